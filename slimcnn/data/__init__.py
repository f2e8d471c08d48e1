"""Data: CIFAR-10 (pickle or image folder, uint8 cache) with a fast tensor loader, any other class-per-folder image
tree through torchvision (:mod:`slimcnn.data.folder`), class-balanced subsets."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .cifar10 import CLASSES, DataError, ImageSet, balanced_subset, cache_dir, load_cifar10
from .embedded import load_demo
from .folder import FolderLoader, folder_loaders, is_cifar_layout
from .loader import IMAGENET_MEAN, IMAGENET_STD, Loader

__all__ = ["CLASSES", "DataError", "ImageSet", "Loader", "FolderLoader", "balanced_subset", "cache_dir",
           "load_cifar10", "IMAGENET_MEAN", "IMAGENET_STD", "cifar10_loaders", "folder_loaders",
           "classification_loaders", "is_cifar_layout", "loader_classes", "load_demo", "train_val_indices",
           "VAL_SIZE"]


#: images in the validation split carved from CIFAR-10's training images (see :func:`train_val_indices`)
VAL_SIZE = 5000


def train_val_indices(labels, train_limit: int | None, seed: int = 0,
                      val_size: int = VAL_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices of the training subset and of the validation split, disjoint: the training subset is the seeded
    class-balanced ``train_limit`` (all images when None, less the validation split); the validation split is a
    seeded class-balanced ``val_size`` of the images *not* in it, so choosing on it never reads a training image.

    >>> labels = torch.arange(100) % 10
    >>> tr, va = train_val_indices(labels, 50, val_size=20)
    >>> len(tr), len(va), len(set(tr.tolist()) & set(va.tolist())), torch.bincount(labels[va]).tolist()
    (50, 20, 0, [2, 2, 2, 2, 2, 2, 2, 2, 2, 2])
    >>> tr, va = train_val_indices(labels, None, val_size=20)
    >>> len(tr), len(va)
    (80, 20)
    """
    everything = torch.arange(len(labels))
    train = balanced_subset(labels, train_limit, seed) if train_limit else None
    rest = everything if train is None else everything[~torch.isin(everything, train)]
    if len(rest) < val_size:
        raise DataError(f"a validation split of {val_size} images needs that many training images outside the "
                        f"training subset; only {len(rest)} are left (lower --train-limit)")
    val = rest[balanced_subset(labels[rest], val_size, seed + 1)]
    if train is None:
        train = everything[~torch.isin(everything, val)]
    return train, torch.sort(val).values


def cifar10_loaders(root, batch_size: int = 128, train_limit: int | None = None, test_limit: int | None = None,
                    seed: int = 0, rank: int = 0, world_size: int = 1, augment: bool = True,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, splits=("train", "test"),
                    val_size: int = VAL_SIZE) -> dict[str, Loader]:
    """Loaders for the requested splits of CIFAR-10 at ``root``; ``*_limit`` picks a seeded class-balanced subset.
    ``"val"`` among ``splits``: a validation split of ``val_size`` images carved from the training images outside
    the training subset (:func:`train_val_indices`; with no ``train_limit`` the training split then leaves those
    images out)."""
    out = {}
    for split in splits:
        data = load_cifar10(root, "test" if split == "test" else "train")
        if split == "test" and test_limit:
            data = data.subset(balanced_subset(data.labels, test_limit, seed))
        elif split == "val" or (split == "train" and "val" in splits):
            train_idx, val_idx = train_val_indices(data.labels, train_limit, seed, val_size)
            data = data.subset(val_idx if split == "val" else train_idx)
        elif split == "train" and train_limit:
            data = data.subset(balanced_subset(data.labels, train_limit, seed))
        train = split == "train"
        out[split] = Loader(data, batch_size, shuffle=train, augment=train and augment, mean=mean, std=std,
                            seed=seed, rank=rank, world_size=world_size if train else 1, drop_last=False)
    return out


def classification_loaders(root, batch_size: int = 128, train_limit: int | None = None,
                           test_limit: int | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                           augment: bool = True, mean=IMAGENET_MEAN, std=IMAGENET_STD, splits=("train", "test"),
                           input_size: int | Sequence[int] | None = None, workers: int = 0,
                           skip_bad_images: bool = False) -> dict[str, Loader | FolderLoader]:
    """Loaders for any classification data at ``root``: the CIFAR-10 layout goes to the fast in-memory path
    (unless ``input_size`` asks for another size than 32), any other class-per-folder tree to
    :func:`folder_loaders` at ``input_size`` (default 224)."""
    size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size or ())
    if (not size or size == (32, 32)) and is_cifar_layout(root):
        return cifar10_loaders(root, batch_size, train_limit, test_limit, seed, rank, world_size, augment, mean, std,
                               splits)
    return folder_loaders(root, batch_size, train_limit, test_limit, seed, rank, world_size, size or 224, mean, std,
                          workers, skip_bad_images, splits, augment)


def loader_classes(loader: Loader | FolderLoader) -> list[str]:
    """The class names a loader's labels index."""
    return list(loader.classes) if hasattr(loader, "classes") else list(loader.data.classes)
