"""Per-layer MACs as a function of group widths: the fast, exact estimator behind MACs targeting.

A conv/linear layer's MACs are ``spatial * kernel * (in / groups) * out``, so after surgery they are
``macs * (kept_in / in) * (kept_out / out)``; a depthwise conv's in and out channels are one group, so its MACs
are linear in that group's width. MACs the profiler attributes to anything else (functional matmuls, ops inside
opaque modules) do not depend on group widths and are carried as a constant.

The same model, made differentiable, is Dagger's cost of soft gates: :meth:`CostModel.soft_macs` replaces each
group's width by the sum of its gates (with 0/1 gates it equals :meth:`CostModel.macs_at` of the kept counts).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from ..profile import profile
from .groups import ChannelGroup, channel_groups
from .handlers import handler_for

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

    def soft_macs(self, sums: Mapping[str, torch.Tensor]) -> torch.Tensor | float:
        """:meth:`macs_at` with real-valued widths (``sums[k]``: the sum of group ``k``'s gates), differentiable;
        groups not named count as whole."""
        # rows from elsewhere may carry only in_group / out_group (no parts)
        p_in = getattr(self, "in_parts", ()) or ([(self.in_group, 0, self.in_channels)] if self.in_group else [])
        p_out = getattr(self, "out_parts", ()) or ([(self.out_group, 0, self.out_channels)] if self.out_group else [])
        if self.groups > 1:  # depthwise (one group on both sides): linear in the kept channels, not quadratic
            return self.macs * _fraction(p_out or p_in, self.out_channels, sums)
        return self.macs * _fraction(p_in, self.in_channels, sums) * _fraction(p_out, self.out_channels, sums)


def _fraction(parts: Sequence[Part], channels: int, sums: Mapping[str, torch.Tensor]) -> torch.Tensor | float:
    kept: torch.Tensor | float = float(channels)
    for key, _, size in parts:
        if key in sums:
            kept = kept - size + sums[key]
    return kept / channels


def soft_macs(costs: Sequence[Any], gates: Mapping[str, torch.Tensor], rest: float = 0.0) -> torch.Tensor:
    """Differentiable MACs of a gated network: ``rest`` plus every layer's :meth:`LayerCost.soft_macs` at the
    sums of the gates (float64). ``gates``: group key -> gate vector; a group not in ``gates`` counts as kept.
    With 0/1 gates this is the MACs of the model with the 0-gated channels removed.

    >>> c = LayerCost("conv", 1000, 10, 20, 1, "a", "b", (("a", 0, 10),), (("b", 0, 20),))
    >>> float(soft_macs([c], {"a": torch.ones(10) / 2, "b": torch.ones(20)}))
    500.0
    """
    sums = {k: g.sum().double() for k, g in gates.items()}
    any_gate = next(iter(gates.values()), None)
    total = torch.tensor(float(rest), dtype=torch.float64, device=any_gate.device if any_gate is not None else None)
    for c in costs:
        total = total + (c.soft_macs(sums) if isinstance(c, LayerCost) else LayerCost.soft_macs(c, sums))
    return total


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

    def soft_macs(self, gates: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Expected MACs under per-channel keep gates (see :func:`soft_macs`)."""
        return soft_macs(self.layers, gates, self.rest)


def layer_costs(model: nn.Module, example_input: torch.Tensor,
                groups: list[ChannelGroup] | None = None) -> list[LayerCost]:
    """MACs of every conv/linear layer that runs, with the groups feeding its channels, in module order.

    >>> from slimcnn import create
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
        layer = handler_for(mod)
        shape = layer.layer_shape(mod) if layer is not None else None
        if shape is None or not macs.get(name):
            continue
        c_in, c_out, n_groups = shape
        p_in, p_out = tuple(sorted(parts.get((name, "in"), []), key=lambda p: p[1])), \
            tuple(sorted(parts.get((name, "out"), []), key=lambda p: p[1]))
        layers.append(LayerCost(name, macs[name], c_in, c_out, n_groups,
                                _single(p_in, c_in), _single(p_out, c_out), p_in, p_out))
    return CostModel(layers, prof.macs)


def _single(parts: tuple[Part, ...], width: int) -> str | None:
    if len(parts) == 1 and parts[0][1] == 0 and parts[0][2] == width:
        return parts[0][0]
    return None
