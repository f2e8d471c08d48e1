"""What a model's output means to the library: one rule for reading the prediction, one for the loss of an
iterative model's outputs. Training, evaluation, distillation and the surgery checks all read outputs here.

The rule: a tensor is the prediction; a mapping (torchvision's segmentation models: ``{"out": ..., "aux": ...}``)
holds it as its first value; a list or tuple is an iterative model's outputs, one per iteration (the gating models
with ``loss_all_iterations``, in training), and the prediction is the last one, the answer after every iteration.

>>> import torch
>>> a, b = torch.zeros(1, 3), torch.ones(1, 3)
>>> [final_output(o).sum().item() for o in (b, {"out": b, "aux": a}, [a, b])]
[3.0, 3.0, 3.0]
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch


def final_output(out: Any) -> torch.Tensor:
    """The prediction in a model's output ``out`` (see the module docstring for the rule); TypeError if there is
    no tensor to read."""
    if isinstance(out, Mapping) and out:
        out = next(iter(out.values()))
    elif isinstance(out, (list, tuple)) and out:
        out = out[-1]
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"cannot read a prediction tensor from a model output of type {type(out).__name__}")
    return out


def iteration_loss(output: Any, target: torch.Tensor,
                   criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The loss of ``output``: the mean of ``criterion`` over an iterative model's outputs (a list or tuple, one per
    iteration, so every iteration learns to answer), else ``criterion`` on its :func:`final_output`.

    >>> import torch.nn.functional as F
    >>> y = torch.tensor([0])
    >>> x = torch.tensor([[2.0, 0.0]])
    >>> iteration_loss([x, x], y, F.cross_entropy).item() == F.cross_entropy(x, y).item()
    True
    """
    if isinstance(output, (list, tuple)):
        return sum(criterion(o, target) for o in output) / len(output)
    return criterion(final_output(output), target)
