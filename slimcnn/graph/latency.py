"""Predicted latency as a function of group widths, measured on the deploy backend: the cost behind
``--target-latency``.

Why not time the whole model once per group and width (the literal per-group table): on ResNet-56, halving one
block's inner group removes under 2% of the MACs, within the timing noise of 2 shared cores (the same base timed
in two runs minutes apart measured 6.2 and 9.0 ms at batch 1), so such a table would be mostly noise, and it
costs (groups x widths) whole-model timings. Instead, as
NetAdapt / AMC-style lookup tables do, every conv/linear layer is timed alone on the backend over a grid of
(kept in, kept out) widths; layers of the same shape share one lookup table (ResNet-56's 56 layers have 7 shapes),
so the whole table is a few hundred micro-timings (about 15 s for ResNet-56 on ONNX Runtime, 1 thread). The
model's raw prediction is the sum of its layers' tables.

The grid has two classes per axis, because runtimes have two speeds: widths in multiples of 8 (and the full width)
and the odd widths just below them (7, 15, 23, ...). Measured on ONNX Runtime (AVX2, 1 thread, batch 1): ResNet-56
pruned uniformly to 8/16/32 channels ran at 0.30 of the base, to 9/18/35 at 0.55 and to 14/29/58 at 1.33 -- slower
than the unpruned net, because odd widths leave the runtime's blocked kernels for plain convolution. An aligned
width reads its own grid point; an odd one interpolates linearly between the odd grid points around it.

What the layer tables miss (BN, ReLU, residual adds, layout changes between layers, per-call overhead, and a
machine shared with other jobs) is not a constant, so the table is calibrated on the real model:
the base, the smallest allowed net (every group at its floor) and one uniformly pruned *anchor* near the target
are timed interleaved on the backend, and the measured ratio is a piecewise-linear, non-decreasing function of
the tables' raw ratio through those points. :func:`prune_to_latency` then adds each plan it times as one more
point and plans again while the measured ratio misses the target (as the MACs search re-aims when its
prediction misses), at most ``rounds`` times. The smallest reachable ratio an error names is the measured one.

Within a class each layer table is made monotone (``ms(w) <= ms(w')`` for ``w < w'``) by taking, at each width,
the least time measured at that width or any wider one of its class: the same kernel on fewer channels does less
work, so a slower narrow timing is noise (micro-timings of 10-100 us kernels on shared cores are noisy). The time
of the narrowest point (the call itself: session run, input copy) is subtracted from every point.

The allocation is the MACs search of :mod:`slimcnn.graph.targeting` (:func:`~slimcnn.graph.targeting.allocate_by_cost`)
with predicted milliseconds as the cost; nothing is written to disk.
"""
from __future__ import annotations

import copy
import re
import time
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ..backends import Runner, budgeted_repeats, check_backend, quantile, runner, time_runners, time_samples
from ..profile import profile
from .costs import LayerCost, cost_model
from .groups import ChannelGroup, channel_groups
from .surgery import remove_channels
from .targeting import Scores, TargetError, keep_top, aligned_widths, allocate_by_cost, check_round_to

#: the statistic of every timing here: the 10th percentile of interleaved calls, not the median. Why: other jobs on
#: the cores only ever add time, and a low quantile drops most of it. Measured on ResNet-56, ONNX Runtime, 2 threads
#: on 2 shared cores, four back-to-back timings of one pruned net against the base: ratios 0.671-0.791 by the
#: median, 0.638-0.661 by the 10th percentile. The confirmation reports the median ratio too.
QUANTILE = 0.1

#: widths timed per prunable axis are multiples of STEP channels (see :func:`_grid`), at most MAX_POINTS of them
STEP = 8
MAX_POINTS = 16


@dataclass(frozen=True)
class LatencyGoal:
    """A latency target: ``value`` is a ratio of the base's latency (``unit="ratio"``) or milliseconds
    (``"ms"``), measured on ``backend`` at ``batch`` images per call with ``threads`` intra-op threads."""

    value: float
    unit: str = "ratio"
    backend: str = "eager"
    batch: int = 1
    threads: int = 1

    def ratio(self, base_ms: float) -> float:
        return self.value if self.unit == "ratio" else self.value / base_ms

    def __str__(self) -> str:
        return f"{self.value:g} of the base latency" if self.unit == "ratio" else f"{self.value:g} ms"


