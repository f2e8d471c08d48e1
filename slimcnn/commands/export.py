"""``slimcnn export``: a saved model to ONNX and/or TorchScript, and optionally to INT8 ONNX (ONNX Runtime static
quantisation, with its accuracy and latency against the FP32 ONNX model written into the folder's report)."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .common import TRUST_HELP, add_data_args, parse_shape, require_extra

ONNX_EXTRA = 'the onnx extra: pip install -e ".[onnx]"'


def add_parser(sub) -> None:
    from ..quantize import ACTIVATION_TYPES, CALIBRATION_METHODS

    p = sub.add_parser("export", help="export a saved model to ONNX / TorchScript / INT8 ONNX",
                       description="Export a model saved by slimcnn (a compress output folder or .safetensors file). "
                                   "--int8 also quantises the ONNX export with ONNX Runtime (static, QDQ, "
                                   "per-channel weights) calibrated on --data's training split, then measures top-1 "
                                   "on the test split and CPU latency of both ONNX models and writes them into "
                                   "DIR/report.json under \"int8\".")
    p.add_argument("model", help="saved model: a folder with model.safetensors, or a .safetensors file")
    p.add_argument("--onnx", default=None,
                   help=f"write ONNX here (dynamic batch axis; needs {ONNX_EXTRA}; with --int8 the default is "
                        "DIR/model.onnx)")
    p.add_argument("--torchscript", default=None, help="write a traced TorchScript module here")
    p.add_argument("--input", type=parse_shape, default=None, help="input C,H,W (default: the model's own)")
    p.add_argument("--check", action="store_true",
                   help="with --onnx: run the ONNX file in onnxruntime and print the largest difference from PyTorch")
    p.add_argument("--trust-builder", action="store_true", help=TRUST_HELP)
    q = p.add_argument_group("INT8 (--int8; needs onnxruntime, part of the onnx extra)")
    q.add_argument("--int8", action="store_true",
                   help="also write <onnx>.int8.onnx: ONNX Runtime static quantisation (QDQ, per-channel INT8 "
                        "weights, INT8 activations) calibrated on --calib-images training images of --data; report "
                        "top-1 and latency of it and of the FP32 ONNX model")
    q.add_argument("--calib-images", type=int, default=512, metavar="N",
                   help="training images to calibrate on (a fixed, seeded, class-balanced subset; default 512)")
    q.add_argument("--calib-method", choices=CALIBRATION_METHODS, default="percentile",
                   help="how activation ranges are set from the calibration images (default percentile: minmax "
                        "lost 4.97 points on a TRP-factorised ResNet-56, percentile 0.32)")
    q.add_argument("--int8-activations", choices=ACTIVATION_TYPES, default="uint8",
                   help="activation type; weights are always int8 (default uint8: ONNX Runtime's fast kernels on x86 "
                        "CPUs without VNNI; int8 for CPUs with VNNI or runtimes that want signed activations)")
    q.add_argument("--reduce-range", action=argparse.BooleanOptionalAction, default=True,
                   help="7-bit weights, against the uint8 x int8 saturation of AVX2 / AVX-512 CPUs without VNNI "
                        "(default on: ResNet-56 at 0.5 MACs lost 1.01 points to INT8 without it, gained 0.13 "
                        "with it; --no-reduce-range for CPUs with VNNI)")
    q.add_argument("--latency-batch", type=int, nargs="+", default=[1, 128],
                   help="batch sizes timed on ONNX Runtime's CPU provider (default 1 128)")
    q.add_argument("--latency-repeats", type=int, default=10, metavar="N",
                   help="timed runs per model and batch size, interleaved; the median is reported (default 10)")
    add_data_args(p, required=False)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .common import UserError
    from ..io import export_onnx, export_torchscript, load
    from ..models import default_input_size

    if not args.onnx and not args.torchscript and not args.int8:
        raise UserError("nothing to do: give --onnx PATH, --torchscript PATH and/or --int8")
    if args.check and not args.onnx:
        raise UserError("--check compares an ONNX export with PyTorch: give --onnx PATH too")
    if args.int8:
        if not args.data:
            raise UserError("--int8 calibrates on training images and scores on the test split: give --data PATH")
        if args.calib_images < 1 or args.latency_repeats < 1 or min(args.latency_batch) < 1:
            raise UserError("--calib-images, --latency-repeats and --latency-batch must be positive")
    ort = None
    if args.onnx or args.int8:  # before any work: a missing optional package is one line naming the extra
        require_extra("onnx", "onnx", "export --int8" if args.int8 else "export --onnx")
        if args.check or args.int8:
            ort = require_extra("onnxruntime", "onnx", "export --int8" if args.int8 else "export --check")
    model = load(args.model, trust_builder=args.trust_builder)
    shape = tuple(args.input) if args.input else default_input_size(model.slimcnn_spec["name"])
    x = torch.randn(2, *shape)
    folder = Path(args.model) if Path(args.model).is_dir() else Path(args.model).parent
    onnx_path = args.onnx or (str(folder / "model.onnx") if args.int8 else None)
    if onnx_path:
        export_onnx(model, onnx_path, x)
        print(f"wrote {onnx_path}")
        if args.check:
            out = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
            with torch.no_grad():
                diff = abs(out - model(x).numpy()).max()
            print(f"onnxruntime max_abs_diff: {diff:.3g}")
    if args.torchscript:
        export_torchscript(model, args.torchscript, x)
        print(f"wrote {args.torchscript}")
    if args.int8:
        record = int8_record(args, Path(onnx_path), shape, ort.__version__)
        print_int8(record)
        write_int8(folder, record)
        print(f"wrote {record['onnx_int8']}, {folder / 'report.json'} (\"int8\")")
    return 0


def int8_record(args: argparse.Namespace, fp32: Path, shape: tuple[int, ...], ort_version: str) -> dict[str, Any]:
    """Quantise ``fp32``, then score and time both ONNX models; the report's ``int8`` entry."""
    import torch

    from ..quantize import onnx_latency, onnx_top1, quantize_int8, session
    from .common import classification_data

    # the loaders see the model's input size, and the training split only the calibration subset
    args.input = tuple(shape)
    args.train_limit = min(args.calib_images, args.train_limit or args.calib_images)
    loaders = classification_data(args, ("train", "test"), augment=False)

    def calibration():
        left = args.train_limit
        for xb, _ in loaders["train"]:
            if left <= 0:
                break
            yield xb[:left]
            left -= len(xb[:left])

    int8 = fp32.with_name(fp32.stem + ".int8.onnx")
    settings = quantize_int8(fp32, int8, calibration(), args.calib_method, activations=args.int8_activations,
                             reduce_range=args.reduce_range)
    threads = torch.get_num_threads()  # the command's --threads (slimcnn.cli sets it for every command)
    sessions = {"fp32": session(fp32, threads), "int8": session(int8, threads)}
    top1, n = onnx_top1(sessions, loaders["test"])
    lat = onnx_latency(sessions, tuple(shape), args.latency_batch, args.latency_repeats)
    lat.update({"ratio": [round(i / f, 4) for f, i in zip(lat["fp32"], lat["int8"])], "threads": threads,
                "runtime": f"onnxruntime {ort_version} CPUExecutionProvider"})
    return {"onnx_fp32": str(fp32), "onnx_int8": str(int8), **settings, "calibration_split": "train",
            "data": args.data, "test_images": n, "top1": top1, "top1_change": round(top1["int8"] - top1["fp32"], 2),
            "latency_ms": lat, "bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}}


def print_int8(record: dict[str, Any]) -> None:
    lat = record["latency_ms"]
    print(f"INT8: {lat['runtime']}, {lat['threads']} thread(s), static {record['format']}, per-channel int8 weights, "
          f"{record['activations']} activations, {record['calibration_images']} calibration images "
          f"({record['calibration_method']})")
    print(f"{'':<6}{'top-1':>8}{'MB':>8}" + "".join(f"{'ms b=' + str(b):>12}" for b in lat["batch"]))
    for name in ("fp32", "int8"):
        print(f"{name:<6}{record['top1'][name]:>8.2f}{record['bytes'][name] / 1e6:>8.2f}"
              + "".join(f"{v:>12.3f}" for v in lat[name]))
    print(f"top1_change: {record['top1_change']:+.2f} on {record['test_images']} test images  "
          f"latency_ratio int8/fp32: {', '.join(f'{r:.3f}' for r in lat['ratio'])}")


def write_int8(folder: Path, record: dict[str, Any]) -> None:
    """Put ``record`` under ``int8`` in the folder's report.json (created if the folder has none), and
    re-render report.md from it when it is a ``compress`` report."""
    from ..report import atomic_write_text, markdown

    path = folder / "report.json"
    report = json.loads(path.read_text()) if path.is_file() else {}
    report["int8"] = record
    atomic_write_text(path, json.dumps(report, indent=1, default=float))
    if (folder / "report.md").is_file() and {"base", "compressed", "method"} <= set(report):
        plots = report.get("plots") or {}
        atomic_write_text(folder / "report.md", markdown(report) + "".join(f"\n![{k}]({v})\n" for k, v in plots.items()))
