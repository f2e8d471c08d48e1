"""The MACs target at which a method's *own* compact net measures a latency goal.

A method that decides its widths itself (Torch-Pruning's per-layer ratios, ModelOpt's subnet search, C-SGD's
clusters, Dagger's gates) is asked for latency through a MACs target. The first guess comes from the latency model
(:func:`slimcnn.graph.latency.macs_for_latency`: a uniformly pruned net of aligned widths), but two nets of equal
MACs differ in time when their widths are spread differently (Torch-Pruning's widths at the uniform net's MACs
measured well above the goal on ONNX Runtime). So each guess is *probed*: the method prepares and
finalizes the base at that MACs target with no training in between, the compact net is timed against the base
(interleaved, the same statistic as every other latency figure), and the target is corrected by the secant through
the probes until the measured ratio is within ``tol`` of the goal. For the peers and C-SGD the probe builds exactly
the structure the run will train (their widths follow from the weights they start from); for a stack, the split its
search chooses and TRP's ranks on the untrained first stage; for Dagger, the structure its gates start from, which
training then moves, so the final timing is what decides its row.

A method whose widths come in steps of its alignment (``round_to`` 8: a 16-channel stage keeps 8 or 16) can have
no net near the goal at all: the latency jumps across it between two neighbouring widths.
:func:`fit_aligned` then fits again at a finer alignment (4), starting where the coarser one came nearest, and
keeps the alignment whose net measured nearer the goal.

>>> fit_macs_to_latency(make, base, x, goal, start=0.44, prepare_kwargs={})  # doctest: +SKIP
(0.41, {"probes": [...], ...})
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import nn

from .graph.latency import LatencyGoal, confirm_latency
from .graph.validate import SurgeryError
from .methods.base import Method
from .profile import profile

#: the range a corrected MACs target is kept in
LOWEST, HIGHEST = 0.02, 0.995
#: the alignments :func:`fit_aligned` tries, coarsest (fastest kernels) first
ALIGNMENTS = (8, 4)
#: how far from the goal a row may measure (relative) and still count as at the goal
BAND = 0.1


def next_target(points: list[tuple[float, float]], goal: float) -> float:
    """The next MACs target from probes ``(macs_ratio, latency_ratio)`` in the order made: the secant through the two
    probes nearest the goal (latency rises with MACs); from one probe, or when noise made the secant fall, latency
    taken as proportional to MACs from the last probe.

    >>> round(next_target([(0.5, 0.8)], 0.6), 3)
    0.375
    >>> round(next_target([(0.5, 0.8), (0.375, 0.65)], 0.6), 3)
    0.333
    """
    near = sorted(points, key=lambda p: abs(p[1] - goal))[:2]
    last_m, last_r = points[-1]
    guess = last_m * goal / last_r
    if len(near) == 2 and abs(near[0][0] - near[1][0]) > 1e-6:
        (m0, r0), (m1, r1) = near
        slope = (r1 - r0) / (m1 - m0)
        if slope > 0:  # else timing noise outweighed the step: scale from the last probe, which keeps moving
            guess = m0 + (goal - r0) / slope
    if any(abs(guess - m) < 2e-3 for m, _ in points):  # a target already probed tells nothing new
        guess = last_m * goal / last_r
    return min(HIGHEST, max(LOWEST, guess))


def probe(make: Callable[[float], Method], base: nn.Module, example: torch.Tensor, macs_target: float,
          prepare_kwargs: dict[str, Any]) -> nn.Module:
    """The compact net ``make(macs_target)`` builds from ``base`` with no training between prepare and finalize."""
    method = make(macs_target)
    # without the run's config a stack trains nothing inside prepare: its first stage is finalized untrained
    work = method.prepare(copy.deepcopy(base), example, **{k: v for k, v in prepare_kwargs.items() if k != "cfg"})
    return method.finalize(work.eval()).eval()


def fit_macs_to_latency(make: Callable[[float], Method], base: nn.Module, example: torch.Tensor, goal: LatencyGoal,
                        start: float, prepare_kwargs: dict[str, Any], tol: float = 0.03, probes: int = 4,
                        measure: Callable[[nn.Module], float] | None = None) -> tuple[float, dict[str, Any]]:
    """The MACs target whose probe (:func:`probe`) measures closest to ``goal`` (a ratio), and the record of every
    probe. ``measure`` gives a compact net's latency ratio to the base (default: timed against it on the goal's
    backend and batch, :func:`~slimcnn.graph.latency.confirm_latency`); it stops at the first probe within ``tol``
    (relative) of the goal, else after ``probes`` probes, keeping the nearest."""
    if goal.unit != "ratio":
        raise ValueError("fit_macs_to_latency takes the goal as a ratio of the base's latency")
    shape = tuple(example.shape[1:])
    measure = measure or (lambda net: confirm_latency(base, net, shape, goal.backend, goal.batch, goal.threads,
                                                      budget_s=4.0)["measured_ratio"])
    base_macs = profile(base, shape).macs
    was_training = base.training
    record: list[dict[str, Any]] = []
    target, unreachable = start, 0.0
    for _ in range(probes):
        try:
            compact = probe(make, base.eval(), example, target, prepare_kwargs)
        except (ValueError, SurgeryError) as e:  # too small for this method: go back up, halfway to the last good
            if not any("ratio" in p for p in record):
                raise
            record.append({"macs_target": round(target, 4), "error": str(e)})
            unreachable = max(unreachable, target)
            target = (target + min(p["macs_target"] for p in record if "ratio" in p)) / 2
            continue
        macs = profile(compact, shape).macs / base_macs
        ratio = float(measure(compact))
        record.append({"macs_target": round(target, 4), "macs_ratio": round(macs, 4), "ratio": round(ratio, 4)})
        print(f"latency probe: MACs target {target:.3f} -> net of {macs:.3f} MACs measures {ratio:.3f} of the base "
              f"(goal {goal.value:g})")
        if abs(ratio - goal.value) <= tol * goal.value:
            break
        # one step moves the target by at most a factor of 2 and never below a target the method could not build
        step = next_target([(p["macs_target"], p["ratio"]) for p in record if "ratio" in p], goal.value)
        target = max(min(step, 2 * target), target / 2, (unreachable + target) / 2 if unreachable else 0.0)
        if any(abs(target - p["macs_target"]) < 1e-3 for p in record):  # nowhere new to go (the lowest target)
            break
    base.train(was_training)
    best = min((p for p in record if "ratio" in p), key=lambda p: abs(p["ratio"] - goal.value))
    within = abs(best["ratio"] - goal.value) <= tol * goal.value
    if not within:
        print(f"warning: no probe came within {tol:.0%} of latency {goal.value:g}: the nearest, MACs target "
              f"{best['macs_target']:.3f}, measured {best['ratio']:.3f} of the base; the run goes on at that target")
    return best["macs_target"], {"probes": record, "chosen": best, "tol": tol, "within_tol": within}



def in_band(ratio: float | None, goal: float, band: float = BAND) -> bool:
    """Whether a measured ``ratio`` is within ``band`` (relative) of ``goal``.

    >>> in_band(0.65, 0.6), in_band(0.513, 0.6), in_band(None, 0.6)
    (True, False, False)
    """
    return ratio is not None and abs(ratio - goal) <= band * goal


def fit_aligned(make: Callable[[int, float], Method], base: nn.Module, example: torch.Tensor, goal: LatencyGoal,
                start: float, prepare_kwargs: dict[str, Any], alignments: tuple[int, ...] = ALIGNMENTS,
                **fit_options: Any) -> tuple[float, int, dict[str, Any]]:
    """:func:`fit_macs_to_latency` at each of ``alignments`` in turn (``make(round_to, macs_target)`` builds the
    method) until one's nearest probe is within :data:`BAND` of the goal; returns the MACs target and alignment of
    the probe that measured nearest over all of them, and one record: every probe (each with its ``round_to``),
    the chosen one, and the alignments tried."""
    fits: list[tuple[int, dict[str, Any]]] = []
    for a in alignments:
        target, fit = fit_macs_to_latency(lambda m, a=a: make(a, m), base, example, goal, start, prepare_kwargs,
                                          **fit_options)
        fits.append((a, fit))
        if in_band(fit["chosen"]["ratio"], goal.value):
            break
        start = target  # a finer alignment has widths between the coarse steps around the nearest net
        if a != alignments[-1]:
            print(f"latency fit: at alignment {a} no net came within {BAND:.0%} of {goal.value:g} (nearest "
                  f"{fit['chosen']['ratio']:.3f}); fitting again at a finer alignment")
    a, best = min(fits, key=lambda f: abs(f[1]["chosen"]["ratio"] - goal.value))
    record = {"probes": [{**p, "round_to": r} for r, f in fits for p in f["probes"]],
              "chosen": {**best["chosen"], "round_to": a}, "tol": best["tol"], "within_tol": best["within_tol"],
              "round_to": a, "alignments_tried": [r for r, _ in fits]}
    return best["chosen"]["macs_target"], a, record
