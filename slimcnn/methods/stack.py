"""Stacked compression under one budget: a channel method (prune or merge), then TRP on the smaller net.

``methods.create("dagger+trp", target_macs=0.5)`` (or ``slimcnn compress --method dagger+trp``) gives one
MACs target and one epoch budget for the whole stack. Stacks: ``l1+trp``, ``dagger+trp``, ``csgd+trp``,
``tp+trp`` (the Torch-Pruning peer, then TRP).

**The split of the target.** ``split`` S in (0, 1) is the fraction of the *log* MACs reduction done by the
channel stage: with an overall target T (a ratio of the base MACs), the channel stage keeps T**S of the base and
TRP the remaining T**(1 - S) of the channel-pruned net. S = 0.5 with T = 0.5: each stage keeps ~0.707. TRP is
always planned at the absolute overall target (T x base MACs) on the net the channel stage produced, so a channel
stage that lands a little off its own ratio is corrected and the final MACs are within TRP's 1% (TRP raises
``TargetError`` at ``prepare`` otherwise). Without ``split``, it is searched: each of ``splits`` is scored by a
finalize-only proxy (channel stage at T**S with no training, TRP's decomposition at the rest, BatchNorm
recalibrated on a few training batches, top-1 on ``search_images`` images of the validation split when the run
has one, else of other training batches); the best is used and every split tried is in the report, beside the same proxy for TRP alone (no channel stage): when that scores above
every split, the report and one warning line say the stack is not expected to beat TRP at this target. The proxy
for a channel stage that needs training before its finalize (dagger, csgd) is magnitude pruning (l1, global ranking:
dagger's search spreads widths unevenly, and csgd in a stack takes the global ranking's widths): untrained gates or
clusters say nothing about a split.

**A latency goal** (``target_latency``, a :class:`~slimcnn.graph.latency.LatencyGoal`) is planned by the stack
itself when both stages plan on latency (``l1+trp``): ``split`` is then the fraction of the *log latency*
reduction done by the channel stage, which runs its own latency plan to G**S of the base's time on the goal's
runtime; TRP's plan then takes the net the rest of the way, to G over the ratio the channel stage's net measured
(both plans time their nets against their base, interleaved). The split search compares the splits (by default
``LATENCY_SPLITS``, reaching higher: where factorising saves little time TRP can take only a small share) at the
same goal on that runtime, so the split is chosen at equal latency, not at equal MACs. Other stacks are given
the MACs target that measures the goal (:mod:`slimcnn.latency_fit`).

**The channel stage's job in a stack** is to take the channels that are cheapest to lose, not a slice of every
layer: TRP already thins every layer. So a stack's l1 stage ranks channels globally (``mode="global"``; pass
``mode="uniform"`` for the method's own default), and the searched splits start small. Measured on the fine-tuned
ResNet-56 at 0.3 MACs, plain recipe, 2 epochs (one run each): TRP alone 85.08; l1+trp at split 0.1 85.44 with
uniform widths, 85.73 with the global ranking, which cut the blocks' inner channels (to 11-16 of 16, 29-31 of 32,
54-63 of 64) and left the residual streams nearly whole (15/16, 32/32, 64/64), 87.94 before TRP against the
base's 88.25 (uniform: 86.25).

**The budget.** A stack trains everything before TRP's finalize (TRP's recipe leaves no fine-tune after its
lossless factorisation), so ``method_share`` is 1. Those epochs M are split by the channel stage's own recipe:
the channel stage gets half of M and spends ``method_share`` of that half with its hooks attached (l1, tp: none;
dagger: a quarter of M); the rest of its half, which would fine-tune it, goes to TRP's training, which trains the
pruned net anyway. C-SGD trains alongside TRP for all of M (below). See :meth:`Stack.stage_epochs`.

**C-SGD trains at the same time as TRP** (``csgd+trp``). C-SGD changes no structure until its merge, which is
lossless once its clusters have met, so it needs no epochs of its own: its centripetal update and TRP's truncation
run in the same steps over the whole budget, and at the end the clusters are merged and the merged net factorised.
Its widths are the global ranking's at ``target**split`` (as a stack's l1 stage; clustering then decides which
channels go together), and TRP's ranks are planned at ``prepare`` on the net the merge will produce (the starting
clusters merged). TRP's truncation of the unmerged convs keeps cluster rows that have met equal in exact
arithmetic (the rank-r projection acts on each filter alone), but its float32 rounding is relative to the whole
matrix: the clusters of a ResNet-56 run at 0.3 ended 3.5e-5 apart, above C-SGD's 1e-5 bar, and the merge was
reported not lossless although no top-1 moved. A stack's TRP therefore truncates in float64 (TRP's ``svd_dtype``):
the clusters then ended 3.7e-7 apart at 0.3 and 3.0e-7 at 0.5, and the bench rows took 433 s and 422 s against 414 s
and 409 s in float32. The merged convs are no richer in rank, so the factorisation is lossless too. C-SGD's training
distils when the run does. Measured on the fine-tuned ResNet-56, plain recipe, 2 epochs, searched split 0.1 (one run
each): 85.46 at 0.3 MACs and 87.46 at 0.5 (85.60 / 87.44 with the float32 truncation), against 84.30 and 86.91 for
the old order (one epoch of C-SGD, the merge, one epoch of TRP); the merge and factorisation left top-1 unchanged
(85.57 and 87.51 before and after; largest logit change 1.3e-5).

**How it runs in one pipeline.** The engine's loop trains one model with one optimiser, and the channel stage's
finalize replaces the model, so stage 1 cannot switch to stage 2 mid-loop. Stack therefore runs stage 1 whole
inside ``prepare`` (its prepare, its training with its hooks, its finalize, BatchNorm recalibration, its top-1;
C-SGD instead trains with TRP, above):
:func:`slimcnn.compress.compress` offers ``prepare`` its ``train_loader``, ``test_loader`` and ``cfg``, and trains
only the remaining ``cfg.method_epochs - epochs_in_prepare`` epochs with the Stack's hooks, which are TRP's.
``finalize`` is TRP's finalize. Stage 1's training does not distil (``--distill`` applies to TRP's phase and the
fine-tune); the report says so.

>>> m = create("dagger+trp", target_macs=0.5, scheme="spatial")    # doctest: +SKIP
>>> compact, report = slimcnn.compress.compress(model, m, train, test, (3, 32, 32), cfg)  # doctest: +SKIP
>>> [s["method"] for s in report["stages"]]                          # doctest: +SKIP
['dagger', 'trp']
"""
from __future__ import annotations

