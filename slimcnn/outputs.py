"""What a model's output means to the library: one rule for reading the prediction, one for the loss of an
iterative model's outputs, and one for listing every tensor of an output of any structure. Training, evaluation,
distillation and the surgery checks all read outputs here.

The rule: a tensor is the prediction; a mapping (torchvision's segmentation models: ``{"out": ..., "aux": ...}``)
holds it as its first value; a list or tuple is an iterative model's outputs, one per iteration (the gating models
with ``loss_all_iterations``, in training), and the prediction is the last one, the answer after every iteration.

>>> import torch
>>> a, b = torch.zeros(1, 3), torch.ones(1, 3)
>>> [final_output(o).sum().item() for o in (b, {"out": b, "aux": a}, [a, b])]
[3.0, 3.0, 3.0]

Tracing and the surgery checks need the whole output instead (a multi-head net or a detector is compared head by
head): :func:`output_items` lists every tensor with its path, at any depth of tuples, lists, mappings, named
tuples and dataclasses.
"""
from __future__ import annotations

import dataclasses
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


def output_items(out: Any, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor in ``out`` with its path (``[1]['box']``), depth first: a mapping's values in its own order,
    list and tuple items (named tuples too) in order, a dataclass's fields in declaration order. The order is
    fixed by the output's structure, so two runs of one model list their tensors alike. Anything else (None,
    numbers, strings) holds no tensor.

    >>> t = torch.zeros(2)
    >>> [p for p, _ in output_items((t, {"box": t, "cls": t}, [t, None]))]
    ['[0]', "[1]['box']", "[1]['cls']", '[2][0]']
    """
    if isinstance(out, torch.Tensor):
        return [(path, out)]
    if isinstance(out, Mapping):
        parts = [(f"{path}[{k!r}]", v) for k, v in out.items()]
    elif isinstance(out, (list, tuple)):
        parts = [(f"{path}[{i}]", v) for i, v in enumerate(out)]
    elif dataclasses.is_dataclass(out) and not isinstance(out, type):
        parts = [(f"{path}.{f.name}", getattr(out, f.name)) for f in dataclasses.fields(out)]
    else:
        return []
    return [item for p, v in parts for item in output_items(v, p)]


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every tensor in ``out``, in :func:`output_items` order.

    >>> [t.shape[0] for t in output_tensors({"a": torch.zeros(1), "b": [torch.zeros(2), torch.zeros(3)]})]
    [1, 2, 3]
    """
    return [t for _, t in output_items(out)]


def check_has_tensor(model: Any, out: Any) -> None:
    """ValueError (one line) when ``out``, ``model``'s output, holds no tensor: the library reads a model by the
    tensors it returns (the prediction, the output checks of surgery)."""
    if not output_items(out):
        raise ValueError(f"{type(model).__name__}'s output holds no tensor (got {type(out).__name__}): slimcnn "
                         "reads a model by the tensors it returns")


def forward_error(model: Any, error: Exception, where: str | None = None) -> ValueError:
    """The one-line error for ``model``'s forward failing on the example input (``where``: the innermost module
    running when it failed, by name; ``""`` is the model itself)."""
    text = str(error).strip().splitlines()
    at = ""
    if where:
        sub = model.get_submodule(where) if hasattr(model, "get_submodule") else None
        at = f" at {where} ({type(sub).__name__})" if sub is not None else f" at {where}"
    return ValueError(f"{type(model).__name__} does not run forward on the example input{at}: "
                      f"{type(error).__name__}: {text[0] if text else '(no message)'}")


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
