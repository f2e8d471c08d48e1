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
import torch.nn.functional as F
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

    def mask_own(self, model: nn.Module, name: str, module: nn.Module, channels: list[int]) -> None:
        """In place: make the layer compute, at the channels it keeps, what it computes once its ``channels`` are
        removed. Only a layer whose kept outputs read other channels of its own group needs it (a norm whose
        statistics run over the channels); the masked check of surgery compares against it."""
        return None

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
    """Batch norms: one entry per channel in gamma, beta and the running statistics (role ``bn``). Group and
    instance norms have no handler: groups through them stay whole (layer norms: :class:`LayerNormHandler`)."""

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


class LayerNormHandler(LayerHandler):
    """Layer norms over one dimension of channels (role ``bn``: surgery selects gamma and beta): ConvNeXt's, run
    after a permute to channels-last, and channel-first subclasses such as torchvision's ``LayerNorm2d``, which
    permute inside their forward. Unlike a batch norm's, its statistics run over the channels, so removing some
    changes the others' outputs: the masked check of surgery normalises over the kept channels (``mask_own``)."""

    types = (nn.LayerNorm,)

    def role(self, module: nn.Module, is_out: bool) -> Role:
        return "bn"

    def problem(self, name: str, module: nn.Module) -> str | None:
        shape = tuple(module.normalized_shape)
        if len(shape) != 1:
            return f"{name} (LayerNorm) normalizes over {len(shape)} dimensions {shape}, not over channels alone"
        return None

    def width(self, module: nn.Module, axis: Axis) -> int:
        return module.normalized_shape[0]

    def edit(self, model, name, module, out, inp) -> None:
        for attr in ("weight", "bias"):
            if getattr(module, attr) is not None:
                setattr(module, attr, _param(getattr(module, attr), select(getattr(module, attr).data, 0, out)))
        module.normalized_shape = (len(out),)

    def mask_own(self, model: nn.Module, name: str, module: nn.Module, channels: list[int]) -> None:
        dropped = module.__dict__.get("_slimcnn_dropped")
        if dropped is None:  # one hook, however many groups (slices of the norm) drop channels
            dropped = module.__dict__["_slimcnn_dropped"] = set()
            module.register_forward_hook(lambda mod, args, output: _norm_over(mod, args[0], output, dropped))
        dropped.update(channels)


def _norm_over(module: nn.LayerNorm, x: torch.Tensor, output: torch.Tensor, dropped: set[int]) -> torch.Tensor:
    """``module``'s output with the statistics taken over the channels not ``dropped`` (zero at those: their
    readers are masked)."""
    c = module.normalized_shape[0]
    keep = [i for i in range(c) if i not in dropped]
    # a subclass with its own forward that sees channels at dim 1 normalises them there (LayerNorm2d); the base
    # class always normalises the last dim
    own_forward = type(module).forward is not nn.LayerNorm.forward
    dim = 1 if own_forward and x.dim() > 2 and x.shape[1] == c else x.dim() - 1
    idx = torch.tensor(keep, dtype=torch.long, device=x.device)
    w = module.weight.index_select(0, idx) if module.weight is not None else None
    b = module.bias.index_select(0, idx) if module.bias is not None else None
    y = F.layer_norm(x.index_select(dim, idx).movedim(dim, -1), (len(keep),), w, b, module.eps).movedim(-1, dim)
    return torch.zeros_like(output).index_copy(dim, idx, y.to(output.dtype))


class BareParameter(nn.Module):
    """A parameter no layer owns, one entry per channel (ConvNeXt's ``layer_scale``, shape ``(C, 1, 1)``), seen as
    a member of a channel group: ``weight`` is the parameter flattened to that one entry per channel. Made on
    lookup by :func:`member_module`, never put into a model."""

    def __init__(self, owner: nn.Module, attr: str) -> None:
        super().__init__()
        object.__setattr__(self, "owner", owner)  # not registered: the proxy must not become the owner's parent
        self.attr = attr

    @property
    def param(self) -> nn.Parameter:
        return getattr(self.owner, self.attr)

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]
        return self.param.view(-1)


class BareParameterHandler(LayerHandler):
    """Per-channel parameters used bare in a forward (``x * self.layer_scale``): role ``bn``, surgery selects the
    entries of the kept channels along the parameter's one non-singleton dimension."""

    types = (BareParameter,)

    def role(self, module: nn.Module, is_out: bool) -> Role:
        return "bn"

    def width(self, module: nn.Module, axis: Axis) -> int:
        return module.param.numel()

    def edit(self, model, name, module, out, inp) -> None:
        p = module.param
        setattr(module.owner, module.attr, _param(p, select(p.data, channel_dim(p), out)))


def channel_dim(p: torch.Tensor) -> int:
    """The dimension of a per-channel parameter that holds its channels (its longest)."""
    return max(range(p.dim()), key=lambda d: p.shape[d])


def is_channel_vector(p: torch.Tensor) -> bool:
    """Whether ``p`` holds one entry per channel along a single dimension (any other dimension has size 1)."""
    return p.dim() >= 1 and sum(1 for s in p.shape if s > 1) <= 1


def member_module(model: nn.Module, name: str) -> nn.Module:
    """The module a group member names: a submodule, or for a bare parameter its :class:`BareParameter` view."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        if isinstance(getattr(owner, attr, None), nn.Parameter):
            return BareParameter(owner, attr)
        raise


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


for _h in (ConvHandler(), LinearHandler(), BatchNormHandler(), LayerNormHandler(), BareParameterHandler()):
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
