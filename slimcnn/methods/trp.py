"""TRP, trained rank pruning (Xu et al.): keep conv weights low-rank while training, then factorise each conv.

Training: every ``period`` steps each selected conv's weight, reshaped into matrices under the chosen scheme,
is replaced by its rank-k SVD approximation (k: the smallest rank holding ``energy`` of the sum of squared
singular values), and on those steps ``nuclear * U_k V_k^T`` (the nuclear norm's sub-gradient restricted to the
kept pairs) is added to the weight's gradient. Finalize: each conv becomes two thin plain ``nn.Conv2d`` layers
in an ``nn.Sequential`` (save/load and ONNX export need no custom module), where that lowers its MACs.

Schemes (W: n x c x kh x kw, ``groups`` g; each group is decomposed on its own, so grouped convs stay exact):

- ``channel`` (NC): W_g -> (n/g) x (c/g*kh*kw); kh x kw conv c -> g*r (the original stride, padding,
  dilation), then 1x1 conv g*r -> n carrying the bias.
- ``spatial`` (VH): W_g -> (c/g*kh) x (n/g*kw); kh x 1 conv c -> g*r (vertical stride/padding/dilation),
  then 1 x kw conv g*r -> n (horizontal ones) carrying the bias.
- ``nd`` (network decoupling): each filter W_j -> (c/g) x (kh*kw); 1x1 conv c -> r*n, then a kh x kw conv
  r*n -> n with groups=n: group j sums filter j's r depthwise paths; bias on the last.

``rank`` always means the rank of each matrix (per group, or per filter for ``nd``); a layer's rank is the
largest any of its matrices needs, since one grouped conv needs one rank. ``round_to=N`` keeps every rank a
multiple of ``N`` (or the full rank) where the full rank is at least ``N``: the rank is the width of the thin
conv between the two factors, and kernels run best on aligned widths. Ranks from the energy / threshold rules are
rounded up (never less energy than asked); a MACs target searches over aligned ranks only.

>>> conv = nn.Conv2d(16, 32, 3, stride=2, padding=1)
>>> thin = decompose_conv(conv, "channel", rank=4)
>>> [type(m).__name__ for m in thin]
['Conv2d', 'Conv2d']
>>> decomposed_macs(conv, "channel", 4, (32, 32)) < conv_macs(conv, (32, 32))
True

DDP: every rank holds identical weights after the all-reduced optimiser step, and the truncation is a
deterministic function of those weights (an SVD, a cumulative sum, a comparison: no randomness, no sampling),
so every rank computes the same truncation and the same sub-gradient (added after the gradient all-reduce);
the ranks stay identical without any extra communication.
"""
from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import torch
from torch import nn

from ..graph.handlers import ConvHandler
from ..graph.handlers import conv_macs as conv_macs_of
from ..graph.replace import replace_modules
from ..profile import profile
from .base import Method, macs_goal
from .factor_timing import Deploy, LayerTimes, time_factorisations

SCHEMES = ("channel", "spatial", "nd")
RANK_RULES = ("threshold", "energy", "target_macs", "target_latency")
TARGET_MODES = ("energy", "uniform")
#: precision of the training truncation's SVD (TRP's ``svd_dtype``)
SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_RANK_THRESHOLD = 0.05  # official, for TRP-trained nets


def _check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise ValueError(f"unknown TRP scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")


# ---------------------------------------------------------------------------------------------------------
# Reshapes: a conv weight <-> a batch of matrices whose ranks the scheme factorises


def weight_matrices(weight: torch.Tensor, scheme: str, groups: int = 1) -> torch.Tensor:
    """The batch of matrices (B, rows, cols) whose low rank the scheme turns into two thin convs.

    >>> weight_matrices(torch.zeros(32, 16, 3, 3), "spatial").shape
    torch.Size([1, 48, 96])
    """
    _check_scheme(scheme)
    n, cg, kh, kw = weight.shape
    ng = n // groups
    if scheme == "channel":
        return weight.reshape(groups, ng, cg * kh * kw)
    if scheme == "spatial":
        return weight.reshape(groups, ng, cg, kh, kw).permute(0, 2, 3, 1, 4).reshape(groups, cg * kh, ng * kw)
    return weight.reshape(n, cg, kh * kw)


