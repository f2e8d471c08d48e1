"""Checks every surgery runs on its result before handing it back.

The result must run in eval mode and in train mode (see :mod:`.modes`: a branch that runs only in training, such
as GoogLeNet's auxiliary heads, breaks only there) and give, in each, an output of the original's structure with
every tensor of the original's shape: all of a nested output (a multi-head net, a detector's boxes and classes)
is compared, not just the prediction. Numbers are compared where a check asks for it (``lossless_tol``, and
``surgery.py``'s masked comparison) in every mode whose forward is repeatable.

>>> import torch
>>> from torch import nn
>>> net, x = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), torch.randn(1, 3, 8, 8)
>>> ref = reference_output(net, x)
>>> list(ref.modes), list(ref.modes["eval"])           # every output tensor by its path; a bare tensor's is ""
(['eval', 'train'], [''])
>>> validate(nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5)), x, ref, "widen")
Traceback (most recent call last):
...
slimcnn.graph.validate.SurgeryError: widen: in eval mode, output shape changed from (1, 4, 6, 6) to (1, 5, 6, 6)
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..inputs import input_device
from ..outputs import final_output, output_items
from .modes import in_mode, inputs_for

#: a train-mode forward whose outputs move by more than this under another seed draws random numbers
_REPEATABLE_TOL = 1e-5

Tensors = dict[str, torch.Tensor]  # every tensor of one output, by its path (see slimcnn.outputs.output_items)


class SurgeryError(RuntimeError):
    """A surgery would return a broken model. The caller's model is untouched."""


@dataclass
class ModelOutputs:
    """What a model computes on the example input: for each mode it ran in, every output tensor by its path."""

    modes: dict[str, Tensors]
    #: mode -> the input it ran on (see :func:`slimcnn.graph.modes.inputs_for`)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    #: mode -> why the model was not run in it (the original does not run in it on this input)
    skipped: dict[str, str] = field(default_factory=dict)
    #: modes whose forward ran an op with a data-dependent output shape (a detector's score threshold and NMS):
    #: the first dimension of its output tensors (how many boxes) may differ in a pruned net, the others may not
    counted: set[str] = field(default_factory=set)
    #: runs the model again in a mode under another seed (a reference's; see :meth:`repeatable`)
    rerun: Callable[[str], Tensors] | None = field(default=None, repr=False)
    _repeatable: dict[str, bool] = field(default_factory=dict, repr=False)

    def repeatable(self, mode: str) -> bool:
        """Whether the forward in ``mode`` gives the same outputs under another seed. One that draws random
        numbers (a functional dropout, noise) cannot be compared by number with a pruned net, which draws them
        over other shapes. Asked only when a comparison fails, as it costs a forward."""
        if mode == "eval" or self.rerun is None:
            return True
        if mode not in self._repeatable:
            again = {mode: self.rerun(mode)}
            self._repeatable[mode] = mismatch(again, {mode: self.modes[mode]}, _REPEATABLE_TOL) is None
        return self._repeatable[mode]


def first_output(out: Any) -> torch.Tensor:
    """The prediction in a model output (the library's one rule, :func:`slimcnn.outputs.final_output`)."""
    return final_output(out)


class _DataDependentShapes(TorchDispatchMode):
    """Notes whether any op whose output shape depends on the values (``nonzero``, boolean indexing) ran."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.seen and torch.Tag.dynamic_output_shape in getattr(func, "tags", ()):
            self.seen = True
        return func(*args, **(kwargs or {}))


def _run(model: nn.Module, x: Any, mode: str, seed: int = 0, watch: _DataDependentShapes | None = None
         ) -> tuple[Tensors, Any]:
    """(every output tensor by path, the raw output) of ``model`` in ``mode`` on ``x``, leaving the model as it
    was. ``watch``: a dispatch mode to run the forward under."""
    with torch.no_grad(), in_mode(model, mode, input_device(x), seed):
        if watch is None:
            out = model(x)
        else:
            with watch:
                out = model(x)
    return {p: t.detach().clone() for p, t in output_items(out)}, out


def _first_run(model: nn.Module, example_input: torch.Tensor, mode: str) -> tuple[Tensors, torch.Tensor]:
    """(outputs, input) of the first of :func:`~slimcnn.graph.modes.inputs_for` that ``model`` runs on in
    ``mode``; the first error if it runs on none."""
    error: Exception | None = None
    for x in inputs_for(example_input, mode):
        try:
            return _run(model, x, mode)[0], x
        except Exception as e:
            error = error or e
    raise error


def prediction(model: nn.Module, example_input: torch.Tensor) -> torch.Tensor:
    """``model``'s eval-mode prediction on ``example_input``, leaving the model as it was."""
    return first_output(_run(model, example_input, "eval")[1]).detach()


