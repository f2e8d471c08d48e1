"""Per-layer MACs as a function of group widths: the fast, exact estimator behind MACs targeting.

A conv/linear layer's MACs are ``spatial * kernel * (in / groups) * out``, so after surgery they are
``macs * (kept_in / in) * (kept_out / out)``; a depthwise conv's in and out channels are one group, so its MACs
are linear in that group's width. MACs the profiler attributes to anything else (functional matmuls, ops inside
opaque modules) do not depend on group widths and are carried as a constant.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..profile import profile
from .groups import ChannelGroup, channel_groups

Part = tuple[str, int, int]  # (group key, offset, size) along one axis of a layer


@dataclass
class LayerCost:
    """One conv/linear layer. ``in_group``/``out_group`` name the group feeding its input/output channels when a
    single group covers them all, else None; ``in_parts``/``out_parts`` list every group slice (densenet's concat
    consumers read many groups). MACs are per single input, as :func:`slimcnn.profile.profile` counts them.

    >>> c = LayerCost("conv", 1000, 10, 20, 1, "a", "b", (("a", 0, 10),), (("b", 0, 20),))
    >>> c.macs_at({"a": 5, "b": 10})
    250
    """

    name: str
    macs: int
    in_channels: int
    out_channels: int
    groups: int
    in_group: str | None
    out_group: str | None
    in_parts: tuple[Part, ...] = field(default=())
    out_parts: tuple[Part, ...] = field(default=())

    def kept(self, widths: Mapping[str, int], axis: str) -> int:
        parts = self.in_parts if axis == "in" else self.out_parts
        full = self.in_channels if axis == "in" else self.out_channels
        return full + sum(widths.get(k, size) - size for k, _, size in parts)

    def macs_at(self, widths: Mapping[str, int]) -> int:
        """MACs of this layer when each group ``k`` keeps ``widths[k]`` channels (groups not named stay whole)."""
        k_out = self.kept(widths, "out")
        if self.groups > 1:  # depthwise: in == out, one group
            return self.macs * k_out // self.out_channels
        return self.macs * self.kept(widths, "in") * k_out // (self.in_channels * self.out_channels)


@dataclass
class CostModel:
    """All layer costs plus the constant rest; ``macs_at(widths)`` predicts the model's total MACs."""

    layers: list[LayerCost]
    total: int

    @property
    def rest(self) -> int:
        return self.total - sum(c.macs for c in self.layers)

    def macs_at(self, widths: Mapping[str, int]) -> int:
        return self.rest + sum(c.macs_at(widths) for c in self.layers)


def layer_costs(model: nn.Module, example_input: torch.Tensor,
                groups: list[ChannelGroup] | None = None) -> list[LayerCost]:
    """MACs of every conv/linear layer that runs, with the groups feeding its channels, in module order.

    >>> from slimcnn.models import create
    >>> costs = layer_costs(create("cifar_resnet20"), torch.randn(1, 3, 32, 32))
    >>> costs[0].name, costs[0].macs, costs[0].out_group
    ('conv1', 442368, 'conv1')
    """
    return cost_model(model, example_input, groups).layers


def cost_model(model: nn.Module, example_input: torch.Tensor, groups: list[ChannelGroup] | None = None) -> CostModel:
    groups = groups if groups is not None else channel_groups(model, example_input)
    prof = profile(model, example_input=example_input)
    macs = {layer.name: layer.macs for layer in prof.layers}
    parts: dict[tuple[str, str], list[Part]] = {}
    for g in groups:
        for m in g.members:
            axes = ("in", "out") if m.role == "dw" else (("in",) if m.role == "in" else ("out",))
            for axis in axes:
                parts.setdefault((m.module, axis), []).append((g.key, m.offset, g.size))
    layers = []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.modules.conv._ConvNd, nn.Linear)) or not macs.get(name):
            continue
        conv = isinstance(mod, nn.modules.conv._ConvNd)
        c_in, c_out = (mod.in_channels, mod.out_channels) if conv else (mod.in_features, mod.out_features)
        p_in, p_out = tuple(sorted(parts.get((name, "in"), []), key=lambda p: p[1])), \
            tuple(sorted(parts.get((name, "out"), []), key=lambda p: p[1]))
        layers.append(LayerCost(name, macs[name], c_in, c_out, mod.groups if conv else 1,
                                _single(p_in, c_in), _single(p_out, c_out), p_in, p_out))
    return CostModel(layers, prof.macs)


def _single(parts: tuple[Part, ...], width: int) -> str | None:
    if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == width:
        return parts[0][0]
    return None
