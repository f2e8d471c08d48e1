"""C-SGD's update (:mod:`slimcnn.methods.csgd`): the centripetal gradient, the strength rule that makes clusters
meet within a training budget, and the per-tensor plan the step applies.

Apart from the method because they are formulas on tensors and learning rates alone (no hooks, no training
state): the identity the step relies on (``M G + eta P + eps (P - M P)``) and the ``eps`` budget rule can be
checked here without a model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from .clustering import cluster_means


# -------------------------------------------------------------------------------------------- the update
def centripetal_grad(grad: torch.Tensor, param: torch.Tensor, ids: torch.Tensor, eps: float,
                     eta: float | torch.Tensor = 0.0, inv_counts: torch.Tensor | None = None) -> torch.Tensor:
    """The centripetal gradient ``M G + eta P + eps (P - M P)`` over the rows (dim 0) of ``param``.

    ``M`` averages rows with the same cluster id; ``eta`` may be a scalar or a per-row (n, 1) tensor.

    >>> p = torch.tensor([[1.0], [3.0]]); g = torch.tensor([[0.5], [-0.5]])
    >>> centripetal_grad(g, p, torch.tensor([0, 0]), eps=0.5)   # mean grad 0, pull towards the mean 2
    tensor([[-0.5000],
            [ 0.5000]])
    """
    return _centripetal(grad, param, ids, inv_counts, eps, eta + eps)


def _centripetal(grad: torch.Tensor, param: torch.Tensor, ids: torch.Tensor, inv_counts: torch.Tensor | None,
                 eps: float, coef: float | torch.Tensor) -> torch.Tensor:
    # M G + eta P + eps (P - M P) = M (G - eps P) + (eps + eta) P: one index_add per tensor, no loop over clusters
    n = param.shape[0]
    p = param.detach().reshape(n, -1)
    a = torch.add(grad.reshape(n, -1), p, alpha=-eps)
    out = cluster_means(a, ids, inv_counts).index_select(0, ids)
    out = out.addcmul_(coef, p) if isinstance(coef, torch.Tensor) else out.add_(p, alpha=coef)
    return out.view_as(grad)


# --------------------------------------------------------------------------------------------- strength
def default_eps(lr_sum: float, max_lr: float, eta: float = 0.0, tol: float = 1e-6, vector_scale: float = 0.1,
                max_step: float = 1.0) -> float:
    """Centripetal strength that shrinks every intra-cluster difference by ``tol`` over a run.

    ``lr_sum`` is the sum of the learning rate over the steps (mean lr x steps). The vectors (strength
    ``vector_scale * eps``) are the slowest: ``eps = ln(1/tol) / (vector_scale * lr_sum)``, capped so that
    ``max_lr * (eta + eps) <= max_step``.

    >>> round(default_eps(lr_sum=0.025 * 3910, max_lr=0.05), 3)   # 10 cosine epochs of ResNet-56 at lr 0.05
    1.413
    """
    if lr_sum <= 0 or max_lr <= 0:
        raise ValueError(f"the learning-rate budget must be positive (sum {lr_sum}, max {max_lr})")
    eps = math.log(1.0 / tol) / (min(vector_scale, 1.0) * lr_sum)
    return max(0.0, min(eps, max_step / max_lr - eta))


def schedule_lr(lr: float, schedule: str, total_steps: int, warmup_steps: int = 0,
                milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1) -> Callable[[int], float]:
    """A learning-rate function step -> lr for a named schedule: the engine's own
    (:class:`slimcnn.engine.trainer.Schedule`: linear warm-up, then "cosine", "step" (x ``gamma`` at ``milestones``,
    fractions of the run) or "constant"), times ``lr`` as the optimiser applies it.

    >>> f = schedule_lr(0.1, "step", 100)
    >>> f(0), round(f(60), 4), round(f(80), 4)
    (0.1, 0.01, 0.001)
    """
    from ..engine.trainer import SCHEDULES, Schedule

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} for C-SGD's strength rule; pass lr_at=... instead")
    multiplier = Schedule.of_run(schedule, total_steps, warmup_steps, milestones, gamma)
    return lambda step: lr * multiplier(step)


# ------------------------------------------------------------------------------------- one tensor's plan
@dataclass
class TensorPlan:
    """How one parameter tensor is transformed: one cluster id per row (rows outside clusters: singletons)."""

    name: str
    vector: bool
    ids: torch.Tensor  # (rows,)
    inv_counts: torch.Tensor  # (clusters, 1)
    eta_rows: torch.Tensor  # (rows, 1): decay per row
    param: nn.Parameter | None = None
    coef: torch.Tensor | None = None  # eps_t + eta_rows, for the current eps


def tensor_plan(name: str, param: nn.Parameter, parts: list[tuple[int, torch.Tensor, str]],
                eta: float) -> TensorPlan:
    """The plan of tensor ``name`` whose rows hold the channels of the groups in ``parts``, each (row offset,
    cluster ids, group key); ``eta`` is the weight decay the step carries for the tensor."""
    n = param.shape[0]
    labels: list[Any] = list(range(n))  # rows outside any cluster stay singletons
    clustered = torch.zeros(n, dtype=torch.bool)
    for off, ids, key in parts:
        for i, c in enumerate(ids.tolist()):
            labels[off + i] = (key, c)
        clustered[off: off + len(ids)] = True
    order: dict[Any, int] = {}
    tid = torch.tensor([order.setdefault(lab, len(order)) for lab in labels], dtype=torch.long)
    vector = param.dim() == 1
    # vectors: no decay inside clusters (the spec); rows outside clusters keep the decay the optimiser
    # would have given them
    eta_rows = torch.full((n, 1), eta, dtype=param.dtype)
    if vector:
        eta_rows[clustered] = 0.0
    counts = torch.bincount(tid, minlength=len(order)).to(param.dtype).unsqueeze(1)
    return TensorPlan(name, vector, tid.to(param.device), (1.0 / counts).to(param.device),
                      eta_rows.to(param.device), param)