import copy
import functools
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from tqdm import tqdm

from ..profile import profile
from .base import Method, macs_goal

if TYPE_CHECKING:
    from ..graph.latency import LatencyGoal

#: stages a stack may start with (each removes or merges channels on the one surgery engine) and end with
CHANNEL_STAGES = ("l1", "dagger", "csgd", "tp")
LAST_STAGES = ("trp",)
STACKS = tuple(f"{a}+{b}" for a in CHANNEL_STAGES for b in LAST_STAGES)
DEFAULT_SPLITS = (0.05, 0.1, 0.2, 0.3, 0.5)
#: under a latency goal the search reaches further: where factorising saves little time (batch 1, eager), TRP can
#: take only a small share of the goal and the channel stage must do most of it
LATENCY_SPLITS = (0.1, 0.3, 0.5, 0.7, 0.9)
#: the channel stage's defaults inside a stack, where they differ from the method's own (a user's option wins)
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {"l1": {"mode": "global"}}
#: channel stages that only steer training until a lossless finalize (C-SGD's merge): in a stack they train in the
#: same steps as TRP, over the whole budget, with the global ranking's widths (module docstring)
CONCURRENT = ("csgd",)
#: the l1 mode whose widths resemble a trained channel stage's, for the split proxy (dagger searches its widths
#: across the net; csgd in a stack takes the global ranking's widths)
PROXY_MODE = {"dagger": "global", "csgd": "global"}
SPLIT_HELP = ("stacks (e.g. dagger+trp): fraction in (0, 1) of the log MACs reduction done by the channel stage: "
              "it keeps TARGET**S of the base MACs, trp the rest of the way to TARGET (default: searched over "
              f"{', '.join(map(str, DEFAULT_SPLITS))} by a finalize-only proxy on training images)")


def parse_stack(name: str) -> tuple[str, str]:
    """``"dagger+trp"`` -> ``("dagger", "trp")``; ValueError naming what is wrong and what would work."""
    from .registry import list_methods

    parts = name.split("+")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"{name!r} is not a stack: a stack is a channel method and trp joined by '+'; "
                         f"stacks: {', '.join(STACKS)}")
    first, last = parts
    for stage in parts:
        if stage not in list_methods():
            raise ValueError(f"unknown stage {stage!r} in {name!r}; stacks: {', '.join(STACKS)}")
    if first not in CHANNEL_STAGES:
        raise ValueError(f"{name!r}: the first stage must be a channel method ({', '.join(CHANNEL_STAGES)}), "
                         f"not {first}; stacks: {', '.join(STACKS)}")
    if last not in LAST_STAGES:
        raise ValueError(f"{name!r}: the last stage must be {' or '.join(LAST_STAGES)}, not {last}; "
                         f"stacks: {', '.join(STACKS)}")
    return first, last


