"""What the library accepts as a model's example input: a tensor (a batch), or a list or tuple of tensors (one per
image: torchvision's detectors take a list of images of any size). Tracing, the surgery checks and the MACs
counter read inputs here, so neither needs to know which kind a model takes.

>>> import torch
>>> x, images = torch.zeros(2, 3, 8, 8), [torch.zeros(3, 8, 8), torch.zeros(3, 6, 6)]
>>> batch_size(x), batch_size(images), tuple(sample_shape(images))
(2, 2, (3, 8, 8))
>>> [tuple(t.shape) for t in doubled(images[:1])]     # the image and its mirror image
[(3, 8, 8), (3, 8, 8)]
"""
from __future__ import annotations

from typing import Any, Callable, Union

import torch

#: an example input: a batch tensor, or a list / tuple of per-image tensors
Input = Union[torch.Tensor, list, tuple]


def input_tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor of ``x`` (a tensor, or a list / tuple of them, at any depth), in order."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in input_tensors(item)]
    return []


def map_input(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``x`` with ``fn`` applied to each of its tensors, its structure kept."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, (list, tuple)):
        return type(x)(map_input(item, fn) for item in x)
    return x


def check_input(x: Any) -> None:
    """ValueError unless ``x`` is a tensor or a non-empty list / tuple holding tensors."""
    if not input_tensors(x):
        raise ValueError(f"the example input must be a tensor or a list of tensors (one per image), got "
                         f"{type(x).__name__}")


def input_device(x: Any) -> torch.device:
    """The device of ``x``'s first tensor (CPU when it holds none)."""
    tensors = input_tensors(x)
    return tensors[0].device if tensors else torch.device("cpu")


def batch_size(x: Any) -> int:
    """Images in ``x``: a tensor's first dimension, a list's length."""
    if isinstance(x, torch.Tensor):
        return int(x.shape[0]) if x.dim() else 1
    return len(x)


def sample_shape(x: Any) -> tuple[int, ...]:
    """The shape of one image of ``x`` (a list's first)."""
    if isinstance(x, torch.Tensor):
        return tuple(x.shape[1:])
    first = input_tensors(x)
    return tuple(first[0].shape) if first else ()


def traceable(x: Any) -> Any:
    """A copy of ``x`` whose tensors require grad, so that every op on them gets an autograd node (tracing needs
    one even behind frozen weights); integer tensors stay as they are."""
    return map_input(x, lambda t: t.detach().clone().requires_grad_(t.is_floating_point()))


def doubled(x: Any) -> Any | None:
    """A batch of two made from a batch of one (the sample and its mirror image), or None when ``x`` holds more
    than one image or no image that can be mirrored."""
    if isinstance(x, torch.Tensor):
        return torch.cat([x, x.flip(-1)]) if x.dim() >= 2 and x.shape[0] == 1 else None
    if isinstance(x, (list, tuple)) and len(x) == 1 and isinstance(x[0], torch.Tensor) and x[0].dim() >= 1:
        return type(x)([x[0], x[0].flip(-1)])
    return None
