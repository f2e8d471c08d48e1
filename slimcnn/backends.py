"""Where latency is measured: PyTorch eager on CPU, ONNX Runtime on CPU, or CUDA, behind one timing loop.

A *runner* is a zero-argument callable that runs one forward pass of one model on a fixed input, as the deploy
runtime would (ONNX Runtime gets the model exported in memory, never through a file; CUDA waits for the GPU before
returning). :func:`time_runners` times several runners interleaved, their order reversed every round, so that a
machine that slows down during the run (2 cores shared with other jobs, here) slows every model alike.

Eager and CUDA time the model with BatchNorm folded into the conv before it (:func:`fold_bn`), as ONNX Runtime's
graph optimiser does on its side and as a PyTorch deploy would: an unfolded BN is a separate kernel per conv, a cost
that pruning cannot shrink, so leaving it in would time the framework, not the network.
"""
from __future__ import annotations

import contextlib
import io
import os
import statistics
import time
from contextvars import ContextVar
from typing import Any, Callable, Iterator

import torch
from torch import nn

BACKENDS = ("eager", "onnxruntime", "cuda")

Runner = Callable[[], None]


def check_backend(name: str) -> str:
    """``name`` if this machine can time on it; ValueError (one line, naming what would work) otherwise."""
    if name not in BACKENDS:
        raise ValueError(f"unknown latency backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("latency backend cuda needs a CUDA GPU, and torch sees none here; time on eager or "
                         "onnxruntime instead")
    if name == "onnxruntime":
        try:
            import onnxruntime  # noqa: F401
        except ImportError as e:
            raise ValueError(f"latency backend onnxruntime needs onnxruntime ({e}): pip install -e \".[onnx]\"") \
                from None
    return name


def runner(model: nn.Module, input_shape: tuple[int, ...], batch: int, backend: str, threads: int) -> Runner:
    """One forward pass of ``model`` (eval mode, a fixed random input of ``batch`` images) on ``backend``.
    ``threads``: ONNX Runtime's intra-op threads; eager and CUDA use torch's own setting (the CLI's --threads)."""
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    if backend == "onnxruntime":
        return _ort_runner(model, x, threads)
    device = torch.device("cuda" if backend == "cuda" else "cpu")
    model = fold_bn(model).to(device)
    x = x.to(device)

    def run() -> None:
        with torch.inference_mode():
            model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return run


