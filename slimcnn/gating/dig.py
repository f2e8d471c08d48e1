"""DIGNet-style distributed (cascaded) feedback gating. **[ours]**: no public code exists.

At the end of iteration t-1 a top-down cascade runs over the stage outputs h_1..h_S::

    f_S = h_S;   f_s = P_s(h_s, f_{s+1}) = h_s * sigmoid(upsample(conv1x1(f_{s+1})))

so f_s carries information from stage s and every stage above it. At iteration t the input of stage s is
multiplied by ``sigmoid(upsample(conv1x1(src_s)))`` (a :class:`~slimcnn.gating.rig.Gate`), where ``variant``
chooses src_s:

- ``"cascaded"`` (DIGNet): f_s;
- ``"same_stage"``: h_s, stage s's own output of iteration t-1;
- ``"previous_stage"``: h_{s+1}, the stage before s in top-down order (RIGNet's choice; the top stage is not
  gated);
- ``"top_only"``: h_S for every stage;
- ``"none"``: no feedback at all, one plain pass whatever ``iterations`` says (the feed-forward baseline; its
  MACs are the backbone's).

Propagators P_s are :class:`~slimcnn.gating.rig.Gate` modules too (same ``gate_type`` and ``gate_init``, so
``"open"`` starts the cascade at f_s = 0.982 h_s), shared across iterations or not with the gates
(``share_gates``); they exist only for the cascade. Every other choice (1x1 convs before upsampling,
``gate_init``, ``bn`` shared or per iteration, stem computed once) is the one described in
:mod:`slimcnn.gating.rig`.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
from torch import nn

from .rig import FeedbackNet, Gate

VARIANTS = ("cascaded", "same_stage", "previous_stage", "top_only", "none")


class DIG(FeedbackNet):
    """Cascaded feedback gating over a staged backbone (segmentation models or CIFAR ResNets).

    >>> from slimcnn.models import create
    >>> m = DIG(create("seg_tiny", num_classes=11), iterations=2, variant="cascaded")
    >>> m(torch.zeros(1, 3, 64, 64)).shape
    torch.Size([1, 11, 64, 64])
    """

    #: its keywords, which ``slimcnn.create(name, gating="dig", ...)`` hands to it rather than to the backbone
    options: ClassVar[frozenset[str]] = frozenset({"iterations", "gate_type", "gate_stages", "share_gates",
                                                   "loss_all_iterations", "variant", "bn", "gate_init"})

    def __init__(self, backbone: nn.Module, iterations: int = 2, gate_type: str = "spatial",
                 gate_stages: Sequence[int] | str | int | None = None, share_gates: bool = True,
                 loss_all_iterations: bool = False, variant: str = "cascaded", bn: str = "shared",
                 gate_init: str = "default") -> None:
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}; got {variant!r}")
        self.variant = variant
        super().__init__(backbone, iterations, gate_type, gate_stages, share_gates, loss_all_iterations, bn,
                         gate_init)

    def _describe(self) -> str:
        return f"DIG with variant={self.variant!r}"

    def _src_index(self, s: int) -> int:
        """Index of the stage output the source of stage s is read from (for the cascade: where it starts)."""
        top = len(self.out_channels) - 1
        return {"cascaded": s, "same_stage": s, "previous_stage": s + 1, "top_only": top}.get(self.variant, top + 1)

    def _build_extra(self, n_sets: int) -> None:
        # P_s for s from the lowest gated stage up to S-2: the cascade never needs to go lower.
        low = self.gate_stages[0] if self.gate_stages else len(self.out_channels)
        top = len(self.out_channels) - 1
        needed = range(low, top) if self.variant == "cascaded" else range(0)
        self.propagators = nn.ModuleList(
            nn.ModuleDict({str(s): Gate(self.out_channels[s + 1], self.out_channels[s], self.gate_type, self.gate_init)
                           for s in needed})
            for _ in range(n_sets if len(needed) else 0))

    def cascade(self, feats: list[torch.Tensor], t: int = 1) -> list[torch.Tensor]:
        """The top-down cascade f_S..f_low over iteration t-1's stage outputs (lowest first, f_s at index s;
        stages below the lowest gated stage keep their h_s)."""
        f = list(feats)
        if not len(self.propagators):  # only the top stage is gated: f_S = h_S
            return f
        props = self.propagators[self._set(t)]
        for s in range(len(feats) - 2, self.gate_stages[0] - 1, -1):
            f[s] = feats[s] * props[str(s)](f[s + 1], feats[s].shape[-2:])
        return f

    def _transform(self, feats: list[torch.Tensor], t: int) -> list[torch.Tensor]:
        return self.cascade(feats, t) if self.variant == "cascaded" else feats
