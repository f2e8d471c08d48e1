"""Choose group widths and channels so that the real MACs land on a target.

``layer_costs`` predicts the MACs of any choice of widths exactly (for conv/linear layers), so the search runs on
the prediction and the result is then confirmed with the real op-level count (:func:`slimcnn.profile.profile`).

Two allocations:

- ``uniform``: every group keeps about the same fraction ``r`` of its channels (``round(r * size)``, at least 1);
  ``r`` is found by bisection, then single channels are added to the groups furthest below ``r`` until the
  MACs are as close to the target as one channel allows.
- ``global``: channels of all groups compete on their scores. Scores are first normalised per group
  (``normalize="max"``: divided by the group's largest absolute score, so each group's best channel scores 1 and
  groups whose scores live on different scales, e.g. L1 norms of 3x3 and 1x1 filters, compete fairly;
  ``"none"``: raw scores, for scores already comparable across groups such as gate probabilities). Each group's
  best channel is always kept; the other channels are kept in order of decreasing score, and the number kept is
  found by bisection on the predicted MACs.

Only prunable groups are touched; with ``scores`` given, only the groups it names (scores for unprunable groups
are ignored). A group never drops below its ``min_keep`` (1 unless a ``--min-keep`` floor says more; see
:mod:`slimcnn.graph.policy`). A target below the MACs left with every such group at its floor raises
:class:`TargetError`.

Aligned widths (``round_to=N``): fewer MACs only make a net faster when its kernels stay efficient, and CPU / GPU
kernels are tuned for channel counts that are multiples of 8 or 16. With ``round_to`` every group at least ``N``
wide keeps a multiple of ``N`` channels (or all of its channels); narrower groups keep the normal rule. Both
allocations then search over those widths only: the same bisection, each group's width snapped to its nearest
allowed width, followed by a local search that moves single groups (then pairs of groups) one allowed step up
or down while that brings the predicted MACs closer to the target. When no allowed combination lands within
``tol`` the closest one is returned instead of an error, so the caller's ``within_tol`` check reports the miss.
``round_to=None`` or ``1`` is the unaligned search, unchanged.
"""
from __future__ import annotations

from bisect import bisect_left
from typing import Mapping, Protocol

import torch
from torch import nn

from ..profile import profile
from .costs import CostModel, cost_model
from .groups import ChannelGroup, channel_groups
from .surgery import remove_channels
from .validate import SurgeryError

Scores = Mapping[str, torch.Tensor]


class TargetError(ValueError):
    """The MACs target cannot be reached; the message states what can."""


class WidthCost(Protocol):
    """What the width search needs of a cost: its value for any choice of group widths (``macs_at``: the name
    of :class:`CostModel`'s exact MACs, the first such cost) and its value with every group whole (``total``).
    :mod:`slimcnn.graph.latency` plugs predicted milliseconds in here."""

    total: float

    def macs_at(self, widths: Mapping[str, int]) -> float: ...


def allocate_by_cost(cost: WidthCost, groups: list[ChannelGroup], target: float, mode: str = "uniform",
                     scores: Scores | None = None, *, tol: float = 0.01, normalize: str = "max",
                     round_to: int | None = None, strict: bool = True) -> dict[str, int]:
    """The search of :func:`allocate_widths` on any :class:`WidthCost`, ``target`` in the cost's own units
    (absolute, never a ratio). The caller checks first that ``target`` is reachable, so that its error speaks
    of its own units. ``strict``: a target one channel cannot get within ``tol`` of is an error; else the
    closest widths are returned (a cost in steps, such as measured latency, may have no widths within ``tol``)."""
    return _allocate(cost, _considered(groups, scores), target, mode, scores, tol, normalize, check_round_to(round_to),
                     strict)


def allocate_widths(model: nn.Module, example_input: torch.Tensor, target: float, mode: str = "uniform",
                    scores: Scores | None = None, *, groups: list[ChannelGroup] | None = None, tol: float = 0.01,
                    normalize: str = "max", round_to: int | None = None, cost: CostModel | None = None
                    ) -> dict[str, int]:
    """Channels to keep per group, ``{key: n_kept}``, so the predicted MACs are within ``tol`` of ``target``
    (``target <= 1``: a fraction of the model's MACs; ``> 1``: absolute MACs). ``round_to``: aligned widths
    (see the module docstring). ``groups`` and ``cost`` (the model's :func:`cost_model`) save a trace and a
    profile when the caller has them (a :class:`~slimcnn.graph.ChannelGraph` does).

    >>> from slimcnn import create
    >>> widths = allocate_widths(create("cifar_resnet20"), torch.randn(1, 3, 32, 32), 0.5)
    >>> widths["layer1.0.conv1"]
    11
    """
    groups = groups if groups is not None else channel_groups(model, example_input)
    cm = cost if cost is not None else cost_model(model, example_input, groups)
    return _allocate(cm, _considered(groups, scores), _target_macs(target, cm.total), mode, scores, tol, normalize,
                     check_round_to(round_to))


