"""Dagger: data-agnostic filter gating learned from the weights, a FLOPs-aware regulariser, pruning to a MACs target.

No public code exists for Dagger; everything below marked **[ours]** is our design, and each open choice is a
constructor parameter.

Pipeline::

    m = Dagger(target_macs=0.5)
    model = m.prepare(model, example_input)         # hooks on the model; the Dagger module lives on ``m``
    opt = torch.optim.SGD(m.param_groups(model, lr=0.01, weight_decay=5e-4), lr=0.01, momentum=0.9)
    for step, (x, y) in enumerate(loader):           # the search phase
        m.before_forward(model, step)
        loss = criterion(model(x), y) + m.loss(model)  # task loss on the gated net + FLOPs regulariser
        loss.backward(); m.after_backward(model, step); opt.step(); opt.zero_grad(); m.after_step(model, step)
    compact = m.finalize(model)                      # prune to the target, no trace of gates or hooks

Design:

- **Descriptors [ours].** For every channel of every prunable channel group, a vector computed only from the
  current weights of the group's members: mean |w| and RMS of each producer filter (role ``out``, and ``dw``
  depthwise filters), cosine similarity of the filter to its layer's mean filter, BN |gamma| and beta (role ``bn``).
  Each feature is normalised across the channels of its own producer first (so a residual stream with many
  producers weighs them equally), averaged over producers, then normalised across the group (``normalize``:
  ``zscore`` (default), ``max`` or ``none``). Plus ``group_l2``: the log of everything the channel owns --
  producer filters, the consumers' input slices, BN gamma/beta -- each tensor scaled by its own mean, the same
  weights :mod:`slimcnn.importance` scores (for L1-style pruning, adding the consumers and BN to the producer's
  filters kept more top-1 after a short fine-tune, and the producer-only prior left Dagger's gated net below L1's).
  Never activations, never the batch: gates
  are a function of the weights and of the Dagger module alone.
- **Dagger module [ours].** One small MLP shared by all groups: ``[descriptor, embedding(group)] -> hidden -> 1``,
  plus a linear path on the descriptors, gives a score s_c; the per-group learned embedding lets the module set
  each layer's keep level. The linear path starts as a magnitude ranking (``prior="group_l2"``, ``prior_scale``), so
  that channels leave one by one as the regulariser lowers the scores rather than all at once (with a flat start
  every gate crossed the threshold in the same step and the search collapsed to zero MACs).
- **Gates [ours].** ``g_c = sigmoid(s_c / T)``; T anneals from ``temperature`` to ``final_temperature`` over
  ``anneal_steps`` (``anneal``: ``exp``, ``linear`` or ``constant``). ``gate="ste"`` (default): the forward pass
  uses the hard gate ``1[s_c > 0]`` and the backward pass the sigmoid's gradient (straight-through); T then only
  narrows the window of channels that get gradient. ``gate="sigmoid"``: the soft gate in the forward pass too.
  Why STE by default: in a BatchNorm network a consumer's output is renormalised, so scaling all of a layer's
  gates by the same factor costs the task loss nothing; soft gates then meet the MACs target by shrinking
  uniformly (measured on ResNet-20: every gate near 0.75) and the gated net says little about the pruned one
  (top-1 70% gated vs 10-19% after pruning, 500 test images). With hard gates the searched net *is* the pruned
  net (22% vs 21% in a short run whose hard MACs had reached the target) and the weights adapt to the pruning
  during the search.
- **Where gates act [ours].** A gate multiplies its channel at the input of every *consumer* of the group (role
  ``in``: the convs, linears and option-A shortcuts that read the channel). With 0/1 gates this is exactly
  channel removal, in train and eval mode alike: a channel nobody reads is a removed channel. Gating a producer's
  output instead would be undone by the BatchNorm that follows it in training mode, and gating BN outputs needs
  the producer/BN pairing of every stream; consumer gating needs neither, and keeps residual streams consistent.
- **Gradients into the weights.** The gates are computed from the weights, so the FLOPs regulariser could push
  the weights themselves (shrinking filters to switch gates off). By default that path is detached
  (``detach_weights=True``): the weights train on the task loss only, through their ordinary path, and the
  Dagger module alone learns which weight patterns to keep. ``detach_weights=False`` lets both losses flow into
  the weights through the descriptors.
- **Soft MACs.** ``F(g) = sum over conv/linear layers of macs * (sum g_in / in_c) * (sum g_out / out_c)`` from
  :func:`slimcnn.graph.layer_costs`; an ungated side counts as full width, a depthwise conv is linear in its one
  group. With 0/1 gates F equals the measured MACs of the pruned model.
- **Regulariser [ours: the form].** ``lambda_flops * (F / F_target - 1)^2`` (``reg="square"``, pulls from both
  sides) or ``lambda_flops * max(0, F / F_target - 1)`` (``reg="hinge"``, only pushes down). F is taken at the
  gate *probabilities* p = sigmoid(s / T): F is multilinear in the gates, so F(p) is exactly the expected MACs of
  independent Bernoulli(p) gates, and it is smooth in the scores. (Taking F at the hard STE gates made a feedback
  loop through a step function: on ResNet-20 the MACs oscillated and then collapsed to 1% of the base within
  200 steps, the task gradients of the near-empty layers exploding.) Polarisation ``polarize * mean(4 p (1 - p))``
  pushes p away from 1/2, so that F(p) and the MACs of the hard gates meet (without it the two drifted far
  apart). ``clip_grad`` bounds the Dagger module's gradient norm per step: the straight-through task gradient
  is heavy-tailed. ``lambda_flops`` is the *starting* weight; dual ascent then moves it each step, ``lambda += lambda_lr * (hard MACs / target - 1)``, because a fixed
  lambda stalls above the target: the hard MACs stayed above a 0.5 target for the whole search, so finalize
  cut extra channels in one shot and the returned net was not the searched one (it lost most of the gated
  net's top-1). With dual ascent the hard MACs meet the target within a few tens of steps.
  History of the fixed weight, for the record: the square
  penalty balances the task loss at an offset that shrinks as 1/lambda (ResNet-20, 300 steps: lambda 2 stalled at
  expected MACs 0.61 of the base for a 0.5 target, lambda 10 held 0.52; top-1 after finalize without fine-tuning,
  500 test images: 22% vs 55%, L1-norm pruning 15%).
- **Holding the target [ours].** ``hold_steps=N``: once the hard MACs have stayed within 5% of the target for N
  steps in a row (dual ascent keeps them circling it), at the first step within 1% the gates freeze where they are and the regulariser stops; the rest of the search phase trains
  the gated net, which with hard gates is the pruned net, so a short budget is not spent searching a net that
  found its target in a few tens of steps. Default None (search to the end of the phase).
- **Finalize.** When the hard gates' own channel set (the frozen one once frozen) measures within 1% of the target
  and no ``round_to`` is asked, exactly that set is kept: the net the search trained is the net returned.
  Otherwise channels are ranked globally by their gate logit ``s_c / T`` (same order as the gate, but never
  tied by float saturation), :func:`slimcnn.graph.select_and_prune` keeps enough of them that the measured MACs
  land within 1% of the target and builds the validated compact copy in the same search, and all
  hooks come off the model. The compact model holds no Dagger module and no hooks. With ``round_to=N`` that
  search keeps multiples of ``N`` channels per group (groups narrower than ``N`` excepted), so the pruned net
  runs on kernel-friendly widths; the gate search itself is not changed by it.
"""
from __future__ import annotations

