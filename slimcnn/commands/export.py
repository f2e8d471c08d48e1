"""``slimcnn export``: a saved model to ONNX and/or TorchScript."""
from __future__ import annotations

import argparse

from .common import TRUST_HELP, parse_shape, require_extra

ONNX_EXTRA = 'the onnx extra: pip install -e ".[onnx]"'


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a saved model to ONNX / TorchScript",
                       description="Export a model saved by slimcnn (a compress output folder or .safetensors file).")
    p.add_argument("model", help="saved model: a folder with model.safetensors, or a .safetensors file")
    p.add_argument("--onnx", default=None, help=f"write ONNX here (dynamic batch axis; needs {ONNX_EXTRA})")
    p.add_argument("--torchscript", default=None, help="write a traced TorchScript module here")
    p.add_argument("--input", type=parse_shape, default=None, help="input C,H,W (default: the model's own)")
    p.add_argument("--check", action="store_true",
                   help="with --onnx: run the ONNX file in onnxruntime and print the largest difference from PyTorch")
    p.add_argument("--trust-builder", action="store_true", help=TRUST_HELP)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..cli import UserError
    from ..io import export_onnx, export_torchscript, load
    from ..models import default_input_size

    if not args.onnx and not args.torchscript:
        raise UserError("nothing to do: give --onnx PATH and/or --torchscript PATH")
    if args.check and not args.onnx:
        raise UserError("--check compares an ONNX export with PyTorch: give --onnx PATH too")
    ort = None
    if args.onnx:  # before any work: a missing optional package is one line naming the extra, not a traceback
        require_extra("onnx", "onnx", "export --onnx")
        if args.check:
            ort = require_extra("onnxruntime", "onnx", "export --check")
    model = load(args.model, trust_builder=args.trust_builder)
    shape = tuple(args.input) if args.input else default_input_size(model.slimcnn_spec["name"])
    x = torch.randn(2, *shape)
    if args.onnx:
        export_onnx(model, args.onnx, x)
        print(f"wrote {args.onnx}")
        if ort is not None:
            out = ort.InferenceSession(args.onnx, providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
            with torch.no_grad():
                diff = abs(out - model(x).numpy()).max()
            print(f"onnxruntime max_abs_diff: {diff:.3g}")
    if args.torchscript:
        export_torchscript(model, args.torchscript, x)
        print(f"wrote {args.torchscript}")
    return 0
