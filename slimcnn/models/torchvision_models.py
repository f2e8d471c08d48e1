"""Any torchvision classifier as ``tv:<name>`` (e.g. ``tv:resnet50``), with fresh weights.

Pretrained torchvision weights would need a download, which slimcnn never does at run time: load your own
file with :func:`slimcnn.models.load_checkpoint` instead.
"""
from __future__ import annotations

from torch import nn


def build_torchvision(name: str, num_classes: int = 10, **kwargs) -> nn.Module:
    import torchvision

    available = torchvision.models.list_models(module=torchvision.models)
    if name not in available:
        raise KeyError(f"unknown torchvision classifier {name!r}; known: {', '.join(sorted(available))}")
    if kwargs.get("weights") not in (None, "none"):
        raise ValueError("tv: models are built without downloaded weights; pass weights=None and load a file")
    kwargs.pop("weights", None)
    return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
