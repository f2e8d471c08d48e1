"""VGG-16 with batch norm for 32x32 inputs (the variant used in CIFAR pruning papers: one linear head)."""
from __future__ import annotations

import torch
from torch import nn

from .registry import register

CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]


class CifarVGG(nn.Module):
    def __init__(self, cfg: list, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@register("cifar_vgg16")
def cifar_vgg16(num_classes: int = 10) -> CifarVGG:
    """VGG-16-BN for CIFAR (13 convs, global pool, linear head)."""
    return CifarVGG(CFG16, num_classes)