def check_split(split: float | None, method: str | None = None) -> float | None:
    """``split`` if it is None or in (0, 1) (and ``method``, when given, is a stack); else ValueError."""
    if split is None:
        return None
    if method is not None and "+" not in method:
        raise ValueError(f"--split applies only to a stack (e.g. --method {method}+trp), not to {method}")
    if not 0.0 < float(split) < 1.0:
        raise ValueError(f"split must be in (0, 1) (the channel stage's share of the log MACs reduction), "
                         f"got {split}")
    return float(split)


def _rank0_split(split: float, device: torch.device | str) -> float:
    """Under torch.distributed every rank takes rank 0's searched split: each rank scores the splits on its own
    shard of the data, and ranks that chose differently would build different nets (DDP stops at the first
    mismatched shape; C-SGD beside TRP would train different clusters and ranks on each rank)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return split
    t = torch.tensor([split], dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return float(t.item())


@functools.cache
def stack_class(name: str) -> type[Stack]:
    """The :class:`Stack` subclass for ``name`` (e.g. ``"dagger+trp"``), so that the pipeline, the CLI and the
    benchmark read its name, recipe and options from a class like any method's."""
    from .registry import method_class

    first, last = parse_stack(name)
    c1, c2 = method_class(first), method_class(last)
    if first in CONCURRENT:
        phase = f"{c1.method_phase} and {c2.method_phase} at once"
    elif c1.method_share > 0:
        phase = f"{first} {c1.method_phase}, then {c2.method_phase}"
    else:
        phase = f"{c2.method_phase} on the {first}-pruned net"
    # --min-keep floors the channel stage's widths (the run's layer policy is active while it prunes); TRP keeps
    # every channel count, so it obeys a floor trivially
    # a latency goal is planned by the stack itself only when both stages plan on latency (l1+trp); the others
    # are given the MACs target that measures it (slimcnn.latency_fit)
    on_latency = all("target_latency" in c.targets for c in (c1, c2))
    return type(f"Stack_{first}_{last}", (Stack,), {"name": name, "stages": (first, last), "method_phase": phase,
                                                     "options": Stack.options | c1.options | c2.options,
                                                     "targets": Stack.targets | ({"target_latency"} if on_latency
                                                                                 else set()),
                                                     "layer_control": c1.layer_control & {"min_keep"},
                                                     "__module__": __name__})