def select_channels(model: nn.Module, example_input: torch.Tensor, scores: Scores, target: float = 0.5,
                    mode: str = "global", *, groups: list[ChannelGroup] | None = None, tol: float = 0.01,
                    normalize: str = "max", round_to: int | None = None, cost: CostModel | None = None
                    ) -> dict[str, list[int]]:
    """Channels to keep per group (sorted indices; highest scores kept) so that the real MACs of the pruned
    model are within ``tol`` of ``target``. Groups without scores stay whole.

    >>> from slimcnn import create
    >>> m, x = create("cifar_resnet20"), torch.randn(1, 3, 32, 32)
    >>> scores = {g.key: torch.rand(g.size) for g in channel_groups(m, x) if g.prunable}
    >>> keep = select_channels(m, x, scores, 0.5)
    """
    return _select(model, example_input, scores, target, mode, groups, tol, normalize, round_to, cost)[0]


def select_and_prune(model: nn.Module, example_input: torch.Tensor, scores: Scores, target: float = 0.5,
                     mode: str = "global", *, groups: list[ChannelGroup] | None = None, tol: float = 0.01,
                     normalize: str = "max", round_to: int | None = None, cost: CostModel | None = None
                     ) -> tuple[dict[str, list[int]], nn.Module]:
    """Both results of one search: the kept channels (as :func:`select_channels`) and the validated pruned copy
    (as :func:`prune_to_target`), for callers that need the two without doing the surgery twice."""
    return _select(model, example_input, scores, target, mode, groups, tol, normalize, round_to, cost)


def prune_to_target(model: nn.Module, example_input: torch.Tensor, scores: Scores, target: float = 0.5,
                    mode: str = "global", *, groups: list[ChannelGroup] | None = None, tol: float = 0.01,
                    normalize: str = "max", round_to: int | None = None, cost: CostModel | None = None) -> nn.Module:
    """:func:`select_channels` then :func:`remove_channels`: a validated copy within ``tol`` of ``target``.

    >>> from slimcnn import create
    >>> m, x = create("cifar_resnet20"), torch.randn(1, 3, 32, 32)
    >>> scores = {g.key: torch.rand(g.size) for g in channel_groups(m, x) if g.prunable}
    >>> small = prune_to_target(m, x, scores, 0.5)
    """
    return _select(model, example_input, scores, target, mode, groups, tol, normalize, round_to, cost)[1]


def check_round_to(round_to: int | None) -> int | None:
    """``round_to`` as the search uses it: None for no alignment (None or 1), else the multiple. ValueError for
    anything but a positive integer, so ``--round-to 0`` is one clear line rather than a division by zero."""
    if round_to is None:
        return None
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ValueError(f"round_to must be a positive integer (channels are kept in multiples of it), "
                         f"got {round_to!r}")
    return round_to if round_to > 1 else None


def aligned_widths(size: int, round_to: int | None, floor: int = 1) -> list[int]:
    """The widths, ascending, a group of ``size`` channels may keep under ``round_to``, none below ``floor``:
    multiples of ``round_to`` plus ``size`` itself (the group left whole) when the group is at least
    ``round_to`` wide, every width from ``floor`` to ``size`` otherwise.

    >>> aligned_widths(20, 8), aligned_widths(6, 8, floor=2), aligned_widths(16, 8, floor=9)
    ([8, 16, 20], [2, 3, 4, 5, 6], [16])
    """
    floor = max(1, min(floor, size))
    if not round_to or size < round_to:
        return list(range(floor, size + 1))
    out = [w for w in range(round_to, size + 1, round_to) if w >= floor]
    if not out or out[-1] != size:
        out.append(size)
    return out


def snap_width(allowed: list[int], width: int) -> int:
    """The allowed width nearest ``width`` (ties go to the wider one: rounding never loses the tie's channel).

    >>> snap_width([8, 16, 20], 11), snap_width([8, 16, 20], 12), snap_width([8, 16, 20], 3)
    (8, 16, 8)
    """
    i = bisect_left(allowed, width)
    if i == 0:
        return allowed[0]
    if i == len(allowed):
        return allowed[-1]
    lo, hi = allowed[i - 1], allowed[i]
    return lo if width - lo < hi - width else hi


