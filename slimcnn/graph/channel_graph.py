"""ChannelGraph: one object for a model's trace, channel groups, costs and surgery.

A method gets one in ``prepare`` and asks it everything: the groups (traced once, on first use), the MACs model
(profiled once), the soft MACs of gates, and the surgery (remove / merge / replace, each a thin call into
:mod:`slimcnn.graph.surgery` with the groups already known). Tracing is the expensive part (a Torch-Pruning
dependency graph), and before the graph existed an L1 finalize traced twice and a C-SGD run three times.

What the graph holds depends only on the model's *structure* (module names, types and tensor shapes), never on
its weights, so one graph serves a model through training. Surgery returns a new model and leaves the graph
describing the old one: build a new graph for the result (:meth:`ChannelGraph.rebuild`). A graph also checks,
every time it is used on a model, that the structure is still the one it traced; if a model was changed in place
(a module swapped, a layer resized) it traces again rather than hand out stale groups. :meth:`invalidate` forces
that explicitly.

>>> import torch, slimcnn
>>> model = slimcnn.create("cifar_resnet20")
>>> graph = ChannelGraph(model, torch.randn(1, 3, 32, 32))
>>> len(graph.groups), graph.traces                   # the first question traces the model
(13, 1)
>>> scores = {g.key: torch.rand(g.size) for g in graph.prunable}
>>> small = graph.prune_to_target(scores, 0.5)        # same groups, no second trace
>>> graph.traces, graph.fits(small), graph.rebuild(small).fits(small)
(1, False, True)
"""
from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from . import groups as _groups
from .costs import CostModel, cost_model
from .groups import ChannelGroup
from .policy import LayerPolicy, active_policy

Signature = tuple[tuple[str, str, tuple[tuple[int, ...], ...]], ...]


def structure(model: nn.Module) -> Signature:
    """What the groups and costs of ``model`` depend on: every module's name, type and own tensor shapes."""
    return tuple((name, type(m).__qualname__,
                  tuple(tuple(t.shape) for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))))
                 for name, m in model.named_modules())


