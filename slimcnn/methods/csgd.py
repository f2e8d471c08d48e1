"""C-SGD, centripetal SGD (Ding et al., CVPR 2019): train clusters of filters to become identical, then merge
each cluster into one filter with no change in the network's function.

**Clusters.** For every prunable channel group (:func:`slimcnn.graph.channel_groups`) cut from ``n`` to ``k``
channels, the ``n`` channels are split into ``k`` clusters: k-means on the flattened producer kernels (fixed
seed) or ``even`` (contiguous blocks). The producers of one residual stream share one clustering, computed on
their concatenated kernels (``cluster_on="concat"``, each producer scaled to unit norm so that no layer
dominates) or on the stream's first producer (``"first"``, the official code's choice). Groups kept at full
width are not clustered. An option-A shortcut feeds fixed channels of the stream above it and has no weights
to train, so a cluster there only joins channels the shortcut feeds alike (nothing, or sources from one cluster
of the stream below) **[ours]**. Under DDP every rank takes rank 0's clusters.

**Update.** After backward and before the optimiser step, every clustered tensor P (rows = the group's
channels) gets the gradient ``G <- M G + eta P + eps (P - M P)``, where ``M`` averages rows within a cluster.
Within a cluster every row then receives the same data gradient, and under plain SGD with learning rate
``tau`` the difference of two rows shrinks by exactly ``(1 - tau (eta + eps))`` per step, whatever the data.
BN gamma/beta and conv/linear biases get ``vector_scale * eps`` (0.1, as the official code) and no decay;
:meth:`CSGD.param_groups` turns the optimiser's weight decay off for those tensors (rows outside any cluster
keep their decay, applied here). The step costs a handful of vectorised ops per tensor (``index_add``).

**Strength at short budgets.** The official ``eps = 3e-3`` assumes 600 epochs per round. By default ``eps``
is derived from the training budget so that even the slowest tensors (the vectors, strength
``vector_scale * eps``, no decay) collapse: with ``S = sum_t lr_t`` (the schedule's mean lr times the number of
steps), ``eps = ln(1/tol) / (vector_scale * S)`` gives ``prod_t (1 - lr_t vector_scale eps) <= exp(-vector_scale
eps S) = tol`` (``tol = 1e-6``); the kernels, at ``eta + eps``, shrink faster still, so ``(1 - lr (eta + eps))^steps
<= tol`` holds for them too. ``eps`` is capped so that ``max_lr (eta + eps) <= 1`` (every factor stays in [0, 1),
and heavy-ball/Nesterov momentum 0.9 stays stable). The budget comes from ``prepare(..., total_steps=...)`` (or
``epochs`` and ``steps_per_epoch``) and the learning rate from ``param_groups(model, lr, ...)`` or
``prepare(..., lr=...)``; ``lr_at`` (a function step -> lr) gives the schedule, else ``schedule`` names one
("cosine", "step", "constant", as :mod:`slimcnn.engine`). Without a budget the official 3e-3 is used, with a
warning. ``eps=...`` overrides the rule. Two limits no ``eps`` can lift: with momentum ``mu`` a difference
shrinks by at best ``sqrt(mu)`` per step (0.949 at 0.9: ~260 steps for 1e-6), and BN running statistics
forget old differences at ``1 - bn_momentum`` per step (~130 steps at 0.1); budgets of a few hundred steps
per round are the minimum for an exact merge. The strength is not applied at once: it ramps up over the first
``ramp`` (0.3) of each round (:meth:`CSGD.eps_at`), and the rule above is computed on the steps after the ramp.

**Convergence check.** Before merging, :meth:`CSGD.finalize` measures the largest relative distance of a filter
from its cluster mean. Above ``converged_distance`` (1e-5) the merge is reported ``lossless: false`` with the
distance and a one-line warning naming the minimum budget (:meth:`CSGD.min_steps`); ``prepare`` already records
the same warning when the budget it is told is too short.

**Merge.** :meth:`CSGD.finalize` reports the largest relative distance of a filter from its cluster mean per
layer, then merges through :func:`slimcnn.graph.merge_channels` (one channel per cluster, consumers' in-slices
summed): lossless once the clusters have collapsed.

**Schedules.** ``target_macs`` (uniform widths from :func:`slimcnn.graph.allocate_widths`), explicit ``widths``
(a fraction of every group, or per group key / per stage prefix), several ``rounds`` of width fractions (within one
training run: at each round boundary the clusters are re-clustered, nested, from the current cluster means;
:func:`run_rounds` merges between rounds instead, as the official code), and ``squeeze=True``: a model built
wide (``create(name, width=1.5)``) is clustered down to the widths of the same model at width 1. ``round_to=N``
makes the number of clusters of every group at least ``N`` wide a multiple of ``N`` (or the whole group): through
the MACs search for ``target_macs``, by snapping to the nearest such count for the other schedules.

Use it in your own loop::

    m = CSGD(target_macs=0.5)
    model = m.prepare(model, x, total_steps=len(loader) * epochs)
    opt = torch.optim.SGD(m.param_groups(model, lr=0.03, weight_decay=1e-4), lr=0.03, momentum=0.9, nesterov=True)
    for step, (x, y) in enumerate(batches):
        m.before_forward(model, step)
        F.cross_entropy(model(x), y).backward()
        m.after_backward(model, step)          # the centripetal gradient
        opt.step(); opt.zero_grad()
    compact = m.finalize(model)                # merged, smaller, same outputs
"""
from __future__ import annotations

