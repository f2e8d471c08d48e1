"""CamVid (11 classes + void) from ``../shared/data/camvid``, decoded once into a uint8 cache.

Layout: ``ROOT/<split>/images/<stem>.jpg`` and ``ROOT/<split>/labels/<stem>.png`` (label values 0-10 are the
classes, 11 = void, ignored by the loss and the metrics), splits train / val / test. Decoded (and, with
``size``, resized: bilinear with antialiasing for images, nearest for labels) arrays are cached as ``.npy``
in :func:`~slimcnn.data.cifar10.cache_dir`, keyed by the split folder's path, file list, mtimes and size.

    >>> loaders = camvid_loaders("../shared/data/camvid", batch_size=8, size=(90, 120))  # doctest: +SKIP
    >>> x, y = next(iter(loaders["train"]))  # x: float (8, 3, 90, 120), y: int64 (8, 90, 120)  # doctest: +SKIP
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .cifar10 import DataError, ImageSet, _atomic_save, cache_dir
from .loader import IMAGENET_MEAN, IMAGENET_STD, Loader

CLASSES = ["sky", "building", "pole", "road", "pavement", "tree", "sign_symbol", "fence", "car", "pedestrian",
           "bicyclist"]
VOID = 11
SPLITS = ("train", "val", "test")


def _pairs(split_dir: Path) -> list[tuple[Path, Path]]:
    img_dir, lab_dir = split_dir / "images", split_dir / "labels"
    for d in (img_dir, lab_dir):
        if not d.is_dir():
            raise DataError(f"{d} is missing (expected {split_dir}/images/<stem>.jpg and "
                            f"{split_dir}/labels/<stem>.png)")
    images = {p.stem: p for p in img_dir.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png")}
    if not images:
        raise DataError(f"{img_dir} holds no images")
    labels = {p.stem: p for p in lab_dir.iterdir() if p.suffix.lower() == ".png"}
    missing = sorted(set(images) - set(labels))
    if missing:
        raise DataError(f"{len(missing)} image(s) in {img_dir} have no label in {lab_dir}, e.g. {missing[0]}.png")
    return [(images[s], labels[s]) for s in sorted(images)]


def _key(split_dir: Path, pairs: list[tuple[Path, Path]], size: tuple[int, int] | None) -> str:
    h = hashlib.sha256(f"{split_dir.resolve()}|{size}".encode())
    for img, lab in pairs:
        h.update(f"{img.name}:{img.stat().st_mtime_ns}:{lab.stat().st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def _decode(pairs: list[tuple[Path, Path]], size: tuple[int, int] | None, progress: bool) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image, UnidentifiedImageError

    from ..progress import bar

    xs, ys = [], []
    for img, lab in bar(pairs, desc="decoding camvid", enabled=progress):
        try:
            with Image.open(img) as im:
                x = np.asarray(im.convert("RGB"))
            with Image.open(lab) as im:
                y = np.asarray(im)
        except (UnidentifiedImageError, OSError) as e:
            raise DataError(f"cannot decode {img} or {lab}: {e}") from None
        if y.ndim != 2 or y.shape != x.shape[:2]:
            raise DataError(f"label {lab} is {y.shape}, its image {img} is {x.shape[:2]}: expected a single-channel "
                            "label of the image's size")
        if xs and x.shape != xs[0].shape:
            raise DataError(f"image {img} is {x.shape[1]}x{x.shape[0]}, others are {xs[0].shape[1]}x{xs[0].shape[0]}")
        xs.append(x)
        ys.append(y)
    images, labels = torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys).astype(np.uint8))
    if size is not None and tuple(size) != tuple(images.shape[1:3]):
        images, labels = resize(images, labels, size)
    return images.numpy(), labels.numpy()


def resize(images: torch.Tensor, labels: torch.Tensor, size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize uint8 images (N, H, W, 3) bilinearly (antialiased) and labels (N, H, W) by nearest neighbour."""
    x = F.interpolate(images.permute(0, 3, 1, 2).float(), size=tuple(size), mode="bilinear", align_corners=False,
                      antialias=True)
    x = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()
    y = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].to(torch.uint8)
    return x, y


