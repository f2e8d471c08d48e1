"""TRP's rank planning (:mod:`slimcnn.methods.trp`): which convs to factorise, and each one's rank under a rank
rule, a MACs target (bisection on one global setting, then a top-up one rank step at a time) or a time budget on
measured layer times; and the copy of a model with a plan applied.

Apart from the method because a plan is a function of the weights, the example input and the budget alone (no
hooks, no training state): the method makes it at ``prepare`` (ranks fixed for a target) and again at ``finalize``,
and it can be read and tested without training.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..graph.replace import replace_modules
from ..profile import profile
from .factor_timing import LayerTimes
from .lowrank import (_check_scheme, conv_macs, decompose_conv, decomposed_macs, energy_ranks, threshold_ranks,
                      weight_matrices)

RANK_RULES = ("threshold", "energy", "target_macs", "target_latency")
TARGET_MODES = ("energy", "uniform")


# ---------------------------------------------------------------------------------------------------------
# Layer selection and rank choice for the whole model


def select_layers(model: nn.Module, patterns: str | list[str] | None = None) -> list[str]:
    """Names of the convs TRP works on. Default: every ``nn.Conv2d`` that is not 1x1 and not the first conv.

    ``patterns`` (a list, or a comma-separated string) of ``fnmatch`` patterns on module names: plain ones
    choose layers (any ``nn.Conv2d``, 1x1 included), ``!pattern`` ones exclude layers from the default set
    (or from the chosen ones).

    >>> select_layers(create("cifar_resnet20"), "layer3.*,!layer3.0.*")  # doctest: +SKIP
    """
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    patterns = list(patterns or [])
    include = [p for p in patterns if not p.startswith("!")]
    exclude = [p[1:] for p in patterns if p.startswith("!")]
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if include:
        chosen = [n for n, _ in convs if any(fnmatch.fnmatchcase(n, p) for p in include)]
    else:
        chosen = [n for i, (n, m) in enumerate(convs) if i > 0 and tuple(m.kernel_size) != (1, 1)]
    chosen = [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    if patterns and not chosen:
        raise ValueError(f"TRP layer patterns {','.join(patterns)!r} match no Conv2d; "
                         f"convs are: {', '.join(n for n, _ in convs[:12])}{' ...' if len(convs) > 12 else ''}")
    return chosen


@dataclass
class LayerPlan:
    """One layer's decomposition decision (MACs count every call the model makes of the layer)."""

    name: str
    scheme: str
    rank: int
    macs_before: int
    macs_after: int
    full_rank: int

    @property
    def applied(self) -> bool:
        return self.macs_after < self.macs_before


@dataclass
class _Candidate:
    name: str
    conv: nn.Conv2d
    s: torch.Tensor          # (B, full) singular values of the layer's matrices
    in_hw: tuple[int, int]
    calls: int               # how many times the model calls this conv per input
    macs: int                # MACs of all those calls
    max_rank: int | None = None  # above it the factors are slower than the layer whole (LayerTimes.max_rank)

    def plan(self, scheme: str, rank: int) -> LayerPlan:
        top = self.s.shape[-1]
        rank = max(1, min(int(rank), top))
        if self.max_rank is not None and rank > self.max_rank:  # whole is faster on the deploy runtime
            return LayerPlan(self.name, scheme, top, self.macs, self.macs, top)
        after = self.calls * decomposed_macs(self.conv, scheme, rank, self.in_hw)
        return LayerPlan(self.name, scheme, rank, self.macs, min(after, self.macs), top)


@torch.no_grad()
def _candidates(model: nn.Module, example_input: torch.Tensor, names: list[str], scheme: str,
                times: LayerTimes | None = None) -> list[_Candidate]:
    prof = {layer.name: layer for layer in profile(model, example_input=example_input[:1]).layers}
    out = []
    for name in names:
        conv = model.get_submodule(name)
        info = prof.get(name)
        if info is None or not info.macs or info.in_shape is None:
            continue  # never called on this input: nothing to gain
        in_hw = (info.in_shape[-2], info.in_shape[-1])
        one = conv_macs(conv, in_hw)
        s = torch.linalg.svdvals(weight_matrices(conv.weight.detach().double(), scheme, conv.groups)).cpu()
        out.append(_Candidate(name, conv, s, in_hw, max(1, round(info.macs / one)), info.macs,
                              times.max_rank(name) if times is not None else None))
    return out