def matrices_to_weight(mats: torch.Tensor, scheme: str, shape: Iterable[int], groups: int = 1) -> torch.Tensor:
    """Inverse of :func:`weight_matrices`: matrices back to a conv weight of ``shape``."""
    _check_scheme(scheme)
    n, cg, kh, kw = shape
    if scheme == "spatial":
        return mats.reshape(groups, cg, kh, n // groups, kw).permute(0, 3, 1, 2, 4).reshape(n, cg, kh, kw)
    return mats.reshape(n, cg, kh, kw)


def full_rank(conv: nn.Conv2d, scheme: str) -> int:
    """The rank at which the scheme reproduces ``conv`` exactly (the rank of each of its matrices at most)."""
    _check_scheme(scheme)
    n, cg, kh, kw = conv.weight.shape
    ng = n // conv.groups
    if scheme == "channel":
        return min(ng, cg * kh * kw)
    if scheme == "spatial":
        return min(cg * kh, ng * kw)
    return min(cg, kh * kw)


# ---------------------------------------------------------------------------------------------------------
# Rank rules on singular values (S: (B, full), sorted descending)


def energy_ranks(s: torch.Tensor, energy: float) -> torch.Tensor:
    """Per matrix, the smallest k with sum(s[:k]^2) / sum(s^2) >= energy (at least 1).

    >>> energy_ranks(torch.tensor([[3.0, 1.0, 0.0]]), 0.9).tolist()
    [1]
    """
    e2 = s.double() ** 2
    ratio = e2.cumsum(-1) / e2.sum(-1, keepdim=True)
    # count the prefixes still short of the target; NaN (all-zero weights) counts as reached
    return ((ratio < energy).sum(-1) + 1).clamp(max=s.shape[-1])


def threshold_ranks(s: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per matrix, the number of singular values above an absolute ``threshold`` (at least 1)."""
    return (s > threshold).sum(-1).clamp(min=1)


# ---------------------------------------------------------------------------------------------------------
# MACs of a conv and of its decomposition


def _out_len(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_out_hw(conv: nn.Conv2d, in_hw: tuple[int, int]) -> tuple[int, int]:
    kh, kw = conv.kernel_size
    if isinstance(conv.padding, str):
        if conv.padding == "same":
            return in_hw
        pad = (0, 0)
    else:
        pad = conv.padding
    return (_out_len(in_hw[0], kh, conv.stride[0], pad[0], conv.dilation[0]),
            _out_len(in_hw[1], kw, conv.stride[1], pad[1], conv.dilation[1]))


def conv_macs(conv: nn.Conv2d, in_hw: tuple[int, int]) -> int:
    """MACs of one call of ``conv`` on an input of spatial size ``in_hw`` (as :func:`slimcnn.profile.profile`:
    both use the conv handler's formula)."""
    return ConvHandler.macs(conv, _conv_out_hw(conv, in_hw))


def decomposed_macs(conv: nn.Conv2d, scheme: str, rank: int, in_hw: tuple[int, int]) -> int:
    """MACs of ``decompose_conv(conv, scheme, rank)`` on an input of spatial size ``in_hw``.

    >>> decomposed_macs(nn.Conv2d(16, 16, 3, padding=1), "spatial", 4, (8, 8))  # 16*4*3*64 + 16*4*3*64
    24576
    """
    _check_scheme(scheme)
    ho, wo = _conv_out_hw(conv, in_hw)
    n, cg, kh, kw = conv.weight.shape
    g, (h, w) = conv.groups, in_hw
    # each scheme is two convs (see decompose_conv): (output elements, inputs per group, kernel elements) each
    if scheme == "channel":  # kh x kw to g * rank channels, then 1x1 back to n
        return conv_macs_of(g * rank * ho * wo, cg, kh * kw) + conv_macs_of(n * ho * wo, rank, 1)
    if scheme == "spatial":  # the vertical conv keeps the full input width: it has no horizontal stride
        return conv_macs_of(g * rank * ho * w, cg, kh) + conv_macs_of(n * ho * wo, rank, kw)
    return conv_macs_of(n * rank * h * w, cg, 1) + conv_macs_of(n * ho * wo, rank, kh * kw)


# ---------------------------------------------------------------------------------------------------------
# Decomposition into real layers


def _svd(mats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(mats, full_matrices=False)


def _conv(cin: int, cout: int, kernel: tuple[int, int], stride: tuple[int, int], padding: Any,
          dilation: tuple[int, int], groups: int, bias: bool, like: nn.Conv2d) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride, padding, dilation, groups, bias, like.padding_mode,
                     device=like.weight.device, dtype=like.weight.dtype)


def _axis_padding(padding: Any, axis: int) -> Any:
    """The padding of a 1-D factor along ``axis`` (0: vertical, 1: horizontal); string modes pass through."""
    if isinstance(padding, str):
        return padding
    return (padding[0], 0) if axis == 0 else (0, padding[1])


@torch.no_grad()
def decompose_conv(conv: nn.Conv2d, scheme: str, rank: int | None = None) -> nn.Sequential:
    """Two plain convs that equal ``conv`` when ``rank`` is its :func:`full_rank` (default), and its best
    rank-``rank`` approximation (per group / per filter, in the scheme's reshape) otherwise.

    >>> conv = nn.Conv2d(8, 8, 3, padding=1, bias=True)
    >>> thin = decompose_conv(conv, "nd")
    >>> x = torch.randn(1, 8, 6, 6)
    >>> bool((thin(x) - conv(x)).abs().max() < 1e-5)
    True
    """
    _check_scheme(scheme)
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"TRP decomposes nn.Conv2d layers, got {type(conv).__name__}")
    top = full_rank(conv, scheme)
    r = top if rank is None else int(rank)
    if not 1 <= r <= top:
        raise ValueError(f"rank must be between 1 and {top} for this conv under scheme {scheme!r}, got {rank}")
    w = conv.weight.detach()
    n, cg, kh, kw = w.shape
    g = conv.groups
    ng, c = n // g, cg * g
    # float64 so that full rank reproduces the conv to float32 rounding
    u, s, vh = _svd(weight_matrices(w.double(), scheme, g))
    root = s[:, :r].sqrt()
    left = u[:, :, :r] * root[:, None, :]      # (B, rows, r)
    right = root[:, :, None] * vh[:, :r, :]    # (B, r, cols)
    has_bias = conv.bias is not None
    stride, pad, dil = conv.stride, conv.padding, conv.dilation
    if scheme == "channel":
        first = _conv(c, g * r, (kh, kw), stride, pad, dil, g, False, conv)
        second = _conv(g * r, n, (1, 1), (1, 1), 0, (1, 1), g, has_bias, conv)
        w1 = right.reshape(g * r, cg, kh, kw)
        w2 = left.reshape(n, r, 1, 1)
    elif scheme == "spatial":
        first = _conv(c, g * r, (kh, 1), (stride[0], 1), _axis_padding(pad, 0), (dil[0], 1), g, False, conv)
        second = _conv(g * r, n, (1, kw), (1, stride[1]), _axis_padding(pad, 1), (1, dil[1]), g, has_bias, conv)
        w1 = left.reshape(g, cg, kh, r).permute(0, 3, 1, 2).reshape(g * r, cg, kh, 1)
        w2 = right.reshape(g, r, ng, kw).permute(0, 2, 1, 3).reshape(n, r, 1, kw)
    else:
        first = _conv(c, n * r, (1, 1), (1, 1), 0, (1, 1), g, False, conv)
        second = _conv(n * r, n, (kh, kw), stride, pad, dil, n, has_bias, conv)
        w1 = left.permute(0, 2, 1).reshape(n * r, cg, 1, 1)
        w2 = right.reshape(n, r, kh, kw)
    first.weight.copy_(w1)
    second.weight.copy_(w2)
    if has_bias:
        second.bias.copy_(conv.bias)
    thin = nn.Sequential(first, second)
    thin.train(conv.training)
    return thin


# ---------------------------------------------------------------------------------------------------------
# Training-time truncation, batched over layers whose matrices share a shape


@dataclass
class Truncation:
    """Result of one truncation of one layer: per-matrix ranks (on the weight's device), the sub-gradient
    ``U_k V_k^T`` reshaped like the weight (None if not asked for), and whether the SVD succeeded."""

    ranks: torch.Tensor | None
    subgradient: torch.Tensor | None
    ok: torch.Tensor  # 0-d bool, left on the device so that training never waits for it


@torch.no_grad()
def truncate_(convs: dict[str, nn.Conv2d], scheme: str, energy: float,
              subgradient: bool = True, ranks: dict[str, int] | None = None,
              svd_dtype: torch.dtype = torch.float32) -> dict[str, Truncation]:
    """Overwrite each conv's weight in place by its rank-k approximation (k per matrix by the energy rule, or
    ``ranks[name]`` for every matrix of the layers it names). The SVD and the product run in ``svd_dtype``.

    Layers whose matrices have the same shape share one batched SVD. A layer whose SVD fails (or gives
    non-finite values) is left untouched and reported with ``ok=False``. No host-device synchronisation
    happens on the success path.

    >>> conv = nn.Conv2d(8, 8, 3)
    >>> out = truncate_({"c": conv}, "channel", 0.5)
    >>> int(torch.linalg.matrix_rank(conv.weight.reshape(8, -1))) == int(out["c"].ranks.max())
    True
    """
    _check_scheme(scheme)
    by_shape: dict[tuple, list[str]] = {}
    mats: dict[str, torch.Tensor] = {}
    for name, conv in convs.items():
        m = weight_matrices(conv.weight.detach(), scheme, conv.groups)
        mats[name] = m
        by_shape.setdefault((tuple(m.shape[1:]), m.dtype, m.device), []).append(name)
    results: dict[str, Truncation] = {}
    for names in by_shape.values():
        factors = _try_svd(torch.cat([mats[n] for n in names]), svd_dtype)
        if factors is not None:
            results.update(_apply_truncation(convs, mats, names, factors, scheme, energy, subgradient, ranks))
            continue
        for n in names:  # one bad layer must not stop the others: retry one by one
            factors = _try_svd(mats[n], svd_dtype)
            if factors is None:
                results[n] = Truncation(None, None, torch.tensor(False, device=mats[n].device))
            else:
                results.update(_apply_truncation(convs, mats, [n], factors, scheme, energy, subgradient, ranks))
    return results


def _try_svd(mats: torch.Tensor, dtype: torch.dtype = torch.float32
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    try:
        return _svd(mats.to(dtype))
    except RuntimeError:  # torch.linalg.LinAlgError: no convergence, or non-finite input on CPU
        return None


def _apply_truncation(convs: dict[str, nn.Conv2d], mats: dict[str, torch.Tensor], names: list[str],
                      factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor], scheme: str, energy: float,
                      subgradient: bool, fixed: dict[str, int] | None = None) -> dict[str, Truncation]:
    u, s, vh = factors
    ranks = energy_ranks(s, energy)
    if fixed:
        per_matrix = [torch.full((mats[n].shape[0],), fixed[n], dtype=ranks.dtype) if n in fixed
                      else ranks.new_full((mats[n].shape[0],), -1) for n in names]
        pinned = torch.cat(per_matrix).to(ranks.device).clamp(max=s.shape[-1])
        ranks = torch.where(pinned > 0, pinned, ranks)
    keep = (torch.arange(s.shape[-1], device=s.device) < ranks[:, None]).to(s.dtype)
    finite = torch.isfinite(s).all(-1)
    new = (u * (s * keep)[:, None, :]) @ vh
    sub = (u * keep[:, None, :]) @ vh if subgradient else None
    out: dict[str, Truncation] = {}
    start = 0
    for name in names:
        conv = convs[name]
        b = mats[name].shape[0]
        sl = slice(start, start + b)
        start += b
        ok = finite[sl].all()
        # torch.where keeps a non-finite layer's old weight without a device sync
        w = matrices_to_weight(new[sl], scheme, conv.weight.shape, conv.groups).to(conv.weight.dtype)
        conv.weight.copy_(torch.where(ok, w, conv.weight))
        g = None
        if sub is not None:
            g = matrices_to_weight(sub[sl], scheme, conv.weight.shape, conv.groups).to(conv.weight.dtype)
            g = torch.where(ok, g, torch.zeros_like(g))
        out[name] = Truncation(ranks[sl], g, ok)
    return out


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
    ``round_to``: aligned ranks only (see the module docstring); when aligned steps cannot land within 1% of the
    target from below, the one step above that lands closest is taken. ``layer_times``: a layer is factorised only
    at ranks whose factors are faster than the layer whole on the deploy runtime (:mod:`.factor_timing`); above them
    it stays whole, and the target is met on the other layers.

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


# ---------------------------------------------------------------------------------------------------------
# The method


class TRP(Method):
    """Trained rank pruning behind the :class:`~slimcnn.methods.base.Method` interface.

    >>> m = TRP(scheme="spatial", energy=0.9, period=1, nuclear=3e-4)
    >>> model = m.prepare(model, x)                                      # doctest: +SKIP
    >>> # ... train with m.before_forward / m.after_backward around each step ...
    >>> thin = m.finalize(model)                                         # doctest: +SKIP
    >>> m.report()["layers"][0]                                          # doctest: +SKIP
    {'name': 'layer1.0.conv1', 'scheme': 'spatial', 'rank': 5, 'macs_before': 2359296, 'macs_after': ...}

    Rank rule, unless ``rank_rule`` forces one: ``decompose_energy`` if given, else ``rank_threshold`` if
    given, else ``target_macs`` if given, else the absolute singular-value threshold 0.05 (the official choice
    for TRP-trained nets).

    ``exclude``: module-name globs of layers left undecomposed, their children too (the run's ``--exclude``); they
    join ``layers`` as ``!pattern`` entries.

    With a MACs target the ranks are fixed at ``prepare`` from the starting weights (energy-ranked allocation
    under the budget, topped up to within one rank step of the target) and training truncates to exactly
    those ranks. Why: re-applying the energy cut to a weight that is already low-rank cuts it again, so
    ranks ratchet down every step (measured on ResNet-20 at lr 0.01: summed ranks 457 -> 120 within ~15 steps,
    5-8 per layer at the end) and finalize landed far below any target (0.15-0.26 of the MACs for a 0.5
    target). With fixed ranks the spatial scheme at 0.5 MACs scored 82.66 after BN recalibration and a
    79-step fine-tune vs 74.66 for the Torch-Pruning peer (base 86.22, 5k test images). ``prepare`` raises
    :class:`~slimcnn.graph.TargetError` if the plan is more than 1% from the target.

    ``svd_dtype``: the training truncation's SVD in ``"float32"`` (default) or ``"float64"``. The rank-k
    projection keeps equal filters equal in exact arithmetic, but float32 rounding moves them apart: up to 7e-5
    (relative) after one truncation of equalised C-SGD clusters on ResNet-20, above C-SGD's 1e-5 bar for a lossless
    merge. ``csgd+trp`` trains both at once and so asks for float64 (methods/stack.py): its ResNet-56 bench rows
    took 3-5% longer (433 s against 414 s at 0.3 MACs, 2 CPU threads).

    ``deploy`` (a :class:`~slimcnn.methods.factor_timing.Deploy`: backend, batch, threads): plan for the runtime the
    net will run on. ``prepare`` times every layer shape whole and factorised at aligned ranks there, and a layer
    is factorised only at ranks whose factors are faster than the layer whole (:mod:`.factor_timing`); ranks are
    multiples of 8 unless ``round_to`` says otherwise. ``layer_times``: such a table given instead (no timing).
    ``slimcnn compress`` passes ``--latency-backend`` at the first ``--latency-batch`` (``--no-latency-plan``: MACs
    alone). Under torchrun every rank takes rank 0's table, so all plan alike.
    """

    name = "trp"
    trains_before_finalize = True
    method_share = 1.0  # its recipe: share of the epoch budget before finalize
    method_phase = "trained-rank pruning"
    targets = frozenset({"target_macs", "target_latency"})
    finalize_key = "decompose"
    segmentation = True
    layer_control = frozenset({"exclude"})  # an excluded conv is left undecomposed
    cli_args: ClassVar[list[tuple[str, dict[str, Any]]]] = [
        ("--scheme", dict(choices=SCHEMES, default=None, help="TRP factorisation: channel (NC), spatial (VH) or nd")),
        ("--energy", dict(type=float, default=None, help="TRP: energy kept by the training truncation")),
        ("--period", dict(type=int, default=None, help="TRP: truncate every M steps (the official ND uses 5)")),
        ("--nuclear", dict(type=float, default=None, help="TRP: nuclear-norm sub-gradient weight")),
        ("--rank-threshold", dict(type=float, default=None,
                                  help="TRP: decompose keeping singular values above this (default: the --target-macs plan "
                                       f"given a target, else {DEFAULT_RANK_THRESHOLD})")),
        ("--decompose-energy", dict(type=float, default=None,
                                    help="TRP: decompose keeping this energy instead of a threshold")),
        ("--rank-rule", dict(choices=RANK_RULES, default=None, help="TRP: force the decomposition rank rule")),
        ("--layers", dict(default=None, help="TRP: comma-separated module-name patterns; !pattern excludes")),
    ]

    def __init__(self, target_macs: float | None = None, scheme: str = "channel", energy: float = 0.9,
                 period: int = 1, nuclear: float = 3e-4, rank_threshold: float | None = None,
                 decompose_energy: float | None = None, rank_rule: str | None = None,
                 layers: str | list[str] | None = None, target_mode: str = "energy",
                 round_to: int | None = None, exclude: Iterable[str] = (), svd_dtype: str = "float32",
                 deploy: Deploy | None = None, layer_times: LayerTimes | None = None,
                 target_latency: Any = None) -> None:
        from ..graph.targeting import check_round_to

        skip = [f"!{p}" for g in exclude for p in (g, f"{g}.*")]  # an excluded layer, children too, stays whole
        if skip:
            layers = ",".join([layers, *skip] if layers else skip) if not isinstance(layers, list) else layers + skip

        if deploy is not None and not isinstance(deploy, Deploy):
            raise ValueError(f"TRP deploy must be a slimcnn.methods.factor_timing.Deploy, got {deploy!r}")
        self.target_latency, self.latency_record = target_latency, {}
        if target_latency is not None:  # a latency goal is measured where it names: the plan is made there too
            if target_macs is not None:
                raise ValueError("TRP takes target_macs or target_latency, not both")
            deploy = Deploy(target_latency.backend, target_latency.batch, target_latency.threads)
        self.deploy, self.times = deploy, layer_times
        # a plan for a runtime uses aligned ranks: an odd rank leaves the runtime's blocked kernels
        self.round_to = check_round_to(round_to) or (8 if deploy is not None or layer_times is not None else None)
        self._round_default = round_to is None and self.round_to is not None
        self.target_miss: str | None = None
        self.plan_note: str | None = None  # why the plan for the runtime was relaxed (report: latency_plan.note)
        _check_scheme(scheme)
        if not 0 < energy <= 1:
            raise ValueError(f"TRP energy must be in (0, 1], got {energy}")
        if period < 1:
            raise ValueError(f"TRP period must be >= 1 step, got {period}")
        if nuclear < 0:
            raise ValueError(f"TRP nuclear weight must be >= 0, got {nuclear}")
        if rank_threshold is not None and rank_threshold < 0:
            raise ValueError(f"TRP rank threshold must be >= 0, got {rank_threshold}")
        if decompose_energy is not None and not 0 < decompose_energy <= 1:
            raise ValueError(f"TRP decompose energy must be in (0, 1], got {decompose_energy}")
        if target_macs is not None and target_macs <= 0:
            raise ValueError(f"target MACs must be > 0 (<= 1: a ratio, > 1: absolute MACs), got {target_macs}")
        if rank_rule is None:
            rank_rule = ("energy" if decompose_energy is not None else
                         "target_latency" if target_latency is not None else
                         "threshold" if rank_threshold is not None or target_macs is None else "target_macs")
        if rank_rule not in RANK_RULES:
            raise ValueError(f"unknown rank rule {rank_rule!r}; choose one of {', '.join(RANK_RULES)}")
        if rank_rule == "target_macs" and target_macs is None:
            raise ValueError("TRP rank rule 'target_macs' needs target_macs")
        if rank_rule == "target_latency" and target_latency is None:
            raise ValueError("TRP rank rule 'target_latency' needs target_latency")
        if rank_rule == "energy" and decompose_energy is None:
            raise ValueError("TRP rank rule 'energy' needs decompose_energy")
        if target_mode not in TARGET_MODES:
            raise ValueError(f"unknown target mode {target_mode!r}; choose one of {', '.join(TARGET_MODES)}")
        if svd_dtype not in SVD_DTYPES:
            raise ValueError(f"TRP svd_dtype must be one of {', '.join(SVD_DTYPES)}, got {svd_dtype!r}")
        self.svd_dtype = SVD_DTYPES[svd_dtype]
        self.target_macs, self.scheme, self.energy, self.period, self.nuclear = target_macs, scheme, energy, period, nuclear
        self.rank_threshold = DEFAULT_RANK_THRESHOLD if rank_threshold is None else rank_threshold
        self.decompose_energy, self.rank_rule = decompose_energy, rank_rule
        self.layer_patterns, self.target_mode = layers, target_mode
        self.layers: list[str] | None = None  # set by prepare
        self.example_input: torch.Tensor | None = None
        self._subgrads: dict[str, torch.Tensor] = {}
        self._pending_step: int | None = None
        self._ranks: dict[str, torch.Tensor] = {}      # per-matrix ranks at the last truncation (on the device)
        self._failed: torch.Tensor | int = 0            # SVD failures so far, a device tensor between reports
        self._plans: list[LayerPlan] = []
        self._fixed: dict[str, int] = {}                # layer -> rank chosen from the target at prepare
        self._macs: tuple[int, int] | None = None
        self.truncations = 0

    def prepare(self, model: nn.Module, example_input: torch.Tensor) -> nn.Module:
        """Pick the layers; with a MACs target, also each layer's rank, from the starting weights: the same
        plan that finalize applies, so training truncates to exactly the ranks that will be kept (never
        below them) and the factorisation at the end is lossless."""
        self.example_input = example_input[:1].detach()
        self.layers = select_layers(model, self.layer_patterns)
        self._fixed = {}
        if self.deploy is not None and self.times is None:
            self.times = self._time_layers(model)
        if self.rank_rule == "target_macs":
            self._plans = self._plan_for_target(model)
            self._fixed = {p.name: p.rank for p in self._plans if p.applied}
            self._check_target(model, self._plans)
        elif self.rank_rule == "target_latency":
            self._plans = self._plan_for_latency(model)
            self._fixed = {p.name: p.rank for p in self._plans if p.applied}
        return model

    def _plan_for_latency(self, model: nn.Module, rounds: int = 3, tol: float = 0.03) -> list[LayerPlan]:
        """Ranks for ``target_latency``: the layer times say how many milliseconds the factors must save; each
        plan is timed against the base on the goal's backend, and while it misses the target by more than ``tol``
        (relative) the next plan scales the saving by what the last one delivered (a layer timed alone saves
        more, or less, than it does inside the net), at most ``rounds`` plans; the closest one is kept. Rank 0's
        plan on every rank under torchrun."""
        import copy
        import json

        from ..backends import budgeted_repeats, runner, time_runners
        from ..engine import distributed
        from ..graph import TargetError
        from ..graph.latency import QUANTILE

        goal, times = self.target_latency, self.times
        x = self.example_input.cpu()
        base = copy.deepcopy(model).cpu().eval()
        shape = tuple(x.shape[1:])
        base_run = runner(base, shape, goal.batch, goal.backend, goal.threads)
        base_ms = time_runners({"base": base_run}, budgeted_repeats({"base": base_run}, 2.0), q=QUANTILE)["base"]
        ratio = goal.ratio(base_ms)
        whole_ms = sum(times.whole[n] for n in self.layers if n in times.whole)

        def measure(plans: list[LayerPlan]) -> tuple[float, float]:
            runners = {"base": base_run, "plan": runner(decompose_model(base, x, plans), shape, goal.batch,
                                                        goal.backend, goal.threads)}
            ms = time_runners(runners, budgeted_repeats(runners, 4.0), q=QUANTILE)
            return ms["plan"] / ms["base"], ms["base"]

        def plan(budget: float | None) -> list[LayerPlan]:
            return plan_for_time(base, x, self.scheme, times, budget, self.layers, self.target_mode, self.round_to)

        def layer_ms(plans: list[LayerPlan]) -> float:
            return sum(times.cost(p.name, p.rank if p.applied else None) for p in plans)

        scale, tried, best = 1.0, [], None
        for i in range(rounds):
            try:
                plans = plan(whole_ms - (1 - ratio) * base_ms / scale)
            except TargetError as e:  # name what the cheapest plan measures
                if best is not None:
                    break
                least, _ = measure(plan(None))
                raise _target_error(f"TRP cannot reach latency {goal} ({ratio:.3f} of the base, {goal.backend}, batch "
                                    f"{goal.batch}): the smallest net its plan allows measures {least:.3f} of the "
                                    f"base ({e})") from None
            measured, base_ms = measure(plans)
            predicted = 1 - scale * (whole_ms - layer_ms(plans)) / base_ms
            tried.append({"plan": i + 1, "predicted_ratio": round(predicted, 4), "ratio": round(measured, 4)})
            if best is None or abs(measured - ratio) < abs(best[0] - ratio):
                best = (measured, plans, tried[-1])
            if abs(measured - ratio) <= tol * ratio:
                break
            saved = (whole_ms - layer_ms(plans)) / base_ms  # the layers' saving, as a share of the base
            if saved > 0 and measured < 1:
                scale = (1 - measured) / saved
        plans = best[1]
        if distributed.is_distributed():
            plans = [LayerPlan(**d) for d in json.loads(distributed.gather_strings(
                json.dumps([vars(p) for p in plans]))[0])]
        self.latency_record = {"target": str(goal), "target_ratio": round(ratio, 4), "backend": goal.backend,
                               "batch": goal.batch, "threads": goal.threads, "base_ms": round(base_ms, 4),
                               "predicted_ratio": best[2]["predicted_ratio"], "search_ratio": best[2]["ratio"],
                               "plans": tried}
        return plans

    def _plan_for_target(self, model: nn.Module) -> list[LayerPlan]:
        """The MACs plan, on the layer times when there are some: aligned ranks first, then (when the alignment is
        our default, not the user's --round-to) unaligned ones. When neither lands within 1% of the target, or the
        few layers that pay would be squeezed far below their MACs-plan ranks (:meth:`_squeezed`), the plan is made
        on MACs alone, and one warning line says that the net may be slower than the base."""
        from ..graph import TargetError
        from ..progress import log_line

        def plan(round_to: int | None, times: LayerTimes | None) -> list[LayerPlan]:
            return plan_decomposition(model, self.example_input, self.scheme, "target_macs", self.target_macs,
                                      self.layers, self.target_mode, round_to, times)

        if self.times is None:
            return plan(self.round_to, None)
        why = ""
        for round_to in [self.round_to] + ([None] if self._round_default else []):
            try:
                plans = plan(round_to, self.times)
            except TargetError as e:
                why = str(e)
                continue
            if self._on_target(model, plans):
                squeezed = self._squeezed(plans, plan(None, None))
                if squeezed:
                    why = squeezed
                    break
                if round_to != self.round_to:
                    self.plan_note = "ranks in multiples of 8 land more than 1% off the MACs target: unaligned ranks"
                    self.round_to = None
                return plans
            why = "the layers whose factors are faster than themselves cannot land within 1% of the target"
        where = self.times.deploy or "the deploy runtime"
        self.plan_note = (f"planned on MACs alone, so the net may be slower than the base on {where}: {why}")
        log_line(f"warning: TRP: {self.plan_note}")
        if self._round_default:
            self.round_to = None
        return plan(self.round_to, None)

    @staticmethod
    def _squeezed(plans: list[LayerPlan], macs_plans: list[LayerPlan], least: float = 0.5) -> str | None:
        """Why the plan for the runtime costs too much accuracy, or None: when factorising pays on too few layers,
        the target squeezes those few to ranks far below what the MACs plan gives them (the demo's ResNet-20 on
        eager, planned for batches 1 and 128 together, kept ranks 4-9 and lost half its top-1). Below ``least``
        of the MACs plan's ranks, summed over the layers both factorise, it is."""
        ranks = {p.name: p.rank for p in macs_plans if p.applied}
        both = [p for p in plans if p.applied and p.name in ranks]
        kept, wanted = sum(p.rank for p in both), sum(ranks[p.name] for p in both)
        if wanted and kept < least * wanted:
            return (f"factorising pays on too few layers: the target would squeeze them to {kept / wanted:.2f} of "
                    "the ranks the MACs plan gives them")
        return None

    def _on_target(self, model: nn.Module, plans: list[LayerPlan]) -> bool:
        base = profile(model, example_input=self.example_input.to(next(model.parameters()).device)).macs
        goal = macs_goal(self.target_macs, base)
        return abs(base - sum(p.macs_before - p.macs_after for p in plans) - goal) <= 0.01 * goal

    def _time_layers(self, model: nn.Module) -> LayerTimes:
        """Time the selected layers on ``deploy`` (:func:`~.factor_timing.time_factorisations`); rank 0's table on
        every rank under torchrun, since timings differ between processes and the plans must not."""
        import json

        from ..engine import distributed

        x = self.example_input.to(next(model.parameters()).device)
        shapes = {layer.name: layer.in_shape for layer in profile(model, example_input=x).layers}
        convs = {n: (model.get_submodule(n), tuple(shapes[n][1:])) for n in self.layers if shapes.get(n)}
        times = time_factorisations(convs, self.deploy, lambda c, r: decompose_conv(c, self.scheme, r),
                                    lambda c: full_rank(c, self.scheme), self.round_to)
        if distributed.is_distributed():
            times = LayerTimes.from_summary(json.loads(distributed.gather_strings(json.dumps(times.summary()))[0]))
        return times

    def _check_target(self, model: nn.Module, plans: list[LayerPlan]) -> None:
        base = profile(model, example_input=self.example_input.to(next(model.parameters()).device)).macs
        goal = macs_goal(self.target_macs, base)
        macs = base - sum(p.macs_before - p.macs_after for p in plans)
        if abs(macs - goal) > 0.01 * goal and self.round_to:
            # aligned ranks step coarsely: the closest plan stands, and the run's within_tol reports the miss
            self.target_miss = (f"TRP ({self.scheme}) with ranks in multiples of {self.round_to} lands at "
                                f"{macs / 1e6:.2f}M MACs, more than 1% from the target {goal / 1e6:.2f}M; the "
                                f"closest aligned plan is used")
        elif abs(macs - goal) > 0.01 * goal:
            raise _target_error(f"TRP ({self.scheme}) lands at {macs / 1e6:.2f}M MACs, more than 1% from the target "
                                f"{goal / 1e6:.2f}M: decomposing every selected layer at full rank changes the "
                                f"MACs too little (or too much) for this target; try another --scheme or --layers")

    def _convs(self, model: nn.Module) -> dict[str, nn.Conv2d]:
        if self.layers is None:
            raise RuntimeError("TRP: call prepare(model, example_input) before training")
        return {n: model.get_submodule(n) for n in self.layers}

    def before_forward(self, model: nn.Module, step: int) -> None:
        self._subgrads, self._pending_step = {}, None
        if step % self.period:
            return
        convs = self._convs(model)
        if self._fixed:  # with a target: truncate the layers it decomposes to their planned ranks, and only those
            convs = {n: c for n, c in convs.items() if n in self._fixed}
        result = truncate_(convs, self.scheme, self.energy, subgradient=self.nuclear > 0, ranks=self._fixed or None,
                           svd_dtype=self.svd_dtype)
        self.truncations += 1
        self._pending_step = step
        self._ranks = {n: t.ranks for n, t in result.items() if t.ranks is not None}
        self._subgrads = {n: t.subgradient for n, t in result.items() if t.subgradient is not None}
        self._failed = self._failed + sum((~t.ok).int() for t in result.values())

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int) -> None:
        if step != self._pending_step or not self._subgrads:
            return
        for name, conv in self._convs(model).items():
            sub = self._subgrads.get(name)
            if sub is not None and conv.weight.grad is not None:
                conv.weight.grad.add_(sub, alpha=self.nuclear)
        self._subgrads = {}

    @property
    def svd_failures(self) -> int:
        """How many layer truncations were skipped because their SVD failed."""
        return int(self._failed)

    def finalize(self, model: nn.Module) -> nn.Module:
        if self.example_input is None:
            raise RuntimeError("TRP: call prepare(model, example_input) before finalize")
        x = self.example_input.to(next(model.parameters()).device)
        value = {"threshold": self.rank_threshold, "energy": self.decompose_energy,
                 "target_macs": self.target_macs, "target_latency": None}[self.rank_rule]
        if not self._fixed:
            self._plans = plan_decomposition(model, x, self.scheme, self.rank_rule, value, self.layers,
                                             self.target_mode, self.round_to, self.times)
        thin = decompose_model(model, x, self._plans)
        self._macs = (profile(model, example_input=x).macs, profile(thin, example_input=x).macs)
        return thin

    def training_ranks(self) -> dict[str, int]:
        """Each layer's largest per-matrix rank at the last truncation."""
        return {n: int(r.max()) for n, r in self._ranks.items()}

    def report(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "scheme": self.scheme, "energy": self.energy, "period": self.period, "nuclear": self.nuclear,
            "rank_rule": self.rank_rule, "truncations": self.truncations, "svd_failures": self.svd_failures,
            "training_ranks": self.training_ranks(),
            "layers": [{"name": p.name, "scheme": p.scheme, "rank": p.rank, "macs_before": p.macs_before,
                        "macs_after": p.macs_after, "applied": p.applied} for p in self._plans],
        }
        if self._macs is not None:
            out["macs_before"], out["macs_after"] = self._macs
        if self.round_to:
            out["round_to"] = self.round_to
        if self.target_miss:
            out["target_miss"] = self.target_miss
        if self.latency_record:
            out["latency_target"] = self.latency_record
        if self.times is not None:
            slower = [p.name for p in self._plans if not p.applied and self.times.max_rank(p.name) == 0]
            out["latency_plan"] = {**self.times.summary(), "kept_whole_factors_slower": slower,
                                   "note": self.plan_note}
        return out

    def state_dict(self) -> dict[str, Any]:
        # The period follows the engine's global step, so resuming needs only these counters.
        return {"truncations": self.truncations, "svd_failures": self.svd_failures, "layers": list(self.layers or []),
                "fixed_ranks": dict(self._fixed), "latency_record": self.latency_record,
                "layer_times": self.times.summary() if self.times is not None else None,
                "plans": [vars(p).copy() for p in self._plans] if self._fixed else []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.truncations = int(state.get("truncations", 0))
        self._failed = int(state.get("svd_failures", 0))
        if state.get("layers"):
            self.layers = list(state["layers"])
        if state.get("layer_times"):  # the table the run planned on, not a new timing
            self.times = LayerTimes.from_summary(state["layer_times"])
        self.latency_record = state.get("latency_record") or self.latency_record
        if state.get("fixed_ranks"):  # the ranks planned on the starting weights, not on the resumed ones
            self._fixed = {k: int(v) for k, v in state["fixed_ranks"].items()}
            self._plans = [LayerPlan(**d) for d in state.get("plans", [])]
