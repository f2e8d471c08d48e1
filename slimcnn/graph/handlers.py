"""Per-layer-type handlers: everything the graph needs to know about one kind of layer, in one class.

A handler says, for its layer type, how the layer's channels couple (its role in a channel group), how wide it is
on each side, how surgery shrinks it (keep some channels) and merges it (a cluster of channels becomes one: the
producer keeps the first channel's rows, a consumer sums the cluster's input columns), how the verification masks
its inputs, and its shape for the MACs model. Groups, surgery and the cost model look handlers up by type instead
of testing ``isinstance`` chains, so a new layer type is one class and one :func:`register_handler` call (as
:mod:`slimcnn.layers` does for the option-A shortcut); the graph package itself knows no model's layers.

>>> conv = nn.Conv2d(8, 16, 3)
>>> h = handler_for(conv)
>>> type(h).__name__, h.width(conv, "in"), h.width(conv, "out"), h.layer_shape(conv)
('ConvHandler', 8, 16, (8, 16, 1))
>>> h.role(nn.Conv2d(8, 8, 3, groups=8), is_out=True)
'dw'
"""
from __future__ import annotations

from typing import ClassVar, Literal, Sequence

import torch
from torch import nn

from ..profile import conv_macs  # noqa: F401  (re-exported: the one formula, named where handlers are)
from .group_types import Role

Axis = Literal["in", "out"]
# A new channel along one axis of one module: (kept old index, old indices whose input slices are summed).
NewChannel = tuple[int, list[int]]