def align_rank(rank: int, full: int, round_to: int | None) -> int:
    """``rank`` rounded up to a multiple of ``round_to``, or to ``full`` when that comes first; unchanged when
    ``round_to`` is None or the full rank is below it (such a layer keeps the normal rule).

    >>> align_rank(5, 16, 8), align_rank(9, 20, 8), align_rank(17, 20, 8), align_rank(3, 6, 8)
    (8, 16, 20, 3)
    """
    if not round_to or full < round_to:
        return rank
    return min(full, -(-max(1, rank) // round_to) * round_to)


def _next_rank(rank: int, full: int, round_to: int | None) -> int:
    """The next rank the search may try above ``rank`` (one more, or the next aligned one)."""
    if not round_to or full < round_to:
        return rank + 1
    return min(full, (rank // round_to + 1) * round_to)


def _ranks_for(cands: list[_Candidate], rule: str, value: float, round_to: int | None = None) -> list[int]:
    if rule == "energy":
        ranks = [int(energy_ranks(c.s, value).max()) for c in cands]
    elif rule == "threshold":
        ranks = [int(threshold_ranks(c.s, value).max()) for c in cands]
    elif rule == "uniform":
        ranks = [max(1, math.ceil(value * c.s.shape[-1])) for c in cands]
    else:
        raise ValueError(f"unknown rank rule {rule!r}")
    if round_to:
        ranks = [align_rank(r, c.s.shape[-1], round_to) for r, c in zip(ranks, cands)]
    return ranks


def _target_error(message: str) -> Exception:
    from ..graph import TargetError

    return TargetError(message)


def plan_decomposition(model: nn.Module, example_input: torch.Tensor, scheme: str, rule: str, value: float,
                       layers: list[str] | None = None, target_mode: str = "energy",
                       round_to: int | None = None, layer_times: LayerTimes | None = None) -> list[LayerPlan]:
    """Choose each layer's rank. ``rule``: ``threshold`` (absolute singular value ``value``), ``energy``
    (fraction ``value`` of the squared singular values), or ``target_macs`` (``value`` <= 1: a ratio of the
    model's MACs; > 1: absolute MACs), reached by bisection on one global energy (``target_mode="energy"``)
    or on one fraction of every layer's full rank (``"uniform"``), landing at the largest setting whose MACs
    do not exceed the target. A plan with ``macs_after == macs_before`` means the layer stays whole.
    ``round_to``: aligned ranks only (see :mod:`slimcnn.methods.trp`); when aligned steps cannot land within 1% of
    the target from below, the one step above that lands closest is taken. ``layer_times``: a layer is factorised
    only at ranks whose factors are faster than the layer whole on the deploy runtime (:mod:`.factor_timing`); above
    them it stays whole, and the target is met on the other layers.

    >>> plans = plan_decomposition(model, x, "spatial", "target_macs", 0.5)  # doctest: +SKIP
    """
    _check_scheme(scheme)
    if rule not in RANK_RULES:
        raise ValueError(f"unknown rank rule {rule!r}; choose one of {', '.join(RANK_RULES)}")
    names = select_layers(model) if layers is None else layers
    cands = _candidates(model, example_input, names, scheme, layer_times)
    if rule != "target_macs":
        return [c.plan(scheme, r) for c, r in zip(cands, _ranks_for(cands, rule, value, round_to))]
    if target_mode not in TARGET_MODES:
        raise ValueError(f"unknown target mode {target_mode!r}; choose one of {', '.join(TARGET_MODES)}")
    base = profile(model, example_input=example_input[:1]).macs
    target = value * base if value <= 1 else value
    fixed = base - sum(c.macs for c in cands)

    def macs_at(v: float) -> tuple[int, list[LayerPlan]]:
        plans = [c.plan(scheme, r) for c, r in zip(cands, _ranks_for(cands, target_mode, v, round_to))]
        return fixed + sum(p.macs_after for p in plans), plans

    lowest, plans = macs_at(0.0)  # energy 0 and fraction 0 both mean rank 1 everywhere
    if lowest > target:
        whole = [c.name for c in cands if c.max_rank == 0]
        why = (f"; {len(whole)} of {len(cands)} layers stay whole because their factors are slower than the layer "
               f"on the deploy runtime" if whole else "")
        raise _target_error(f"TRP cannot reach {target / 1e6:.2f}M MACs with scheme {scheme!r}: the least "
                            f"reachable is {lowest / 1e6:.2f}M (rank 1 in every decomposed layer){why}")
    if macs_at(1.0)[0] <= target:
        return macs_at(1.0)[1]
    plans = _largest_within(macs_at, target, plans)
    plans = _top_up(cands, plans, scheme, target - fixed, round_to)
    if round_to:
        plans = _closest_above(cands, plans, scheme, target - fixed, round_to)
    return plans


def _largest_within(cost_at: Callable[[float], tuple[float, list[LayerPlan]]], budget: float,
                    plans: list[LayerPlan]) -> list[LayerPlan]:
    """The plans of the largest setting v in [0, 1] whose cost is within ``budget``, by bisection: the cost (MACs or
    milliseconds) never falls as v grows. ``plans``: those of v = 0, known to fit."""
    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        cost, p = cost_at(mid)
        if cost <= budget:
            lo, plans = mid, p
        else:
            hi = mid
    return plans


def _top_up(cands: list[_Candidate], plans: list[LayerPlan], scheme: str, budget: float,
            round_to: int | None = None, cost: Callable[[LayerPlan], float] | None = None) -> list[LayerPlan]:
    """Spend what the bisection left under the target one rank at a time (one aligned step with ``round_to``),
    each time on the layer whose next singular values hold the most energy per extra MAC (per extra ``cost``, e.g.
    milliseconds, when given): one global setting moves many layers at once and can stop several percent short
    of the target."""
    cost = cost or (lambda p: p.macs_after)
    plans = list(plans)
    used = sum(cost(p) for p in plans)
    while True:
        best, best_gain = None, 0.0
        for i, (c, p) in enumerate(zip(cands, plans)):
            if p.rank >= p.full_rank:
                continue
            nxt = c.plan(scheme, _next_rank(p.rank, p.full_rank, round_to))
            extra = cost(nxt) - cost(p)
            if extra <= 0 or used + extra > budget:
                continue
            e2 = c.s.double() ** 2
            if nxt.rank == p.rank + 1:
                held = e2[..., p.rank]
            else:
                held = e2[..., p.rank:nxt.rank].sum(-1)
            gain = float((held / e2.sum(-1).clamp_min(1e-30)).max()) / extra
            if gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            return plans
        nxt = cands[best].plan(scheme, _next_rank(plans[best].rank, plans[best].full_rank, round_to))
        used += cost(nxt) - cost(plans[best])
        plans[best] = nxt


def _closest_above(cands: list[_Candidate], plans: list[LayerPlan], scheme: str, budget: float,
                   round_to: int, tol: float = 0.01) -> list[LayerPlan]:
    """With aligned ranks the top-up may stop more than ``tol`` under the budget: one aligned step of one layer
    above it can be closer. Take the closest such step if it beats staying below."""
    used = sum(p.macs_after for p in plans)
    if budget - used <= tol * budget:
        return plans
    best, best_gap = None, budget - used
    for i, (c, p) in enumerate(zip(cands, plans)):
        if p.rank >= p.full_rank:
            continue
        nxt = c.plan(scheme, _next_rank(p.rank, p.full_rank, round_to))
        gap = abs(used + nxt.macs_after - p.macs_after - budget)
        if gap < best_gap:
            best, best_gap = (i, nxt), gap
    if best is None:
        return plans
    plans = list(plans)
    plans[best[0]] = best[1]
    return plans


def plan_for_time(model: nn.Module, example_input: torch.Tensor, scheme: str, times: LayerTimes,
                  budget_ms: float | None,
                  layers: list[str] | None = None, target_mode: str = "energy",
                  round_to: int | None = None) -> list[LayerPlan]:
    """Each layer's rank so that the selected layers' time (whole, or their factors, by ``times``) is at most
    ``budget_ms``: the MACs search of :func:`plan_decomposition` on milliseconds. A layer is factorised only at
    ranks where that is faster than the layer whole; TargetError when even the cheapest plan costs more.
    ``budget_ms=None``: that cheapest plan.

    >>> t = LayerTimes.fixed({"c": 1.0}, {"c": {8: 0.3, 16: 0.6, 24: 1.2}})  # doctest: +SKIP
    >>> plan_for_time(model, x, "spatial", t, 0.7, layers=["c"])[0].rank   # doctest: +SKIP
    16
    """
    names = select_layers(model) if layers is None else layers
    cands = [c for c in _candidates(model, example_input, names, scheme, times) if c.name in times.whole]

    def ms(p: LayerPlan) -> float:
        return times.cost(p.name, p.rank if p.applied else None)

    def ms_at(v: float) -> tuple[float, list[LayerPlan]]:
        plans = [c.plan(scheme, r) for c, r in zip(cands, _ranks_for(cands, target_mode, v, round_to))]
        return sum(ms(p) for p in plans), plans

    lowest, plans = ms_at(0.0)
    if budget_ms is None:
        return plans
    if lowest > budget_ms:
        raise _target_error(f"the factorised layers cannot get below {lowest:.3f} ms (wanted {budget_ms:.3f} ms)")
    # time never falls as v grows either: factor times are monotone in the rank, and a whole layer caps them
    return _top_up(cands, _largest_within(ms_at, budget_ms, plans), scheme, budget_ms, round_to, cost=ms)


def decompose_model(model: nn.Module, example_input: torch.Tensor, plans: list[LayerPlan]) -> nn.Module:
    """A validated copy of ``model`` with every plan that lowers MACs applied (``model`` is untouched)."""
    replacements = {p.name: decompose_conv(model.get_submodule(p.name), p.scheme, p.rank)
                    for p in plans if p.applied}
    return replace_modules(model, example_input, replacements)