def fold_bn(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` with each BatchNorm folded into the conv (or linear) that feeds it alone
    (``torch.fx.experimental.optimization.fuse``); ``model`` itself in eval mode when torch.fx cannot trace it
    (data-dependent control flow, as in the gated nets), so such a model is timed unfolded rather than not at all.

    >>> net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval()
    >>> sum(isinstance(m, nn.BatchNorm2d) for m in fold_bn(net).modules())
    0
    """
    import copy

    from torch.fx.experimental.optimization import fuse

    model = model.eval()
    try:
        return fuse(copy.deepcopy(model))
    except Exception:  # torch.fx raises many types on untraceable code; unfolded is the safe answer for all
        return model


def _ort_runner(model: nn.Module, x: torch.Tensor, threads: int) -> Runner:
    import warnings

    import onnxruntime as ort

    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is chatty
        torch.onnx.export(model.cpu().eval(), (x,), buf, dynamo=False, input_names=["input"],
                          output_names=["output"], opset_version=17)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1  # a CNN is a chain: nothing to run side by side
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    # ORT's intra-op workers spin-wait after each run by default. With one session per timed width alive at once
    # (hundreds for ResNet-56) and 2 threads, the spinning workers kept the 2 shared cores busy: load average above
    # 20 and a 47 s table build (20 s with 1 thread). Off for every session, so base and plan are timed alike.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(buf.getvalue(), opts, providers=["CPUExecutionProvider"])
    feed = {"input": x.numpy()}
    return lambda: sess.run(None, feed)


def busy_cores_elsewhere(window_s: float = 0.3) -> float:
    """Cores that other processes keep busy, measured over ``window_s``: the machine's busy time in
    ``/proc/stat`` minus this process's own CPU time (all its threads), per second. 0.0 where ``/proc/stat`` does
    not exist."""
    def sample() -> tuple[float, float]:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), time.process_time()

    try:
        busy0, own0 = sample()
        t0 = time.monotonic()
        time.sleep(window_s)
        busy1, own1 = sample()
    except (OSError, ValueError):
        return 0.0
    return max(0.0, ((busy1 - busy0) - (own1 - own0)) / (time.monotonic() - t0))


#: while :func:`quiet_timing` is on: the most cores other processes may keep busy, the longest wait per timing and
#: what is left of the run's whole waiting budget (s)
_QUIET: ContextVar[dict[str, float] | None] = ContextVar("slimcnn_quiet_timing", default=None)
#: what the last wait saw (for the records of a benchmark)
last_wait: dict[str, Any] = {}


@contextlib.contextmanager
def quiet_timing(max_busy_cores: float = 0.3, timeout_s: float = 300.0, total_s: float = 1800.0) -> Iterator[None]:
    """Within it, every timing first waits (up to ``timeout_s``, and ``total_s`` over the whole block, after which
    timings go on unwaited and their records say so) until other processes keep at most ``max_busy_cores`` cores
    busy: a benchmark's latencies are ratios of interleaved calls, but a job that starts
    on the shared cores mid-way still moves them (the same two nets measured a ratio about 10% lower while a test
    suite shared the cores)."""
    token = _QUIET.set({"max": max_busy_cores, "timeout": timeout_s, "left": total_s})
    try:
        yield
    finally:
        _QUIET.reset(token)


def wait_for_quiet(max_busy_cores: float, timeout_s: float) -> dict[str, Any]:
    """Wait until other processes keep at most ``max_busy_cores`` cores busy (measured over 0.5 s, every 5 s), at most
    ``timeout_s``; returns what it saw: ``busy_cores_elsewhere``, ``waited_s`` and ``quiet`` (False: timed out)."""
    t0 = time.monotonic()
    while True:
        busy = busy_cores_elsewhere(0.5)
        waited = time.monotonic() - t0
        if busy <= max_busy_cores or waited >= timeout_s:
            last_wait.update({"busy_cores_elsewhere": round(busy, 2), "waited_s": round(waited, 1),
                              "quiet": busy <= max_busy_cores})
            return dict(last_wait)
        time.sleep(min(5.0, max(0.0, timeout_s - waited)))


def time_samples(runners: dict[str, Runner], repeats: int = 20, warmup: int = 2) -> dict[str, list[float]]:
    """Milliseconds of every call of every runner, timed interleaved (order reversed every round); under
    :func:`quiet_timing`, once the other processes are quiet."""
    quiet = _QUIET.get()
    if quiet is not None:
        seen = wait_for_quiet(quiet["max"], min(quiet["timeout"], max(0.0, quiet["left"])))
        quiet["left"] -= seen["waited_s"]
    names = list(runners)
    for name in names:
        for _ in range(warmup):
            runners[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            t0 = time.perf_counter()
            runners[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (nearest rank; 0.5 is the median of an odd count).

    >>> quantile([5.0, 1.0, 3.0, 2.0, 4.0], 0.5), quantile(list(map(float, range(1, 11))), 0.1)
    (3.0, 2.0)
    """
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def time_runners(runners: dict[str, Runner], repeats: int = 20, warmup: int = 2, q: float = 0.5
                 ) -> dict[str, float]:
    """The ``q`` quantile (default: the median) of the milliseconds per call of every runner, timed
    interleaved."""
    if q == 0.5:
        return {k: statistics.median(v) for k, v in time_samples(runners, repeats, warmup).items()}
    return {k: quantile(v, q) for k, v in time_samples(runners, repeats, warmup).items()}


def budgeted_repeats(runners: dict[str, Runner], budget_s: float, max_repeats: int = 200,
                     min_repeats: int = 5) -> int:
    """How many interleaved rounds of ``runners`` fit in about ``budget_s`` seconds (one warm call each priced)."""
    t0 = time.perf_counter()
    for r in runners.values():
        r()
    once = max(time.perf_counter() - t0, 1e-6)
    return max(min_repeats, min(max_repeats, int(budget_s / once)))
