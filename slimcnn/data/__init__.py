"""Data: CIFAR-10 (pickle or image folder, uint8 cache), class-balanced subsets, a fast tensor loader."""
from .cifar10 import CLASSES, DataError, ImageSet, balanced_subset, cache_dir, load_cifar10
from .embedded import load_demo
from .loader import IMAGENET_MEAN, IMAGENET_STD, Loader

__all__ = ["CLASSES", "DataError", "ImageSet", "Loader", "balanced_subset", "cache_dir", "load_cifar10",
           "IMAGENET_MEAN", "IMAGENET_STD", "cifar10_loaders", "load_demo"]


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