def load_camvid(root: str | Path, split: str = "train", size: Sequence[int] | None = None, use_cache: bool = True,
                progress: bool = True) -> ImageSet:
    """Split ``train``, ``val`` or ``test`` of CamVid at ``root``: images (N, H, W, 3) uint8, labels (N, H, W)
    uint8 (11 = void), optionally resized to ``size`` = (H, W)."""
    if split not in SPLITS:
        raise DataError(f"split must be one of {', '.join(SPLITS)}; got {split!r}")
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"CamVid path does not exist or is not a folder: {root}")
    split_dir = root / split
    if not split_dir.is_dir():
        raise DataError(f"{root} has no {split}/ folder (expected {root}/{split}/images and {root}/{split}/labels)")
    size_t = None if size is None else (int(size[0]), int(size[1]))
    if size_t is not None and min(size_t) < 1:
        raise DataError(f"size must be two positive integers (H, W); got {size}")
    pairs = _pairs(split_dir)
    key = _key(split_dir, pairs, size_t)
    cdir = cache_dir() / "camvid"
    xf, yf = cdir / f"{key}-x.npy", cdir / f"{key}-y.npy"
    if use_cache and xf.is_file() and yf.is_file():
        return ImageSet(torch.from_numpy(np.load(xf)), torch.from_numpy(np.load(yf)), list(CLASSES))
    x, y = _decode(pairs, size_t, progress)
    if use_cache:
        try:
            cdir.mkdir(parents=True, exist_ok=True)
            _atomic_save(xf, x)
            _atomic_save(yf, y)
        except OSError:
            pass  # a read-only cache only costs speed
    return ImageSet(torch.from_numpy(x), torch.from_numpy(y), list(CLASSES))


class SegLoader(Loader):
    """Batches ``(x, y)``: x float (N, 3, H, W) normalised, y int64 (N, H, W) with 11 = void.

    ``augment``: random horizontal flip; with ``scale=(lo, hi)`` also a random zoom by a factor in [lo, hi] and a
    random crop back to (H, W) (zoom-out borders become void). Image and label get the same transform.
    """

    def __init__(self, data: ImageSet, batch_size: int = 8, shuffle: bool = False, augment: bool = False,
                 scale: Sequence[float] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, seed: int = 0, rank: int = 0, world_size: int = 1,
                 drop_last: bool = False) -> None:
        # the base loader only batches and normalises; the paired augmentation happens here, after normalising
        # (flips and bilinear resampling with border padding commute with a per-channel affine map)
        super().__init__(data, batch_size, shuffle, False, mean, std, seed, rank, world_size, drop_last)
        if scale is not None and not (0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi; got {scale}")
        self.augment_pairs = augment
        self.scale = None if scale is None else (float(scale[0]), float(scale[1]))

    def _augment_pair(self, x: torch.Tensor, y: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        n = x.shape[0]
        flip = torch.rand(n, generator=g) < 0.5
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
        y = torch.where(flip.view(n, 1, 1), y.flip(2), y)
        if self.scale is None:
            return x, y
        lo, hi = self.scale
        s = lo + (hi - lo) * torch.rand(n, generator=g)
        # output pixel u in [-1, 1] reads input at u / s + shift; the shift keeps the window inside the image
        # when zooming in, and places the (smaller) image anywhere inside the output when zooming out
        room = (1 - 1 / s).abs()
        shift = (torch.rand(n, 2, generator=g) * 2 - 1) * room.view(n, 1)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0] = theta[:, 1, 1] = 1 / s
        theta[:, :, 2] = shift
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        # labels shifted by one so that zero padding (outside the image) becomes -1, then void
        yy = F.grid_sample(y[:, None].float() + 1, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        y = (yy[:, 0] - 1).round().long()
        return x, torch.where(y < 0, torch.full_like(y, VOID), y)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 31 + self.rank + 1)
        for x, y in super().__iter__():
            y = y.long()
            yield self._augment_pair(x, y, g) if self.augment_pairs else (x, y)


def _limit(n: int, limit: int | None, seed: int) -> torch.Tensor | None:
    """A fixed seeded subset of ``limit`` of ``n`` frames, in file order (None: all)."""
    if not limit or limit >= n:
        return None
    if limit < 1:
        raise DataError(f"subset size must be >= 1, got {limit}")
    g = torch.Generator().manual_seed(seed)
    return torch.sort(torch.randperm(n, generator=g)[:limit]).values


def camvid_loaders(root: str | Path, batch_size: int = 8, size: Sequence[int] | None = None,
                   train_limit: int | None = None, test_limit: int | None = None, seed: int = 0, rank: int = 0,
                   world_size: int = 1, splits: Sequence[str] = ("train", "val", "test"), augment: bool = True,
                   scale: Sequence[float] | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                   std: Sequence[float] = IMAGENET_STD) -> dict[str, SegLoader]:
    """Loaders for the requested CamVid splits. ``train_limit`` / ``test_limit`` (the latter for val and test)
    pick a fixed seeded subset of frames; the train loader shuffles, augments and is sharded over ranks."""
    out = {}
    for split in splits:
        data = load_camvid(root, split, size)
        idx = _limit(len(data), train_limit if split == "train" else test_limit, seed)
        if idx is not None:
            data = data.subset(idx)
        train = split == "train"
        out[split] = SegLoader(data, batch_size, shuffle=train, augment=train and augment, scale=scale, mean=mean,
                               std=std, seed=seed, rank=rank, world_size=world_size if train else 1)
    return out
