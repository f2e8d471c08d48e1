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
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from .base import Method

if TYPE_CHECKING:
    from ..graph import ChannelGraph

OFFICIAL_EPS = 3e-3
_ROW_ROLES = ("out", "dw", "bn")  # member roles whose parameters hold the group's channels as rows (dim 0)


# ----------------------------------------------------------------------------------------------- clusters
def canonical_ids(labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Renumber cluster labels in order of each cluster's first member.

    >>> canonical_ids([2, 2, 0, 1, 0]).tolist()
    [0, 0, 1, 2, 1]
    """
    order: dict[int, int] = {}
    out = [order.setdefault(int(v), len(order)) for v in torch.as_tensor(labels).tolist()]
    return torch.tensor(out, dtype=torch.long)


def cluster_lists(ids: torch.Tensor) -> list[list[int]]:
    """Cluster ids -> clusters as sorted member lists, ordered by first member (the form merge_channels takes).

    >>> cluster_lists(torch.tensor([0, 1, 0, 2]))
    [[0, 2], [1], [3]]
    """
    out: dict[int, list[int]] = {}
    for i, c in enumerate(ids.tolist()):
        out.setdefault(c, []).append(i)
    return [out[c] for c in sorted(out, key=lambda c: out[c][0])]


def even_clusters(n: int, k: int) -> torch.Tensor:
    """Cluster ids of ``n`` channels in ``k`` contiguous blocks whose sizes differ by at most one.

    >>> even_clusters(10, 3).tolist()
    [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    """
    _check_k(n, k)
    return torch.arange(n) * k // n


def kmeans_clusters(features: torch.Tensor, k: int, seed: int = 0, n_init: int = 3) -> torch.Tensor:
    """Cluster ids of the rows of ``features`` (n, d) by k-means (k-means++ starts, best of ``n_init``) with a
    fixed seed: exactly ``k`` clusters.

    >>> kmeans_clusters(torch.tensor([[0.0], [10.0], [0.1], [10.1]]), 2).tolist()
    [0, 1, 0, 1]
    """
    n = features.shape[0]
    _check_k(n, k)
    if k == n:
        return torch.arange(n)
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    # one thread: measured 4x faster than the default threads on small and large (512 x 4608) problems alike
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate rows find fewer clusters; fixed below
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
        labels = km.fit(features.detach().double().cpu().numpy()).labels_
    ids = canonical_ids(labels)
    while int(ids.max()) + 1 < k:  # split the largest cluster until there are k
        sizes = torch.bincount(ids)
        big = int(torch.argmax(sizes))
        last = int(torch.nonzero(ids == big).flatten()[-1])
        ids[last] = int(ids.max()) + 1
        ids = canonical_ids(ids)
    return ids


def partitioned_clusters(k: int, classes: Sequence[int] | torch.Tensor, features: torch.Tensor | None = None,
                         seed: int = 0) -> torch.Tensor:
    """``k`` clusters of which none spans two ``classes``: k-means on ``features`` within each class (``None``:
    contiguous blocks). Clusters are shared out over the classes in proportion to their sizes (at least one each).

    >>> partitioned_clusters(3, [0, 0, 1, 1, 1, 1]).tolist()
    [0, 0, 1, 1, 2, 2]
    """
    cls = canonical_ids(classes)
    n_cls = int(cls.max()) + 1
    if n_cls > k:
        raise ValueError(f"{n_cls} kinds of channel that may not share a cluster, but only {k} clusters")
    sizes = torch.bincount(cls).tolist()
    alloc = [1] * n_cls
    for _ in range(k - n_cls):  # highest size per cluster next (D'Hondt), never more clusters than channels
        c = max((c for c in range(n_cls) if alloc[c] < sizes[c]), key=lambda c: sizes[c] / alloc[c])
        alloc[c] += 1
    ids = torch.empty(len(cls), dtype=torch.long)
    first = 0
    for c in range(n_cls):
        idx = torch.nonzero(cls == c).flatten()
        local = (kmeans_clusters(features[idx], alloc[c], seed) if features is not None
                 else even_clusters(len(idx), alloc[c]))
        ids[idx] = local + first
        first += alloc[c]
    return canonical_ids(ids)


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} channels (need 1 <= k <= {n})")


def cluster_means(x: torch.Tensor, ids: torch.Tensor, inv_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the rows of ``x`` (n, d) per cluster: (k, d). ``inv_counts`` (k, 1) may be precomputed."""
    k = int(ids.max()) + 1
    if inv_counts is None:
        inv_counts = 1.0 / torch.bincount(ids, minlength=k).to(x.dtype).unsqueeze(1)
    return x.new_zeros(k, x.shape[1]).index_add_(0, ids, x).mul_(inv_counts)


def centripetal_grad(grad: torch.Tensor, param: torch.Tensor, ids: torch.Tensor, eps: float,
                     eta: float | torch.Tensor = 0.0, inv_counts: torch.Tensor | None = None) -> torch.Tensor:
    """The centripetal gradient ``M G + eta P + eps (P - M P)`` over the rows (dim 0) of ``param``.

    ``M`` averages rows with the same cluster id; ``eta`` may be a scalar or a per-row (n, 1) tensor.

    >>> p = torch.tensor([[1.0], [3.0]]); g = torch.tensor([[0.5], [-0.5]])
    >>> centripetal_grad(g, p, torch.tensor([0, 0]), eps=0.5)   # mean grad 0, pull towards the mean 2
    tensor([[-0.5000],
            [ 0.5000]])
    """
    return _centripetal(grad, param, ids, inv_counts, eps, eta + eps)


def _centripetal(grad: torch.Tensor, param: torch.Tensor, ids: torch.Tensor, inv_counts: torch.Tensor | None,
                 eps: float, coef: float | torch.Tensor) -> torch.Tensor:
    # M G + eta P + eps (P - M P) = M (G - eps P) + (eps + eta) P: one index_add per tensor, no loop over clusters
    n = param.shape[0]
    p = param.detach().reshape(n, -1)
    a = torch.add(grad.reshape(n, -1), p, alpha=-eps)
    out = cluster_means(a, ids, inv_counts).index_select(0, ids)
    out = out.addcmul_(coef, p) if isinstance(coef, torch.Tensor) else out.add_(p, alpha=coef)
    return out.view_as(grad)


def relative_distances(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row: ``||P_i - mean_c|| / ||mean_c||`` with ``mean_c`` the mean of its cluster (0 for singletons)."""
    rows = rows.detach().double().reshape(rows.shape[0], -1)
    mean = cluster_means(rows, ids).index_select(0, ids)
    return (rows - mean).norm(dim=1) / mean.norm(dim=1).clamp_min(1e-12)


# --------------------------------------------------------------------------------------------- strength
def default_eps(lr_sum: float, max_lr: float, eta: float = 0.0, tol: float = 1e-6, vector_scale: float = 0.1,
                max_step: float = 1.0) -> float:
    """Centripetal strength that shrinks every intra-cluster difference by ``tol`` over a run.

    ``lr_sum`` is the sum of the learning rate over the steps (mean lr x steps). The vectors (strength
    ``vector_scale * eps``) are the slowest: ``eps = ln(1/tol) / (vector_scale * lr_sum)``, capped so that
    ``max_lr * (eta + eps) <= max_step``.

    >>> round(default_eps(lr_sum=0.025 * 3910, max_lr=0.05), 3)   # 10 cosine epochs of ResNet-56 at lr 0.05
    1.413
    """
    if lr_sum <= 0 or max_lr <= 0:
        raise ValueError(f"the learning-rate budget must be positive (sum {lr_sum}, max {max_lr})")
    eps = math.log(1.0 / tol) / (min(vector_scale, 1.0) * lr_sum)
    return max(0.0, min(eps, max_step / max_lr - eta))


def schedule_lr(lr: float, schedule: str, total_steps: int, warmup_steps: int = 0,
                milestones: Sequence[float] = (0.5, 0.75), gamma: float = 0.1) -> Callable[[int], float]:
    """A learning-rate function step -> lr for a named schedule: the engine's own
    (:class:`slimcnn.engine.trainer.Schedule`: linear warm-up, then "cosine", "step" (x ``gamma`` at ``milestones``,
    fractions of the run) or "constant"), times ``lr`` as the optimiser applies it.

    >>> f = schedule_lr(0.1, "step", 100)
    >>> f(0), round(f(60), 4), round(f(80), 4)
    (0.1, 0.01, 0.001)
    """
    from ..engine.trainer import SCHEDULES, Schedule

    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r} for C-SGD's strength rule; pass lr_at=... instead")
    multiplier = Schedule.of_run(schedule, total_steps, warmup_steps, milestones, gamma)
    return lambda step: lr * multiplier(step)


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
@dataclass
class _TensorPlan:
    """How one parameter tensor is transformed: one cluster id per row (rows outside clusters: singletons)."""

    name: str
    vector: bool
    ids: torch.Tensor  # (rows,)
    inv_counts: torch.Tensor  # (clusters, 1)
    eta_rows: torch.Tensor  # (rows, 1): decay per row
    param: nn.Parameter | None = None
    coef: torch.Tensor | None = None  # eps_t + eta_rows, for the current eps


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
        self._plans: list[_TensorPlan] | None = None
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

    def _features(self, model: nn.Module, key: str) -> torch.Tensor:
        """The rows k-means sees for a group: its producers' kernels (concatenated, or the first one)."""
        g = self._groups[key]
        blocks = []
        for m in g.members:
            if m.role not in ("out", "dw"):
                continue
            w = getattr(model.get_submodule(m.module), "weight", None)
            if not isinstance(w, torch.Tensor):
                continue  # a parameter-free producer, e.g. an option-A shortcut
            rows = w.detach()[m.offset: m.offset + g.size].reshape(g.size, -1).double().cpu()
            blocks.append(rows / rows.norm().clamp_min(1e-12))
            if self.cluster_on == "first":
                break
        if not blocks:
            raise ValueError(f"C-SGD: channel group {key!r} has no producer with weights to cluster")
        return torch.cat(blocks, dim=1)

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
            classes = self._classes(model, key, out)[[c[0] for c in members]]
            feats = None if self.cluster == "even" else cluster_means(self._features(model, key), prev)
            try:
                coarse = partitioned_clusters(k, classes, feats, self.seed)
            except ValueError as e:
                raise ValueError(f"C-SGD cannot cut group {key!r} to {k} channels: {e} (a zero-pad shortcut "
                                 "feeds it: keep more channels here, or cut the stream that feeds the shortcut "
                                 "too)") from None
            out[key] = canonical_ids(coarse[prev])
        return _broadcast_ids(out, model)

    def _classes(self, model: nn.Module, key: str, done: dict[str, torch.Tensor]) -> torch.Tensor:
        """Per channel: what parameter-free producers (option-A shortcuts) put into it. Channels may share a
        cluster only if they get the same: nothing, or the same (cluster of) source channel; training cannot
        make two different sources equal, so merging them would not be lossless."""
        from ..layers import PadShortcut

        g = self._groups[key]
        sig: list[tuple] = [() for _ in range(g.size)]
        for m in g.producers:
            module = model.get_submodule(m.module)
            if isinstance(getattr(module, "weight", None), torch.Tensor):
                continue
            if not isinstance(module, PadShortcut):
                raise ValueError(f"C-SGD cannot merge channels of group {key!r}: producer {m.module!r} "
                                 f"({type(module).__name__}) has no weights to train")
            source = dict(zip(module.dst, module.src))
            for c in range(g.size):
                s = source.get(m.offset + c)
                sig[c] += (m.module, self._source_cluster(m.module, s, done) if s is not None else None)
        order: dict[tuple, int] = {}
        return torch.tensor([order.setdefault(t, len(order)) for t in sig], dtype=torch.long)

    def _source_cluster(self, module: str, channel: int, done: dict[str, torch.Tensor]) -> tuple[str, int]:
        """The (group, cluster) that input ``channel`` of ``module`` belongs to (its own index when unclustered)."""
        for key, offset, size in self._readers.get(module, []):
            if offset <= channel < offset + size:
                ids = done.get(key)  # groups are clustered in forward order: the sources come first
                return key, int(ids[channel - offset]) if ids is not None else channel - offset
        return "", channel

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
    def _build_plans(self, model: nn.Module) -> list[_TensorPlan]:
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
        plans = []
        for name, parts in rows.items():
            p = params[name]
            n = p.shape[0]
            labels: list[Any] = list(range(n))  # rows outside any cluster stay singletons
            clustered = torch.zeros(n, dtype=torch.bool)
            for off, ids, key in parts:
                for i, c in enumerate(ids.tolist()):
                    labels[off + i] = (key, c)
                clustered[off: off + len(ids)] = True
            order: dict[Any, int] = {}
            tid = torch.tensor([order.setdefault(lab, len(order)) for lab in labels], dtype=torch.long)
            vector = p.dim() == 1
            # vectors: no decay inside clusters (the spec); rows outside clusters keep the decay the optimiser
            # would have given them
            eta_rows = torch.full((n, 1), eta, dtype=p.dtype)
            if vector:
                eta_rows[clustered] = 0.0
            counts = torch.bincount(tid, minlength=len(order)).to(p.dtype).unsqueeze(1)
            plans.append(_TensorPlan(name, vector, tid.to(p.device), (1.0 / counts).to(p.device),
                                     eta_rows.to(p.device), p))
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
                    yield key, ids, m, model.get_submodule(m.module)

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
def _explicit_widths(widths: float | dict[str, float], sizes: dict[str, int]) -> dict[str, int]:
    """Widths given as one fraction, or per group key / stage prefix (an int count or a float fraction)."""
    def count(v: float, n: int) -> int:
        return int(v) if isinstance(v, int) else max(1, math.floor(v * n + 1e-9))

    if isinstance(widths, (int, float)):
        return {k: count(float(widths), n) for k, n in sizes.items()}
    out, used = {}, set()
    for key, n in sizes.items():
        # the most specific entry wins: the key itself, else the longest module-name prefix (a stage)
        match = max((w for w in widths if w == key or key.startswith(w + ".")), key=len, default=None)
        if match is not None:
            out[key] = count(widths[match], n)
            used.add(match)
    unused = set(widths) - used
    if unused:
        raise ValueError(f"C-SGD widths: {', '.join(sorted(unused))} match no prunable group; "
                         f"groups: {', '.join(sizes)}")
    return out


def squeeze_widths(model: nn.Module, example_input: torch.Tensor, reference: nn.Module | None = None,
                   graph: ChannelGraph | None = None) -> dict[str, int]:
    """Group widths of ``reference`` (default: ``model``'s recipe rebuilt at width 1) for a wide ``model``
    (``graph``: ``model``'s :class:`~slimcnn.graph.ChannelGraph`, when the caller has one).

    >>> from slimcnn.models import create
    >>> wide = create("cifar_resnet20", width=1.5)
    >>> squeeze_widths(wide, torch.zeros(1, 3, 32, 32))["conv1"]                # doctest: +SKIP
    16
    """
    from ..graph import ChannelGraph, channel_groups

    if reference is None:
        spec = getattr(model, "slimcnn_spec", None)
        if spec is None or spec["kwargs"].get("width", 1.0) == 1.0:
            raise ValueError("C-SGD squeeze needs a model built wide, e.g. create('cifar_resnet56', width=1.5), "
                             "or an explicit reference model")
        from ..models import create

        kwargs = {k: v for k, v in spec["kwargs"].items() if k != "width"}
        reference = create(spec["name"], num_classes=spec["num_classes"], **kwargs)
    graph = graph if graph is not None else ChannelGraph(model, example_input)
    wide = {g.key: g.size for g in graph.groups_for(model) if g.prunable}
    narrow = {g.key: g.size for g in channel_groups(reference, example_input)}
    missing = sorted(set(wide) - set(narrow))
    if missing:
        raise ValueError(f"C-SGD squeeze: the reference model has no channel group {', '.join(missing)}")
    return {k: narrow[k] for k in wide}


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
