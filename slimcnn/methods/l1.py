"""L1 filter-norm pruning (Li et al., "Pruning Filters for Efficient ConvNets", ICLR 2017): the baseline.

Each channel of a prunable group is scored by the L1 norm of the filters that produce it (summed over all
producers of a residual stream, each normalised by its filter size so that wide and narrow producers weigh the
same), then the lowest-scoring channels are removed until the real MACs hit the target. ``mode="uniform"``
keeps the same fraction of every group (the paper prunes layer by layer); ``"global"`` ranks channels across
groups after normalising scores per group.
"""
from __future__ import annotations

import torch
from torch import nn

from .base import Method


def producer_norms(model: nn.Module, group, p: int = 1) -> torch.Tensor:
    """Per-channel ``p``-norm of the weights producing each channel of ``group`` (mean over producers)."""
    total = torch.zeros(group.size)
    count = 0
    for m in group.members:
        if m.role not in ("out", "dw"):
            continue
        w = getattr(model.get_submodule(m.module), "weight", None)
        if w is None:
            continue  # e.g. a parameter-free shortcut
        rows = w.detach()[m.offset: m.offset + group.size].flatten(1).float()
        total += rows.norm(p=p, dim=1).cpu() / rows.shape[1]
        count += 1
    return total / max(count, 1)


class L1Pruning(Method):
    """Prune the filters with the smallest L1 norm to ``target_macs`` (ratio <= 1 or absolute MACs)."""

    name = "l1"
    trains_before_finalize = False
    cli_args = [("--mode", {"choices": ["uniform", "global"], "default": None,
                            "help": "l1/tp: same keep ratio in every group (uniform, default) or one global ranking"})]

    def __init__(self, target_macs: float = 0.5, mode: str = "uniform", norm: int = 1) -> None:
        if mode not in ("uniform", "global"):
            raise ValueError(f"mode must be 'uniform' or 'global', got {mode!r}")
        self.target_macs, self.mode, self.norm = target_macs, mode, norm

    def prepare(self, model: nn.Module, example_input: torch.Tensor) -> nn.Module:
        self.example_input = example_input
        return model

    def scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from ..graph import channel_groups

        return {g.key: producer_norms(model, g, self.norm)
                for g in channel_groups(model, self.example_input) if g.prunable}

    def finalize(self, model: nn.Module) -> nn.Module:
        from ..graph import prune_to_target

        return prune_to_target(model, self.example_input, self.scores(model), self.target_macs, mode=self.mode)

    def state_dict(self) -> dict:
        return {"target_macs": self.target_macs, "mode": self.mode, "norm": self.norm}