class ChannelGraph:
    """The channel structure of ``model`` on inputs like ``example_input``: groups, costs and surgery.

    Built lazily (nothing is traced until a question needs it) and at most once per model structure. Every method
    that takes ``model`` uses that model's weights (default: the model the graph was built on); the groups must fit
    it, else it is traced anew.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor) -> None:
        self.model = model
        self.example_input = example_input
        #: how many times this graph traced a model (a test and a user can check that it is once)
        self.traces = 0
        self._raw: list[ChannelGroup] | None = None
        self._signature: Signature | None = None
        self._policy_groups: dict[LayerPolicy | None, list[ChannelGroup]] = {}
        self._costs: CostModel | None = None

    # ------------------------------------------------------------------------------------------ state
    def fits(self, model: nn.Module) -> bool:
        """Whether this graph describes ``model`` (same structure as the model it traced, or would trace)."""
        return structure(model) == (self._signature if self._signature is not None else structure(self.model))

    def invalidate(self) -> None:
        """Forget the trace and the costs: the next question traces again. Call it after changing the model in
        place (the checks on each use catch that too, at the cost of a structure walk)."""
        self._raw, self._signature, self._costs = None, None, None
        self._policy_groups = {}

    def rebuild(self, model: nn.Module | None = None, example_input: torch.Tensor | None = None) -> ChannelGraph:
        """A fresh graph for ``model`` (e.g. what a surgery returned); this one is left as it is."""
        return ChannelGraph(self.model if model is None else model,
                            self.example_input if example_input is None else example_input)

    def _sync(self, model: nn.Module | None) -> nn.Module:
        """The model to work on, with the trace made to fit it."""
        model = self.model if model is None else model
        if self._raw is not None and structure(model) != self._signature:
            self.invalidate()
        if self._raw is None:
            self.model = model
            self._raw = _groups.build_groups(model, self.example_input)
            self._signature = structure(model)
            self.traces += 1
        return model

    # ------------------------------------------------------------------------------------------ groups
    def groups_for(self, model: nn.Module | None = None) -> list[ChannelGroup]:
        """The channel groups, unprunable ones included, with the active layer policy applied
        (as :func:`slimcnn.graph.channel_groups`)."""
        self._sync(model)
        policy = active_policy() or None
        if policy not in self._policy_groups:
            groups = copy.deepcopy(self._raw)
            if policy:  # --exclude / --min-keep of the run in progress
                policy.apply(groups)
            self._policy_groups[policy] = groups
        return self._policy_groups[policy]

    @property
    def groups(self) -> list[ChannelGroup]:
        return self.groups_for()

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    @property
    def by_key(self) -> dict[str, ChannelGroup]:
        return {g.key: g for g in self.groups}

    # ------------------------------------------------------------------------------------------ costs
    def costs(self, model: nn.Module | None = None) -> CostModel:
        """The MACs model (per-layer costs and the measured total), profiled once."""
        model = self._sync(model)
        if self._costs is None:
            self._costs = cost_model(model, self.example_input, self._raw)
        return self._costs

    def macs_at(self, widths: Mapping[str, int]) -> int:
        """Predicted MACs when each named group keeps ``widths[key]`` channels (exact for conv/linear layers)."""
        return self.costs().macs_at(widths)

    def soft_macs(self, gates: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Differentiable MACs under per-channel gates (Dagger's cost; see :func:`slimcnn.graph.costs.soft_macs`)."""
        return self.costs().soft_macs(gates)

    # ------------------------------------------------------------------------------------------ targeting
    def allocate_widths(self, target: float, mode: str = "uniform", scores: Mapping[str, torch.Tensor] | None = None,
                        model: nn.Module | None = None, **options: Any) -> dict[str, int]:
        """:func:`slimcnn.graph.allocate_widths` on this graph's groups and costs."""
        from .targeting import allocate_widths

        model = self._sync(model)
        return allocate_widths(model, self.example_input, target, mode, scores, groups=self.groups_for(model),
                               cost=self.costs(model), **options)

    def select_and_prune(self, scores: Mapping[str, torch.Tensor], target: float = 0.5, mode: str = "global",
                         model: nn.Module | None = None, **options: Any) -> tuple[dict[str, list[int]], nn.Module]:
        """:func:`slimcnn.graph.select_and_prune` on this graph: the kept channels and the validated copy."""
        from .targeting import select_and_prune

        model = self._sync(model)
        return select_and_prune(model, self.example_input, scores, target, mode, groups=self.groups_for(model),
                                cost=self.costs(model), **options)

    def prune_to_target(self, scores: Mapping[str, torch.Tensor], target: float = 0.5, mode: str = "global",
                        model: nn.Module | None = None, **options: Any) -> nn.Module:
        """:func:`slimcnn.graph.prune_to_target` on this graph: a validated copy within ``tol`` of ``target``."""
        return self.select_and_prune(scores, target, mode, model, **options)[1]

    # ------------------------------------------------------------------------------------------ surgery
    def remove(self, keep: Mapping[str, Sequence[int]], model: nn.Module | None = None, tol: float = 1e-4) -> nn.Module:
        """A validated copy keeping channels ``keep[key]`` of each named group (:func:`remove_channels`)."""
        from .surgery import remove_channels

        model = self._sync(model)
        return remove_channels(model, self.example_input, keep, groups=self.groups_for(model), tol=tol)

    def merge(self, clusters: Mapping[str, Sequence[Sequence[int]]], model: nn.Module | None = None,
              lossless_tol: float | None = None) -> nn.Module:
        """A validated copy where each cluster becomes one channel (:func:`merge_channels`)."""
        from .surgery import merge_channels

        model = self._sync(model)
        return merge_channels(model, self.example_input, clusters, lossless_tol=lossless_tol,
                              groups=self.groups_for(model))

    def equalize(self, clusters: Mapping[str, Sequence[Sequence[int]]], model: nn.Module | None = None) -> None:
        """In place: make each cluster's channels identical, so that :meth:`merge` is exact."""
        from .surgery import equalize_clusters

        model = self._sync(model)
        equalize_clusters(model, self.groups_for(model), clusters)

    def replace(self, replacements: dict[str, nn.Module], model: nn.Module | None = None,
                lossless_tol: float | None = None) -> nn.Module:
        """A validated copy with the named modules replaced (:func:`replace_modules`); no trace needed."""
        from .replace import replace_modules

        return replace_modules(self.model if model is None else model, self.example_input, replacements,
                               lossless_tol)

    def __repr__(self) -> str:
        state = f"{len(self._raw)} groups" if self._raw is not None else "not traced yet"
        return f"ChannelGraph({type(self.model).__name__}, {state}, traces={self.traces})"
