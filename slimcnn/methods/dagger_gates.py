"""Dagger's gates (:mod:`slimcnn.methods.dagger`): the per-channel weight descriptors, the Dagger module that maps
them to gate logits, the straight-through gate, the temperature schedule and the FLOPs regulariser.

Apart from the method because these are functions of the weights and of the Dagger module alone (no hooks, no
search state): the gates' mathematics can be read and tested here, and the method only drives it (hooks on the
consumers, dual ascent on lambda, pruning at finalize).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..graph.handlers import handler_for, member_module
from ..importance import group_rows

FEATURES = ("l1", "l2", "cos", "gamma", "beta", "group_l2")
_FILTER_FEATURES = ("l1", "l2", "cos")
_BN_FEATURES = ("gamma", "beta")
_EPS = 1e-8


# ----------------------------------------------------------------------------------------------- descriptors

def _normalise(x: torch.Tensor, how: str) -> torch.Tensor:
    """Normalise the columns of ``x`` (channels x features) across channels."""
    if how == "zscore":
        return (x - x.mean(0, keepdim=True)) / (x.std(0, unbiased=False, keepdim=True) + _EPS)
    if how == "max":
        return x / (x.abs().amax(0, keepdim=True) + _EPS)
    if how == "none":
        return x
    raise ValueError(f"normalize must be 'zscore', 'max' or 'none', got {how!r}")


def _filter_rows(module: nn.Module) -> torch.Tensor | None:
    """The module's filters as rows (out_channels x fan_in), or None for modules without weights (shortcuts)."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() < 2:
        return None
    layer = handler_for(module)
    if layer is not None:
        w = layer.out_first(module, w)  # a transposed conv stores (in, out, ...)
    return w.flatten(1)


def channel_descriptors(model: nn.Module, group: Any, features: Sequence[str] = FEATURES,
                        normalize: str = "zscore", detach: bool = True) -> torch.Tensor:
    """Per-channel weight descriptors of one channel group: a ``(group.size, len(features))`` tensor.

    ``group`` is a :class:`slimcnn.graph.ChannelGroup` (anything with ``size`` and ``members`` of
    ``(module, role, offset)``). Only the weights of the group's members are read.

    >>> g = channel_groups(model, x)[0]                  # doctest: +SKIP
    >>> channel_descriptors(model, g).shape              # doctest: +SKIP
    torch.Size([16, 5])
    """
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise ValueError(f"unknown descriptor feature(s) {unknown}; known: {', '.join(FEATURES)}")
    size = group.size
    per_feature: dict[str, list[torch.Tensor]] = {f: [] for f in FEATURES}
    for member in group.members:
        module = member_module(model, member.module)
        sl = slice(member.offset, member.offset + size)
        if member.role in ("out", "dw"):
            rows = _filter_rows(module)
            if rows is None:
                continue
            rows = rows.detach() if detach else rows
            mine = rows[sl]
            stats = {"l1": mine.abs().mean(1), "l2": mine.pow(2).mean(1).sqrt(),
                     "cos": F.cosine_similarity(mine, rows.mean(0, keepdim=True), dim=1, eps=_EPS)}
            for f in _FILTER_FEATURES:
                per_feature[f].append(_normalise(stats[f][:, None], normalize)[:, 0])
        elif member.role == "bn" and getattr(module, "weight", None) is not None:
            gamma, beta = module.weight, module.bias
            if detach:
                gamma, beta = gamma.detach(), beta.detach()
            per_feature["gamma"].append(_normalise(gamma[sl].abs()[:, None], normalize)[:, 0])
            per_feature["beta"].append(_normalise(beta[sl][:, None], normalize)[:, 0])
    if "group_l2" in features:
        # everything the channel owns (producers, consumers' input slices, BN), each tensor's squared norms divided
        # by their mean so the feature stays scale-free; log, since the norms span orders of magnitude
        parts = [r.float().pow(2).sum(1) for _, _, r in group_rows(model, group, detach)]
        if parts:
            rel = torch.stack([v / v.mean().clamp_min(_EPS) for v in parts]).mean(0)
            per_feature["group_l2"].append(_normalise(rel.clamp_min(_EPS).log()[:, None], normalize)[:, 0])
    device = next(model.parameters()).device
    cols = []
    for f in features:
        vals = per_feature[f]
        # A group without BN (or without weighted producers) has no such feature: a constant column carries none.
        cols.append(torch.stack(vals).mean(0) if vals else torch.zeros(size, device=device))
    return _normalise(torch.stack(cols, 1), normalize)


