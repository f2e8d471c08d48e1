"""INT8 post-training quantisation of an exported ONNX model with ONNX Runtime, and what it costs / gains.

``slimcnn export DIR --int8 --data PATH`` runs :func:`quantize_int8` on the FP32 ONNX file, then measures both
files the same way: top-1 on the test split (:func:`onnx_top1`) and latency on ONNX Runtime's CPU provider
(:func:`onnx_latency`). Why ONNX Runtime: it is what most CPU deployments of an exported CNN run on, and its
static quantiser needs nothing but calibration images.

Choices, all recorded in the report:

- **Static, QDQ, per-channel weights.** Activations get fixed scales from calibration (no per-batch work at run
  time, unlike dynamic quantisation, which ONNX Runtime does not apply to convolutions anyway); the QDQ format
  keeps the graph a plain ONNX graph that other runtimes read; per-channel weight scales matter for pruned and
  BN-folded convs, whose filters differ widely in range.
- **Activations uint8 by default** (weights always int8: "U8S8"). On an AVX2 CPU without VNNI, U8S8 ran faster
  than the FP32 ONNX model and S8S8 slower (without VNNI ONNX Runtime has no fast signed x signed kernel).
  ``activations="int8"`` is there for CPUs with VNNI and for runtimes that want S8S8. ``reduce_range`` (7-bit
  weights) guards against the U8S8 saturation ONNX Runtime warns of on AVX2 / AVX-512 without VNNI; the CLI
  turns it on by default because INT8 top-1 of an L1-pruned ResNet-56 dropped by about a point without it and
  did not with it (a test-split measurement, to be re-checked on a validation split: docs/results.md).
- **Calibration** on training images without augmentation (the test split is never seen), percentile by
  default: activation ranges from MinMax let a few outliers set the scale, which cost TRP's thin factorised convs
  several points of top-1 where percentile cost a fraction of one; on the L1-pruned net the two are within noise.
- **Pre-processing** (``quant_pre_process``: shape inference and graph optimisation, as ONNX Runtime advises
  before quantising). Its symbolic shape inference gives up on some graphs (our option-A shortcuts), so it is
  retried without that step; if that fails too, the FP32 file is quantised as it is. The report says which.
- **Latency** of the two sessions is timed interleaved (FP32, INT8, INT8, FP32, ...) so that a machine that
  slows down during the run slows both alike; the median of the runs is reported, per batch size, with the
  thread count the sessions were given.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_TYPES = ("uint8", "int8")


def quantize_int8(fp32_path: str | Path, int8_path: str | Path, calibration: Iterable[torch.Tensor],
                  method: str = "percentile", input_name: str = "input", activations: str = "uint8",
                  reduce_range: bool = True) -> dict[str, Any]:
    """Quantise ``fp32_path`` to ``int8_path`` (static, QDQ, per-channel INT8 weights, ``activations`` uint8 or
    int8), calibrated on the batches ``calibration`` yields. Returns the settings and what was done, for the
    report."""
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    if method not in CALIBRATION_METHODS:
        raise ValueError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}, got {method!r}")
    if activations not in ACTIVATION_TYPES:
        raise ValueError(f"activations must be one of {', '.join(ACTIVATION_TYPES)}, got {activations!r}")
    batches = [b.detach().cpu().float().numpy() for b in calibration]
    if not batches:
        raise ValueError("INT8 calibration needs at least one image")

    class Reader(CalibrationDataReader):
        """Feeds the calibration batches once, in order."""

        def __init__(self) -> None:
            self.left = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.left, None)
            return None if batch is None else {input_name: batch}

    int8_path, fp32_path = Path(int8_path).resolve(), Path(fp32_path).resolve()
    int8_path.parent.mkdir(parents=True, exist_ok=True)
    calib = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
             "percentile": CalibrationMethod.Percentile}[method]
    with tempfile.TemporaryDirectory() as tmp, _working_dir(tmp):
        source = fp32_path
        preprocessed = _preprocess(source, Path(tmp) / "prepared.onnx")
        if preprocessed != "none":
            source = Path(tmp) / "prepared.onnx"
        quantize_static(str(source), str(int8_path), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        reduce_range=reduce_range, weight_type=QuantType.QInt8, calibrate_method=calib,
                        activation_type=QuantType.QUInt8 if activations == "uint8" else QuantType.QInt8)
    return {"format": "QDQ", "per_channel": True, "weights": "int8", "activations": activations,
            "reduce_range": reduce_range, "calibration_method": method,
            "calibration_images": int(sum(len(b) for b in batches)), "preprocessed": preprocessed}


@contextlib.contextmanager
def _working_dir(path: str) -> Iterator[None]:
    """Run the body in ``path``. Why: ONNX Runtime's quantiser saves an intermediate copy with its weights as
    external data, and onnx writes that ``<uuid>.data`` file into the current directory, where it stays behind
    (measured: one 0.7 MB file in the repository per quantisation). In a temp directory it goes with it."""
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def _preprocess(source: Path, out: Path) -> str:
    """ONNX Runtime's pre-quantisation pass into ``out``: ``"full"``, ``"no symbolic shapes"`` (retried without
    the symbolic shape inference), or ``"none"`` (both failed; ``out`` is not written)."""
    import io
    import logging

    from onnxruntime.quantization.shape_inference import quant_pre_process

    for label, kw in (("full", {}), ("no symbolic shapes", {"skip_symbolic_shape": True})):
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                logging.disable(logging.WARNING)
                try:
                    quant_pre_process(str(source), str(out), **kw)
                finally:
                    logging.disable(logging.NOTSET)
            return label
        except Exception:  # this step cannot handle the graph: the next, lighter one may
            continue
    return "none"


def session(path: str | Path, threads: int):
    """An ONNX Runtime CPU session with ``threads`` intra-op threads (one inter-op thread: a CNN is a chain)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnx_top1(sessions: dict[str, Any], loader, input_name: str = "input") -> tuple[dict[str, float], int]:
    """Top-1 (percent, two decimals) of every session over ``loader``, and the number of images."""
    correct = dict.fromkeys(sessions, 0)
    n = 0
    for x, y in loader:
        feed = {input_name: x.cpu().float().numpy()}
        labels = y.cpu().numpy()
        for name, sess in sessions.items():
            correct[name] += int((sess.run(None, feed)[0].argmax(1) == labels).sum())
        n += len(labels)
    return {name: round(100.0 * c / max(n, 1), 2) for name, c in correct.items()}, n


def onnx_latency(sessions: dict[str, Any], shape: tuple[int, ...], batches: Iterable[int], repeats: int = 10,
                 warmup: int = 2, input_name: str = "input") -> dict[str, Any]:
    """Median milliseconds per run of every session at each batch size, the sessions timed interleaved (their
    order reversed every round, so neither always runs first)."""
    names = list(sessions)
    out: dict[str, Any] = {"batch": [], **{name: [] for name in names}}
    gen = np.random.default_rng(0)
    for b in batches:
        feed = {input_name: gen.standard_normal((b, *shape), dtype=np.float32)}
        for name in names:
            for _ in range(warmup):
                sessions[name].run(None, feed)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                t0 = time.perf_counter()
                sessions[name].run(None, feed)
                times[name].append((time.perf_counter() - t0) * 1e3)
        out["batch"].append(int(b))
        for name in names:
            out[name].append(round(statistics.median(times[name]), 3))
    out["repeats"] = repeats
    return out
