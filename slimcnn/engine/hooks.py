"""What the training loop asks of a compression method: a few hooks around each step. A protocol, so the loop
needs nothing from :mod:`slimcnn.methods` (every :class:`~slimcnn.methods.base.Method` has these hooks, and so
can any object a user passes)."""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class TrainingHooks(Protocol):
    """Called by :func:`slimcnn.engine.train` in this order every step: ``before_forward``, the forward and
    ``loss`` (added to the task loss), the backward, ``after_backward``, the optimiser step, ``after_step``.
    ``state_dict`` goes into each checkpoint and ``load_state_dict`` restores it on resume; ``name`` is checked on
    resume."""

    name: str

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]: ...

    def before_forward(self, model: nn.Module, step: int) -> None: ...

    def loss(self, model: nn.Module) -> torch.Tensor | float: ...

    def after_backward(self, model: nn.Module, step: int) -> None: ...

    def after_step(self, model: nn.Module, step: int) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NoHooks:
    """Plain training: every parameter that requires a gradient in one group, no extra loss, nothing to save.
    Its ``name`` is the one checkpoints of plain runs have always recorded."""

    name = "base"

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr, "weight_decay": weight_decay}]

    def before_forward(self, model: nn.Module, step: int) -> None:
        pass

    def loss(self, model: nn.Module) -> torch.Tensor | float:
        return 0.0

    def after_backward(self, model: nn.Module, step: int) -> None:
        pass

    def after_step(self, model: nn.Module, step: int) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