class Stack(Method):
    """A channel method, then TRP, behind the one method interface (see the module docstring).

    ``report()["stages"]``: per stage, its MACs target and measured MACs as ratios of the base, its epochs with
    its hooks, top-1 on the test loader right after its finalize (stage 1: after BN recalibration, or for C-SGD
    right after its merge at the end of training; None without a test loader), wall time and the stage's own report
    (``details``).

    Build it with ``methods.create("l1+trp", target_macs=0.5, split=0.5, scheme="spatial")``: options other than
    the stack's own go to every stage whose constructor takes them (``round_to`` to both; ``scheme`` to trp;
    ``scorer`` to l1; ...); an option no stage takes is a TypeError.
    """

    name = "stack"
    stages: ClassVar[tuple[str, str]] = ("l1", "trp")
    trains_before_finalize = True  # TRP's training, at least
    method_share = 1.0             # every epoch before TRP's finalize; TRP's recipe leaves no fine-tune
    method_phase = "stage training"
    # it runs its first stage whole in prepare; it scores its split search on the validation split
    prepare_inputs = frozenset({"train_loader", "test_loader", "val_loader", "cfg"})
    cli_args: ClassVar[list[tuple[str, dict[str, Any]]]] = [
        ("--split", {"type": float, "default": None, "metavar": "S", "help": SPLIT_HELP})]

    def __init__(self, target_macs: float = 0.5, split: float | None = None,
                 splits: tuple[float, ...] | None = None, search_images: int = 512,
                 round_to: int | None = None, target_latency: LatencyGoal | None = None, **options: Any) -> None:
        from .registry import method_class

        if target_latency is not None:
            if "target_latency" not in self.targets:
                raise ValueError(f"{self.name}: a latency goal is planned by a stack only when both stages plan on "
                                 f"latency (l1+trp); give {self.name} the MACs target that measures it (slimcnn "
                                 f"compress --target-latency fits one)")
            target_macs = None
        elif target_macs is None or target_macs <= 0:
            raise ValueError(f"target MACs must be > 0 (<= 1: a ratio, > 1: absolute MACs), got {target_macs}")
        self.target_macs, self.target_latency, self.split = target_macs, target_latency, check_split(split)
        self._goal_ratio = 1.0  # the latency goal as a ratio of the base's time (prepare times the base for ms)
        if splits is None:
            splits = DEFAULT_SPLITS if target_latency is None else LATENCY_SPLITS
        self.splits = tuple(check_split(s) for s in splits)
        if not self.splits:
            raise ValueError("splits must name at least one split to search")
        if search_images < 1:
            raise ValueError(f"search_images must be >= 1, got {search_images}")
        self.search_images, self.round_to = search_images, round_to
        self.stage_classes = [method_class(s) for s in self.stages]
        self.stage_options: list[dict[str, Any]] = [{} for _ in self.stages]
        for key, value in {**options, **({"round_to": round_to} if round_to is not None else {})}.items():
            takers = [i for i, c in enumerate(self.stage_classes) if key in c.options]
            if not takers:
                raise TypeError(f"{self.name}: no stage ({', '.join(self.stages)}) takes option {key!r}")
            for i in takers:
                self.stage_options[i][key] = value
        for key, value in STAGE_DEFAULTS.get(self.stages[0], {}).items():
            self.stage_options[0].setdefault(key, value)
        if self.concurrent():  # TRP's truncation must keep C-SGD's met clusters equal for a lossless merge
            self.stage_options[1].setdefault("svd_dtype", "float64")
        for c, opts in zip(self.stage_classes, self.stage_options):  # bad stage options fail now, not mid-run
            c(target_macs=0.5, **opts)
        self.first: Method | None = None
        self.last: Method | None = None
        self.epochs_in_prepare = 0
        self.stage_records: list[dict[str, Any]] = []
        self.search: dict[str, Any] | None = None
        self.chosen_split: float | None = None
        self._test_loader = None
        self._t_last = 0.0
        self._base_macs = 0
        self._stage2_epochs: int | None = None

    # ------------------------------------------------------------------------------------------ budget
    @classmethod
    def concurrent(cls) -> bool:
        """Whether the channel stage trains in the same steps as TRP (see ``CONCURRENT``)."""
        return cls.stages[0] in CONCURRENT

    @classmethod
    def stage_epochs(cls, method_epochs: int) -> tuple[int, int]:
        """(epochs of the channel stage with its hooks, epochs of TRP's training) out of ``method_epochs``;
        ValueError if a stage that needs training is left with none.

        A concurrent stage (C-SGD) trains in the same epochs as TRP: both get all of them.

        >>> [stack_class(s).stage_epochs(4) for s in ("dagger+trp", "l1+trp", "csgd+trp")]
        [(1, 3), (0, 4), (4, 4)]
        """
        from .registry import method_class

        if cls.concurrent():
            if method_epochs < 1:
                raise ValueError(f"{cls.name} needs at least 1 epoch before its finalize (centripetal SGD and "
                                 f"trained-rank pruning at once), and {method_epochs} leave(s) none; give it a "
                                 f"budget, e.g. --epochs 1")
            return method_epochs, method_epochs
        first = method_class(cls.stages[0])
        share = first.method_share
        e1 = round(method_epochs / 2 * share)
        if share > 0:
            e1 = max(1, e1)
        e2 = method_epochs - e1
        if e2 < 1 or (first.trains_before_finalize and e1 < 1):
            need = 1 + (1 if first.trains_before_finalize else 0)
            plan = (f"1 of {first.method_phase} and 1 of trained-rank pruning" if need == 2
                    else "1 of trained-rank pruning")
            raise ValueError(f"{cls.name} needs at least {need} epoch(s) before its finalize ({plan}), and "
                             f"{method_epochs} leave(s) too few; give it a budget, e.g. --epochs {need}")
        return e1, e2

    # ------------------------------------------------------------------------------------------ stage 1
    def prepare(self, model: nn.Module, example_input: torch.Tensor, train_loader=None, test_loader=None,
                cfg: Any = None, val_loader=None) -> nn.Module:
        """Choose the split, run the channel stage whole (prepare, train, finalize, BN recalibration, top-1),
        then prepare TRP on its output at the overall target; returns the model TRP's training starts from.

        ``cfg`` (a :class:`slimcnn.compress.CompressConfig`; ``compress`` passes it) gives the epoch budget and
        the training settings; without it the channel stage gets no training (fine for l1 and tp)."""
        from .registry import create

        t0 = time.time()
        self.example_input = example_input
        self._test_loader = test_loader
        device = example_input.device
        model = model.to(device)  # the pipeline hands over a copy: stage 1 runs here, on the run's device
        x = example_input[:1]
        base = profile(model, example_input=x).macs
        if self.target_latency is not None:
            self._goal_ratio = self._latency_ratio(model, example_input)
            goal = ratio = 0.0  # no MACs target: each stage plans on the runtime (_first_at, _last_after)
        else:
            goal = macs_goal(self.target_macs, base)
            ratio = goal / base
            if not 0 < ratio < 1:
                raise ValueError(f"{self.name}: the target {goal / 1e6:.2f}M MACs must be below the base "
                                 f"{base / 1e6:.2f}M MACs")
        e1 = self.stage_epochs(cfg.method_epochs)[0] if cfg is not None else 0
        if self.split is not None:
            split = self.split
        elif train_loader is None:
            raise ValueError(f"{self.name}: give split= (there is no training data to search it on)")
        else:
            split = _rank0_split(self._search_split(model, example_input, train_loader, ratio, goal, base,
                                                    val_loader), device)
            self.search["chosen"] = split
        self.chosen_split = split
        self._base_macs = base
        if self.concurrent():
            return self._prepare_concurrent(model, example_input, cfg, len(train_loader) if train_loader else 0,
                                            ratio ** split, goal, t0)
        first_name, last_name = self.stages
        self.first = self._first_at(first_name, split, ratio, **self.stage_options[0])
        accepted = self.first.prepare_inputs
        offered: dict[str, Any] = {"train_loader": train_loader}
        if e1 > 0 and cfg is not None:  # the stage's own schedule (Dagger's annealing, C-SGD's ramp)
            offered.update(cfg.method_budget(len(train_loader), e1))
        work = self.first.prepare(model, example_input, **{k: v for k, v in offered.items() if k in accepted})
        if e1 > 0:
            if train_loader is None:
                raise ValueError(f"{self.name}: {first_name} trains before its finalize: pass train_loader")
            from ..engine import train

            tcfg = cfg.train_config(e1, cfg.method_lr or cfg.lr, Path(cfg.out_dir) / "stage1_ckpt" if cfg.out_dir
                                    else None)
            work = train(work, train_loader, tcfg, method=self.first).model
        pruned = self.first.finalize(work).to(device)
        recalib = 0
        if train_loader is not None:  # the same recalibration the pipeline gives every finalize
            from ..engine import recalibrate_bn

            recalib = recalibrate_bn(pruned, train_loader, cfg.bn_recalib if cfg is not None else 100, device)
        macs = profile(pruned, example_input=x).macs
        self.stage_records = [{
            "stage": 1, "method": first_name, **self._stage_target(split, ratio), "macs": macs,
            "macs_ratio": macs / base, "epochs": e1, "distilled": False, "bn_recalib_batches": recalib,
            "top1": self._top1(pruned, test_loader, device), "time_s": round(time.time() - t0, 1),
            "details": self.first.report()}]
        self.epochs_in_prepare = e1
        # what the pipeline then trains with TRP's hooks: the rest of the epochs before finalize
        self._stage2_epochs = cfg.method_epochs - e1 if cfg is not None else None
        # TRP at the absolute overall target: it plans its ranks on the net stage 1 produced, within 1% (or the
        # rest of the latency goal, on the runtime)
        self.last = self._last_after(self.first, goal)
        self._t_last = time.time()
        return self.last.prepare(pruned, example_input)

    def _prepare_concurrent(self, model: nn.Module, example_input: torch.Tensor, cfg: Any, steps_per_epoch: int,
                            channel_ratio: float, goal: float, t0: float) -> nn.Module:
        """C-SGD to the global ranking's widths at ``channel_ratio``, and TRP's ranks planned on the net its merge
        will produce; both then train in the pipeline's steps (module docstring). Returns the unchanged model."""
        from .clustering import cluster_lists
        from .registry import create

        first_name, last_name = self.stages
        ranker = create("l1", target_macs=channel_ratio, mode="global",
                        **({"round_to": self.round_to} if self.round_to else {}))
        ranker.prepare(model, example_input)
        graph = ranker.graph
        sizes = {g.key: g.size for g in graph.groups_for(model) if g.prunable}
        kept = graph.allocate_widths(channel_ratio, "global", ranker.scores(model), model=model, round_to=self.round_to)
        widths = {k: n for k, n in kept.items() if n < sizes.get(k, n)}
        self.first = create(first_name, widths=widths, **self.stage_options[0])
        # C-SGD's strength follows the whole run's schedule; it clusters on the graph the ranking already traced
        budget = cfg.method_budget(steps_per_epoch) if cfg is not None and steps_per_epoch else {}
        model = self.first.prepare(model, example_input, graph=graph, **budget)
        # the net the merge will produce, from the starting clusters: TRP plans its ranks (and its MACs) on it
        clusters = {key: cluster_lists(ids) for key, ids in self.first.ids.items()}
        preview = graph.merge(clusters, model=copy.deepcopy(model))
        macs = profile(preview, example_input=example_input[:1]).macs
        self.stage_records = [{"stage": 1, "method": first_name, "target_macs": round(channel_ratio, 6),
                               "macs": macs, "macs_ratio": macs / self._base_macs,
                               "epochs": cfg.method_epochs if cfg is not None else None,
                               # it trains in the pipeline's steps, which distil when the run does
                               "distilled": bool(cfg is not None and cfg.distils)}]
        self.epochs_in_prepare = 0
        self._stage2_epochs = cfg.method_epochs if cfg is not None else None
        self.last = create(last_name, target_macs=goal, **self.stage_options[1])
        self.last.prepare(preview, example_input)
        self._t_last = t0
        return model

    def _search_split(self, model: nn.Module, example_input: torch.Tensor, train_loader, ratio: float,
                      goal: float, base: int, val_loader=None) -> float:
        """Score each of ``self.splits`` by the finalize-only proxy (module docstring) on the validation split
        (without one: on training batches set apart from the recalibration ones); return the best."""
        from ..engine import recalibrate_bn
        from ..graph.validate import SurgeryError
        from .registry import create, method_class

        t0 = time.time()
        device = example_input.device
        calib, held = [], []
        seen = 0
        for i, batch in enumerate(train_loader):  # alternate batches: recalibrate on some, score on the others
            (calib if i % 2 == 0 else held).append(batch)
            seen += len(batch[1])
            if seen >= 2 * self.search_images:
                break
        held = held or calib
        if val_loader is not None:  # choose on images no stage trains on
            held, seen = [], 0
            for batch in val_loader:
                held.append(batch)
                seen += len(batch[1])
                if seen >= self.search_images:
                    break
        first_name, last_name = self.stages
        proxy = first_name if not method_class(first_name).trains_before_finalize else "l1"
        proxy_opts = self.stage_options[0] if proxy == first_name else {
            "mode": PROXY_MODE.get(first_name, "uniform"), **({"round_to": self.round_to} if self.round_to else {})}

        def low_rank(net: nn.Module, first: Method | None = None) -> nn.Module:
            """The last stage's decomposition at the overall target, BN recalibrated: the net the proxy scores."""
            lr = self._last_after(first, goal)
            thin = lr.finalize(lr.prepare(net, example_input)).to(device)
            recalibrate_bn(thin, calib, len(calib), device)
            return thin

        tried: list[dict[str, Any]] = []
        for s in self.splits:
            try:
                ch = self._first_at(proxy, s, ratio, **proxy_opts)
                thin = low_rank(ch.finalize(ch.prepare(copy.deepcopy(model), example_input)), ch)
            except (ValueError, SurgeryError) as e:  # this split cannot reach the target: record why, try the next
                tried.append({"split": s, **self._stage_target(s, ratio, "channel_ratio"), "error": str(e)})
                continue
            tried.append({"split": s, **self._stage_target(s, ratio, "channel_ratio"),
                          "macs_ratio": profile(thin, example_input=example_input[:1]).macs / base,
                          "top1": self._top1(thin, held, device)})
        scored = [t for t in tried if "top1" in t]
        if not scored:
            raise ValueError(f"{self.name}: no split in {', '.join(map(str, self.splits))} reaches "
                             f"{self._goal_text(goal)}; first reason: {tried[0]['error']}")
        best = max(scored, key=lambda t: t["top1"])  # ties: the first, i.e. the smallest channel share
        # The same proxy with no channel stage at all (split 0): whether stacking is expected to help here at all.
        alone: dict[str, Any] = {"method": last_name, "top1": None}
        try:
            alone["top1"] = self._top1(low_rank(copy.deepcopy(model)), held, device)
        except (ValueError, SurgeryError) as e:
            alone["error"] = str(e)
        mode = f"{proxy_opts['mode']}, " if "mode" in proxy_opts else ""
        self.search = {"proxy": f"{proxy} ({mode}no training), then {last_name} decomposition, BN recalibrated",
                       "scored_on": "validation split" if val_loader is not None else "training images",
                       "images": sum(len(b[1]) for b in held), "calibration_images": sum(len(b[1]) for b in calib),
                       "tried": tried, "alone": alone, "chosen": best["split"], "time_s": round(time.time() - t0, 1)}
        if alone["top1"] is not None and alone["top1"] > best["top1"]:
            self.search["warning"] = (f"{self.name}: the split proxy scores {last_name} alone above every split "
                                      f"({alone['top1']:.2f} against {best['top1']:.2f} at split {best['split']}); "
                                      f"at this target the stack is not expected to beat --method {last_name}")
            tqdm.write(f"warning: {self.search['warning']}")
        return best["split"]

    # ------------------------------------------------------------------------------------------ the two targets
    def _latency_ratio(self, model: nn.Module, example_input: torch.Tensor) -> float:
        """The latency goal as a ratio of ``model``'s time (milliseconds: the base timed once on the goal's
        runtime)."""
        g = self.target_latency
        if g.unit == "ratio":
            return g.value
        from ..backends import budgeted_repeats, runner, time_runners
        from ..graph.latency import QUANTILE

        run = {"base": runner(copy.deepcopy(model).cpu().eval(), tuple(example_input.shape[1:]), g.batch, g.backend,
                              g.threads)}
        return g.value / time_runners(run, budgeted_repeats(run, 2.0), q=QUANTILE)["base"]

    def _first_at(self, name: str, split: float, ratio: float, **options: Any) -> Method:
        """The channel stage at ``split``: ``ratio**split`` of the base MACs, or under a latency goal G its own
        latency plan to ``G**split`` of the base's time on the same runtime."""
        from .registry import create

        if self.target_latency is None:
            return create(name, target_macs=ratio ** split, **options)
        return create(name, target_latency=replace(self.target_latency, value=self._goal_ratio ** split,
                                                   unit="ratio"), **options)

    def _last_after(self, first: Method | None, goal: float) -> Method:
        """TRP at the overall target: the absolute MACs ``goal``, or under a latency goal the rest of it: the
        goal over the ratio the channel stage's net measured against the base (interleaved, in its plan)."""
        from .registry import create

        if self.target_latency is None:
            return create(self.stages[1], target_macs=goal, **self.stage_options[1])
        planned = (first.report().get("latency_target") or {}) if first is not None else {}
        reached = planned.get("search_ratio") or 1.0
        return create(self.stages[1], target_latency=replace(self.target_latency, value=self._goal_ratio / reached,
                                                             unit="ratio"), **self.stage_options[1])

    def _stage_target(self, split: float, ratio: float, macs_key: str = "target_macs") -> dict[str, float]:
        """The channel stage's target at ``split``, as the records name it."""
        if self.target_latency is None:
            return {macs_key: round(ratio ** split, 6)}
        return {"target_latency_ratio": round(self._goal_ratio ** split, 6)}

    def _goal_text(self, goal: float) -> str:
        return f"{goal / 1e6:.2f}M MACs" if self.target_latency is None else f"latency {self.target_latency}"

    @staticmethod
    def _top1(model: nn.Module, loader, device: torch.device | str) -> float | None:
        if loader is None:
            return None
        from ..engine import evaluate

        return round(evaluate(model, loader, device=device, progress=False)["top1"], 2)

    # ------------------------------------------------------------------------------------------ stage 2
    def _stage2(self) -> Method:
        if self.last is None:
            raise RuntimeError(f"{self.name}: call prepare(model, example_input) first")
        return self.last

    def _training(self) -> list[Method]:
        """The stages whose hooks the pipeline's training runs: TRP, and C-SGD beside it when concurrent."""
        last = self._stage2()
        return [self.first, last] if self.concurrent() and self.first is not None else [last]

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        # C-SGD's groups (no decay on its clustered tensors; its update carries it); TRP keeps the default groups
        return self._training()[0].param_groups(model, lr, weight_decay)

    def before_forward(self, model: nn.Module, step: int) -> None:
        for m in self._training():
            m.before_forward(model, step)

    def loss(self, model: nn.Module) -> torch.Tensor | float:
        return sum((m.loss(model) for m in self._training()), 0.0)

    def after_backward(self, model: nn.Module, step: int) -> None:
        # TRP's sub-gradient first: C-SGD's centripetal update then averages it within each cluster too, so the
        # rows of a cluster keep receiving one gradient
        for m in reversed(self._training()):
            m.after_backward(model, step)

    def after_step(self, model: nn.Module, step: int) -> None:
        for m in self._training():
            m.after_step(model, step)

    def finalize(self, model: nn.Module) -> nn.Module:
        last = self._stage2()
        if self.concurrent() and self.first is not None:
            model = self._merge(model)
        thin = last.finalize(model)
        device = next(thin.parameters()).device
        macs = profile(thin, example_input=self.example_input[:1].to(device)).macs
        self.stage_records = self.stage_records[:1] + [{
            "stage": 2, "method": self.stages[1],
            **({"target_macs": round(last.target_macs / self._base_macs, 6)} if self.target_latency is None else
               {"target_latency_ratio": round(last.target_latency.value, 6)}),
            "macs": macs,
            "macs_ratio": macs / self._base_macs, "epochs": self._stage2_epochs,
            # measured right after the factorisation (before the pipeline's BN recalibration and fine-tune)
            "top1": self._top1(thin, self._test_loader, device), "time_s": round(time.time() - self._t_last, 1),
            "details": last.report()}]
        return thin

    def _merge(self, model: nn.Module) -> nn.Module:
        """The concurrent C-SGD's merge, recorded as stage 1 (top-1 right after it; a lossy merge is one warning
        line, and its report says so)."""
        merged = self.first.finalize(model)
        device = next(merged.parameters()).device
        details = self.first.report()
        warning = (details.get("merge") or {}).get("warning")
        if warning:
            tqdm.write(f"warning: {warning}")
        macs = profile(merged, example_input=self.example_input[:1].to(device)).macs
        self.stage_records = [{**self.stage_records[0], "macs": macs, "macs_ratio": macs / self._base_macs,
                               "trained_with": self.stages[1],
                               "top1": self._top1(merged, self._test_loader, device),
                               "time_s": round(time.time() - self._t_last, 1), "details": details}]
        return merged

    def report(self) -> dict[str, Any]:
        records = [dict(r) for r in self.stage_records]
        rule = ("fraction of the log MACs reduction done by the channel stage (it keeps target**split of the base "
                "MACs; trp the rest)") if self.target_latency is None else (
                "fraction of the log latency reduction done by the channel stage (its own latency plan to "
                "goal**split of the base's time; trp's plan the rest, on the same runtime)")
        return {"stack": {"stages": list(self.stages), "target_macs": self.target_macs,
                          **({"target_latency": str(self.target_latency), "goal_ratio": round(self._goal_ratio, 4)}
                             if self.target_latency is not None else {}),
                          "split": self.chosen_split, "split_rule": rule,
                          "split_source": "given" if self.split is not None else "searched",
                          "search": self.search},
                "stages": records, **self._latency_record()}

    def _latency_record(self) -> dict[str, Any]:
        """The goal the pipeline confirms on the runtime (``report.json: latency_target``), under a latency goal."""
        g = self.target_latency
        if g is None:
            return {}
        # each stage predicted its own net against its own base: the stack's prediction is the product
        predicted = [((m.report().get("latency_target") or {}).get("predicted_ratio") if m is not None else None)
                     for m in (self.first, self.last)]
        return {"latency_target": {"target": str(g), "target_ratio": round(self._goal_ratio, 4), "backend": g.backend,
                                   "batch": g.batch, "threads": g.threads,
                                   "predicted_ratio": round(predicted[0] * predicted[1], 4) if all(predicted)
                                   else None}}

    def state_dict(self) -> dict[str, Any]:
        state = {"split": self.chosen_split, "epochs_in_prepare": self.epochs_in_prepare,
                 "last": self.last.state_dict() if self.last is not None else {}}
        if self.concurrent() and self.first is not None:
            state["first"] = self.first.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.last is not None and state.get("last"):
            self.last.load_state_dict(state["last"])
        if self.concurrent() and self.first is not None and state.get("first"):
            self.first.load_state_dict(state["first"])