def parse_latency_target(text: str) -> tuple[float, str]:
    """``"0.5"`` -> ``(0.5, "ratio")``; ``"12ms"`` -> ``(12.0, "ms")``. ValueError for anything else, so a bare
    ``12`` (a ratio above 1, or forgotten units?) is one clear line rather than a guess.

    >>> parse_latency_target("0.5"), parse_latency_target("12ms"), parse_latency_target("3.5 ms")
    ((0.5, 'ratio'), (12.0, 'ms'), (3.5, 'ms'))
    """
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(ms)?\s*", str(text))
    if not m:
        raise ValueError(f"--target-latency takes a ratio of the base's latency (e.g. 0.5) or milliseconds "
                         f"(e.g. 12ms), got {text!r}")
    value, unit = float(m.group(1)), "ms" if m.group(2) else "ratio"
    if not value > 0 or (unit == "ratio" and value > 1):
        raise ValueError(f"--target-latency as a ratio must be in (0, 1] (milliseconds take units: 12ms), "
                         f"got {text!r}")
    return value, unit


@dataclass
class LayerTable:
    """Milliseconds of one layer shape at every (kept in, kept out) pair of the grid (after the monotone
    envelope); ``measured`` keeps the raw medians."""

    in_grid: list[int]
    out_grid: list[int]
    ms: list[list[float]]
    measured: list[list[float]]

    def at(self, k_in: int, k_out: int) -> float:
        """Bilinear in each axis's own class: an aligned width reads its grid point, an unaligned one interpolates
        between the unaligned grid points around it (see the module docstring)."""
        return sum(wi * wj * self.ms[i][j] for i, wi in _weights(self.in_grid, k_in)
                   for j, wj in _weights(self.out_grid, k_out))


@dataclass
class LatencyTable:
    """Per-layer lookup tables plus the calibration on the real model. ``ratio_at(widths)`` predicts the model's
    latency as a ratio of the base's when each group ``k`` keeps ``widths[k]`` channels (groups not named stay
    whole); ``ms_at`` in milliseconds."""

    backend: str
    batch: int
    threads: int
    input_shape: tuple[int, ...]
    layers: list[LayerCost]
    tables: dict[str, LayerTable]          # layer name -> its shape's table (shared between equal shapes)
    base_ms: float = 0.0                    # measured, full model
    #: measured calibration points: {"what", "raw_ratio", "ratio", "ms"}; (1, 1) is the base
    points: list[dict[str, Any]] = field(default_factory=list)
    build_s: float = 0.0
    base_runner: Runner | None = field(default=None, repr=False)

    def raw_at(self, widths: Mapping[str, int]) -> float:
        """Sum of the layer tables (ms): the uncalibrated prediction."""
        return sum(self.tables[c.name].at(c.kept(widths, "in"), c.kept(widths, "out"))
                   for c in self.layers if c.name in self.tables)

    def ratio_at(self, widths: Mapping[str, int]) -> float:
        return self.calibrated(self.raw_at(widths) / self.raw_at({}))

    def ms_at(self, widths: Mapping[str, int]) -> float:
        return self.base_ms * self.ratio_at(widths)

    @property
    def total(self) -> float:
        return self.base_ms

    def calibrated(self, raw_ratio: float) -> float:
        """The measured ratio at ``raw_ratio``: piecewise-linear through the calibration points and the base
        ``(1, 1)``, made non-decreasing (a running max, so noise cannot make a costlier plan predict faster);
        outside the points it scales in proportion (a plan of odd widths can predict above 1: slower than the
        base)."""
        knots = sorted([(1.0, 1.0)] + [(p["raw_ratio"], p["ratio"]) for p in self.points if p["raw_ratio"] != 1])
        xs, ys, top = [], [], 0.0
        for x, y in knots:
            top = max(top, y)
            if xs and x == xs[-1]:
                ys[-1] = top
                continue
            xs.append(x)
            ys.append(top)
        if raw_ratio <= xs[0]:
            return ys[0] * raw_ratio / xs[0] if xs[0] > 0 else ys[0]
        if raw_ratio >= xs[-1]:
            return ys[-1] * raw_ratio / xs[-1]
        i = bisect_right(xs, raw_ratio) - 1
        return ys[i] + (ys[i + 1] - ys[i]) * (raw_ratio - xs[i]) / (xs[i + 1] - xs[i])

    def measure(self, model: nn.Module, widths: Mapping[str, int], what: str, budget_s: float = 4.0) -> float:
        """Time ``model`` (a net pruned to ``widths``) against the base, interleaved; record the point and return
        the measured ratio."""
        runners = {"base": self.base_runner, what: runner(model, self.input_shape, self.batch, self.backend,
                                                          self.threads)}
        ms = time_runners(runners, budgeted_repeats(runners, budget_s), q=QUANTILE)
        ratio = ms[what] / ms["base"]
        self.points.append({"what": what, "raw_ratio": round(self.raw_at(widths) / self.raw_at({}), 4),
                            "ratio": round(ratio, 4), "ms": round(ms[what], 4), "base_ms": round(ms["base"], 4)})
        return ratio

    def group_curves(self, groups: list[ChannelGroup]) -> dict[str, list[list[float]]]:
        """The per-group view: for every prunable group, ``[width, predicted ratio]`` over its grid widths with
        every other group whole."""
        return {g.key: [[w, round(self.ratio_at({g.key: w}), 4)] for w in _grid(g.size)]
                for g in groups if g.prunable}

    def summary(self) -> dict[str, Any]:
        shapes = {id(t): t for t in self.tables.values()}
        return {"backend": self.backend, "batch": self.batch, "threads": self.threads,
                "base_ms": round(self.base_ms, 4), "layers": len(self.tables), "layer_shapes": len(shapes),
                "grid_points": sum(len(t.in_grid) * len(t.out_grid) for t in shapes.values()),
                "layer_sum_ms": round(self.raw_at({}), 4), "calibration": self.points,
                "table_build_s": round(self.build_s, 2)}


