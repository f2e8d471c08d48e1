"""Channel groups: the sets of channels that must be removed or merged together.

A group is one "wire bundle" of the network: the output channels of every producer feeding it (convs, linears,
option-A shortcuts), the per-channel entries of every norm on it, the input channels of every consumer reading
it (at an offset when it was concatenated with other tensors), and depthwise convs that carry it through.

The coupling comes from Torch-Pruning's ``DependencyGraph`` (autograd tracing, concat/split index mapping), but we
do not trust it blindly: every node it reports is checked, and anything we cannot prove channel-preserving
(an unknown op, an unsupported layer type, a module run twice, a grouped conv, the model output, a channel
flattened into several features) makes the groups touching it unprunable, with the reason. Surgery then
verifies its result numerically (see ``surgery.py``).

The trace runs the model in train mode and in eval mode (:mod:`.modes`) and reads every tensor of its output,
however nested: a head that runs only in training, or one in the middle of a detector's output, is a reader like
any other, and its channels, when they are the output, cannot be pruned.
"""
from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from ..inputs import input_device, traceable
from ..outputs import check_has_tensor, forward_error, output_tensors
from .group_types import ChannelGroup, Member, Role  # noqa: F401  (re-exported: their home for callers)
from .handlers import handler_for, is_channel_vector, is_depthwise, member_module, opaque_types
from .modes import MODES, in_mode, inputs_for
from .validate import SurgeryError

if TYPE_CHECKING:
    import torch_pruning as tp
    from torch_pruning.pruner import function as tp_function


@functools.cache
def _tp() -> ModuleType:
    """Torch-Pruning, imported on first use: importing it pulls timm, torchvision, torch._dynamo and sympy, which
    took 3.9 s of the 7.7 s that ``slimcnn --help`` spent importing (torch itself 3.6 s) on a 2-core machine,
    and only tracing needs it."""
    import torch_pruning

    return torch_pruning

# ---------------------------------------------------------------------------------------------------------------
# Modules we cannot prune: registered by type, with the reason shown to the user.

_UNPRUNABLE: dict[type, str] = {}


def register_unprunable(module_type: type, reason: str) -> None:
    """Declare modules of ``module_type`` opaque: every group touching one becomes ``prunable=False`` with
    ``reason``. Their inner layers are not analysed (their channels stay as they are).

    >>> class Gate(nn.Module): ...
    >>> register_unprunable(Gate, "gates are removed before surgery")
    """
    if not isinstance(module_type, type) or not issubclass(module_type, nn.Module):
        raise TypeError(f"register_unprunable expects an nn.Module subclass, got {module_type!r}")
    _UNPRUNABLE[module_type] = reason


def unprunable_reason(module: nn.Module) -> str | None:
    for t, reason in _UNPRUNABLE.items():
        if isinstance(module, t):
            return f"{type(module).__name__}: {reason}"
    return None


@functools.cache
def _split_pruner_class() -> type[tp_function.BasePruningFunc]:
    """The ``_SplitPruner`` class, built on first use because its base class lives in Torch-Pruning (see
    :func:`_tp`)."""

    class _SplitPruner(_tp().pruner.function.BasePruningFunc):
        """Tells Torch-Pruning that a module's inputs and outputs are different channel spaces (different
        ``prune_in_channels`` / ``prune_out_channels`` functions cut the dependency through it). We never let
        Torch-Pruning edit tensors, so the functions only exist to be told apart."""

        def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
            raise NotImplementedError("slimcnn edits tensors itself")

        def prune_in_channels(self, layer: nn.Module, idxs) -> nn.Module:
            raise NotImplementedError("slimcnn edits tensors itself")

        def get_out_channels(self, layer: nn.Module) -> int | None:
            return getattr(layer, "out_channels", None)

        def get_in_channels(self, layer: nn.Module) -> int | None:
            return getattr(layer, "in_channels", None)

    return _SplitPruner


@functools.cache
def _graph_class() -> type[tp.DependencyGraph]:
    """Torch-Pruning's ``DependencyGraph``, built on first use (see :func:`_tp`), without its index mapping of
    reshapes that split or merge the channel dimension: it has none that is right for them (1.6.1 divides by zero
    on ShuffleNetV2's channel shuffle). They couple their input and output channels as one, and
    :func:`_reshape_problem` keeps every group through them whole."""

    class _Graph(_tp().DependencyGraph):
        def _trace(self, *args: Any, **kwargs: Any) -> dict:
            module2node = super()._trace(*args, **kwargs)
            ops = _tp().ops
            for node in module2node.values():
                if node.type == ops.OPTYPE.RESHAPE and _reshape_problem(node.grad_fn):
                    node.type = ops.OPTYPE.ELEMENTWISE
                elif node.type == ops.OPTYPE.SPLIT:
                    _fix_split(node, ops)
            return module2node

    return _Graph