import math
import warnings
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from ..graph.handlers import member_module
from .base import Method
from .centripetal import TensorPlan, _centripetal, default_eps, schedule_lr, tensor_plan
from .centripetal import centripetal_grad  # noqa: F401  (re-exported: callers and tests import it from here)
from .clustering import (_explicit_widths, canonical_ids, cluster_lists, cluster_means, partitioned_clusters,
                         producer_features, relative_distances, shortcut_classes, squeeze_widths)
from .clustering import even_clusters, kmeans_clusters  # noqa: F401  (re-exported: callers and tests import them here)

if TYPE_CHECKING:
    from ..graph import ChannelGraph

OFFICIAL_EPS = 3e-3
_ROW_ROLES = ("out", "dw", "bn")  # member roles whose parameters hold the group's channels as rows (dim 0)


def parse_fractions(text: str) -> list[float]:
    """``"13/16,11/16,5/8"`` or ``"0.8,0.6"`` -> a list of floats (the ``--rounds`` option).

    >>> parse_fractions("13/16,11/16,5/8")
    [0.8125, 0.6875, 0.625]
    """
    try:
        out = [float(Fraction(s.strip())) for s in text.split(",") if s.strip()]
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"--rounds takes a comma list of width fractions like 13/16,11/16,5/8; got {text!r}") from None
    if not out:
        raise ValueError("--rounds is empty")
    return out