class _Cost:
    """A :class:`~slimcnn.graph.targeting.WidthCost` over a prediction function."""

    def __init__(self, fn, total: float) -> None:
        self.macs_at, self.total = fn, total


def build_latency_table(model: nn.Module, example_input: torch.Tensor, backend: str = "eager", batch: int = 1,
                        threads: int | None = None, anchor_ratio: float = 0.5, *,
                        groups: list[ChannelGroup] | None = None, repeats: int = 15,
                        calibration_budget_s: float = 6.0, round_to: int | None = None) -> LatencyTable:
    """Time every layer shape of ``model`` over the width grid on ``backend``, then calibrate on the base, the
    smallest allowed net and an anchor pruned uniformly to a raw predicted ratio of ``anchor_ratio`` (see the
    module docstring). ``repeats``: interleaved timings per grid point (the median is kept).

    >>> from slimcnn import create
    >>> t = build_latency_table(create("cifar_resnet20"), torch.randn(1, 3, 32, 32), repeats=3,
    ...                         calibration_budget_s=1)
    >>> t.ratio_at({})                 # the base's widths: the base's latency (timings vary, this does not)
    1.0
    """
    start = time.perf_counter()
    check_backend(backend)
    threads = threads or torch.get_num_threads()
    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    groups = groups if groups is not None else channel_groups(model, example_input)
    prunable = {g.key for g in groups if g.prunable}
    if not prunable:
        raise TargetError("--target-latency needs a prunable channel group, and this model has none")
    layers = cost_model(model, example_input, groups).layers
    in_shapes = {r.name: r.in_shape for r in profile(model, example_input=example_input).layers}
    modules = dict(model.named_modules())
    by_shape: dict[tuple, list[str]] = {}
    specs: dict[tuple, tuple[nn.Module, tuple[int, ...], list[int], list[int]]] = {}
    for c in layers:
        mod, shape = modules[c.name], in_shapes.get(c.name)
        key = _shape_key(mod, shape)
        if key is None:
            continue  # a layer type we cannot rebuild alone: the calibration on the real model carries it
        axis_in = any(k in prunable for k, _, _ in c.in_parts)
        axis_out = any(k in prunable for k, _, _ in c.out_parts)
        depthwise = _depthwise(mod)
        in_grid = _grid(c.in_channels) if axis_in and not depthwise else [c.in_channels]
        out_grid = _grid(c.out_channels) if axis_out or (depthwise and axis_in) else [c.out_channels]
        key = (*key, tuple(in_grid), tuple(out_grid))
        by_shape.setdefault(key, []).append(c.name)
        specs[key] = (mod, tuple(shape[1:]), in_grid, out_grid)
    tables: dict[str, LayerTable] = {}
    for key, names in by_shape.items():
        mod, shape, in_grid, out_grid = specs[key]
        table = _time_layer(mod, shape, in_grid, out_grid, batch, backend, threads, repeats)
        for n in names:
            tables[n] = table
    t = LatencyTable(backend, batch, threads, tuple(example_input.shape[1:]), layers, tables)
    _calibrate(t, model, example_input, groups, anchor_ratio, calibration_budget_s, check_round_to(round_to))
    t.build_s = time.perf_counter() - start
    return t


