"""Any class-per-folder image tree, decoded on the fly by torchvision, for models and data users bring themselves.

Layout: ``ROOT/train/<class>/<image>`` plus ``ROOT/val/<class>/...`` or ``ROOT/test/<class>/...``; images of
any size and of any format Pillow reads. The CIFAR-10 layout (the pickle files, or an image folder of 32x32
images) keeps its fast in-memory path (:mod:`slimcnn.data.cifar10`), because per-image PIL transforms cost more
than a ResNet-20 step there; :func:`classification_loaders` picks the path.

Transforms are the standard ones: train ``RandomResizedCrop`` + horizontal flip, eval ``Resize`` (side / 0.875)
+ ``CenterCrop``, both at ``input_size`` and normalised with ``mean`` / ``std``. Decoding runs in a multi-worker
``DataLoader``; the training split is sharded by a ``DistributedSampler`` (seeded, reshuffled by ``set_epoch``),
so the same loader serves a single process and every torchrun rank.

Broken images are found where they are decoded, in the workers. A worker never raises for one (a worker's
exception reaches the main process as a multi-line traceback): it hands back a marker, and the main process
either stops with one :class:`DataError` naming the file or, with ``skip_bad_images``, drops the image and
counts it (``loader.skipped``).
"""
from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .cifar10 import DataError, _pickle_dir, balanced_subset
from .loader import IMAGENET_MEAN, IMAGENET_STD

#: what a folder image may be: the extensions torchvision's ImageFolder accepts
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
EVAL_SPLITS = ("val", "test")


def _listing(split_dir: Path) -> tuple[list[str], dict[str, int]]:
    """Class names and image count per class of one split; one DataError for a split no loader can use."""
    if not split_dir.is_dir():
        raise DataError(f"{split_dir} is not a folder")
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
    counts = {c: sum(1 for f in os.scandir(split_dir / c) if f.is_file() and f.name.lower().endswith(IMAGE_EXTS))
              for c in classes}
    if not any(counts.values()):
        raise DataError(f"{split_dir} has class folders but no images ({', '.join(IMAGE_EXTS)})")
    empty = [c for c, n in counts.items() if n == 0]
    if empty:
        others = f" (and {len(empty) - 1} more empty class folder(s))" if len(empty) > 1 else ""
        raise DataError(f"class folder {split_dir / empty[0]} has no images{others}: remove it or add images")
    return classes, counts


def eval_split(root: str | Path) -> str:
    """The held-out split of ``root``: ``val`` if present, else ``test``."""
    root = Path(root)
    for name in EVAL_SPLITS:
        if (root / name).is_dir():
            return name
    raise DataError(f"{root} has no val/ or test/ folder beside train/ (expected {root}/val/<class>/<image>)")


def _first_image(split_dir: Path) -> Path | None:
    for c in sorted(p for p in split_dir.iterdir() if p.is_dir()):
        for f in sorted(c.iterdir()):
            if f.suffix.lower() in IMAGE_EXTS:
                return f
    return None


def is_cifar_layout(root: str | Path) -> bool:
    """Whether ``root`` is CIFAR-10 as the in-memory path reads it: the pickle layout, or ``train/`` and ``test/``
    image folders whose first image is 32x32 (the in-memory path then checks that every image is)."""
    root = Path(root)
    if _pickle_dir(root) is not None:
        return True
    if not ((root / "train").is_dir() and (root / "test").is_dir()):
        return False
    first = _first_image(root / "train")
    if first is None:
        return False
    from PIL import Image

    try:
        with Image.open(first) as im:
            return im.size == (32, 32)
    except OSError:
        return False


def _size(input_size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(input_size, int):
        return (input_size, input_size)
    h, w = (int(v) for v in input_size)
    return (h, w)


def transforms(train: bool, input_size: int | Sequence[int], mean: Sequence[float] = IMAGENET_MEAN,
               std: Sequence[float] = IMAGENET_STD):
    """The standard ImageNet-style transforms at ``input_size`` (an int or (H, W))."""
    from torchvision import transforms as T

    size = _size(input_size)
    if train:
        steps = [T.RandomResizedCrop(size, antialias=True), T.RandomHorizontalFlip()]
    else:  # the usual 0.875 crop ratio, 256 -> 224: the shorter side is resized (aspect kept), then the centre crop
        resize = math.ceil(size[0] / 0.875) if size[0] == size[1] else tuple(math.ceil(s / 0.875) for s in size)
        steps = [T.Resize(resize, antialias=True), T.CenterCrop(size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(list(mean), list(std))])


class _Images(torch.utils.data.Dataset):
    """(path, label) pairs decoded with Pillow; a file that fails to decode comes back as a marker, not an
    exception, so that the main process can name it in one line (or skip it)."""

    def __init__(self, samples: list[tuple[str, int]], transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, ...]:
        from PIL import Image

        path, label = self.samples[i]
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except Exception as e:  # noqa: BLE001  (truncated, not an image, unreadable: all the same to the user)
            return (None, label, f"{path}: {type(e).__name__}: {e}")
        return (self.transform(img), label, None)


def _collate(batch: list[tuple[Any, ...]]) -> tuple[torch.Tensor | None, torch.Tensor, list[str]]:
    good = [(x, y) for x, y, err in batch if err is None]
    bad = [err for _, _, err in batch if err is not None]
    if not good:
        return None, torch.empty(0, dtype=torch.long), bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good], dtype=torch.long), bad