def run_modes(model: nn.Module, reference: ModelOutputs) -> dict[str, Tensors]:
    """``model``'s output tensors in every mode of ``reference``, on its inputs (e.g. a model that should compute
    exactly what the reference's did)."""
    return {mode: _run(model, reference.inputs[mode], mode)[0] for mode in reference.modes}


def run_modes_double(model: nn.Module, reference: ModelOutputs) -> dict[str, Tensors] | None:
    """:func:`run_modes` on a float64 copy of ``model`` and of the inputs: a comparison that float32 rounding
    cannot blur (a train-mode BatchNorm over a handful of values divides rounding noise by a tiny spread). None
    where the model does not run in float64."""
    def double(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            return x.double() if x.is_floating_point() else x
        if isinstance(x, (list, tuple)):
            return type(x)(double(v) for v in x)
        return {k: double(v) for k, v in x.items()} if isinstance(x, dict) else x

    try:
        twin = copy.deepcopy(model).double()
        return {mode: _run(twin, double(reference.inputs[mode]), mode)[0] for mode in reference.modes}
    except Exception:  # an op without a float64 kernel: the float32 comparison stands
        return None


def reference_output(model: nn.Module, example_input: torch.Tensor) -> ModelOutputs:
    """The outputs a surgery's result is checked against: ``model``'s in every mode it runs in (eval first, the
    mode a pruned net is used in). Eval mode must run; a model that does not run in train mode on this input is
    checked in eval mode only, with a warning."""
    watch = _DataDependentShapes()
    ref = ModelOutputs({"eval": _run(model, example_input, "eval", watch=watch)[0]}, {"eval": example_input})
    if watch.seen:
        ref.counted.add("eval")
    ref.rerun = lambda mode: _run(model, ref.inputs[mode], mode, seed=1)[0]
    try:
        ref.modes["train"], ref.inputs["train"] = _first_run(model, example_input, "train")
    except Exception as e:
        ref.skipped["train"] = f"{type(e).__name__}: {e}"
        warnings.warn(f"{type(model).__name__} does not run in train mode on the example input "
                      f"({ref.skipped['train']}); surgery on it is checked in eval mode only")
    return ref


def validate(model: nn.Module, example_input: torch.Tensor, reference: ModelOutputs, what: str,
             lossless_tol: float | None = None) -> ModelOutputs:
    """Run ``model`` in every mode of ``reference``, on the inputs the reference ran on (``example_input``, the
    one it was made from, in eval mode): the output must have the reference's structure and every tensor its
    shape, and, if ``lossless_tol`` is set, match it within that max abs difference (in the modes that are
    repeatable). Raises :class:`SurgeryError` naming ``what``, the mode (and the module that failed, if the
    forward pass broke) otherwise. Returns the outputs."""
    got = ModelOutputs({}, dict(reference.inputs), dict(reference.skipped), set(reference.counted))
    for mode in reference.modes:
        got.modes[mode] = _located_run(model, reference.inputs[mode], mode, what)
        problem = _shape_problem(reference.modes[mode], got.modes[mode], mode in reference.counted)
        if problem:
            raise SurgeryError(f"{what}: in {mode} mode, {problem}")
    if lossless_tol is not None:
        found = difference(got.modes, reference.modes, lossless_tol, reference, relative=False)
        if found:
            raise SurgeryError(f"{what}: should be lossless but outputs differ by {found[0]:.3g} in {found[1]} "
                               f"(tolerance {lossless_tol:g})")
    return got


def _located_run(model: nn.Module, x: torch.Tensor, mode: str, what: str) -> Tensors:
    """:func:`_run`; a forward that breaks is a :class:`SurgeryError` naming the mode and the innermost module
    running when it broke."""
    stack: list[str] = []
    names = {m: n for n, m in model.named_modules()}

    def pre(mod, inputs):
        stack.append(names.get(mod, "?"))

    def post(mod, inputs, output):
        stack.pop()

    handles = [m.register_forward_pre_hook(pre) for m in model.modules()]
    handles += [m.register_forward_hook(post) for m in model.modules()]
    try:
        return _run(model, x, mode)[0]
    except Exception as e:
        failed = stack[-1:]
        where = f" at {failed[0] or '(model)'} ({type(model.get_submodule(failed[0])).__name__})" if failed else ""
        raise SurgeryError(f"{what}: the model no longer runs forward in {mode} mode{where}: "
                           f"{type(e).__name__}: {e}") from None
    finally:
        for h in handles:
            h.remove()


def _shape_problem(expected: Tensors, got: Tensors, counted: bool = False) -> str | None:
    """What differs between two outputs' structures or tensor shapes, or None. ``counted``: the first dimension
    of a tensor is a count that depends on the values (see :attr:`ModelOutputs.counted`)."""
    if list(expected) != list(got):
        return f"the output's structure changed from {_paths(expected)} to {_paths(got)}"
    for path, t in expected.items():
        same = got[path].shape[1:] == t.shape[1:] and got[path].dim() == t.dim() if counted and t.dim() else \
            got[path].shape == t.shape
        if not same:
            at = f" {path}" if path else ""
            return f"output{at} shape changed from {tuple(t.shape)} to {tuple(got[path].shape)}"
    return None


def _paths(tensors: Tensors) -> str:
    return "a tensor" if list(tensors) == [""] else f"tensors at {', '.join(tensors) or 'no path'}"


def difference(got: dict[str, Tensors], expected: dict[str, Tensors], tol: float, reference: ModelOutputs,
               relative: bool = True) -> tuple[float, str] | None:
    """The first output tensor of ``got`` (mode -> tensors) farther than ``tol`` from ``expected``'s, as (max abs
    difference, where), or None; a mode whose forward is not :meth:`~ModelOutputs.repeatable` for ``reference``
    is not compared by number. Shapes must already agree (see :func:`mismatch`)."""
    skip: set[str] = set()
    while (found := mismatch(got, expected, tol, relative, skip)) is not None:
        diff, mode, path = found
        if reference.repeatable(mode):
            return diff, f"{mode} mode, output {path}".rstrip()
        skip.add(mode)
    return None


def mismatch(got: dict[str, Tensors], expected: dict[str, Tensors], tol: float, relative: bool = True,
             skip: set[str] | frozenset[str] = frozenset()) -> tuple[float, str, str] | None:
    """The first output tensor of ``got`` (mode -> tensors) farther than ``tol`` from ``expected``'s, as (max abs
    difference, mode, path), or None. ``relative``: ``tol`` scales with the expected tensor's largest magnitude
    (at least 1). Modes in ``skip`` and modes missing from either side are not compared; a tensor whose shape
    differs (a count of detections) is infinitely far.

    >>> a, b = torch.zeros(2), torch.tensor([0.0, 0.5])
    >>> mismatch({"eval": {"[0]": a, "[1]": a}}, {"eval": {"[0]": a, "[1]": b}}, 1e-3)
    (0.5, 'eval', '[1]')
    """
    for mode, tensors in expected.items():
        if mode in skip or mode not in got:
            continue
        for path, t in tensors.items():
            if got[mode][path].shape != t.shape:  # a count that depends on the values came out otherwise
                return float("inf"), mode, path
            if not t.is_floating_point() and not t.is_complex():
                if not torch.equal(got[mode][path], t):
                    return float("inf"), mode, path
                continue
            diff = (got[mode][path] - t).abs().max().item() if t.numel() else 0.0
            scale = max(1.0, t.abs().max().item()) if relative and t.numel() else 1.0
            if not diff <= tol * scale:
                return diff, mode, path
    return None