# -------------------------------------------------------------------------------------------- Dagger module

class DaggerNet(nn.Module):
    """The Dagger module: a shared MLP ``[descriptor, group embedding] -> hidden -> 1`` plus a linear path on the
    descriptors, giving gate logits.

    ``prior`` initialises the linear path (one weight per descriptor feature; zeros if None). With a weight on
    the L1 feature the module starts as a magnitude ranking, so channels leave one by one as the regulariser
    lowers the logits instead of all at once; the search then learns from there.

    >>> net = DaggerNet(n_groups=3, n_features=5)
    >>> net(torch.zeros(7, 5), torch.tensor([0, 0, 1, 1, 1, 2, 2])).shape
    torch.Size([7])
    """

    def __init__(self, n_groups: int, n_features: int, hidden: int = 16, embed_dim: int = 4,
                 init_logit: float = 2.0, prior: Sequence[float] | None = None) -> None:
        super().__init__()
        self.embed = nn.Embedding(n_groups, embed_dim)
        self.fc1 = nn.Linear(n_features + embed_dim, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        self.linear = nn.Linear(n_features, 1, bias=False)
        with torch.no_grad():
            self.embed.weight.mul_(0.1)
            # Start every gate near sigmoid(init_logit): the gated net begins close to the trained one.
            self.fc2.weight.mul_(0.1)
            self.fc2.bias.fill_(init_logit)
            self.linear.weight.copy_(torch.tensor(list(prior) if prior is not None else [0.0] * n_features)[None])

    def forward(self, descriptors: torch.Tensor, group_ids: torch.Tensor) -> torch.Tensor:
        h = torch.cat([descriptors, self.embed(group_ids)], 1)
        return self.fc2(F.relu(self.fc1(h)))[:, 0] + self.linear(descriptors)[:, 0]


# --------------------------------------------------------------------------- gate, regulariser, temperature

def straight_through_gate(soft: torch.Tensor) -> torch.Tensor:
    """The hard gate ``1[soft > 1/2]`` in value, the soft gate's gradient in the backward pass (straight-through).
    The group's best channel stays on: an emptied layer feeds its BN all zeros, and the gradients around it explode.

    >>> straight_through_gate(torch.tensor([0.2, 0.7, 0.4])).tolist()
    [0.0, 1.0, 0.0]
    >>> straight_through_gate(torch.tensor([0.2, 0.3])).tolist()   # none above 1/2: the best one stays on
    [0.0, 1.0]
    """
    return ((soft > 0.5) | (soft == soft.max())).to(soft.dtype) + (soft - soft.detach())


def flops_regularizer(soft: torch.Tensor, target: float, kind: str = "square") -> torch.Tensor:
    """``(soft/target - 1)^2`` (``square``) or ``max(0, soft/target - 1)`` (``hinge``); zero at the target.

    >>> flops_regularizer(torch.tensor(50.0), 50.0).item()
    0.0
    """
    ratio = soft / target - 1
    if kind == "square":
        return ratio.pow(2)
    if kind == "hinge":
        return ratio.clamp(min=0)
    raise ValueError(f"reg must be 'square' or 'hinge', got {kind!r}")


def temperature_at(step: int, start: float, end: float, steps: int, anneal: str = "exp") -> float:
    """Temperature after ``step`` steps of the schedule: ``exp`` (geometric), ``linear`` or ``constant``.

    >>> temperature_at(0, 1.0, 0.1, 100), round(temperature_at(100, 1.0, 0.1, 100), 6), temperature_at(5, 1.0, 0.1, 100, "constant")
    (1.0, 0.1, 1.0)
    """
    if anneal == "constant" or steps <= 0:
        return start
    t = min(max(step, 0), steps) / steps
    if anneal == "exp":
        return start * (end / start) ** t
    if anneal == "linear":
        return start + (end - start) * t
    raise ValueError(f"anneal must be 'exp', 'linear' or 'constant', got {anneal!r}")