class FolderLoader:
    """Iterate ``(x, y)`` batches of an image folder split: x float (N, 3, H, W) normalised, y int64.

    Same contract as :class:`slimcnn.data.Loader` (``set_epoch``, ``len``, ``world_size``, ``classes``), so the
    trainer, evaluator and BN recalibration take either. ``skipped`` lists the images dropped so far (only with
    ``skip_bad_images``; otherwise the first broken image is a :class:`DataError`).
    """

    def __init__(self, samples: list[tuple[str, int]], classes: list[str], transform, batch_size: int = 128,
                 shuffle: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0,
                 skip_bad_images: bool = False) -> None:
        from torch.utils.data import DistributedSampler

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset, self.classes = _Images(samples, transform), classes
        self.batch_size, self.shuffle, self.seed, self.rank, self.world_size = batch_size, shuffle, seed, rank, world_size
        self.workers, self.skip_bad_images = workers, skip_bad_images
        # a DistributedSampler even in one process: a seeded shuffle that set_epoch changes, and the same code
        # path as under torchrun (where each rank takes its own equal-sized slice)
        self.sampler = DistributedSampler(self.dataset, num_replicas=world_size, rank=rank, shuffle=shuffle,
                                          seed=seed, drop_last=False) if shuffle or world_size > 1 else None
        self.epoch = 0
        self.skipped: list[str] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        n = len(self.sampler) if self.sampler is not None else len(self.dataset)
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader

        # augmentation randomness in the workers follows (seed, epoch, rank), so a resumed run sees the same crops
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 31 + self.rank + 1)
        loader = DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler, shuffle=False,
                            num_workers=self.workers, collate_fn=_collate, generator=g,
                            persistent_workers=False, pin_memory=False)
        for x, y, bad in loader:
            if bad:
                if not self.skip_bad_images:
                    raise DataError(f"cannot decode image {bad[0]} (pass --skip-bad-images to skip and count "
                                    "broken images)")
                self.skipped.extend(b for b in bad if b not in self.skipped)
            if x is not None:
                yield x, y


def folder_loaders(root: str | Path, batch_size: int = 128, train_limit: int | None = None,
                   test_limit: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                   input_size: int | Sequence[int] = 224, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD, workers: int = 0, skip_bad_images: bool = False,
                   splits: Sequence[str] = ("train", "test"), augment: bool = True) -> dict[str, FolderLoader]:
    """Loaders of an image folder, keyed ``train`` and ``test`` (the latter reads ``val/`` if present, else
    ``test/``). ``*_limit`` picks a seeded, class-balanced subset. The training split is sharded over
    ``world_size`` ranks; the held-out split is not (every rank evaluates all of it, as with CIFAR-10)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path does not exist: {root}")
    if not root.is_dir():
        raise DataError(f"data path is not a folder: {root}")
    if not (root / "train").is_dir():
        raise DataError(f"{root} is not an image folder: expected {root}/train/<class>/<image> and "
                        f"{root}/val/<class>/<image> (or test/)")
    out: dict[str, FolderLoader] = {}
    train_classes, _ = _listing(root / "train")  # the class list (and label order) both splits share
    for split in splits:
        folder = root / ("train" if split == "train" else eval_split(root))
        classes, _ = _listing(folder)
        if classes != train_classes:
            odd = sorted(set(train_classes) ^ set(classes))
            raise DataError(f"{folder} and {root / 'train'} have different class folders ({', '.join(odd[:5])}): "
                            "both splits need the same classes")
        samples = [(str(f.path), ci) for ci, c in enumerate(classes)
                   for f in sorted(os.scandir(folder / c), key=lambda e: e.name)
                   if f.is_file() and f.name.lower().endswith(IMAGE_EXTS)]
        limit = train_limit if split == "train" else test_limit
        if limit:
            labels = torch.tensor([y for _, y in samples])
            samples = [samples[i] for i in balanced_subset(labels, limit, seed).tolist()]
        train = split == "train"
        out[split] = FolderLoader(samples, classes, transforms(train and augment, input_size, mean, std), batch_size,
                                  shuffle=train, seed=seed, rank=rank, world_size=world_size if train else 1,
                                  workers=workers, skip_bad_images=skip_bad_images)
    return out
