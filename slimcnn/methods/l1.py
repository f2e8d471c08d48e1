"""Magnitude pruning, the baseline: score channels, remove the lowest until the real MACs hit the target.

``scorer="l1"`` is the paper's (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017): the L1 norm of
the filters that produce a channel. The default, ``"group_l2"``, scores everything the channel owns (producers,
consumers' input slices, BN gamma/beta; see :mod:`slimcnn.importance` for the measured reason). ``mode="uniform"``
keeps the same fraction of every group (the paper prunes layer by layer); ``"global"`` ranks channels across
groups after normalising scores per group. ``round_to=N`` keeps multiples of ``N`` channels in every group at
least ``N`` wide (aligned widths run faster; see :mod:`slimcnn.graph.targeting`). ``target_latency`` (a
:class:`~slimcnn.graph.latency.LatencyGoal`) replaces the MACs target by a latency measured on a backend: the
table is timed on the model ``prepare`` gets, and ``finalize`` plans the widths on it (:mod:`slimcnn.graph.latency`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..importance import SCORERS, check_scorer, score
from .base import Method

if TYPE_CHECKING:
    from ..graph import ChannelGraph
    from ..graph.latency import LatencyGoal, LatencyTable


class L1Pruning(Method):
    """Prune the lowest-scoring channels to ``target_macs`` (ratio <= 1 or absolute MACs)."""

    name = "l1"
    trains_before_finalize = False
    method_share = 0.0  # its recipe: share of the epoch budget before finalize
    targets = frozenset({"target_macs", "target_latency"})
    segmentation = True
    layer_control = frozenset({"exclude", "min_keep"})
    cli_args = [("--mode", {"choices": ["uniform", "global"], "default": None,
                            "help": "l1/tp: same keep ratio in every group (uniform) or one global ranking "
                                    "(what a stack's l1 stage uses, e.g. l1+trp)"}),
               ("--scorer", {"choices": sorted(SCORERS), "default": None,
                             "help": "l1: channel importance: group_l2 (producers + consumers + BN) or "
                                     "l1 (the paper's producer L1 norm)"})]

    def __init__(self, target_macs: float = 0.5, mode: str = "uniform", scorer: str = "group_l2",
                 round_to: int | None = None, target_latency: LatencyGoal | None = None) -> None:
        from ..graph.targeting import check_round_to

        if mode not in ("uniform", "global"):
            raise ValueError(f"mode must be 'uniform' or 'global', got {mode!r}")
        self.target_macs, self.mode, self.scorer = target_macs, mode, check_scorer(scorer)
        self.round_to = check_round_to(round_to)
        self.target_latency = target_latency
        self.latency_table: LatencyTable | None = None
        self.latency_record: dict[str, Any] = {}

    def prepare(self, model: nn.Module, example_input: torch.Tensor, graph: ChannelGraph | None = None) -> nn.Module:
        super().prepare(model, example_input, graph)
        if self.target_latency is not None:
            from ..graph.latency import build_latency_table

            goal = self.target_latency
            # the anchor sits at the target (a ratio; for milliseconds, 0.5 until the base is timed)
            self.latency_table = build_latency_table(model, example_input[:1], goal.backend, goal.batch, goal.threads,
                                                     goal.value if goal.unit == "ratio" else 0.5,
                                                     groups=self.graph.groups_for(model), round_to=self.round_to)
        return model

    def scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        return {g.key: score(self.scorer, model, g) for g in self.graph.groups_for(model) if g.prunable}

    def finalize(self, model: nn.Module) -> nn.Module:
        if self.latency_table is not None:
            return self._finalize_latency(model)
        return self.graph.prune_to_target(self.scores(model), self.target_macs, mode=self.mode, model=model,
                                          round_to=self.round_to)

    def _finalize_latency(self, model: nn.Module) -> nn.Module:
        from ..graph.latency import prune_to_latency

        table, goal = self.latency_table, self.target_latency
        groups = self.graph.groups_for(model)
        ratio = goal.ratio(table.base_ms)
        small, widths, plan = prune_to_latency(model, self.example_input, self.scores(model), table, ratio,
                                               self.mode, groups=groups, round_to=self.round_to)
        # predicted: before the plan was timed; search_ratio: its timing during the search (the report's measured
        # ratio is a fresh timing after compression)
        self.latency_record = {**table.summary(), "target": str(goal), "target_ratio": round(ratio, 4),
                               "predicted_ratio": plan["predicted"], "search_ratio": plan["ratio"],
                               "chosen_plan": plan["what"], "groups": table.group_curves(groups)}
        return small

    def state_dict(self) -> dict:
        return {"target_macs": self.target_macs, "mode": self.mode, "scorer": self.scorer,
                **({"round_to": self.round_to} if self.round_to else {})}

    def report(self) -> dict:
        return {"scorer": self.scorer, "mode": self.mode, **({"round_to": self.round_to} if self.round_to else {}),
                **({"latency_target": self.latency_record} if self.latency_record else {})}