def smallest_ratio(table: LatencyTable) -> float:
    """The smallest reachable latency ratio: measured on the net with every group at its floor."""
    floors = [p["ratio"] for p in table.points if p["what"] == "floor"]
    return min(floors) if floors else 0.0


def allocate_latency(table: LatencyTable, groups: list[ChannelGroup], ratio: float, mode: str = "uniform",
                     scores: Scores | None = None, *, tol: float = 0.01, normalize: str = "max",
                     round_to: int | None = None) -> dict[str, int]:
    """Channels to keep per group so the predicted latency is within ``tol`` of ``ratio`` of the base's: the MACs
    search of :mod:`slimcnn.graph.targeting` on predicted milliseconds. TargetError names the smallest reachable
    ratio (measured) when ``ratio`` is below it."""
    where = f"on {table.backend} at batch {table.batch} with {table.threads} thread(s)"
    if not 0 < ratio <= 1:
        raise TargetError(f"latency target {ratio:.3f} of the base is not in (0, 1] (base {table.base_ms:.3f} ms "
                          f"{where})")
    floor = smallest_ratio(table)
    if ratio < floor:
        least = f"{round_to} channels (or 1 in a narrower group)" if check_round_to(round_to) else "1 channel"
        floors = any(g.min_keep > 1 for g in groups if g.prunable)
        raise TargetError(f"latency target {ratio:.3f} of the base ({ratio * table.base_ms:.3f} ms) is below the "
                          f"smallest reachable ratio {floor:.3f}, measured {where} with every prunable group at "
                          f"{'its --min-keep floor or ' if floors else ''}{least}")
    # latency comes in steps (kernels pad channels to their block size): the closest plan, never an error
    return allocate_by_cost(_Cost(table.ms_at, table.total), groups, ratio * table.total, mode, scores, tol=tol,
                            normalize=normalize, round_to=round_to, strict=False)


def prune_to_latency(model: nn.Module, example_input: torch.Tensor, scores: Scores, table: LatencyTable,
                     ratio: float, mode: str = "uniform", *, groups: list[ChannelGroup] | None = None,
                     tol: float = 0.01, normalize: str = "max", round_to: int | None = None, rounds: int = 3,
                     measured_tol: float = 0.03) -> tuple[nn.Module, dict[str, int], dict[str, Any]]:
    """:func:`allocate_latency`, the highest-scoring channels kept, :func:`remove_channels`; each plan is timed
    against the base and added to the calibration, and while its measured ratio is more than ``measured_tol``
    (relative) off ``ratio`` the next plan is predicted from every point so far, at most ``rounds`` plans.
    Returns the validated copy, the widths and the calibration point (with the ratio predicted before it was
    timed) of the plan measured closest to ``ratio``: on a noisy machine a later plan is not always better."""
    groups = groups if groups is not None else channel_groups(model, example_input)
    best: tuple[float, nn.Module, dict[str, int], dict[str, Any]] | None = None
    last: dict[str, int] | None = None
    for i in range(rounds):
        widths = allocate_latency(table, groups, ratio, mode, scores, tol=tol, normalize=normalize, round_to=round_to)
        if widths == last:
            break  # the new point did not move the plan
        predicted, last = table.ratio_at(widths), widths
        pruned = remove_channels(model, example_input, keep_top(scores, widths), groups=groups)
        miss = abs(table.measure(pruned, widths, f"plan {i + 1}") - ratio)
        point = table.points[-1]
        point["predicted"] = round(predicted, 4)
        if best is None or miss < best[0]:
            best = (miss, pruned, widths, point)
        if miss <= measured_tol * ratio:
            break
    return best[1], best[2], best[3]


def confirm_latency(base: nn.Module, compact: nn.Module, input_shape: tuple[int, ...], backend: str, batch: int,
                    threads: int, budget_s: float = 5.0) -> dict[str, Any]:
    """Base and compressed model timed interleaved on the table's backend, batch and threads: a fresh
    measurement, apart from the ones the search made."""
    runners = {k: runner(copy.deepcopy(m).cpu(), input_shape, batch, backend, threads)
               for k, m in (("base", base), ("compressed", compact))}
    repeats = budgeted_repeats(runners, budget_s)
    samples = time_samples(runners, repeats)
    ms = {k: quantile(v, QUANTILE) for k, v in samples.items()}
    median = {k: quantile(v, 0.5) for k, v in samples.items()}
    return {"measured_base_ms": round(ms["base"], 4), "measured_compressed_ms": round(ms["compressed"], 4),
            "measured_ratio": round(ms["compressed"] / ms["base"], 4),
            "measured_ratio_median": round(median["compressed"] / median["base"], 4), "measured_repeats": repeats,
            "statistic": f"{QUANTILE:.0%} quantile of interleaved calls"}