# ------------------------------------------------------------------------------------------- the method
class CSGD(Method):
    """Centripetal SGD to a MACs target, explicit widths, several rounds, or the "squeeze" of a wide model.

    >>> m = CSGD(target_macs=0.5)                      # uniform widths at 50% MACs, eps from the budget
    >>> m = CSGD(widths={"layer1": 0.5}, eps=0.05)     # half of every group under layer1, fixed strength
    >>> m = CSGD(rounds=[13/16, 11/16, 5/8])           # the official ResNet-56 schedule, within one run
    """

    name = "csgd"
    trains_before_finalize = True
    method_share = 1.0  # its recipe: share of the epoch budget before finalize
    method_phase = "centripetal SGD"
    targets = frozenset({"target_macs", "widths", "rounds", "squeeze"})
    prepare_inputs = frozenset({"total_steps", "lr", "schedule"})
    finalize_key = "merge"
    segmentation = True
    layer_control = frozenset({"exclude", "min_keep"})
    cli_args = [
        ("--eps", {"type": float, "default": None,
                   "help": "csgd: centripetal strength (default: derived from lr and the number of steps)"}),
        ("--cluster", {"choices": ["kmeans", "even"], "default": None,
                       "help": "csgd: cluster filters by k-means on the kernels (kmeans) or in contiguous blocks (even)"}),
        ("--cluster-on", {"dest": "cluster_on", "choices": ["concat", "first"], "default": None,
                          "help": "csgd: a residual stream is clustered on all its producers' kernels (concat) "
                                  "or on its first producer (first, as the official code)"}),
        ("--rounds", {"type": parse_fractions, "default": None,
                      "help": "csgd: width fractions per round, e.g. 13/16,11/16,5/8 (instead of --target-macs)"}),
        ("--vector-scale", {"dest": "vector_scale", "type": float, "default": None,
                            "help": "csgd: strength on BN gamma/beta and biases, relative to eps (0.1 is "
                                    "the official value; 1.0 lets the filters collapse gradually over the whole budget)"}),
        ("--ramp", {"type": float, "default": None,
                    "help": "csgd: fraction of each round over which the strength grows from the official 3e-3 to "
                            "its full value (0: full strength from the first step)"}),
        ("--squeeze", {"action": "store_true", "default": None,
                       "help": "csgd: cluster a wide model (width > 1) down to the original widths"}),
    ]

    def __init__(self, target_macs: float | None = None, widths: float | dict[str, float] | None = None,
                 rounds: Sequence[float] | None = None, squeeze: bool = False, eps: float | None = None,
                 cluster: str = "kmeans", cluster_on: str = "concat", vector_scale: float = 0.1,
                 weight_decay: float | None = None, tol: float = 1e-6, seed: int = 0,
                 lossless_tol: float | None = None, ramp: float = 0.3, momentum: float = 0.9,
                 converged_distance: float = 1e-5, round_to: int | None = None) -> None:
        from ..graph.targeting import check_round_to

        self.round_to = check_round_to(round_to)
        if cluster not in ("kmeans", "even"):
            raise ValueError(f"cluster must be 'kmeans' or 'even', got {cluster!r}")
        if cluster_on not in ("concat", "first"):
            raise ValueError(f"cluster_on must be 'concat' or 'first', got {cluster_on!r}")
        given = [n for n, v in (("widths", widths), ("rounds", rounds), ("squeeze", squeeze or None)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"C-SGD takes one of widths, rounds, squeeze; got {', '.join(given)}")
        if given and target_macs is not None:
            # both asked for: explicit widths are the more specific request
            warnings.warn(f"C-SGD: the widths come from {given[0]}; target_macs={target_macs} is not used")
            target_macs = None
        if not given and target_macs is None:
            target_macs = 0.5
        if rounds is not None:
            rounds = [float(r) for r in rounds]
            if not rounds or any(not 0 < r <= 1 for r in rounds) or any(b > a for a, b in zip(rounds, rounds[1:])):
                raise ValueError(f"rounds must be non-increasing width fractions in (0, 1], got {rounds}")
        if eps is not None and eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        if not vector_scale > 0:
            raise ValueError(f"vector_scale must be > 0, got {vector_scale}")
        self.target_macs, self.widths, self.rounds, self.squeeze = target_macs, widths, rounds, bool(squeeze)
        self.eps, self.cluster, self.cluster_on = eps, cluster, cluster_on
        self.vector_scale, self.tol, self.seed = vector_scale, tol, seed
        # eta: the given weight decay, else the optimiser's (recorded by param_groups)
        self.eta_option, self.weight_decay = weight_decay, weight_decay
        self.lossless_tol = lossless_tol
        if not 0 <= ramp < 1:
            raise ValueError(f"ramp must be in [0, 1), got {ramp}")
        self.ramp, self.momentum, self.converged_distance = float(ramp), float(momentum), float(converged_distance)
        self.budget_warning: str | None = None
        # filled by prepare / training
        self.example_input: torch.Tensor | None = None
        self.base_sizes: dict[str, int] = {}
        self.round_widths: list[dict[str, int]] = []  # per round: {group key: clusters}, clustered groups only
        self.bounds: list[int] = [0]  # first step of each round
        self.round = 0
        self.ids: dict[str, torch.Tensor] = {}  # group key -> cluster id per channel, current round
        self.round_eps: list[float] = []
        self.total_steps: int | None = None
        self.lr: float | None = None
        self.lr_at: Callable[[int], float] | None = None
        self.schedule = "cosine"
        self.warmup_steps = 0
        self._groups: dict[str, Any] = {}
        self._readers: dict[str, list[tuple[str, int, int]]] = {}
        self._plans: list[TensorPlan] | None = None
        self._bound: nn.Module | None = None
        self._report: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ prepare
    def prepare(self, model: nn.Module, example_input: torch.Tensor, total_steps: int | None = None,
                epochs: int | None = None, steps_per_epoch: int | None = None, lr: float | None = None,
                lr_at: Callable[[int], float] | None = None, schedule: str | None = None,
                warmup_steps: int = 0, graph: ChannelGraph | None = None) -> nn.Module:
        """Cluster every group that loses channels; the model itself is not changed.

        ``total_steps`` (or ``epochs * steps_per_epoch``), ``lr``/``lr_at``/``schedule`` describe the training
        budget for the default strength rule (see the module docstring); ``rounds`` need ``total_steps``.
        ``graph``: the model's :class:`~slimcnn.graph.ChannelGraph` when the caller has one.
        """
        super().prepare(model, example_input, graph)
        if total_steps is None and epochs is not None and steps_per_epoch is not None:
            total_steps = epochs * steps_per_epoch
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps
        self.lr = lr if lr is not None else self.lr
        self.lr_at, self.warmup_steps = lr_at, warmup_steps
        self.schedule = schedule or self.schedule
        every = self.graph.groups_for(model)
        # module -> the groups it reads (consumer role), to follow an option-A shortcut back to its sources
        self._readers = {}
        for g in every:
            for m in g.consumers:
                self._readers.setdefault(m.module, []).append((g.key, m.offset, g.size))
        groups = [g for g in every if g.prunable]
        self._groups = {g.key: g for g in groups}
        self.base_sizes = {g.key: g.size for g in groups}
        fractions = self.rounds or [None]
        if len(fractions) > 1 and total_steps is None:
            raise ValueError("C-SGD rounds within one run need the number of training steps: "
                             "prepare(..., total_steps=N) or epochs and steps_per_epoch")
        self.round_widths = [self._resolve_widths(model, f) for f in fractions]
        n = total_steps or 0
        self.bounds = [n * r // len(fractions) for r in range(len(fractions))]
        self.round, self.round_eps, self._plans, self._bound = 0, [], None, None
        self.ids = self._cluster(model, self.round_widths[0], previous=None)
        need = self.min_steps() * len(fractions)
        self.budget_warning = None
        if total_steps is not None and total_steps < need and self.ids:
            self.budget_warning = (f"C-SGD: {total_steps} training steps are fewer than the {need} its clusters need "
                                   f"to meet (momentum {self.momentum}, ramp {self.ramp}); the merge will not be "
                                   f"lossless: train longer or fine-tune after the merge")
        if self.budget_warning is None and self.ids:
            self.budget_warning = self._vector_budget_warning()
        return model

    def vector_shrink(self, r: int = 0) -> float | None:
        """The factor by which round ``r`` shrinks an intra-cluster difference of the slowest tensors (BN gamma/beta
        and biases, strength ``vector_scale * eps``) after its ramp, from the learning-rate schedule; None when the
        schedule is not known yet. With ``eps`` capped at ``1 / max_lr`` this is ``exp(-vector_scale * sum(lr) /
        max_lr)``, whatever ``eps``: measured in the demo (94 cosine steps, vector_scale 0.1) the BN rows stayed
        0.0036 apart while every kernel met to 1e-8, so the momentum bound of :meth:`min_steps` is not the only one.
        """
        lr_at = self._lr_function()
        if lr_at is None:
            return None
        start, stop = self._round_range(r)
        full = start + round(self.ramp * (stop - start))
        lr_sum = sum(lr_at(s) for s in range(full, stop))
        return math.exp(-min(self.vector_scale, 1.0) * self.current_eps() * lr_sum)

    def _vector_budget_warning(self) -> str | None:
        shrink = self.vector_shrink(0)
        if shrink is None or shrink <= self.tol * 1.001:  # the rule aims at tol exactly; allow float rounding
            return None
        return (f"C-SGD: at this learning-rate budget the BN and bias rows (strength vector_scale {self.vector_scale:g}"
                f" x eps, eps capped at 1/lr) shrink only to {shrink:.2g} of their spread, not {self.tol:g}; the merge "
                "will not be lossless: train longer or raise --vector-scale (e.g. 1.0)")

    def min_steps(self) -> int:
        """Steps one round needs for an exact merge: with heavy-ball momentum ``mu`` an intra-cluster difference
        shrinks by at best ``sqrt(mu)`` per step, whatever the strength, so ``ln(1/tol) / -ln(sqrt(mu))`` steps at
        full strength (262 at mu 0.9, tol 1e-6), after the ramp."""
        rate = -0.5 * math.log(self.momentum) if 0 < self.momentum < 1 else 1.0
        return math.ceil(math.log(1.0 / self.tol) / rate / (1.0 - self.ramp))

    def _resolve_widths(self, model: nn.Module, fraction: float | None) -> dict[str, int]:
        """{group key: kept channels} for the groups that lose channels."""
        sizes = self.base_sizes
        if fraction is not None:
            want = {k: max(1, math.floor(fraction * n + 1e-9)) for k, n in sizes.items()}
        elif self.squeeze:
            want = squeeze_widths(model, self.example_input, graph=self.graph)
        elif self.widths is not None:
            want = _explicit_widths(self.widths, sizes)
        else:
            want = self.graph.allocate_widths(self.target_macs, mode="uniform", model=model, round_to=self.round_to)
        from ..graph.targeting import aligned_widths, snap_width

        out = {}
        for key, k in want.items():
            if key not in sizes:
                raise ValueError(f"C-SGD: no prunable channel group {key!r}; prunable: {', '.join(sizes)}")
            if not 1 <= k <= sizes[key]:
                raise ValueError(f"C-SGD: group {key!r} has {sizes[key]} channels, cannot keep {k}")
            if self.round_to:  # the MACs search already aligned its widths; explicit ones are snapped here
                k = snap_width(aligned_widths(sizes[key], self.round_to), k)
            if k < sizes[key]:
                out[key] = int(k)
        return out

    def _cluster(self, model: nn.Module, widths: dict[str, int],
                 previous: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """Cluster ids per group, in forward order; with ``previous``, new clusters are unions of previous ones."""
        from ..progress import bar

        out: dict[str, torch.Tensor] = {}
        todo = [key for key in self._groups if key in widths]
        for key in bar(todo, desc="csgd: clustering", enabled=len(todo) >= 8):
            k, n = widths[key], self.base_sizes[key]
            prev = previous[key] if previous and key in previous else torch.arange(n)
            members = cluster_lists(prev)
            if k >= len(members):
                out[key] = prev.clone()
                continue
            group = self._groups[key]
            classes = shortcut_classes(model, group, self._readers, out)[[c[0] for c in members]]
            feats = (None if self.cluster == "even"
                     else cluster_means(producer_features(model, group, self.cluster_on == "first"), prev))
            try:
                coarse = partitioned_clusters(k, classes, feats, self.seed)
            except ValueError as e:
                raise ValueError(f"C-SGD cannot cut group {key!r} to {k} channels: {e} (a zero-pad shortcut "
                                 "feeds it: keep more channels here, or cut the stream that feeds the shortcut "
                                 "too)") from None
            out[key] = canonical_ids(coarse[prev])
        return _broadcast_ids(out, model)

    # ------------------------------------------------------------------------------------- optimiser
    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """Weight decay off for the clustered tensors (their update carries it); records lr and decay."""
        self.lr = lr
        self.weight_decay = self.eta_option if self.eta_option is not None else weight_decay
        self._plans, self.round_eps = None, []  # decay and eps follow the new settings (deterministic on resume)
        owned = {p.name for p in self._build_plans(model)}
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if n not in owned], "lr": lr, "weight_decay": weight_decay},
                  {"params": [p for n, p in named if n in owned], "lr": lr, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    def current_eps(self) -> float:
        """The strength of the current round (the rule in the module docstring, unless ``eps`` was given)."""
        while len(self.round_eps) <= self.round:
            self.round_eps.append(self._rule_eps(len(self.round_eps)))
        return self.round_eps[self.round]

    def _lr_function(self) -> Callable[[int], float] | None:
        if self.lr_at is not None:
            return self.lr_at
        if self.lr is None or self.total_steps is None:
            return None
        return schedule_lr(self.lr, self.schedule, self.total_steps, self.warmup_steps)

    def _round_range(self, r: int) -> tuple[int, int]:
        stop = self.bounds[r + 1] if r + 1 < len(self.bounds) else (self.total_steps or 0)
        return self.bounds[r], stop

    def _rule_eps(self, r: int) -> float:
        if self.eps is not None:
            return self.eps
        lr_at = self._lr_function()
        start, stop = self._round_range(r)
        if lr_at is None or stop <= start:
            warnings.warn("C-SGD: the training budget is unknown (pass total_steps and lr to prepare/param_groups), "
                          f"using the official eps={OFFICIAL_EPS}, which needs hundreds of epochs to converge")
            return OFFICIAL_EPS
        full = start + round(self.ramp * (stop - start))
        lrs = [lr_at(s) for s in range(min(full, stop - 1), stop)]
        eta = self.weight_decay or 0.0
        return default_eps(sum(lrs), max(lrs), eta, self.tol, self.vector_scale)

    # ---------------------------------------------------------------------------------------- the step
    def _build_plans(self, model: nn.Module) -> list[TensorPlan]:
        if self._plans is not None and self._bound is model and (
                not self._plans or self._plans[0].ids.device == self._plans[0].param.device):
            return self._plans
        params = dict(model.named_parameters())
        rows: dict[str, list[tuple[int, torch.Tensor, str]]] = {}  # tensor -> (offset, ids, group key)
        for key, ids, m, module in self._row_members(model):
            if isinstance(module, nn.modules.conv._ConvTransposeNd):
                raise ValueError(f"C-SGD: cannot cluster transposed conv {m.module!r} (its filters are dim 1)")
            for pname in ("weight", "bias"):
                name = f"{m.module}.{pname}" if m.module else pname
                p = params.get(name)
                if p is None or not p.requires_grad:
                    continue
                if p.shape[0] < m.offset + len(ids):
                    raise ValueError(f"C-SGD: {name} has {p.shape[0]} rows, group {key!r} needs {m.offset + len(ids)}")
                rows.setdefault(name, []).append((m.offset, ids, key))
        eta = float(self.weight_decay or 0.0)
        plans = [tensor_plan(name, params[name], parts, eta) for name, parts in rows.items()]
        self._plans, self._bound = plans, model
        self._set_coef()
        return plans

    def _set_coef(self, eps: float | None = None) -> None:
        eps = self.current_eps() if eps is None else eps
        for pl in self._plans or []:
            pl.coef = pl.eta_rows + eps * (self.vector_scale if pl.vector else 1.0)
        self._coef_eps = eps

    def eps_at(self, step: int) -> float:
        """The strength at ``step``: over the first ``ramp`` of each round it grows geometrically from the
        official 3e-3 to the round's strength, then stays there.

        Why a ramp: at full strength from the first step (eps ~70 at the 2-epoch benchmark budget, ~23,000x the
        official 3e-3) the intra-cluster gap of ResNet-20 was 24% at step 25 and 7% at step 50 of 392, so C-SGD
        was a k-means merge followed by plain fine-tuning. With the ramp the clusters draw together while the
        rest of the network still adapts, and meet in the remaining steps (see :meth:`min_steps`)."""
        full = self.current_eps()
        start, stop = self._round_range(self.round)
        ramp_steps = round(self.ramp * (stop - start))
        low = min(OFFICIAL_EPS, full)
        if self.eps is not None or ramp_steps <= 0 or step >= start + ramp_steps or low <= 0:
            return full
        t = max(0.0, (step - start) / ramp_steps)
        return low * (full / low) ** t

    def before_forward(self, model: nn.Module, step: int) -> None:
        """Start the next round (nested re-clustering) when ``step`` reaches its first step."""
        while self.round + 1 < len(self.bounds) and step >= self.bounds[self.round + 1]:
            self.round += 1
            self.ids = self._cluster(model, self.round_widths[self.round], previous=self.ids)
            self._plans = None

    @torch.no_grad()
    def after_backward(self, model: nn.Module, step: int) -> None:
        """Replace every clustered tensor's gradient by the centripetal one (in place)."""
        eps = self.eps_at(step)
        plans = self._build_plans(model)
        if eps != getattr(self, "_coef_eps", None):
            self._set_coef(eps)
        for pl in plans:
            g = pl.param.grad
            if g is None:
                continue
            g.copy_(_centripetal(g, pl.param, pl.ids, pl.inv_counts, eps * self.vector_scale if pl.vector else eps,
                                 pl.coef))

    # ---------------------------------------------------------------------------------------- finalize
    @torch.no_grad()
    def cluster_distances(self, model: nn.Module) -> dict[str, float]:
        """Per layer (module): max over its channels of ``||P_i - mean|| / ||mean||`` within the clusters, where
        ``P_i`` is everything the layer holds for channel ``i`` (filter, bias, BN affine and running stats)."""
        per_layer: dict[str, float] = {}
        for _, ids, m, module in self._row_members(model):
            n = len(ids)
            # BN running statistics too: they must agree for the merge to be exact, and they lag the
            # weights (an average over the last ~1/momentum steps)
            parts = [t.detach()[m.offset: m.offset + n].reshape(n, -1)
                     for t in (getattr(module, a, None) for a in ("weight", "bias", "running_mean", "running_var"))
                     if isinstance(t, torch.Tensor)]
            if parts:
                d = float(relative_distances(torch.cat(parts, dim=1), ids).max())
                per_layer[m.module] = max(per_layer.get(m.module, 0.0), d)
        return per_layer

    def _row_members(self, model: nn.Module):
        """(group key, cluster ids, member, module) for every member holding a clustered group's channels as rows."""
        for key, ids in self.ids.items():
            for m in self._groups[key].members:
                if m.role in _ROW_ROLES:
                    yield key, ids, m, member_module(model, m.module)

    def finalize(self, model: nn.Module) -> nn.Module:
        """Report the remaining intra-cluster distances, then merge every cluster into one channel."""
        if self.example_input is None:
            raise RuntimeError("C-SGD: call prepare() before finalize()")
        per_layer = self.cluster_distances(model)
        dist = max(per_layer.values(), default=0.0)
        merge: dict[str, Any] = {"max_cluster_distance": dist, "per_layer": per_layer,
                                 "lossless": dist <= self.converged_distance}
        if not merge["lossless"]:
            # never a lossy merge reported as done: one line, with the budget that would have been enough
            merge["warning"] = (f"C-SGD: clusters have not met (max relative distance {dist:.2g} > "
                                f"{self.converged_distance:g}), so the merge changes the network; "
                                f"an exact merge needs at least {self.min_steps()} centripetal steps per round"
                                + (f", this run had {self.total_steps}" if self.total_steps else "")
                                + (f" ({self.budget_warning.removeprefix('C-SGD: ')})" if self.budget_warning else ""))
        self._report = {"merge": merge}
        if not self.ids:
            return model
        clusters = {key: cluster_lists(ids) for key, ids in self.ids.items()}
        return self.graph.merge(clusters, model=model, lossless_tol=self.lossless_tol)

    def report(self) -> dict[str, Any]:
        """``merge`` (after finalize): max relative intra-cluster distance, overall and per layer; ``csgd``: the
        strength per round, the settings, and the plain-SGD bound on what remains of a difference."""
        eps = list(self.round_eps) or [self.current_eps()]
        info: dict[str, Any] = {"eps": eps, "ramp": self.ramp, "min_steps": self.min_steps(),
                                "budget_warning": self.budget_warning,
                                "cluster": self.cluster, "cluster_on": self.cluster_on,
                                "vector_scale": self.vector_scale, "rounds": self.rounds,
                                "widths": {k: len(cluster_lists(v)) for k, v in self.ids.items()}}
        if self.round_to:
            info["round_to"] = self.round_to
        lr_at = self._lr_function()
        start, stop = self._round_range(len(eps) - 1)
        if lr_at is not None and stop > start:
            # plain-SGD bound with the strength each step really had (the ramp included)
            lr_sum = sum(lr_at(s) for s in range(start, stop))
            lr_eps = sum(lr_at(s) * self.eps_at(s) for s in range(start, stop))
            info["predicted_residual"] = {"kernels": math.exp(-(self.weight_decay or 0.0) * lr_sum - lr_eps),
                                          "vectors": math.exp(-self.vector_scale * lr_eps)}
        return {**self._report, "csgd": info}

    # ---------------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict[str, Any]:
        return {"round": self.round, "round_eps": list(self.round_eps), "bounds": list(self.bounds),
                "ids": {k: v.clone() for k, v in self.ids.items()}, "weight_decay": self.weight_decay,
                "lr": self.lr}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.round, self.round_eps, self.bounds = int(state["round"]), list(state["round_eps"]), list(state["bounds"])
        self.ids = {k: torch.as_tensor(v, dtype=torch.long) for k, v in state["ids"].items()}
        self.weight_decay, self.lr = state["weight_decay"], state["lr"]
        self._plans = None


# -------------------------------------------------------------------------------------------- helpers
def _broadcast_ids(ids: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Under torch.distributed, every rank takes rank 0's clusters (k-means is seeded, but be certain)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or not ids:
        return ids
    device = next(model.parameters()).device
    flat = torch.cat([ids[k] for k in ids]).to(device)
    dist.broadcast(flat, src=0)
    out, i = {}, 0
    for k, v in ids.items():
        out[k] = flat[i: i + len(v)].cpu()
        i += len(v)
    return out


def run_rounds(model: nn.Module, example_input: torch.Tensor, fractions: Sequence[float],
               train: Callable[[nn.Module, CSGD, int], nn.Module | None], total_steps: int | None = None,
               **options: Any) -> tuple[nn.Module, list]:
    """The official schedule: for each width fraction, train with C-SGD, then merge; the next round clusters the
    merged model. ``train(model, method, round_index)`` trains in place (or returns the trained model), e.g. with
    :func:`slimcnn.engine.train`; ``total_steps`` (per round) feeds the strength rule; ``options`` go to
    :class:`CSGD`. Fractions are of the original widths. Returns (model, per-round reports).

    >>> compact, reports = run_rounds(model, x, [13/16, 11/16, 5/8],
    ...     lambda m, method, r: train(m, loader, cfg, method=method).model)            # doctest: +SKIP
    """
    from ..graph import ChannelGraph

    graph = ChannelGraph(model, example_input)
    base = {g.key: g.size for g in graph.prunable}
    reports = []
    for r, f in enumerate(fractions):
        if r:  # the previous round merged channels: a new model, a new graph
            graph = graph.rebuild(model)
        now = {g.key: g.size for g in graph.prunable}
        widths = {k: min(now[k], max(1, math.floor(f * base[k] + 1e-9))) for k in now if k in base}
        method = CSGD(widths=widths, **options)
        model = method.prepare(model, example_input, total_steps=total_steps, graph=graph)
        model = train(model, method, r) or model
        model = method.finalize(model)
        reports.append(method.report())
    return model, reports