# ---------------------------------------------------------------------------------------------------------------


def _target_macs(target: float, base: int) -> float:
    if not target > 0:
        raise TargetError(f"the MACs target must be positive, got {target}")
    macs = target * base if target <= 1 else float(target)
    if macs > base:
        raise TargetError(f"target {macs:,.0f} MACs is above the model's {base:,} MACs")
    return macs


def _considered(groups: list[ChannelGroup], scores: Scores | None) -> list[ChannelGroup]:
    if scores is None:
        return [g for g in groups if g.prunable]
    by_key = {g.key: g for g in groups}
    unknown = [k for k in scores if k not in by_key]
    if unknown:
        raise KeyError(f"scores name unknown channel groups {unknown[:5]}; known: {', '.join(list(by_key)[:8])}, ...")
    for k, s in scores.items():
        if len(s) != by_key[k].size:
            raise ValueError(f"scores for group {k!r} have {len(s)} entries, the group has {by_key[k].size} channels")
    return [g for g in groups if g.prunable and g.key in scores]


def _check_reachable(cm: WidthCost, considered: list[ChannelGroup], target: float, tol: float,
                     round_to: int | None = None) -> None:
    floor = cm.macs_at({g.key: aligned_widths(g.size, round_to, g.min_keep)[0] for g in considered})
    if target < floor * (1 - tol):
        floors = any(g.min_keep > 1 for g in considered)
        least = f"{round_to} channels (or 1 in a group narrower than that)" if round_to else "1 channel"
        raise TargetError(f"target {target:,.0f} MACs ({target / cm.total:.1%}) is below the minimum reachable "
                          f"{floor:,} MACs ({floor / cm.total:.1%} of {cm.total:,}), what remains with every prunable "
                          f"group at {'its --min-keep floor (else ' if floors else ''}{least}{')' if floors else ''}"
                          + (f" under --round-to {round_to}" if round_to else ""))


def _allocate(cm: WidthCost, considered: list[ChannelGroup], target: float, mode: str, scores: Scores | None,
              tol: float, normalize: str, round_to: int | None = None, strict: bool = True) -> dict[str, int]:
    _check_reachable(cm, considered, target, tol, round_to)
    if mode == "uniform":
        widths = _uniform(cm, considered, target, tol) if round_to is None else \
            _uniform_aligned(cm, considered, target, tol, round_to)
    elif mode == "global":
        if scores is None:
            raise ValueError("global allocation needs per-channel scores")
        normalised = _normalised(scores, considered, normalize)
        widths = _global(cm, considered, normalised, target, tol) if round_to is None else \
            _global_aligned(cm, considered, normalised, target, tol, round_to)
    else:
        raise ValueError(f"mode must be 'uniform' or 'global', got {mode!r}")
    est = cm.macs_at(widths)
    if abs(est - target) > tol * target and round_to is None and strict:
        raise TargetError(f"cannot get within {tol:.0%} of {target:,.0f} MACs: one channel changes the MACs too much "
                          f"here; the closest reachable is {est:,} MACs")
    return widths


def _uniform(cm: WidthCost, considered: list[ChannelGroup], target: float, tol: float) -> dict[str, int]:
    def at(r: float) -> dict[str, int]:
        return {g.key: min(g.size, max(g.min_keep, round(r * g.size))) for g in considered}

    lo, hi = 0.0, 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cm.macs_at(at(mid)) <= target else (lo, mid)
    widths = at(lo)
    # top up, one channel at a time, the groups that lag most behind the common ratio
    sizes = {g.key: g.size for g in considered}
    open_keys = [k for k in widths if widths[k] < sizes[k]]
    est = cm.macs_at(widths)
    while est < target and open_keys:
        k = min(open_keys, key=lambda k: (widths[k] + 1) / sizes[k])
        trial = dict(widths, **{k: widths[k] + 1})
        t_est = cm.macs_at(trial)
        if t_est <= target * (1 + tol) and abs(t_est - target) < abs(est - target):
            widths, est = trial, t_est
            if widths[k] == sizes[k]:
                open_keys.remove(k)
        else:
            open_keys.remove(k)
    return widths