# ---------------------------------------------------------------------------------------------------------------


def _aligned(width: int, size: int) -> bool:
    return width % STEP == 0 or width == size


def _grid(size: int) -> list[int]:
    """Widths timed along one axis of ``size`` channels: every width up to :data:`STEP`; beyond, two classes,
    the aligned widths (multiples of ``STEP``, and ``size``) and the unaligned ones just below them (``8k - 1``,
    and 1); past ``STEP * MAX_POINTS`` channels both step by a coarser multiple of ``STEP``.

    >>> _grid(16), _grid(20), _grid(6)
    ([1, 7, 8, 15, 16], [1, 7, 8, 15, 16, 19, 20], [1, 2, 3, 4, 5, 6])
    """
    if size <= STEP:
        return list(range(1, size + 1))
    step = STEP * -(-size // (STEP * MAX_POINTS))
    aligned = {*range(step, size + 1, step), size}
    return sorted(aligned | {1} | {w - 1 for w in aligned if w - 1 > 0})


def _weights(grid: list[int], k: int) -> list[tuple[int, float]]:
    """Grid indices and weights that give width ``k``: its own point if timed, else linear between the nearest
    timed points of its class (aligned or not), clamped at the ends of the class."""
    size = grid[-1]
    i = bisect_left(grid, k)
    if i < len(grid) and grid[i] == k:
        return [(i, 1.0)]
    same = [j for j, w in enumerate(grid) if _aligned(w, size) == _aligned(k, size)] or list(range(len(grid)))
    lo = [j for j in same if grid[j] < k]
    hi = [j for j in same if grid[j] > k]
    if not lo or not hi:
        return [((lo or hi)[-1 if lo else 0], 1.0)]
    a, b = lo[-1], hi[0]
    f = (k - grid[a]) / (grid[b] - grid[a])
    return [(a, 1 - f), (b, f)]


def _depthwise(mod: nn.Module) -> bool:
    return isinstance(mod, nn.modules.conv._ConvNd) and mod.groups > 1 and mod.groups == mod.in_channels \
        == mod.out_channels


def _shape_key(mod: nn.Module, in_shape: tuple[int, ...] | None) -> tuple | None:
    if in_shape is None:
        return None
    if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and mod.padding_mode == "zeros":
        return (type(mod).__name__, tuple(in_shape[1:]), mod.in_channels, mod.out_channels, mod.kernel_size,
                mod.stride, mod.padding, mod.dilation, mod.groups, mod.bias is not None)
    if isinstance(mod, nn.Linear):
        return ("Linear", tuple(in_shape[1:]), mod.in_features, mod.out_features, mod.bias is not None)
    return None


def _rebuild(mod: nn.Module, k_in: int, k_out: int) -> nn.Module:
    """A fresh layer like ``mod`` with ``k_in`` inputs and ``k_out`` outputs (random weights: time does not depend
    on values)."""
    if isinstance(mod, nn.Linear):
        return nn.Linear(k_in, k_out, bias=mod.bias is not None)
    groups = k_out if _depthwise(mod) else mod.groups
    k_in = k_out if _depthwise(mod) else k_in
    return type(mod)(k_in, k_out, mod.kernel_size, mod.stride, mod.padding, mod.dilation, groups,
                     mod.bias is not None)


def _time_layer(mod: nn.Module, shape: tuple[int, ...], in_grid: list[int], out_grid: list[int], batch: int,
                backend: str, threads: int, repeats: int) -> LayerTable:
    """Every grid point of one layer shape, timed interleaved (so a burst of load hits all points alike)."""
    depthwise = _depthwise(mod)
    runners: dict[tuple[int, int], Runner] = {}
    for i in in_grid:
        for o in out_grid:
            k_in = o if depthwise else i
            runners[(i, o)] = runner(_rebuild(mod, k_in, o), (k_in, *shape[1:]), batch, backend, threads)
    ms = time_runners(runners, repeats, q=QUANTILE)
    measured = [[ms[(i, o)] for o in out_grid] for i in in_grid]
    env = [row[:] for row in measured]
    for row in env:  # least time at this width or any wider one of its class: see the module docstring
        _envelope(row, out_grid)
    for j in range(len(out_grid)):
        col = [row[j] for row in env]
        _envelope(col, in_grid)
        for row, v in zip(env, col):
            row[j] = v
    least = min(min(row) for row in env)  # the call itself (session run, input copy): not the layer's work
    env = [[v - least for v in row] for row in env]
    return LayerTable(list(in_grid), list(out_grid), env, measured)


def _envelope(values: list[float], grid: list[int]) -> None:
    """In place: each value becomes the least of itself and every wider grid point of the same class."""
    size = grid[-1]
    for cls in (True, False):
        idx = [j for j, w in enumerate(grid) if _aligned(w, size) == cls]
        for a, b in zip(idx[-2::-1], idx[:0:-1]):
            values[a] = min(values[a], values[b])


def _calibrate(t: LatencyTable, model: nn.Module, x: torch.Tensor, groups: list[ChannelGroup], anchor_ratio: float,
               budget_s: float, round_to: int | None) -> None:
    """Time the base, the floor net (every prunable group at its smallest allowed width) and a uniform anchor
    near ``anchor_ratio`` interleaved, and record them as calibration points."""
    considered = [g for g in groups if g.prunable]
    raw_full = t.raw_at({})
    floor = {g.key: aligned_widths(g.size, round_to, g.min_keep)[0] for g in considered}
    aim = max(anchor_ratio * raw_full, t.raw_at(floor))
    anchor = allocate_by_cost(_Cost(t.raw_at, raw_full), groups, aim, "uniform", round_to=round_to, strict=False)
    plans = {"floor": floor, "anchor": anchor}
    nets = {k: remove_channels(model, x, {g: list(range(n)) for g, n in w.items()}, groups=groups)
            for k, w in plans.items()}
    t.base_runner = runner(model, t.input_shape, t.batch, t.backend, t.threads)
    runners = {"base": t.base_runner, **{k: runner(m, t.input_shape, t.batch, t.backend, t.threads)
                                         for k, m in nets.items()}}
    ms = time_runners(runners, budgeted_repeats(runners, budget_s), q=QUANTILE)
    t.base_ms = ms["base"]
    for k, w in plans.items():
        t.points.append({"what": k, "raw_ratio": round(t.raw_at(w) / raw_full, 4),
                         "ratio": round(ms[k] / ms["base"], 4), "ms": round(ms[k], 4), "base_ms": round(ms["base"], 4)})


def macs_for_latency(model: nn.Module, example_input: torch.Tensor, goal: LatencyGoal, round_to: int = 8,
                     groups: list[ChannelGroup] | None = None) -> tuple[float, dict[str, Any]]:
    """The MACs ratio at which ``model``, pruned uniformly to aligned widths, measures ``goal`` on its backend:
    the MACs target of a method that decides its widths by training or by its own search (Dagger, C-SGD, the
    peers, the stacks), so that every method can be asked for a latency. The widths come from
    :func:`prune_to_latency` (table, calibration, timed plans); the record says what was measured.

    >>> ratio, record = macs_for_latency(model, x, LatencyGoal(0.6, backend="onnxruntime"))  # doctest: +SKIP
    """
    groups = groups if groups is not None else channel_groups(model, example_input)
    anchor = goal.value if goal.unit == "ratio" else 0.5
    table = build_latency_table(model, example_input, goal.backend, goal.batch, goal.threads, anchor, groups=groups,
                                round_to=round_to)
    ratio = goal.ratio(table.base_ms)
    scores = {g.key: torch.zeros(g.size) for g in groups if g.prunable}  # which channels: irrelevant to time
    _, widths, point = prune_to_latency(model, example_input, scores, table, ratio, "uniform", groups=groups,
                                        round_to=round_to)
    costs = cost_model(model, example_input, groups)
    macs_ratio = costs.macs_at(widths) / costs.macs_at({})
    return macs_ratio, {"target": str(goal), "target_ratio": round(ratio, 4), "backend": goal.backend,
                        "batch": goal.batch, "threads": goal.threads, "via": "macs",
                        "macs_ratio": round(macs_ratio, 4), "round_to": round_to,
                        "predicted_ratio": point.get("predicted"), "search_ratio": point["ratio"],
                        "table_build_s": round(table.build_s, 2)}
