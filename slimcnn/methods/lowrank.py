"""TRP's low-rank mathematics (:mod:`slimcnn.methods.trp`): a conv weight as a batch of matrices under each
scheme, the rank rules on singular values, the MACs of a factorised conv, the factorisation into two thin convs,
and the training-time SVD truncation.

Apart from the method because these are functions of one conv (or a batch of convs) alone, with no hooks and no
training state: the schemes and the identity "full rank reproduces the conv" can be read and tested here, and
the rank planner (:mod:`.rank_plan`) and the method both build on them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from ..graph.handlers import ConvHandler
from ..graph.handlers import conv_macs as conv_macs_of

SCHEMES = ("channel", "spatial", "nd")


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