def _uniform_aligned(cm: WidthCost, considered: list[ChannelGroup], target: float, tol: float,
                     round_to: int) -> dict[str, int]:
    """:func:`_uniform` over aligned widths: one common ratio, each group snapped to its nearest allowed width,
    then :func:`_refine` closes what the coarse steps leave."""
    allowed = {g.key: aligned_widths(g.size, round_to, g.min_keep) for g in considered}

    def at(r: float) -> dict[str, int]:
        return {g.key: snap_width(allowed[g.key], round(r * g.size)) for g in considered}

    lo, hi = 0.0, 1.0
    for _ in range(40):  # snapping is monotone in r, so the MACs still never fall as r grows
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cm.macs_at(at(mid)) <= target else (lo, mid)
    return _refine(cm, at(lo), allowed, target, tol)


def _global_aligned(cm: WidthCost, considered: list[ChannelGroup], scores: dict[str, torch.Tensor],
                    target: float, tol: float, round_to: int) -> dict[str, int]:
    """:func:`_global` over aligned widths: the channels still compete on their scores, and the count each group
    wins is snapped to its nearest allowed width before the MACs are predicted; then :func:`_refine`."""
    allowed = {g.key: aligned_widths(g.size, round_to, g.min_keep) for g in considered}
    queue: list[tuple[float, str]] = []
    for g in considered:
        ordered = torch.sort(scores[g.key], descending=True, stable=True).values.tolist()
        queue += [(v, g.key) for v in ordered[g.min_keep:]]
    queue.sort(key=lambda t: -t[0])

    def at(k: int) -> dict[str, int]:
        won = {g.key: g.min_keep for g in considered}
        for _, key in queue[:k]:
            won[key] += 1
        return {key: snap_width(allowed[key], n) for key, n in won.items()}

    lo, hi = 0, len(queue)  # largest k whose snapped widths stay within the target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cm.macs_at(at(mid)) <= target else (lo, mid - 1)
    return _refine(cm, at(lo), allowed, target, tol)


def _refine(cm: WidthCost, widths: dict[str, int], allowed: dict[str, list[int]], target: float,
            tol: float) -> dict[str, int]:
    """Move groups one allowed step at a time while that brings the predicted MACs closer to ``target``.

    Why a local search: aligned steps are coarse (8 channels of a 64-wide stream can be 1-2% of a small net's
    MACs), so the common ratio or the global ranking alone often stops a few percent away. Single-group moves
    are tried first (best first); when none helps and the MACs are still outside ``tol``, pairs (one group up,
    another down) exchange MACs in finer amounts. Stops once within a tenth of ``tol``, or when nothing helps.
    """
    widths = dict(widths)
    est = cm.macs_at(widths)

    def steps() -> list[tuple[str, int, int]]:  # (key, new width, direction)
        out = []
        for key, opts in allowed.items():
            i = opts.index(widths[key])
            if i + 1 < len(opts):
                out.append((key, opts[i + 1], 1))
            if i > 0:
                out.append((key, opts[i - 1], -1))
        return out

    for _ in range(4 * sum(len(v) for v in allowed.values())):  # each move strictly improves: this only bounds it
        gap = abs(est - target)
        if gap <= tol / 10 * target:
            break
        best: tuple[dict[str, int], int] | None = None
        moves = steps()
        for key, w, _ in moves:
            trial = dict(widths, **{key: w})
            t = cm.macs_at(trial)
            if abs(t - target) < (abs(best[1] - target) if best else gap):
                best = (trial, t)
        if best is None and gap > tol * target:
            ups = [(k, w) for k, w, d in moves if d > 0]
            downs = [(k, w) for k, w, d in moves if d < 0]
            for ku, wu in ups:
                for kd, wd in downs:
                    if ku == kd:
                        continue
                    trial = dict(widths, **{ku: wu, kd: wd})
                    t = cm.macs_at(trial)
                    if abs(t - target) < (abs(best[1] - target) if best else gap):
                        best = (trial, t)
        if best is None:
            break
        widths, est = best
    return widths


def _normalised(scores: Scores, considered: list[ChannelGroup], normalize: str) -> dict[str, torch.Tensor]:
    out = {}
    for g in considered:
        s = torch.as_tensor(scores[g.key], dtype=torch.float64).flatten()
        if normalize == "max":
            top = s.abs().max()
            s = s / top if top > 0 else s
        elif normalize != "none":
            raise ValueError(f"normalize must be 'max' or 'none', got {normalize!r}")
        out[g.key] = s
    return out


