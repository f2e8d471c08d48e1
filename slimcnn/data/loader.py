"""A fast in-memory loader over uint8 image tensors: augmentation and normalisation on whole batches.

Per-sample PIL transforms cost more than a ResNet-20 step on 2 CPU cores; cropping and flipping a uint8
batch tensor costs almost nothing. Sharding follows ``DistributedSampler``: every rank sees a disjoint,
equal-sized slice of the same seeded permutation.
"""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from .cifar10 import ImageSet

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Loader:
    """Iterate ``(x, y)`` batches: x float (N, 3, H, W) normalised, y int64.

    ``augment`` enables pad-4 random crop and horizontal flip. Call ``set_epoch(e)`` each epoch so that the
    shuffle (and augmentation) differs per epoch yet is reproducible from ``seed``.
    """

    def __init__(self, data: ImageSet, batch_size: int = 128, shuffle: bool = False, augment: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD, seed: int = 0,
                 rank: int = 0, world_size: int = 1, drop_last: bool = False, pad: int = 4) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.shuffle, self.augment = data, batch_size, shuffle, augment
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255.0
        self.seed, self.rank, self.world_size, self.drop_last, self.pad = seed, rank, world_size, drop_last, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _indices(self) -> torch.Tensor:
        n = len(self.data)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            idx = torch.randperm(n, generator=g)
        else:
            idx = torch.arange(n)
        if self.world_size > 1:  # pad to a multiple of world_size, then take this rank's stride
            per = -(-n // self.world_size)
            idx = torch.cat([idx, idx[: per * self.world_size - n]])[self.rank:: self.world_size]
        return idx

    def __len__(self) -> int:
        n = len(self._indices())
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, _, h, w = x.shape
        p = self.pad
        padded = F.pad(x, (p, p, p, p))
        dy = torch.randint(0, 2 * p + 1, (n,), generator=g)
        dx = torch.randint(0, 2 * p + 1, (n,), generator=g)
        rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # (n, h)
        cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # (n, w)
        flip = torch.rand(n, generator=g) < 0.5
        cols = torch.where(flip.view(n, 1), cols.flip(1), cols)
        bidx = torch.arange(n).view(n, 1, 1)
        out = padded.permute(0, 2, 3, 1)[bidx, rows.view(n, h, 1), cols.view(n, 1, w)]  # (n, h, w, c)
        return out.permute(0, 3, 1, 2)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        idx = self._indices()
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch * 31 + self.rank + 1)
        stop = len(idx) - (len(idx) % self.batch_size if self.drop_last else 0)
        for s in range(0, stop, self.batch_size):
            b = idx[s: s + self.batch_size]
            x = self.data.images[b].permute(0, 3, 1, 2).float()
            if self.augment:
                x = self._augment(x, g)
            yield (x - self.mean) / self.std, self.data.labels[b]
