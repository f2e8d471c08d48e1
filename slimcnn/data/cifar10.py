"""CIFAR-10 from the torchvision pickle layout or an image-folder layout, decoded once into a uint8 cache.

Either layout is detected automatically:
- pickle: ``ROOT/cifar-10-batches-py/{data_batch_1..5,test_batch}`` (or those files directly in ROOT);
- image folder: ``ROOT/{train,test}/<class>/*.{jpg,png}`` (as ``../shared/data/cifar10-jpeg``).
Decoding 50,000 JPEGs takes a while, so the decoded uint8 arrays are cached (``.npy``, no pickle) in
``$SLIMCNN_CACHE`` (default ``~/.cache/slimcnn``), keyed by the folder's path, size and mtimes.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp"}


class DataError(ValueError):
    """A data set path is missing, empty or not in a layout we read."""


@dataclass
class ImageSet:
    """Decoded images (N, H, W, 3) uint8 and labels (N,) int64, with the class names."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: torch.Tensor | list[int]) -> "ImageSet":
        idx = torch.as_tensor(indices, dtype=torch.long)
        return ImageSet(self.images[idx], self.labels[idx], self.classes)


def cache_dir() -> Path:
    return Path(os.environ.get("SLIMCNN_CACHE", Path.home() / ".cache" / "slimcnn"))


def _pickle_dir(root: Path) -> Path | None:
    for d in (root / "cifar-10-batches-py", root):
        if (d / "test_batch").is_file() and (d / "data_batch_1").is_file():
            return d
    return None


def _read_pickle(d: Path, split: str) -> ImageSet:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for n in names:
        # The official CIFAR distribution is a pickle of numpy arrays; it is the only pickle we ever read,
        # and only when the user points us at that layout explicitly.
        with open(d / n, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
    return ImageSet(torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys)), list(CLASSES))


def _folder_files(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image>.jpg)")
    files = []
    for ci, c in enumerate(classes):
        for p in sorted((split_dir / c).iterdir()):
            if p.suffix.lower() in IMAGE_EXTS:
                files.append((p, ci))
    if not files:
        raise DataError(f"{split_dir} has class folders but no images ({', '.join(sorted(IMAGE_EXTS))})")
    return classes, files


def _decode_folder(split_dir: Path, progress: bool = True) -> ImageSet:
    from PIL import Image, UnidentifiedImageError

    from ..progress import bar

    classes, files = _folder_files(split_dir)
    imgs = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    first = None
    for i, (p, _) in enumerate(bar(files, desc=f"decoding {split_dir.name}", enabled=progress)):
        try:
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB"))
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot decode image {p}: {e}") from None
        if first is None:
            first = a.shape
            if a.shape != (32, 32, 3):
                imgs = np.empty((len(files), *a.shape), dtype=np.uint8)
        if a.shape != first:
            raise DataError(f"image {p} is {a.shape[1]}x{a.shape[0]}, others are {first[1]}x{first[0]}")
        imgs[i] = a
    labels = np.array([c for _, c in files], dtype=np.int64)
    return ImageSet(torch.from_numpy(imgs), torch.from_numpy(labels), classes)


def _folder_key(split_dir: Path) -> str:
    st = split_dir.stat()
    h = hashlib.sha256(str(split_dir.resolve()).encode())
    for c in sorted(split_dir.iterdir()):
        if c.is_dir():
            cs = c.stat()
            h.update(f"{c.name}:{cs.st_mtime_ns}:{len(os.listdir(c))}".encode())
    h.update(str(st.st_mtime_ns).encode())
    return h.hexdigest()[:16]


def _atomic_save(path: Path, arr: np.ndarray) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    os.replace(tmp, path)


def load_cifar10(root: str | Path, split: str = "train", use_cache: bool = True, progress: bool = True) -> ImageSet:
    """Load split ``train`` or ``test`` of CIFAR-10 at ``root`` (layout detected automatically)."""
    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    pd = _pickle_dir(root)
    if pd is not None:
        return _read_pickle(pd, split)
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{root} is neither the CIFAR-10 pickle layout (cifar-10-batches-py/) nor an image folder "
                        f"with {split}/<class>/*.jpg")
    key = _folder_key(split_dir)
    cdir = cache_dir() / "cifar10"
    xi, yi = cdir / f"{key}-x.npy", cdir / f"{key}-y.npy"
    classes_file = cdir / f"{key}-classes.txt"
    if use_cache and xi.is_file() and yi.is_file() and classes_file.is_file():
        return ImageSet(torch.from_numpy(np.load(xi)), torch.from_numpy(np.load(yi)),
                        classes_file.read_text().split("\n"))
    data = _decode_folder(split_dir, progress)
    if use_cache:
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            _atomic_save(xi, data.images.numpy())
            _atomic_save(yi, data.labels.numpy())
            classes_file.write_text("\n".join(data.classes))
        except OSError:
            pass  # a read-only cache only costs speed
    return data


def balanced_subset(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Indices of a fixed, class-balanced subset of ``n`` items (same seed, same subset), in ascending order."""
    classes = torch.unique(labels)
    if n >= len(labels):
        return torch.arange(len(labels))
    if n < 1:
        raise DataError(f"subset size must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    per = [n // len(classes) + (1 if i < n % len(classes) else 0) for i in range(len(classes))]
    chosen = []
    for c, k in zip(classes.tolist(), per):
        idx = torch.nonzero(labels == c).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.sort(torch.cat(chosen)).values