class _SplitFn:
    """A channel split's autograd node with its chunk sizes where Torch-Pruning 1.6.1 reads them
    (``_saved_split_sizes``): without them it guesses the sizes from the graph around the split, and the guess is
    wrong across a channel shuffle."""

    def __init__(self, fn: Any, sizes: list[int]) -> None:
        self._fn, self._saved_split_sizes = fn, sizes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fn, name)


def _fix_split(node: Any, ops: ModuleType) -> None:
    """Give a split along the channels its true chunk sizes, its outputs in chunk order; where its outputs are not
    one reader per chunk, couple it as one (the split's groups are unprunable either way, see
    :func:`_shape_op_problem`: this only keeps Torch-Pruning's index mapping from going wrong)."""
    fn = node.grad_fn
    sizes = _split_sizes(fn)
    if sizes is None:
        return
    nrs = [next((nr for f, nr in getattr(o.grad_fn, "next_functions", ()) if f is fn), None) for o in node.outputs]
    if sorted(n for n in nrs if n is not None) != list(range(len(sizes))) or None in nrs:
        node.type = ops.OPTYPE.ELEMENTWISE
        return
    node.outputs[:] = [o for _, o in sorted(zip(nrs, node.outputs), key=lambda p: p[0])]
    node.grad_fn = _SplitFn(fn, sizes)


def _split_sizes(fn: Any) -> list[int] | None:
    """The chunk sizes of a split (``chunk``, ``split``) along dimension 1, or None for other splits."""
    shape = getattr(fn, "_saved_self_sym_sizes", None)
    dim = getattr(fn, "_saved_dim", None)
    if shape is None or not isinstance(dim, int) or len(shape) < 2 or dim % len(shape) != 1:
        return None
    if getattr(fn, "_saved_split_sizes", None) is not None:
        return [int(s) for s in fn._saved_split_sizes]
    step, total = getattr(fn, "_saved_split_size", None), int(shape[1])
    if not step:
        return None
    return [min(int(step), total - i) for i in range(0, total, int(step))]


def _output_shape(grad_fn: Any) -> tuple[int, ...] | None:
    """The shape of the tensor an autograd node's forward produced (None where autograd does not say)."""
    try:
        return tuple(int(s) for s in grad_fn._input_metadata[0].shape)
    except (AttributeError, IndexError, TypeError, RuntimeError):
        return None


def _reshape_problem(grad_fn: Any) -> str | None:
    """Why a reshape cannot be pruned through: it splits or merges the channel dimension of a 3-D or larger tensor
    (a channel shuffle's ``view(b, g, c // g, h, w)`` and back), so which channel lands where depends on the
    channel count written in the forward code."""
    before = getattr(grad_fn, "_saved_self_sym_sizes", None) or getattr(grad_fn, "_saved_self_sizes", None)
    after = _output_shape(grad_fn)
    if before is None or after is None or len(before) < 3 or len(after) < 3:
        return None
    before = tuple(int(s) for s in before)
    if before[1] == after[1]:
        return None
    return (f"a reshape {before} -> {after} splits or merges the channel dimension (as a channel shuffle does); "
            "the channels across it stay whole")


# Autograd ops that keep channel i at channel i (or reduce only over other dims). Anything else is suspect.
_SAFE_OPS = (
    "Add", "Sub", "Mul", "Div", "Neg", "Relu", "Relu6", "Hardtanh", "Sigmoid", "Silu", "Hardswish", "Hardsigmoid",
    "Gelu", "LeakyRelu", "Elu", "Celu", "Selu", "Tanh", "Clamp", "ClampMin", "ClampMax", "Threshold", "Softplus",
    "Mish", "Exp", "Log", "Sqrt", "Rsqrt", "Pow", "Abs", "MaxPool2DWithIndices", "MaxPool2D", "MaxPool1D",
    "AvgPool2D", "AvgPool1D", "AdaptiveAvgPool2D", "AdaptiveMaxPool2D", "AdaptiveAvgPool1D", "UpsampleNearest2D",
    "UpsampleBilinear2D", "UpsampleBicubic2D", "Clone", "NativeDropout", "Mean", "Sum", "Amax", "Amin",
    "ConstantPadNd", "ReflectionPad2D", "ReplicationPad2D", "ToCopy", "Expand", "Unsqueeze", "Squeeze",
    # a permute moves the channel axis but never mixes channels (ConvNeXt runs its LayerNorm and linears
    # channels-last); mixing takes a reshape across the channel dimension, which _reshape_problem refuses
    "Permute", "Transpose",
)