def _global(cm: WidthCost, considered: list[ChannelGroup], scores: dict[str, torch.Tensor],
            target: float, tol: float) -> dict[str, int]:
    sizes = {g.key: g.size for g in considered}
    queue: list[tuple[float, str]] = []  # every channel but each group's best (or its floor's worth), best first
    for g in considered:
        order = torch.argsort(scores[g.key], descending=True, stable=True).tolist()
        queue += [(scores[g.key][i].item(), g.key) for i in order[g.min_keep:]]
    queue.sort(key=lambda t: -t[0])

    def at(k: int) -> dict[str, int]:
        widths = {g.key: g.min_keep for g in considered}
        for _, key in queue[:k]:
            widths[key] += 1
        return widths

    lo, hi = 0, len(queue)  # largest k with predicted MACs <= target
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if cm.macs_at(at(mid)) <= target else (lo, mid - 1)
    widths = at(lo)
    est = cm.macs_at(widths)
    # The next channel in line may cost too much (a wide residual stream): let cheaper ones behind it fill the
    # gap, still in score order, without passing the target; then, if still short, the one closest above it.
    for _, key in queue[lo:]:
        if est >= target * (1 - tol / 10):
            break
        trial = dict(widths, **{key: widths[key] + 1})
        t_est = cm.macs_at(trial)
        if t_est <= target:
            widths, est = trial, t_est
    if est < target * (1 - tol):
        for key in dict.fromkeys(key for _, key in queue[lo:]):
            trial = dict(widths, **{key: widths[key] + 1})
            if widths[key] < sizes[key] and abs(cm.macs_at(trial) - target) < abs(est - target):
                widths, est = trial, cm.macs_at(trial)
    return widths


def keep_top(scores: Scores, widths: Mapping[str, int]) -> dict[str, list[int]]:
    """The channels each group keeps: the indices of its ``widths[key]`` highest scores, in channel order (ties:
    the lower index).

    >>> keep_top({"g": [0.1, 0.9, 0.5, 0.9]}, {"g": 2})
    {'g': [1, 3]}
    """
    keep = {}
    for key, n in widths.items():
        s = torch.as_tensor(scores[key], dtype=torch.float64).flatten()
        keep[key] = sorted(torch.argsort(s, descending=True, stable=True)[:n].tolist())
    return keep


def _select(model: nn.Module, x: torch.Tensor, scores: Scores, target: float, mode: str,
            groups: list[ChannelGroup] | None, tol: float, normalize: str, round_to: int | None = None,
            cost: CostModel | None = None) -> tuple[dict[str, list[int]], nn.Module]:
    round_to = check_round_to(round_to)
    groups = groups if groups is not None else channel_groups(model, x)
    cm = cost if cost is not None else cost_model(model, x, groups)
    considered = _considered(groups, scores)
    goal = _target_macs(target, cm.total)
    aim = goal
    closest: tuple[dict[str, list[int]], nn.Module, int] | None = None
    for _ in range(3):  # the prediction is exact for conv/linear layers; correct it if other ops scale too
        widths = _allocate(cm, considered, aim, mode, scores, tol, normalize, round_to)
        keep = keep_top(scores, widths)
        pruned = remove_channels(model, x, keep, groups=groups)
        prof = profile(pruned, example_input=x)
        real = prof.macs
        if abs(real - goal) <= tol * goal:
            return keep, pruned
        if round_to is not None:
            # aligned steps may make the tolerance unreachable: keep the closest; the caller reports the miss
            if closest is None or abs(real - goal) < abs(closest[2] - goal):
                closest = (keep, pruned, real)
            if real == cm.macs_at(widths):  # the prediction was exact: another aim cannot do better
                break
        aim *= goal / real
    if closest is not None:
        return closest[0], closest[1]
    predicted = cm.macs_at({k: len(v) for k, v in keep.items()})
    if prof.data_dependent:  # a count the values make (proposals, detections) changed with the weights
        raise SurgeryError(f"MACs targeting: {type(model).__name__}'s MACs depend on its values (layers run on items "
                           f"it selects, such as a detector's proposals after NMS), and the pruned net selects other "
                           f"counts: predicted {predicted:,} MACs, measured {real:,} (target {goal:,.0f}); cap the "
                           f"counts (e.g. torchvision's rpn_post_nms_top_n_test, box_detections_per_img) so they "
                           f"are always reached")
    raise SurgeryError(f"MACs targeting: layer_costs predicted {predicted:,} MACs but the pruned model measures "
                       f"{real:,} (target {goal:,.0f})")