class LayerHandler:
    """Base class: the behaviour of one layer type (``types``) in channel groups, surgery and costs."""

    #: the layer types this handler serves (subclasses included)
    types: ClassVar[tuple[type[nn.Module], ...]] = ()
    #: whether channel groups start from this layer's outputs (layers with weights that make channels)
    is_root: ClassVar[bool] = False
    #: a layer Torch-Pruning does not know: its inputs and outputs are separate channel spaces, the tracer must not
    #: couple them, and the ops inside its forward (index, pad on channels) are modelled by this handler
    opaque_to_tracer: ClassVar[bool] = False

    def role(self, module: nn.Module, is_out: bool) -> Role:
        """The role the layer plays in a group the tracer reached on its output (``is_out``) or input side."""
        return "out" if is_out else "in"

    def problem(self, name: str, module: nn.Module) -> str | None:
        """Why groups touching this layer cannot be changed, or None."""
        return None

    def width(self, module: nn.Module, axis: Axis) -> int:
        """Channels on the ``in`` or ``out`` side."""
        return module.in_channels if axis == "in" else module.out_channels

    def edit(self, model: nn.Module, name: str, module: nn.Module, out: list[NewChannel] | None,
             inp: list[NewChannel] | None) -> None:
        """Shrink / merge in place: output channel ``j`` becomes ``out[j]``'s kept channel, input channel ``j``
        the sum of ``inp[j]``'s members (None: that side stays as it is)."""
        raise NotImplementedError(type(self).__name__)

    @torch.no_grad()
    def mask_inputs(self, model: nn.Module, name: str, module: nn.Module, channels: list[int]) -> None:
        """In place: make the layer ignore input ``channels`` (what removing them upstream must equal)."""
        dim = 0 if getattr(module, "transposed", False) else 1
        module.weight.index_fill_(dim, torch.tensor(channels, dtype=torch.long, device=module.weight.device), 0.0)

    @torch.no_grad()
    def equalize(self, module: nn.Module, offset: int, clusters: Sequence[Sequence[int]]) -> None:
        """In place: copy each cluster's first channel onto its other members in every per-channel tensor, so
        merging them is exact."""
        w_dim = 1 if getattr(module, "transposed", False) else 0
        for attr in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(module, attr, None)
            if t is None:
                continue
            dim = w_dim if attr == "weight" else 0
            for c in clusters:
                first = t.narrow(dim, offset + c[0], 1)
                for i in c[1:]:
                    t.narrow(dim, offset + i, 1).copy_(first)

    def layer_shape(self, module: nn.Module) -> tuple[int, int, int] | None:
        """``(in, out, groups)`` for the MACs model, or None for a layer with no MACs of its own."""
        return None

    def out_first(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (the layer's, or a copy) laid out with output channels on dim 0 and inputs on dim 1, the
        layout scorers read rows and columns from."""
        return weight

    def merge_note(self, module: nn.Module, offset: int, clusters: Sequence[Sequence[int]], group: str) -> str | None:
        """Why merging ``clusters`` of ``group`` (at ``offset`` of the layer's outputs) cannot be exact, when the
        layer knows: a sentence that follows the layer's name."""
        return None


class ConvHandler(LayerHandler):
    """Convolutions of any dimension, transposed ones included. A depthwise conv carries its group through (role
    ``dw``: in and out are the same channels); a grouped one is left whole."""

    types = (nn.modules.conv._ConvNd,)
    is_root = True

    def role(self, module: nn.Module, is_out: bool) -> Role:
        return "dw" if is_depthwise(module) else ("out" if is_out else "in")

    def problem(self, name: str, module: nn.Module) -> str | None:
        if module.groups != 1 and not is_depthwise(module):
            return f"{name} is a grouped convolution (groups={module.groups})"
        return None

    def edit(self, model, name, module, out, inp) -> None:
        w_out, w_in = (1, 0) if module.transposed else (0, 1)
        depthwise = is_depthwise(module)
        if out is not None:
            module.weight = _param(module.weight, select(module.weight.data, w_out, out))
            if module.bias is not None:
                module.bias = _param(module.bias, select(module.bias.data, 0, out))
            module.out_channels = len(out)
            if depthwise:  # in and out channels are the same channels
                module.in_channels = module.groups = len(out)
        if inp is not None:
            module.weight = _param(module.weight, sum_into(module.weight.data, w_in, inp))
            module.in_channels = len(inp)

    def layer_shape(self, module: nn.Module) -> tuple[int, int, int]:
        return module.in_channels, module.out_channels, module.groups

    def out_first(self, module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
        return weight.transpose(0, 1) if module.transposed else weight  # transposed: (in, out, ...)

    @staticmethod
    def macs(module: nn.Module, out_spatial: Sequence[int]) -> int:
        """MACs of one call of an (untransposed) conv whose output has spatial size ``out_spatial``."""
        n, cg, *kernel = module.weight.shape
        return conv_macs(n * _prod(out_spatial), cg, _prod(kernel))


class LinearHandler(LayerHandler):
    """Fully connected layers: weight rows are output channels, columns input channels."""

    types = (nn.Linear,)
    is_root = True

    def width(self, module: nn.Module, axis: Axis) -> int:
        return module.in_features if axis == "in" else module.out_features

    def edit(self, model, name, module, out, inp) -> None:
        if out is not None:
            module.weight = _param(module.weight, select(module.weight.data, 0, out))
            if module.bias is not None:
                module.bias = _param(module.bias, select(module.bias.data, 0, out))
            module.out_features = len(out)
        if inp is not None:
            module.weight = _param(module.weight, sum_into(module.weight.data, 1, inp))
            module.in_features = len(inp)

    def layer_shape(self, module: nn.Module) -> tuple[int, int, int]:
        return module.in_features, module.out_features, 1


class BatchNormHandler(LayerHandler):
    """Batch norms: one entry per channel in gamma, beta and the running statistics (role ``bn``). Other norms
    (group, layer, instance norm) have no handler: their statistics mix channels, so groups through them stay
    whole."""

    types = (nn.modules.batchnorm._BatchNorm,)

    def role(self, module: nn.Module, is_out: bool) -> Role:
        return "bn"

    def width(self, module: nn.Module, axis: Axis) -> int:
        return module.num_features

    def edit(self, model, name, module, out, inp) -> None:
        for attr in ("weight", "bias"):
            if getattr(module, attr) is not None:
                setattr(module, attr, _param(getattr(module, attr), select(getattr(module, attr).data, 0, out)))
        for attr in ("running_mean", "running_var"):
            if getattr(module, attr) is not None:
                setattr(module, attr, select(getattr(module, attr), 0, out))
        module.num_features = len(out)


# ---------------------------------------------------------------------------------------------------------------
# The registry

_BY_TYPE: dict[type, LayerHandler] = {}


def register_handler(handler: LayerHandler) -> LayerHandler:
    """Make ``handler`` serve every type in its ``types`` (and their subclasses, unless one has its own).

    >>> class Scale(nn.Module): ...
    >>> class ScaleHandler(LayerHandler):
    ...     types = (Scale,)
    >>> _ = register_handler(ScaleHandler())
    >>> type(handler_for(Scale())).__name__
    'ScaleHandler'
    """
    if not handler.types:
        raise TypeError(f"{type(handler).__name__} names no layer type (set its `types`)")
    for t in handler.types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"a handler's types must be nn.Module subclasses, got {t!r}")
        _BY_TYPE[t] = handler
    return handler


def handler_for(module: object) -> LayerHandler | None:
    """The handler of ``module``'s type (the most specific registered base class), or None."""
    for t in type(module).__mro__:
        h = _BY_TYPE.get(t)
        if h is not None:
            return h
    return None


def opaque_types() -> list[type]:
    """Registered layer types the tracer must treat as separate input and output channel spaces."""
    return [t for t, h in _BY_TYPE.items() if h.opaque_to_tracer]


for _h in (ConvHandler(), LinearHandler(), BatchNormHandler()):
    register_handler(_h)
del _h


# ---------------------------------------------------------------------------------------------------------------
# Tensor edits shared by the handlers


def is_depthwise(m: nn.Module) -> bool:
    """A conv whose every output channel reads exactly the input channel of the same index."""
    return (isinstance(m, nn.modules.conv._ConvNd) and not m.transposed and m.groups > 1
            and m.groups == m.in_channels == m.out_channels)


def select(t: torch.Tensor, dim: int, chans: list[NewChannel]) -> torch.Tensor:
    """The kept channel of every new channel, along ``dim`` (producer side)."""
    return t.index_select(dim, torch.tensor([rep for rep, _ in chans], device=t.device))


def sum_into(t: torch.Tensor, dim: int, chans: list[NewChannel]) -> torch.Tensor:
    """The sum of every new channel's members, along ``dim`` (consumer side: what C-SGD's merge needs)."""
    src = [i for _, members in chans for i in members]
    dst = [j for j, (_, members) in enumerate(chans) for _ in members]
    shape = list(t.shape)
    shape[dim] = len(chans)
    out = t.new_zeros(shape)
    return out.index_add(dim, torch.tensor(dst, device=t.device), t.index_select(dim, torch.tensor(src, device=t.device)))


def _param(old: nn.Parameter, value: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(value.detach().clone(), requires_grad=old.requires_grad)


def _prod(values: Sequence[int]) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out