def _op_name(grad_fn_name: str) -> str:
    name = grad_fn_name.removesuffix("Backward0").removesuffix("Backward1").removesuffix("Backward2")
    return name.removesuffix("Backward")


def _channel_dim_touched(grad_fn: Any) -> bool:
    """Whether a reduction / pad / squeeze acts on the channel dimension (dim 1) of its input."""
    sizes = getattr(grad_fn, "_saved_self_sym_sizes", None) or getattr(grad_fn, "_saved_self_sizes", None)
    ndim = len(sizes) if sizes is not None else 4
    dims = getattr(grad_fn, "_saved_dim", None)
    if dims is not None:
        dims = dims if isinstance(dims, (tuple, list)) else (dims,)
        return any((d % ndim) == 1 for d in dims) or len(dims) == 0
    pad = getattr(grad_fn, "_saved_pad", None)
    if pad is not None:  # pad lists (last dim first) pairs; channel dim of a 4-D tensor is pair index ndim - 2
        idx = ndim - 2
        return len(pad) > 2 * idx and any(pad[2 * idx: 2 * idx + 2])
    return False


def _op_problem(node: Any, internal: set) -> str | None:
    """Why an element-wise-classified Torch-Pruning node cannot be trusted, or None."""
    grad_fn = node.grad_fn
    if grad_fn in internal:
        return None
    name = grad_fn.name() if hasattr(grad_fn, "name") else str(grad_fn)
    op = _op_name(name)
    if op == "T" and not node.inputs:  # a linear layer's weight transpose: no activation flows through it
        return None
    if op == "AsStrided" and _same_shape_view(grad_fn):
        return None
    if op not in _SAFE_OPS:
        return f"operation {name} is not known to preserve channels"
    if op in ("Mean", "Sum", "Amax", "Amin", "ConstantPadNd", "Squeeze", "Unsqueeze") and _channel_dim_touched(grad_fn):
        return f"operation {name} acts on the channel dimension"
    return None


def _same_shape_view(grad_fn: Any) -> bool:
    """Whether an ``as_strided`` node re-views its input at the input's own shape: autograd records one where a
    view of a pooled ``(N, C, 1, 1)`` tensor is permuted (ConvNeXt's classifier ``LayerNorm2d``); any other
    ``as_strided`` may gather elements across channels."""
    size, stride = getattr(grad_fn, "_saved_size", None), getattr(grad_fn, "_saved_stride", None)
    parents = [fn for fn, _ in getattr(grad_fn, "next_functions", ()) if fn is not None]
    if size is None or stride is None or len(parents) != 1 or _output_shape(parents[0]) != tuple(int(s) for s in size):
        return False
    # and in the input's order: the strides of the dims longer than 1 are those of a contiguous tensor
    expected, run = [], 1
    for n in reversed([int(s) for s in size]):
        expected.append(run)
        run *= n
    return all(int(st) == ex for n, st, ex in zip(size, stride, reversed(expected)) if int(n) > 1)


# ---------------------------------------------------------------------------------------------------------------
# Tracing


@dataclass
class _Trace:
    graph: tp.DependencyGraph
    names: dict[Any, str]
    order: dict[str, int]
    calls: dict[str, int]
    internal: set = field(default_factory=set)
    output_fns: set = field(default_factory=set)
    #: module name -> the autograd nodes of its outputs, in every mode traced
    module_fns: dict[str, set] = field(default_factory=dict)
    #: autograd node -> the innermost module that output it
    owner: dict[Any, str] = field(default_factory=dict)
    #: mode -> why it could not be traced
    skipped: dict[str, str] = field(default_factory=dict)

    def is_model_output(self, name: str) -> bool:
        """Whether module ``name``'s output is (part of) the model's output in some mode."""
        return bool(self.module_fns.get(name, set()) & self.output_fns)


