"""One honest MACs counter, plus parameter counts and CPU latency.

Convention: MACs = multiply-accumulates of convolution and matrix-multiply ops only (conv, linear, matmul),
the convention behind the published figures; BN, activations and pooling are not counted. Params = all
parameters. Counting happens at the op level (every ``aten.convolution`` / ``aten.mm`` call), so layers
that a module-hook counter would miss (factorised convs, functional calls, gated iterations run T times)
are all counted. Each op is attributed to the innermost module running when it was issued.

``slimcnn.profile`` is this module, and calling it calls :func:`profile`: the package's one-call profiler
without rebinding the module's name to a function (so ``import slimcnn.profile as p`` gives the module).

>>> import slimcnn
>>> slimcnn.profile(slimcnn.create("cifar_resnet20"), (3, 32, 32)).macs == slimcnn.profile.profile(
...     slimcnn.create("cifar_resnet20"), (3, 32, 32)).macs
True
"""
from __future__ import annotations

import statistics
import sys
import time
import types
from dataclasses import dataclass, field
from math import prod
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .inputs import batch_size, map_input, sample_shape
from .outputs import check_has_tensor, forward_error

aten = torch.ops.aten


def conv_macs(out_elements: int, in_per_group: int, kernel_elements: int) -> int:
    """MACs of a convolution (or a matrix multiply, kernel 1): every output element is a dot product over the
    input channels of its group times the kernel. The one formula behind the profiler's count of a conv op,
    TRP's MACs of a conv and of its factorisation, and :meth:`slimcnn.graph.handlers.ConvHandler.macs`.

    >>> conv_macs(16 * 32 * 32, 3, 9)    # a 3->16 channel 3x3 conv with a 32x32 output
    442368
    """
    return out_elements * in_per_group * kernel_elements


def _conv_macs(args: tuple, out: torch.Tensor) -> int:
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    kernel = prod(w.shape[2:])
    if transposed:  # w: (in, out/groups, k...); every input element meets out/groups * k weights
        return conv_macs(x.numel(), w.shape[1], kernel)
    return conv_macs(out.numel(), w.shape[1], kernel)  # w: (out, in/groups, k...)


def _mm_macs(a: torch.Tensor, b: torch.Tensor) -> int:
    return conv_macs(prod(a.shape[:-1]) * b.shape[-1], a.shape[-1], 1)  # a matmul is a 1x1 conv


def _macs_of(func: Any, args: tuple, out: Any) -> int:
    if func in (aten.convolution.default, aten._convolution.default):
        return _conv_macs(args, out)
    if func is aten.mm.default or func is aten.bmm.default:
        return _mm_macs(args[0], args[1])
    if func is aten.addmm.default or func is aten.baddbmm.default:
        return _mm_macs(args[1], args[2])
    return 0


class _Counter(TorchDispatchMode):
    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.by_module: dict[str, int] = {}
        self.selected = False  # an op whose output shape depends on the values ran (nonzero, boolean index)
        self.data_dependent = False  # and MACs were counted after it

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.selected = self.selected or torch.Tag.dynamic_output_shape in getattr(func, "tags", ())
        macs = _macs_of(func, args, out)
        if macs:
            self.data_dependent = self.data_dependent or self.selected
            key = self.stack[-1]
            self.by_module[key] = self.by_module.get(key, 0) + macs
        return out


@dataclass
class LayerInfo:
    name: str
    type: str
    in_shape: tuple[int, ...] | None
    out_shape: tuple[int, ...] | None
    macs: int
    params: int


@dataclass
class Profile:
    """Result of :func:`profile`: totals (per single input) and a per-layer table."""

    macs: int
    params: int
    input_shape: tuple[int, ...]
    layers: list[LayerInfo] = field(default_factory=list)
    #: whether layers ran on a selection the values made (a detector's proposals after NMS): the MACs then depend
    #: on the input's values and on the weights, not only on the shapes
    data_dependent: bool = False

    def table(self, max_rows: int | None = None) -> str:
        rows = [r for r in self.layers if r.macs or r.params]
        if max_rows is not None:
            rows = rows[:max_rows]
        w = max([len(r.name) for r in rows] + [5])
        lines = [f"{'layer':<{w}}  {'type':<18} {'in':>16} {'out':>16} {'MACs':>12} {'params':>10}"]
        for r in rows:
            ins = "x".join(map(str, r.in_shape[1:])) if r.in_shape else "-"
            outs = "x".join(map(str, r.out_shape[1:])) if r.out_shape else "-"
            lines.append(f"{r.name:<{w}}  {r.type:<18} {ins:>16} {outs:>16} {r.macs:>12,} {r.params:>10,}")
        lines.append(f"{'total':<{w}}  {'':<18} {'':>16} {'':>16} {self.macs:>12,} {self.params:>10,}")
        return "\n".join(lines)

    def summary(self) -> str:
        return f"MACs: {self.macs / 1e6:.2f}M  params: {self.params / 1e6:.3f}M  input: {'x'.join(map(str, self.input_shape))}"


def _shape(t: Any) -> tuple[int, ...] | None:
    if isinstance(t, torch.Tensor):
        return tuple(t.shape)
    if isinstance(t, (tuple, list)) and t and isinstance(t[0], torch.Tensor):
        return tuple(t[0].shape)
    return None


