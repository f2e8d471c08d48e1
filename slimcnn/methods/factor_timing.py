"""Whether factorising a conv pays on the deploy runtime: each layer shape timed whole and as its two factors.

Fewer MACs is not less time. A factorised conv is two kernel calls instead of one, with an intermediate tensor
of ``rank`` channels written and read between them, and a rank off the runtime's block size (8) leaves its fast
kernels: TRP's ResNet-56 at half the MACs, with energy-chosen ranks, ran slower than the net it came from on ONNX
Runtime (``benchmarks/results/latency-cpu-resnet56.md``, ``latency-cpu-resnet56-trp-plan.md``).

So TRP plans on measured layer times when it knows where the net will run (``deploy``): every distinct layer
shape (conv configuration and input size; ResNet-56 has 6) is rebuilt with random weights and timed alone, whole
and factorised at each rank of a grid of aligned ranks, interleaved on the backend at the deploy batch (the
10th percentile of the calls, as :mod:`slimcnn.graph.latency` times). The factor times along the rank grid are made
non-decreasing (a slower narrow timing is noise: the same two kernels on fewer channels do less work). A layer is
factorised only at ranks whose factors are faster than the layer left whole (:meth:`LayerTimes.max_rank`); at a
higher rank it stays whole. The table is what the tests fix by hand (:meth:`LayerTimes.fixed`): no timing there.

A deploy of several batches (the CLI's ``--latency-batch 1 128``) times each and keeps a factorisation only where it
is faster at every one: the table then holds times relative to the whole layer, the largest over the batches
(:func:`merge_batches`), since one net must not be faster at batch 1 and slower at batch 128 without saying so.

>>> t = LayerTimes.fixed({"a": 1.0, "b": 1.0}, {"a": {8: 0.4, 16: 0.9, 24: 1.3}, "b": {8: 1.2, 16: 1.5}})
>>> t.max_rank("a"), t.max_rank("b"), t.cost("a", 12), t.cost("a", None)
(16, 0, 0.9, 1.0)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

#: ranks timed per layer: multiples of the alignment up to the full rank, at most this many (coarser beyond)
MAX_RANKS = 24


@dataclass(frozen=True)
class Deploy:
    """Where the compressed net will run: ``backend`` (``eager``, ``onnxruntime``, ``cuda``), ``batch`` images per
    call, ``threads`` intra-op threads."""

    backend: str = "eager"
    batch: int | tuple[int, ...] = 1
    threads: int = 1

    @property
    def batches(self) -> tuple[int, ...]:
        return tuple(int(b) for b in self.batch) if isinstance(self.batch, (tuple, list)) else (int(self.batch),)

    def __str__(self) -> str:
        """
        >>> str(Deploy("onnxruntime", (1, 128), 2))
        'onnxruntime, batch 1/128, 2 thread(s)'
        """
        return f"{self.backend}, batch {'/'.join(map(str, self.batches))}, {self.threads} thread(s)"


@dataclass
class LayerTimes:
    """Milliseconds of each layer left whole and factorised at each timed rank (after the monotone envelope); for a
    deploy of several batches, times relative to the whole layer (:func:`merge_batches`)."""

    whole: dict[str, float]
    factored: dict[str, dict[int, float]]
    deploy: Deploy | None = None
    build_s: float = 0.0
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # raw ms, "b<batch>/<rank>"

    @classmethod
    def fixed(cls, whole: dict[str, float], factored: dict[str, dict[int, float]]) -> "LayerTimes":
        """A table given by hand (tests, or a table measured elsewhere): used as it is."""
        return cls(dict(whole), {k: {int(r): float(v) for r, v in d.items()} for k, d in factored.items()})

    def cost(self, name: str, rank: int | None) -> float:
        """Milliseconds of layer ``name`` whole (``rank`` None) or factorised at ``rank``: the time of the smallest
        timed rank at or above it (never optimistic), the largest timed one beyond the grid."""
        if rank is None:
            return self.whole[name]
        times = self.factored[name]
        above = [r for r in times if r >= rank]
        return times[min(above)] if above else times[max(times)]

    def max_rank(self, name: str) -> int:
        """The largest rank at which the factors of ``name`` are faster than the layer whole (0: at none)."""
        if name not in self.whole:
            return 0
        faster = [r for r, ms in self.factored.get(name, {}).items() if ms < self.whole[name]]
        return max(faster, default=0)

    def summary(self) -> dict[str, Any]:
        """The table as report.json keeps it (and as a resumed run reads it back)."""
        return {"deploy": vars(self.deploy) if self.deploy else None, "build_s": round(self.build_s, 2),
                "whole_ms": {k: round(v, 5) for k, v in self.whole.items()},
                "factored_ms": {k: {str(r): round(v, 5) for r, v in d.items()} for k, d in self.factored.items()}}

    @classmethod
    def from_summary(cls, record: dict[str, Any]) -> "LayerTimes":
        t = cls.fixed(record["whole_ms"], record["factored_ms"])
        d = record.get("deploy")
        t.deploy = Deploy(d["backend"], tuple(d["batch"]) if isinstance(d["batch"], list) else d["batch"],
                          d["threads"]) if d else None
        t.build_s = float(record.get("build_s", 0.0))
        return t


def rank_grid(full: int, round_to: int | None) -> list[int]:
    """The ranks timed for a layer of full rank ``full``: multiples of ``round_to`` (8 if None) and ``full``, every
    rank when ``full`` is below the alignment, at most :data:`MAX_RANKS` of them.

    >>> rank_grid(48, 8), rank_grid(6, 8), len(rank_grid(576, 8))
    ([8, 16, 24, 32, 40, 48], [1, 2, 3, 4, 5, 6], 24)
    """
    step = round_to or 8
    if full < step:
        return list(range(1, full + 1))
    step *= -(-full // (step * MAX_RANKS))
    return sorted({*range(step, full + 1, step), full})


def _rebuild(conv: nn.Conv2d) -> nn.Conv2d:
    """A conv like ``conv`` with fresh random weights (time does not depend on the values)."""
    return nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                     conv.groups, conv.bias is not None, conv.padding_mode)


def _envelope(times: dict[int, float]) -> dict[int, float]:
    """Each rank's time becomes the least of itself and every higher rank's (see the module docstring)."""
    out, least = {}, float("inf")
    for r in sorted(times, reverse=True):
        least = min(least, times[r])
        out[r] = least
    return dict(sorted(out.items()))


def merge_batches(tables: list[tuple[dict[str, float], dict[str, dict[int, float]]]]
                  ) -> tuple[dict[str, float], dict[str, dict[int, float]]]:
    """One table from the ``(whole, factored)`` tables of several batches: each layer whole is 1, each rank the
    largest ratio factored / whole over the batches, so a rank pays only if it pays at every batch. One table is
    returned as it is (milliseconds).

    >>> merge_batches([({"a": 2.0}, {"a": {8: 1.0, 16: 1.8}}), ({"a": 10.0}, {"a": {8: 4.0, 16: 11.0}})])
    ({'a': 1.0}, {'a': {8: 0.5, 16: 1.1}})
    """
    if len(tables) == 1:
        return tables[0]
    names = tables[0][0]
    whole = {n: 1.0 for n in names}
    factored = {n: {r: max(f[n][r] / w[n] for w, f in tables) for r in tables[0][1][n]} for n in names}
    return whole, factored


def time_factorisations(convs: dict[str, tuple[nn.Conv2d, tuple[int, ...]]], deploy: Deploy,
                        factorise: Callable[[nn.Conv2d, int], nn.Module], full_rank: Callable[[nn.Conv2d], int],
                        round_to: int | None = None, repeats: int = 15) -> LayerTimes:
    """Time every distinct layer shape of ``convs`` (name -> conv and its input shape ``(C, H, W)``) whole and
    ``factorise(conv, rank)``-d at each rank of :func:`rank_grid`, interleaved on ``deploy``."""
    from ..backends import check_backend, runner, time_runners
    from ..graph.latency import QUANTILE

    start = time.perf_counter()
    check_backend(deploy.backend)
    shapes: dict[tuple, list[str]] = {}
    for name, (conv, in_shape) in convs.items():
        key = (conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride),
               str(conv.padding), tuple(conv.dilation), conv.groups, conv.bias is not None, tuple(in_shape))
        shapes.setdefault(key, []).append(name)
    modules, ranks_of = {}, {}
    with torch.no_grad():
        for key, names in shapes.items():
            conv, in_shape = convs[names[0]]
            fresh = _rebuild(conv).eval()
            ranks_of[key] = rank_grid(full_rank(fresh), round_to)
            modules[(key, None)] = (fresh, in_shape)
            modules.update({(key, r): (factorise(fresh, r).eval(), in_shape) for r in ranks_of[key]})
    tables, measured = [], {}
    for batch in deploy.batches:  # one batch at a time, its runners interleaved
        ms = time_runners({k: runner(m, shape, batch, deploy.backend, deploy.threads)
                           for k, (m, shape) in modules.items()}, repeats, q=QUANTILE)
        whole, factored = {}, {}
        for key, names in shapes.items():
            raw = {r: ms[(key, r)] for r in ranks_of[key]}
            for name in names:
                whole[name], factored[name] = ms[(key, None)], _envelope(raw)
                measured.setdefault(name, {}).update({f"b{batch}/{r}": v for r, v in raw.items()})
        tables.append((whole, factored))
    whole, factored = merge_batches(tables)
    return LayerTimes(whole, factored, deploy, time.perf_counter() - start, measured)