def _collect_internal(out_fn: Any, in_fns: set, into: set, limit: int | None = None) -> None:
    """Autograd nodes between a module's inputs and its output: its own implementation, which its handler models
    (the option-A shortcut's index and pad ops on the channel dimension, a linear's ``addmm`` on a channels-last
    tensor, ``LayerNorm2d``'s permutes). With ``limit``, a walk longer than that adds nothing: a layer's own ops are
    a few, and a longer walk means an input was not seen (so the walk left the layer)."""
    found: set = set()
    stack = [out_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in into or fn in found or fn in in_fns:
            continue
        found.add(fn)
        if limit is not None and len(found) > limit:
            return
        for nxt, _ in getattr(fn, "next_functions", ()):
            stack.append(nxt)
    into.update(found)


#: the most autograd nodes one layer with a handler may run inside its forward (see _collect_internal)
_LAYER_OPS = 16


def _trace(model: nn.Module, example_input: torch.Tensor) -> _Trace:
    """One Torch-Pruning graph of every mode's forward (see :mod:`.modes`): the dependency graph joins the nodes
    of a module seen in both modes, so a branch that only runs in training couples its channels like any other."""
    names = {m: n for n, m in model.named_modules()}
    own_ops = tuple(opaque_types())
    layers = {m for m in model.modules() if handler_for(m) is not None}  # their inner ops are theirs
    tr = _Trace(None, names, {}, {})  # the graph comes last
    run = _Pass()
    layer_names = {names[m] for m in layers}
    pending_inputs: dict[nn.Module, set] = {}

    def pre(mod, inputs):
        name = names[mod]
        tr.order.setdefault(name, len(tr.order))
        run.calls[name] = run.calls.get(name, 0) + 1
        run.running.append(name)
        if mod in layers:
            pending_inputs[mod] = {t.grad_fn for t in inputs if isinstance(t, torch.Tensor)}

    def post(mod, inputs, output):
        tensors = [t for t in output_tensors(output) if t.grad_fn is not None]
        fns = {t.grad_fn for t in tensors}
        if run.running:
            run.running.pop()
        if mod is not model:
            tr.module_fns.setdefault(names[mod], set()).update(fns)
            for fn in fns:  # hooks run innermost first
                tr.owner.setdefault(fn, names[mod])
            run.done.extend(tensors)
        if mod in layers and isinstance(output, torch.Tensor):
            limit = None if isinstance(mod, own_ops) else _LAYER_OPS
            _collect_internal(output.grad_fn, pending_inputs.pop(mod, set()), tr.internal, limit)
            tr.internal.discard(output.grad_fn)  # the module's own node is judged by its type, not as an op

    def forward_all_modes(m: nn.Module, inputs: Any) -> list[torch.Tensor]:
        """Torch-Pruning's one forward: every mode's, and every output tensor (any nesting) for it to trace."""
        outs: dict[str, list[torch.Tensor]] = {}
        for mode in MODES:
            out = _traced_forward(model, example_input, mode, run, tr.skipped)
            if mode not in tr.skipped:
                ends = [t for t in output_tensors(out) if t.grad_fn is not None]
                outs[mode] = _ends_to_trace(ends, list(run.done), tr.owner, layer_names)
                tr.output_fns.update(t.grad_fn for t in outs[mode])
                for name, n in run.calls.items():  # shared weights: run twice in one forward, not across modes
                    tr.calls[name] = max(tr.calls.get(name, 0), n)
            run.done.clear()
        for mode, why in tr.skipped.items():  # said once eval mode ran: a model that runs in neither is an error
            warnings.warn(f"{type(model).__name__} does not run in {mode} mode on the example input ({why}); its "
                          "channels are traced in eval mode only, so a branch that runs only in training is not "
                          "analysed")
        return [t for mode in _modes_to_trace(outs, tr.owner) for t in outs[mode]]

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        # flags and buffers as they were afterwards, whatever happens
        with torch.enable_grad(), in_mode(model, "eval", input_device(example_input)):
            tr.graph = _graph_class()().build_dependency(
                model, (example_input,), forward_fn=forward_all_modes, customized_pruners=_customized(model),
                verbose=False)
    except (SurgeryError, ValueError):
        raise
    except Exception as e:
        raise SurgeryError(f"cannot trace the channels of {type(model).__name__}: Torch-Pruning's dependency "
                           f"graph failed after the forward ({type(e).__name__}: {e})") from None
    finally:
        for h in handles:
            h.remove()
    return tr


def _ends_to_trace(outputs: list[torch.Tensor], done: list[torch.Tensor], owner: dict[Any, str],
                   layers: set[str]) -> list[torch.Tensor]:
    """The tensors Torch-Pruning traces back from, each an *output layer*'s: the outputs of the layers met first
    walking back from the model's outputs (a classifier, a detector's class and box heads), then of those met
    walking back from module outputs that reach no model output (a detector's proposal head, whose outputs are
    detached to rank and select boxes: they leave the traced graph there). Their channels are outputs, never
    pruned. What runs after them holds no layer, so it couples no channel that can be pruned; leaving it out keeps
    data-dependent post-processing (box decoding, NMS, per-class loops) out of the dependency graph, where it made
    Torch-Pruning's group search run for many minutes."""
    tensor_of = {t.grad_fn: t for t in done}
    reach: set = set()
    found: list[torch.Tensor] = []

    def from_ends(ends: list[Any]) -> None:
        for fn in _first_layers(ends, owner, layers, reach):
            if fn not in reach and fn in tensor_of:
                found.append(tensor_of[fn])
                _collect_internal(fn, set(), reach)

    from_ends([t.grad_fn for t in outputs])
    for t in reversed(done):  # the last to finish first: a head before the layers inside it
        if t.grad_fn not in reach:
            from_ends([t.grad_fn])
    return found


def _first_layers(ends: list[Any], owner: dict[Any, str], layers: set[str], stop: set) -> list[Any]:
    """The autograd nodes of layer outputs first met walking back from ``ends`` (not past ``stop``)."""
    found, seen, stack = [], set(), list(ends)
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen or fn in stop:
            continue
        seen.add(fn)
        if owner.get(fn) in layers:
            found.append(fn)
            continue
        stack += [nxt for nxt, _ in getattr(fn, "next_functions", ())]
    return found


def _modes_to_trace(outs: dict[str, list[torch.Tensor]], owner: dict[Any, str]) -> list[str]:
    """The modes whose autograd graphs Torch-Pruning must see: one mode when its graph holds the other's whole
    (eval mode when both run the same graph, the usual case, traced as before train mode was), else both. Each
    graph costs its own index mapping of every concatenation (densenet121 at 64 px: 3.3 s, 6.6 s for both)."""
    if len(outs) < 2:
        return list(outs)
    seen = {mode: _fingerprint([t.grad_fn for t in ts], owner) for mode, ts in outs.items()}
    for mode, other in (("eval", "train"), ("train", "eval")):
        if seen[other][0] <= seen[mode][0] and seen[other][1] <= seen[mode][1]:
            return [mode]
    return list(outs)


# Saved arguments that decide how an op maps channels: two nodes differing in them are different nodes.
_SHAPE_ARGS = ("_saved_dim", "_saved_start", "_saved_end", "_saved_step", "_saved_split_size", "_saved_split_sizes",
               "_saved_chunks", "_saved_pad", "_saved_self_sym_sizes", "_saved_sizes", "_saved_groups")


def _fingerprint(roots: list[Any], owner: dict[Any, str]) -> tuple[set[int], set[int]]:
    """(hashes of every autograd node reachable from ``roots``, hashes of the roots). A node's hash covers its
    module (or op and channel-mapping arguments) and its inputs' hashes, so one mode's graph holds another's when
    its hashes include the other's. The batch size does not count (train mode may run a larger batch)."""
    memo: dict[Any, int] = {}
    stack = [(fn, False) for fn in roots]
    while stack:  # depth first, without recursion: a deep net's graph is thousands of nodes long
        fn, ready = stack.pop()
        if fn in memo:
            continue
        parents = [n for n, _ in getattr(fn, "next_functions", ()) if n is not None and not hasattr(n, "variable")]
        if not ready:
            stack.append((fn, True))
            stack += [(n, False) for n in parents if n not in memo]
            continue
        memo[fn] = hash((_label(fn, owner), tuple(memo[n] for n in parents)))
    return set(memo.values()), {memo[fn] for fn in roots}


def _label(fn: Any, owner: dict[Any, str]) -> tuple:
    """What a node does, for :func:`_fingerprint`: the module that output it (whose op may differ by mode, as
    BatchNorm's does) or else its op, and the arguments of :data:`_SHAPE_ARGS` (sizes without the batch)."""
    args = []
    for name in _SHAPE_ARGS:
        value = getattr(fn, name, None)
        if isinstance(value, (tuple, list)):
            value = tuple(value[1:] if name.endswith("sym_sizes") or name == "_saved_sizes" else value)
        if isinstance(value, (int, tuple)) or value is None:
            args.append(value)
    if fn in owner:
        return ("module", owner[fn], tuple(args))
    return ("op", _op_name(fn.name()) if hasattr(fn, "name") else type(fn).__name__, tuple(args))


def _customized(model: nn.Module) -> dict[Any, tp_function.BasePruningFunc]:
    """Layers with a handler that Torch-Pruning does not know, and unprunable ones: separate input and output
    channel spaces (see :func:`_split_pruner_class`)."""
    split_pruner = _split_pruner_class()
    unprunable_types = {type(m) for m in model.modules() if unprunable_reason(m) is not None}
    return {t: split_pruner() for t in (*opaque_types(), *unprunable_types)}


@dataclass
class _Pass:
    """What the hooks of :func:`_trace` record of the forward running now (one attempt, one mode)."""

    calls: dict[str, int] = field(default_factory=dict)  # calls per module
    done: list[torch.Tensor] = field(default_factory=list)  # every module's output tensors, in the order they finished
    running: list[str] = field(default_factory=list)  # the modules whose forward has begun and not ended

    def clear(self) -> None:
        self.calls.clear()
        self.done.clear()
        self.running.clear()


def _traced_forward(model: nn.Module, example_input: Any, mode: str, run: _Pass, skipped: dict[str, str]) -> Any:
    """``model``'s output in ``mode``, traceable (``run`` records the attempt that ran). A model that does not run
    in train mode on this input is traced in eval mode alone (``skipped`` says why; its train-only branches stay
    unseen); in eval mode a forward that fails, or an output with no tensor, is an error of one line."""
    error: Exception | None = None
    where = ""
    for candidate in inputs_for(example_input, mode):
        run.clear()
        x = traceable(candidate)
        try:
            with in_mode(model, mode, input_device(x)):
                out = model(x)
        except Exception as e:
            if error is None:
                error, where = e, run.running[-1] if run.running else ""
            continue
        if mode == "eval":
            check_has_tensor(model, out)
        return out
    if mode == "eval":
        raise forward_error(model, error, where) from None
    skipped[mode] = str(forward_error(model, error)).partition(": ")[2]
    return None


# ---------------------------------------------------------------------------------------------------------------
# From Torch-Pruning groups to ours


@functools.cache
def _tp_op_types() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(layer types Torch-Pruning knows but surgery does not support, shape ops that pass channels through),
    built on first use (see :func:`_tp`)."""
    ops = _tp().ops
    unsupported = (ops.TORCH_LAYERNORM, ops.TORCH_GROUPNORM, ops.TORCH_INSTANCENORM, ops.TORCH_PRELU, ops.TORCH_EMBED,
                   ops.TORCH_MHA, ops.TORCH_LSTM)
    pass_through = (ops._ConcatOp, ops._SplitOp, ops._ReshapeOp, ops._SliceOp, ops._UnbindOp, ops._ExpandOp)
    return unsupported, pass_through


def _classify(tr: _Trace, node: Any, handler: Any) -> tuple[str, Role | None, str | None]:
    """(module name, role or None for pass-through nodes, problem or None) of one Torch-Pruning group item."""
    mod = node.module
    name = tr.names.get(mod, "")
    ops = _tp().ops
    unsupported, pass_through = _tp_op_types()
    problem = None
    is_out = tr.graph.is_out_channel_pruning_fn(handler)
    if is_out and (node.grad_fn in tr.output_fns or tr.is_model_output(name)):
        problem = "its channels are part of the model output"
    layer = handler_for(mod) if isinstance(mod, nn.Module) else None
    if layer is not None and layer.opaque_to_tracer:  # its handler models it, even inside an opaque module
        return name, layer.role(mod, is_out), problem
    if isinstance(mod, nn.Module) and unprunable_reason(mod) is not None:
        return name, None, unprunable_reason(mod)
    if layer is not None:
        return name, layer.role(mod, is_out), problem or layer.problem(name, mod)
    if isinstance(mod, ops._OutputOp):
        return name, None, "its channels are part of the model output"
    if isinstance(mod, ops._ElementWiseOp):
        return name, None, _op_problem(node, tr.internal)
    if isinstance(mod, pass_through):
        return name, None, _shape_op_problem(node)
    if isinstance(mod, nn.Parameter):
        pname = tr.graph._param_to_name.get(mod, "")
        if pname and is_channel_vector(mod):  # a layer scale: one entry per channel, pruned with them
            return pname, "bn", problem
        return name, None, f"a bare parameter {pname!r} of shape {tuple(mod.shape)} (not one entry per channel) reads it"
    if isinstance(mod, unsupported):
        return name, None, f"{name} ({type(mod).__name__}) is not supported by slimcnn surgery"
    return name, None, f"{name or type(mod).__name__} is not supported by slimcnn surgery"


def _shape_op_problem(node: Any) -> str | None:
    """Concat/split/slice/unbind/expand nodes: fine off the channel dim; on it, only a concat whose every input
    Torch-Pruning has seen (so the offsets are right). Split and slice sizes are written in the forward code,
    which surgery cannot change."""
    mod, fn = node.module, node.grad_fn
    ops = _tp().ops
    op = type(mod).__name__.strip("_").removesuffix("Op").lower()
    dim = mod.dim if isinstance(mod, ops._SliceOp) else getattr(fn, "_saved_dim", None)
    if isinstance(mod, ops._ExpandOp):
        sizes = getattr(fn, "_saved_self_sym_sizes", None)
        return "an expand over the channel dimension" if sizes is not None and len(sizes) > 1 and sizes[1] == 1 else None
    if isinstance(mod, ops._ReshapeOp):
        return _reshape_problem(fn)
    if dim is None or dim > 1 or dim == 0:
        return None
    if dim < 0:
        return f"a {op} along dimension {dim} (not analysed)"
    if isinstance(mod, ops._ConcatOp):
        n_inputs = len(getattr(fn, "next_functions", ()))
        if len(node.inputs) != n_inputs or mod.offsets is None or len(mod.offsets) != n_inputs + 1:
            return "a concatenation with a tensor from outside the traced graph (e.g. the network input)"
        return None
    return f"a channel {op} whose sizes are fixed in the forward code"


def _axis(role: Role) -> str:
    return "in" if role == "in" else "out"


def _module_width(module: nn.Module, role: Role) -> int:
    layer = handler_for(module)
    if layer is None:
        raise TypeError(type(module).__name__)
    return layer.width(module, _axis(role))


def _segments(root_idxs: list[int], maps: dict[tuple[str, Role], dict[int, list[int]]]):
    """Split a root's channels into runs along which every member's channel advances by one in lockstep.

    Yields (first root index, length, {(module, role): first channel}) for each run.
    """
    run: list[int] = []
    run_start: dict[tuple[str, Role], int] = {}
    prev_sig = None
    for r in sorted(root_idxs):
        here = {k: v[r][0] for k, v in maps.items() if r in v}
        sig = frozenset(here)
        if run and sig == prev_sig and r == run[-1] + 1 and all(here[k] == run_start[k] + len(run) for k in here):
            run.append(r)
            continue
        if run:
            yield run[0], len(run), run_start
        run, run_start, prev_sig = [r], here, sig
    if run:
        yield run[0], len(run), run_start


def channel_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """The channel groups of ``model`` in forward order, unprunable ones included (with ``reason``).

    The network input is not a group; the classifier's outputs form an unprunable group. An active
    :func:`~slimcnn.graph.policy.layer_policy` marks excluded groups unprunable and sets floors (``min_keep``).

    >>> from slimcnn import create
    >>> groups = channel_groups(create("cifar_resnet20"), torch.randn(1, 3, 32, 32))
    >>> [g.key for g in groups][:3], len(groups)
    (['conv1', 'layer1.0.conv1', 'layer1.1.conv1'], 13)
    """
    groups = build_groups(model, example_input)
    from .policy import active_policy

    policy = active_policy()
    if policy:  # --exclude / --min-keep of the run in progress
        policy.apply(groups)
    return groups


def _is_root(m: Any) -> bool:
    layer = handler_for(m) if isinstance(m, nn.Module) else None
    return layer is not None and layer.is_root


def build_groups(model: nn.Module, example_input: torch.Tensor) -> list[ChannelGroup]:
    """:func:`channel_groups` before any layer policy: what one trace of the model says (the part
    :class:`~slimcnn.graph.ChannelGraph` keeps, applying the policy active at each use)."""
    tr = _trace(model, example_input)
    graph = tr.graph
    ignored = set(graph.IGNORED_LAYERS_IN_TRACING)
    roots = [m for m in graph.module2node if _is_root(m) and m not in ignored]
    roots.sort(key=lambda m: tr.order.get(tr.names[m], 1 << 30))
    covered: dict[str, set[int]] = {}
    groups: list[ChannelGroup] = []
    for root in roots:
        rname = tr.names[root]
        width = handler_for(root).width(root, "out")
        todo = [i for i in range(width) if i not in covered.get(rname, set())]
        if not todo:
            continue
        pruner = graph.get_pruner_of_module(root)
        tp_group = graph.get_pruning_group(root, pruner.prune_out_channels, todo)
        maps: dict[tuple[str, Role], dict[int, list[int]]] = {}
        problems: list[str] = []
        for item in tp_group:
            name, role, problem = _classify(tr, item.dep.target, item.dep.handler)
            if problem and problem not in problems:
                problems.append(problem)
            if role is None:
                continue
            per_root = maps.setdefault((name, role), {})
            for idx, r in zip(item.idxs, item.root_idxs):
                per_root.setdefault(r, []).append(idx)
        problems += _shared_problems(tr, maps)
        for (name, role), per_root in maps.items():
            if any(len(v) > 1 for v in per_root.values()):
                problems.append(f"one channel feeds several channels of {name} (flatten or repeated concatenation)")
            if role in ("out", "dw", "bn"):
                covered.setdefault(name, set()).update(i for v in per_root.values() for i in v)
        for first, size, starts in _segments(todo, maps):
            members = [Member(name, role, off) for (name, role), off in starts.items()]
            groups.append(ChannelGroup("", size, members, not problems, _summarise(problems)))
    _check_widths(model, groups)
    _check_overlaps(groups)
    _name_and_sort(model, groups, tr.order)
    return groups


def _shared_problems(tr: _Trace, maps: dict[tuple[str, Role], Any]) -> list[str]:
    """A layer run several times per forward (shared weights: a detector's head applied to every pyramid level)
    is one node of the dependency graph, whose inputs and outputs couple every call's, as surgery needs them to.
    Only a layer that reads its own output (run in a chain) is refused: its inputs and outputs are then one
    channel space."""
    roles: dict[str, set[str]] = {}
    for name, role in maps:
        if tr.calls.get(name, 0) > 1:
            roles.setdefault(name, set()).add(role)
    return [f"{name} runs {tr.calls[name]} times per forward and reads its own output (shared weights)"
            for name, r in roles.items() if "in" in r and "out" in r]


def _summarise(problems: list[str]) -> str:
    shared = [p.split(" runs ")[0] for p in problems if p.endswith("(shared weights)")]
    rest = [p for p in problems if not p.endswith("(shared weights)")]
    if shared:
        more = f" and {len(shared) - 3} more" if len(shared) > 3 else ""
        rest.append(f"{', '.join(shared[:3])}{more} run several times per forward (shared weights)")
    return "; ".join(rest)


def _check_widths(model: nn.Module, groups: list[ChannelGroup]) -> None:
    for g in groups:
        for m in g.members:
            width = _module_width(member_module(model, m.module), m.role)
            if m.offset < 0 or m.offset + g.size > width:
                _mark(g, f"channels {m.offset}..{m.offset + g.size - 1} fall outside {m.module} ({width} channels)")


def _check_overlaps(groups: list[ChannelGroup]) -> None:
    seen: dict[tuple[str, str], list[tuple[int, int, ChannelGroup]]] = {}
    for g in groups:
        for m in g.members:
            for a, b, other in seen.get((m.module, _axis(m.role)), []):
                if a < m.offset + g.size and m.offset < b and other is not g:
                    why = f"{m.module} is claimed by two groups ({other.key or 'another'} and this one)"
                    _mark(g, why)
                    _mark(other, why)
            seen.setdefault((m.module, _axis(m.role)), []).append((m.offset, m.offset + g.size, g))


def _mark(g: ChannelGroup, reason: str) -> None:
    g.prunable = False
    if reason not in g.reason:
        g.reason = f"{g.reason}; {reason}" if g.reason else reason


def _name_and_sort(model: nn.Module, groups: list[ChannelGroup], order: dict[str, int]) -> None:
    def first_producer(g: ChannelGroup) -> Member:
        makers = [m for m in g.members if m.role in ("out", "dw")] or g.members
        return min(makers, key=lambda m: (order.get(m.module, 1 << 30), m.offset))

    for g in groups:
        g.members.sort(key=lambda m: (order.get(m.module, 1 << 30), m.role, m.offset))
        p = first_producer(g)
        whole = p.offset == 0 and g.size == _module_width(member_module(model, p.module), p.role)
        g.key = p.module if whole else f"{p.module}[{p.offset}:{p.offset + g.size}]"
    groups.sort(key=lambda g: (order.get(first_producer(g).module, 1 << 30), first_producer(g).offset))
    seen: dict[str, int] = {}
    for g in groups:  # keys must be unique even in odd graphs
        n = seen.get(g.key, 0)
        seen[g.key] = n + 1
        if n:
            g.key = f"{g.key}#{n + 1}"


def groups_by_key(groups: Iterable[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {g.key: g for g in groups}
