"""Data: CIFAR-10 (pickle or image folder, uint8 cache) with a fast tensor loader, any other class-per-folder image
tree through torchvision (:mod:`slimcnn.data.folder`), class-balanced subsets."""
from __future__ import annotations

from collections.abc import Sequence

from .cifar10 import CLASSES, DataError, ImageSet, balanced_subset, cache_dir, load_cifar10
from .embedded import load_demo
from .folder import FolderLoader, folder_loaders, is_cifar_layout
from .loader import IMAGENET_MEAN, IMAGENET_STD, Loader

__all__ = ["CLASSES", "DataError", "ImageSet", "Loader", "FolderLoader", "balanced_subset", "cache_dir",
           "load_cifar10", "IMAGENET_MEAN", "IMAGENET_STD", "cifar10_loaders", "folder_loaders",
           "classification_loaders", "is_cifar_layout", "loader_classes", "load_demo"]


def cifar10_loaders(root, batch_size: int = 128, train_limit: int | None = None, test_limit: int | None = None,
                    seed: int = 0, rank: int = 0, world_size: int = 1, augment: bool = True,
                    mean=IMAGENET_MEAN, std=IMAGENET_STD, splits=("train", "test")) -> dict[str, Loader]:
    """Loaders for the requested splits of CIFAR-10 at ``root``; ``*_limit`` picks a seeded class-balanced subset."""
    out = {}
    for split in splits:
        data = load_cifar10(root, split)
        limit = train_limit if split == "train" else test_limit
        if limit:
            data = data.subset(balanced_subset(data.labels, limit, seed))
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
