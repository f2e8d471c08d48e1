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

from typing import Any, ClassVar, Iterable

import torch
from torch import nn

from ..profile import profile
from .base import Method, macs_goal
from .factor_timing import Deploy, LayerTimes, time_factorisations
from .lowrank import SCHEMES, _check_scheme, decompose_conv, full_rank, truncate_
from .lowrank import conv_macs, decomposed_macs, weight_matrices  # noqa: F401  (re-exported: callers, the docstring)
from .rank_plan import (RANK_RULES, TARGET_MODES, LayerPlan, _target_error, decompose_model, plan_decomposition,
                        plan_for_time, select_layers)

#: precision of the training truncation's SVD (TRP's ``svd_dtype``)
SVD_DTYPES = {"float32": torch.float32, "float64": torch.float64}
DEFAULT_RANK_THRESHOLD = 0.05  # official, for TRP-trained nets


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
                plans = plan(None)
                least, _ = measure(plans)
                if least > (1 + tol) * ratio:
                    raise _target_error(f"TRP cannot reach latency {goal} ({ratio:.3f} of the base, {goal.backend}, "
                                        f"batch {goal.batch}): the smallest net its plan allows measures {least:.3f} "
                                        f"of the base ({e})") from None
                # the layers timed alone promised less than the net delivers: plan from the cheapest net's timing
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