def profile(model: nn.Module, input_shape: tuple[int, ...] | list[int] = (3, 32, 32),
            example_input: torch.Tensor | None = None) -> Profile:
    """Count MACs (conv/linear/matmul ops, per single input) and params of ``model``.

    >>> import slimcnn
    >>> p = slimcnn.profile(slimcnn.create("cifar_resnet56"), (3, 32, 32))
    >>> round(p.macs / 1e6, 2), round(p.params / 1e6, 3)
    (125.49, 0.853)
    """
    x = example_input if example_input is not None else torch.zeros(1, *input_shape)
    batch = batch_size(x)  # a list input (a detector's images) holds one image per item
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = map_input(x, lambda t: t.to(device))
    stack = ["(top)"]
    shapes: dict[str, tuple] = {}
    handles = []
    names = {m: n for n, m in model.named_modules()}

    def pre(mod, inputs):
        stack.append(names[mod])
        shapes.setdefault(names[mod] + ".in", _shape(inputs))

    def post(mod, inputs, output):
        stack.pop()
        shapes.setdefault(names[mod] + ".out", _shape(output))

    for m in model.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    was_training = model.training
    model.eval()
    counter = _Counter(stack)
    try:
        with torch.no_grad(), counter:
            out = model(x)
        check_has_tensor(model, out)
    except ValueError:
        raise
    except Exception as e:  # the user's model on the user's input: one line that says where, not a traceback
        raise forward_error(model, e, stack[-1] if len(stack) > 1 else "") from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    layers = []
    for name, m in model.named_modules():
        own_params = sum(p.numel() for p in m.parameters(recurse=False))
        macs = counter.by_module.get(name, 0) // batch
        if not macs and not own_params:
            continue
        layers.append(LayerInfo(name or "(model)", type(m).__name__, shapes.get(name + ".in"),
                                shapes.get(name + ".out"), macs, own_params))
    total = sum(counter.by_module.values()) // batch
    params = sum(p.numel() for p in model.parameters())
    return Profile(total, params, sample_shape(x), layers, counter.data_dependent)


def latency(model: nn.Module, input_shape: tuple[int, ...], batch: int = 1, repeats: int = 20,
            warmup: int = 3) -> float:
    """Median wall time of one forward pass in milliseconds (CPU unless the model is elsewhere)."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    x = torch.randn(batch, *input_shape, device=device)
    model.eval()
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def budgeted_latency(models: dict[str, nn.Module], input_shape: tuple[int, ...], batch: int = 1,
                     budget_s: float = 5.0, max_repeats: int = 12, rounds: int = 3
                     ) -> tuple[dict[str, float], int, int]:
    """:func:`compare_latency` within about ``budget_s`` seconds: ``(ms per model, batch timed, repeats)``.

    Timing exists to compare the models, so it must never cost more than the compression it reports on (a
    ResNeXt-50 at 224 px and batch 128 took minutes on 2 cores). One forward per model at batch 1 (after a
    warm-up) prices an image; a batch whose warm-up plus one timed pass would overrun the budget is shrunk to
    the largest that fits (the batch actually timed is returned, and reported), and the repeats are as many as
    the rest of the budget allows, between 1 and ``max_repeats``, interleaved over up to ``rounds`` rounds.
    """
    start = time.perf_counter()
    per_image_s = sum(latency(m, input_shape, 1, repeats=1, warmup=1) for m in models.values()) / 1e3
    b = batch
    if batch > 1 and 2 * batch * per_image_s > budget_s:
        b = max(1, int(budget_s / (2 * per_image_s)))
    first = {k: latency(m, input_shape, b, repeats=1, warmup=1) for k, m in models.items()}
    left = budget_s - (time.perf_counter() - start)
    repeats = max(1, min(max_repeats, int(left / max(sum(first.values()) / 1e3, 1e-6))))
    rounds = max(1, min(rounds, repeats))
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):  # interleaved, so that machine noise hits every model alike
        for k, m in models.items():
            times[k].append(latency(m, input_shape, b, repeats=max(1, repeats // rounds), warmup=0))
    return {k: statistics.median(v) for k, v in times.items()}, b, repeats


def compare_latency(models: dict[str, nn.Module], input_shape: tuple[int, ...], batch: int = 1,
                    repeats: int = 20, rounds: int = 3) -> dict[str, float]:
    """Latency of several models measured interleaved in one run, so machine noise hits all of them alike."""
    results: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(rounds):
        for k, m in models.items():
            results[k].append(latency(m, input_shape, batch, repeats=max(1, repeats // rounds), warmup=2))
    return {k: statistics.median(v) for k, v in results.items()}


class _ProfileModule(types.ModuleType):
    """The type of this module: calling ``slimcnn.profile(...)`` runs :func:`profile`."""

    def __call__(self, model: nn.Module, input_shape: tuple[int, ...] | list[int] = (3, 32, 32),
                 example_input: torch.Tensor | None = None) -> Profile:
        return profile(model, input_shape, example_input)


sys.modules[__name__].__class__ = _ProfileModule