import types

import math
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..graph import ChannelGraph
from ..graph.costs import soft_macs  # the cost model's soft MACs, kept importable from here
from .base import Method, macs_goal
from .dagger_gates import (FEATURES, DaggerNet, channel_descriptors, flops_regularizer, straight_through_gate,
                           temperature_at)


# ---------------------------------------------------------------------------------------------- the method

def _choice(name: str, value: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


class Dagger(Method):
    """Data-agnostic filter gating (see the module docstring for every design choice).

    >>> m = Dagger(target_macs=0.5, lambda_flops=10.0, gate="ste")
    >>> model = m.prepare(model, torch.zeros(1, 3, 32, 32))   # doctest: +SKIP
    """

    name = "dagger"
    trains_before_finalize = True
    method_share = 0.5  # its recipe: share of the epoch budget before finalize
    method_phase = "gate search"
    prepare_inputs = frozenset({"total_steps"})  # anneals its gates over the phase
    segmentation = True
    layer_control = frozenset({"exclude", "min_keep"})
    cli_args = [
        ("--search-lr", dict(dest="search_lr", type=float, default=None,
                             help="dagger: learning rate of the Dagger module (default: 10x the training lr)")),
        ("--lambda-flops", dict(dest="lambda_flops", type=float, default=None,
                                help="dagger: weight of the FLOPs regulariser")),
        ("--gate", dict(dest="gate", choices=["sigmoid", "ste"], default=None,
                        help="dagger: straight-through hard gates (ste) or soft sigmoid gates (sigmoid)")),
        ("--temperature", dict(dest="temperature", type=float, default=None,
                               help="dagger: initial gate temperature T")),
        ("--final-temperature", dict(dest="final_temperature", type=float, default=None,
                                     help="dagger: temperature at the end of annealing")),
        ("--anneal-steps", dict(dest="anneal_steps", type=int, default=None,
                                help="dagger: optimiser steps over which T anneals (default: the whole search under compress, else 2000)")),
        ("--reg", dict(dest="reg", choices=["square", "hinge"], default=None,
                       help="dagger: regulariser form: (F/F_t - 1)^2 (square) or max(0, F/F_t - 1) (hinge)")),
        ("--lambda-lr", dict(dest="lambda_lr", type=float, default=None,
                             help="dagger: dual-ascent step on lambda per search step, lambda += lr * (MACs/target - 1) "
                                  "(0 keeps lambda fixed)")),
        ("--hold-steps", dict(dest="hold_steps", type=int, default=None,
                              help="dagger: end the search once the hard MACs have held the target (within 5%%) for "
                                   "N steps in a row (then at a step within 1%%); the rest of the phase trains the "
                                   "gated net (default: never)")),
        ("--polarize", dict(dest="polarize", type=float, default=None,
                            help="dagger: weight of the polarisation term mean(4 p (1 - p)) on gate probabilities")),
    ]

    def __init__(self, target_macs: float | None = None, search_lr: float | None = None, lambda_flops: float = 10.0,
                 gate: str = "ste", temperature: float = 1.0, final_temperature: float = 0.1,
                 anneal: str = "exp", anneal_steps: int | None = None, reg: str = "square", polarize: float = 1.0,
                 features: Sequence[str] = FEATURES, normalize: str = "zscore", hidden: int = 16,
                 embed_dim: int = 4, init_gate: float = 0.95, prior: str | None = "group_l2", prior_scale: float = 1.0,
                 detach_weights: bool = True, clip_grad: float | None = 1.0, mode: str = "global",
                 seed: int = 0, lambda_lr: float = 20.0, round_to: int | None = None,
                 hold_steps: int | None = None) -> None:
        from ..graph.targeting import check_round_to

        self.round_to = check_round_to(round_to)
        if target_macs is None or not target_macs > 0:
            raise ValueError(f"dagger needs a positive MACs target (ratio <= 1 or absolute MACs), got {target_macs}")
        if not 0 < init_gate < 1:
            raise ValueError(f"init_gate must be in (0, 1), got {init_gate}")
        if not (temperature > 0 and final_temperature > 0):
            raise ValueError("temperatures must be positive")
        self.target_macs = float(target_macs)
        self.search_lr = search_lr
        self.lambda_flops = self.lambda_start = float(lambda_flops)
        if lambda_lr < 0:
            raise ValueError(f"lambda_lr must be >= 0, got {lambda_lr}")
        self.lambda_lr = float(lambda_lr)
        if hold_steps is not None and hold_steps < 1:
            raise ValueError(f"hold_steps must be >= 1 (or None: never freeze), got {hold_steps}")
        self.hold_steps = hold_steps
        self.frozen: dict[str, torch.Tensor] | None = None  # the hard gates, once they held the target (hold_steps)
        self.frozen_at: int | None = None
        self._held = 0
        self.finalize_rule: str | None = None
        self.gate = _choice("gate", gate, ("sigmoid", "ste"))
        # anneal over the whole search when the caller tells prepare() its length; 2000 steps otherwise
        self._anneal_given = anneal_steps is not None
        self.t_start, self.t_end = float(temperature), float(final_temperature)
        self.anneal_steps = int(anneal_steps) if anneal_steps is not None else 2000
        self.anneal = _choice("anneal", anneal, ("exp", "linear", "constant"))
        self.reg = _choice("reg", reg, ("square", "hinge"))
        self.polarize = float(polarize)
        self.features = tuple(features)
        self.normalize = _choice("normalize", normalize, ("zscore", "max", "none"))
        self.hidden, self.embed_dim, self.init_gate = hidden, embed_dim, init_gate
        if prior is not None and prior not in self.features:
            raise ValueError(f"prior must be one of the features {', '.join(self.features)} or None, got {prior!r}")
        self.prior, self.prior_scale = prior, float(prior_scale)
        self.detach_weights = detach_weights
        self.clip_grad = clip_grad
        self.mode = mode
        self.seed = seed
        self.temperature = self.t_start
        self.step = 0
        self.net: DaggerNet | None = None
        self.groups: list[Any] = []
        self.costs: list[Any] = []
        self.trajectory: list[dict[str, float]] = []
        self.widths: dict[str, int] = {}
        self.final_gates: dict[str, list[float]] = {}
        self._handles: list[Any] = []
        self._gates: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None = None  # (forward, probs)
        self._fresh = False
        self._last: tuple[float, float] | None = None  # (expected MACs, MACs of the forward gates) of this step
        self._pending_state: dict[str, Any] | None = None

    # ------------------------------------------------------------------ gates
    def logits(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Gate logits ``s_c / T`` per prunable group, from the current weights of ``model`` only."""
        if self.net is None:
            raise RuntimeError("Dagger: call prepare(model, example_input) first")
        desc = [channel_descriptors(model, g, self.features, self.normalize, self.detach_weights) for g in self.groups]
        device = desc[0].device
        if next(self.net.parameters()).device != device:
            self.net.to(device)
        ids = torch.cat([torch.full((g.size,), i, dtype=torch.long, device=device) for i, g in enumerate(self.groups)])
        s = self.net(torch.cat(desc), ids) / self.temperature
        return dict(zip([g.key for g in self.groups], s.split([g.size for g in self.groups])))

    def gates(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Gate vectors per prunable group key, as used in the forward pass (hard 0/1 values for ``ste``)."""
        return self._gate_pair(model)[0]

    @property
    def last_gates(self) -> dict[str, torch.Tensor] | None:
        """The gates the hooked model's last forward pass used (None before the first one)."""
        return None if self._gates is None else self._gates[0]

    def _gate_pair(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(forward gates, soft sigmoid gates) per group key; once frozen, the held hard gates for both."""
        if self.frozen is not None:
            device = next(model.parameters()).device
            fixed = {k: v.to(device) for k, v in self.frozen.items()}
            return fixed, fixed
        soft = {key: torch.sigmoid(s) for key, s in self.logits(model).items()}
        if self.gate == "sigmoid":
            return soft, soft
        # straight-through: the value of the hard gate, the gradient of the soft one
        return {k: straight_through_gate(v) for k, v in soft.items()}, soft

    def _current_gates(self, model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """The gates of the last forward pass if it built a graph, else freshly computed ones."""
        pair = self._gates
        needs_graph = torch.is_grad_enabled() and self.net is not None and any(
            p.requires_grad for p in self.net.parameters())
        if not self._fresh or pair is None or (needs_graph and not next(iter(pair[1].values())).requires_grad):
            pair = self._gate_pair(model)
        self._fresh = False
        return pair

    # ------------------------------------------------------------------ hooks
    def _attach(self, model: nn.Module) -> None:
        self._detach_hooks()
        # Closures, not bound methods: a deep copy of the hooked model shares this method object instead of
        # cloning it (and the Dagger module) into the copy.
        method = self

        def compute(module: nn.Module, args: tuple) -> None:
            method._gates = method._gate_pair(module)
            method._fresh = True

        self._handles.append(model.register_forward_pre_hook(compute))
        slices: dict[str, list[tuple[str, int, int]]] = {}
        for g in self.groups:
            for m in g.members:
                if m.role == "in":
                    slices.setdefault(m.module, []).append((g.key, m.offset, g.size))
        for name, parts in slices.items():
            module = model.get_submodule(name)
            parts = sorted(parts, key=lambda p: p[1])
            if _foldable(module):
                self._handles.append(_FoldedGate(module, method, parts))
            else:
                self._handles.append(module.register_forward_pre_hook(_consumer_hook(method, parts,
                                                                                     isinstance(module, nn.Linear))))

    def _detach_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ------------------------------------------------------------------ Method interface
    def prepare(self, model: nn.Module, example_input: torch.Tensor, total_steps: int | None = None,
                graph: ChannelGraph | None = None) -> nn.Module:
        """Attach the gates. ``total_steps`` (the search length, passed by ``slimcnn compress``) sets the
        annealing length unless ``anneal_steps`` was given; ``graph``: the model's ChannelGraph, if at hand."""
        if total_steps and not self._anneal_given:
            self.anneal_steps = int(total_steps)
        self._detach_hooks()  # prepared twice: trace the clean model
        super().prepare(model, example_input, graph)
        self.step, self.trajectory, self.widths, self.final_gates = 0, [], {}, {}
        self.frozen, self.frozen_at, self._held = None, None, 0
        self.lambda_flops = self.lambda_start
        groups = self.graph.groups_for(model)
        self.groups = [g for g in groups if g.prunable]
        if not self.groups:
            raise ValueError("Dagger: the model has no prunable channel group")
        costs = self.graph.costs(model)  # layer_costs plus the measured total
        self.costs = costs.layers
        self.base_macs = float(costs.total)
        # MACs no conv/linear layer accounts for (functional matmuls) do not change with widths: a constant.
        self.rest = float(costs.rest)
        self.target_abs = macs_goal(self.target_macs, self.base_macs)
        # an unreachable target fails here, before any training, with the MACs that can be reached
        self.graph.allocate_widths(self.target_macs, model=model, round_to=self.round_to)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            init_logit = math.log(self.init_gate / (1 - self.init_gate)) * self.t_start
            prior = [self.prior_scale * self.t_start * (f == self.prior) for f in self.features]
            self.net = DaggerNet(len(self.groups), len(self.features), self.hidden, self.embed_dim, init_logit, prior)
        self.net.to(next(model.parameters()).device)
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
        self.temperature = temperature_at(self.step, self.t_start, self.t_end, self.anneal_steps, self.anneal)
        self._attach(model)
        return model

    def param_groups(self, model: nn.Module, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        groups = super().param_groups(model, lr, weight_decay)
        if self.net is None:
            raise RuntimeError("Dagger: call prepare(model, example_input) before param_groups")
        self.net.to(next(model.parameters()).device)
        # 10x the training lr by default: the module's gradient is clipped to norm 1 each step, so its lr alone sets
        # how fast the gates move. Measured (ResNet-20, trained weights, 0.5 target, 40 steps at lr 0.01): at the
        # training lr the hard MACs were still 1.23x the target at the end; at 10x they met it by step 6 and
        # held 0.995.
        groups.append({"params": list(self.net.parameters()), "lr": self.search_lr if self.search_lr else 10 * lr,
                       "weight_decay": 0.0})
        return groups

    def before_forward(self, model: nn.Module, step: int) -> None:
        self.step = step
        self.temperature = temperature_at(step, self.t_start, self.t_end, self.anneal_steps, self.anneal)

    def loss(self, model: nn.Module) -> torch.Tensor | float:
        if self.frozen is not None:  # the search is over: the rest of the phase trains the gated (= pruned) net
            self._current_gates(model)
            return 0.0
        gates, probs = self._current_gates(model)
        # Expected MACs under keep probabilities p: smooth in the scores, unlike the MACs of the hard gates.
        macs = soft_macs(self.costs, probs, self.rest)
        self._last = (float(macs.detach()), float(soft_macs(self.costs, {k: v.detach() for k, v in gates.items()},
                                                            self.rest)))
        total = self.lambda_flops * flops_regularizer(macs, self.target_abs, self.reg)
        if self.polarize:
            p = torch.cat(list(probs.values()))
            total = total + self.polarize * (4 * p * (1 - p)).mean()
        return total.float()

    def after_backward(self, model: nn.Module, step: int) -> None:
        if self.net is None:
            return
        params = [p for p in self.net.parameters() if p.grad is not None]
        # The Dagger module is not part of the (possibly DDP-wrapped) model: average its gradients by hand.
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            for p in params:
                torch.distributed.all_reduce(p.grad)
                p.grad /= world
        if self.clip_grad and params:
            torch.nn.utils.clip_grad_norm_(params, self.clip_grad)

    def after_step(self, model: nn.Module, step: int) -> None:
        if self._last is None:
            with torch.no_grad():
                gates, probs = self._gate_pair(model)
                self._last = (float(soft_macs(self.costs, probs, self.rest)), float(soft_macs(self.costs, gates, self.rest)))
        self.trajectory.append({"step": step, "soft_macs": self._last[0], "hard_macs": self._last[1],
                                "temperature": self.temperature, "lambda": self.lambda_flops})
        # Dual ascent: raise the penalty while the searched net is above the target, lower it below. The MACs of
        # the hard gates are a function of the (all-reduced) weights, so every DDP rank takes the same step.
        if self.lambda_lr and self.frozen is None:
            self.lambda_flops = max(0.0, self.lambda_flops + self.lambda_lr * (self._last[1] / self.target_abs - 1))
        self._maybe_freeze(model, step)
        self._last = None
        self.step = step + 1
        self.temperature = temperature_at(self.step, self.t_start, self.t_end, self.anneal_steps, self.anneal)

    def _maybe_freeze(self, model: nn.Module, step: int) -> None:
        """End the search once the hard MACs have held the target (within 5%: dual ascent keeps them circling it,
        measured +-3% on ResNet-20 for the whole search) for ``hold_steps`` steps in a row, at a step where they
        are within 1%: the gates stay as they are, so the rest of the phase trains exactly the net finalize cuts."""
        if self.hold_steps is None or self.frozen is not None:
            return
        off = abs(self._last[1] / self.target_abs - 1)
        self._held = self._held + 1 if off <= 0.05 else 0
        if self._held >= self.hold_steps and off <= 0.01:
            # the gates of this step's forward pass: the ones whose MACs were just checked
            gates = self._gates[0] if self._gates is not None else self._gate_pair(model)[0]
            self.frozen = {k: (v.detach() > 0.5).float().cpu() for k, v in gates.items()}
            self.frozen_at = step

    def _hard_set(self, scores: dict[str, torch.Tensor]) -> dict[str, list[int]] | None:
        """The channels the search's hard gates keep (the frozen ones once frozen; at least one per group), when
        their MACs are within 1% of the target and no alignment is asked; else None."""
        if self.round_to:
            return None
        kept = {}
        for k, v in scores.items():
            on = self.frozen[k] > 0.5 if self.frozen is not None else v > 0
            kept[k] = on.nonzero().flatten().tolist() or [int(v.argmax())]
        if abs(self.graph.macs_at({k: len(v) for k, v in kept.items()}) / self.target_abs - 1) > 0.01:
            return None
        sizes = {g.key: g.size for g in self.groups}
        return {k: v for k, v in kept.items() if len(v) < sizes[k]}

    def finalize(self, model: nn.Module) -> nn.Module:
        if self.net is None:
            raise RuntimeError("Dagger: finalize called before prepare")
        self._detach_hooks()  # the model is clean again whatever happens below
        self._gates, self._fresh = None, False
        with torch.no_grad():
            scores = {k: v.float().cpu() for k, v in self.logits(model).items()}
        self.final_gates = {k: torch.sigmoid(v).tolist() for k, v in scores.items()}
        # the searched net itself when its hard gates meet the target: the net the search trained is the one
        # returned. Else the logits (comparable across groups as they are) rank the channels to the target.
        exact = self._hard_set(scores)
        if exact is not None:
            keep, compact = exact, self.graph.remove(exact, model=model)
            self.finalize_rule = "the hard gates' channels (within 1% of the target)"
        else:
            keep, compact = self.graph.select_and_prune(scores, self.target_macs, self.mode, model=model,
                                                        normalize="none", round_to=self.round_to)
            self.finalize_rule = "gate logits ranked to the target"
        self.widths = {k: len(v) for k, v in keep.items()}
        searched = {k: set((v > 0).nonzero().flatten().tolist()) | {int(v.argmax())} for k, v in scores.items()}
        self.changed_at_finalize = sum(len(searched[k] ^ set(keep.get(k, range(len(scores[k]))))) for k in scores)
        return compact

    def report(self) -> dict[str, Any]:
        """Figures for report.json: ``gates`` (per group, the final gate probabilities, for a histogram; filled
        by finalize), ``soft_macs`` (expected MACs F(p) at each search step) and ``hard_macs`` (MACs of the
        forward gates), with ``soft_macs_steps``, ``temperatures`` and ``target_macs_abs``; ``widths`` after
        finalize and ``base_widths``."""
        return {"gates": self.final_gates,
                "soft_macs": [r["soft_macs"] for r in self.trajectory],
                "hard_macs": [r["hard_macs"] for r in self.trajectory],
                "soft_macs_steps": [r["step"] for r in self.trajectory],
                "temperatures": [r["temperature"] for r in self.trajectory],
                "target_macs_abs": getattr(self, "target_abs", None), "base_macs": getattr(self, "base_macs", None),
                "widths": self.widths, "base_widths": {g.key: g.size for g in self.groups},
                "lambdas": [r.get("lambda") for r in self.trajectory], "lambda_lr": self.lambda_lr,
                "search_macs_ratio": (self.trajectory[-1]["hard_macs"] / self.target_abs) if self.trajectory else None,
                "channels_changed_at_finalize": getattr(self, "changed_at_finalize", None),
                "finalize_rule": self.finalize_rule, "hold_steps": self.hold_steps, "frozen_at_step": self.frozen_at,
                **({"round_to": self.round_to} if self.round_to else {})}

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        return {"net": None if self.net is None else {k: v.detach().cpu().clone() for k, v in self.net.state_dict().items()},
                "step": self.step, "temperature": self.temperature, "trajectory": list(self.trajectory),
                "lambda": self.lambda_flops, "held": self._held, "frozen_at": self.frozen_at,
                "frozen": None if self.frozen is None else {k: v.clone() for k, v in self.frozen.items()},
                "group_keys": [g.key for g in self.groups]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.net is None:  # before prepare: applied once the groups (and so the module's shape) are known
            self._pending_state = state
            self.step = int(state["step"])
            return
        self._apply_state(state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        keys = [g.key for g in self.groups]
        if state.get("group_keys") and list(state["group_keys"]) != keys:
            raise ValueError("Dagger state does not fit this model: its channel groups differ")
        if state.get("net") is not None:
            self.net.load_state_dict(state["net"])
        self.step = int(state["step"])
        self.temperature = float(state["temperature"])
        self.trajectory = list(state.get("trajectory", []))
        self.lambda_flops = float(state.get("lambda", self.lambda_flops))
        self._held, self.frozen_at = int(state.get("held", 0)), state.get("frozen_at")
        self.frozen = state.get("frozen")


def _gate_vector(method: Dagger, parts: list[tuple[str, int, int]], n: int, like: torch.Tensor) -> torch.Tensor:
    """The gate of each of a consumer's ``n`` input channels (1 where no gated group feeds it)."""
    pieces, pos = [], 0
    for key, offset, size in parts:
        if offset > pos:
            pieces.append(like.new_ones(offset - pos))
        pieces.append(method._gates[0][key].to(like.dtype))
        pos = offset + size
    if pos < n:
        pieces.append(like.new_ones(n - pos))
    return torch.cat(pieces)


def _consumer_hook(method: Dagger, parts: list[tuple[str, int, int]], linear: bool) -> Callable:
    """Forward pre-hook multiplying a consumer's input channels by the gates of the groups feeding them."""

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if method._gates is None or not args or not isinstance(args[0], torch.Tensor):
            return None
        x = args[0]
        dim = x.dim() - 1 if linear else 1
        shape = [1] * x.dim()
        shape[dim] = x.shape[dim]
        return (x * _gate_vector(method, parts, x.shape[dim], x).view(shape), *args[1:])

    return hook


def _foldable(module: nn.Module) -> bool:
    """Consumers whose input gating can move onto the weight: ungrouped convs (zero padding or any per-channel
    padding commutes with a per-channel scale) and linears."""
    return (type(module) is nn.Conv2d and module.groups == 1) or type(module) is nn.Linear


class _FoldedGate:
    """Gate a consumer by scaling its weight's input slices instead of its input activation.

    ``conv(x * g) == conv_{W * g}(x)`` exactly, and W is far smaller than x: this keeps the search step close to a
    plain step (multiplying every activation cost ~30% on ResNet-56 on CPU). The module's ``forward`` is shadowed
    by a bound method (a deep copy of the module rebinds it to the copy, and shares this method object as the
    activation hooks' closures do) and restored by ``remove()``.
    """

    def __init__(self, module: nn.Module, method: Dagger, parts: list[tuple[str, int, int]]) -> None:
        self.module = module
        module.forward = types.MethodType(_folded_forward(method, parts), module)

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


def _folded_forward(method: Dagger, parts: list[tuple[str, int, int]]) -> Callable:
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if method._gates is None:
            return type(self).forward(self, x)
        g = _gate_vector(method, parts, self.weight.shape[1], self.weight)
        if isinstance(self, nn.Linear):
            return F.linear(x, self.weight * g.view(1, -1), self.bias)
        return self._conv_forward(x, self.weight * g.view(1, -1, 1, 1), self.bias)

    return forward
