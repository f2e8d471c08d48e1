"""Segmentation models: a ResNet encoder with a light top-down decoder, logits at input resolution.

The encoder is torchvision's ResNet layout (7x7 stride-2 stem, max-pool, four stages of basic blocks with 1x1
projection shortcuts, strides 1/2/2/2) built from our own :class:`~slimcnn.models.cifar_resnet.BasicBlock`
(shortcut "B" is exactly torchvision's block), with fresh weights: nothing is downloaded.

The decoder is FPN-like: a 1x1 lateral conv per stage to ``decoder_channels``, summed top-down with bilinear
upsampling, one 3x3 conv + BN + ReLU, a 1x1 classifier, then bilinear upsampling to the input size.

Like the CIFAR ResNets, the model exposes ``stem(x)``, ``stages`` and ``decode(features, size)`` so that the
feedback-gating wrappers in :mod:`slimcnn.gating` can run the stages themselves::

    >>> from slimcnn.models import create
    >>> m = create("seg_resnet18", num_classes=11)
    >>> m(torch.zeros(1, 3, 180, 240)).shape
    torch.Size([1, 11, 180, 240])
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .cifar_resnet import BasicBlock
from .registry import register


def upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize to ``size`` (H, W); the identity when the size already matches."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class SegDecoder(nn.Module):
    """Top-down decoder over the encoder's stage outputs (lowest stage first)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 64) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.channels = list(in_channels), num_classes, channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1, bias=False) for c in in_channels)
        self.fuse = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        p = self.lateral[-1](features[-1])
        for lat, h in zip(reversed(self.lateral[:-1]), reversed(features[:-1])):
            p = upsample(p, h.shape[-2:]) + lat(h)
        return upsample(self.classifier(self.fuse(p)), size)


class SegResNet(nn.Module):
    """ResNet encoder (``blocks`` per stage, widths 64/128/256/512 times ``width``) + :class:`SegDecoder`."""

    def __init__(self, blocks: Sequence[int] = (2, 2, 2, 2), num_classes: int = 11, width: float = 1.0,
                 decoder_channels: int = 64) -> None:
        super().__init__()
        widths = [max(1, round(w * width)) for w in (64, 128, 256, 512)][: len(blocks)]
        self.conv1 = nn.Conv2d(3, widths[0], 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_planes = widths[0]
        layers = []
        for i, (planes, n) in enumerate(zip(widths, blocks)):
            stage = []
            for j in range(n):
                stage.append(BasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, shortcut="B"))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layers = nn.ModuleList(layers)
        self.decoder = SegDecoder(widths, num_classes, decoder_channels)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(F.relu(self.bn1(self.conv1(x))))

    @property
    def stages(self) -> list[nn.Module]:
        return list(self.layers)

    def decode(self, features: list[torch.Tensor], size: Sequence[int]) -> torch.Tensor:
        """Logits (N, num_classes, *size) from the stage outputs (lowest stage first)."""
        return self.decoder(features, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        features = []
        for stage in self.layers:
            h = stage(h)
            features.append(h)
        return self.decode(features, x.shape[-2:])


@register("seg_resnet18", input_size=(3, 180, 240))
def seg_resnet18(num_classes: int = 11, width: float = 1.0, decoder_channels: int = 64) -> SegResNet:
    """ResNet-18 encoder (2 blocks per stage) + top-down decoder."""
    return SegResNet((2, 2, 2, 2), num_classes, width, decoder_channels)


@register("seg_resnet10", input_size=(3, 180, 240))
def seg_resnet10(num_classes: int = 11, width: float = 1.0, decoder_channels: int = 64) -> SegResNet:
    """ResNet-10 encoder (1 block per stage) + top-down decoder; ``width=0.5`` suits CPU budgets."""
    return SegResNet((1, 1, 1, 1), num_classes, width, decoder_channels)


@register("seg_tiny", input_size=(3, 64, 64))
def seg_tiny(num_classes: int = 11, width: float = 0.125, decoder_channels: int = 16) -> SegResNet:
    """ResNet-10 layout at 1/8 width (8..64 channels): for tests and smoke runs."""
    return SegResNet((1, 1, 1, 1), num_classes, width, decoder_channels)
