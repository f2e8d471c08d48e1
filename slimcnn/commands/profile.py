"""``slimcnn profile``: MACs, params and a per-layer table; optional CPU latency."""
from __future__ import annotations

import argparse

from .common import add_model_args, build_model, input_shape


def add_parser(sub) -> None:
    p = sub.add_parser("profile", help="count MACs and params (conv/linear MACs convention), optional latency",
                       description="Count MACs (multiply-accumulates of conv and linear ops, per image) and params.")
    add_model_args(p)
    p.add_argument("--layers", action="store_true", help="print the per-layer table")
    p.add_argument("--latency", action="store_true", help="measure CPU latency (median of repeats)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 128], help="batch sizes for --latency")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..profile import latency, profile

    model = build_model(args)
    shape = input_shape(args)
    prof = profile(model, shape)
    if args.layers:
        print(prof.table())
    print(f"model: {args.model}")
    print(f"macs: {prof.macs} ({prof.macs / 1e6:.2f}M)")
    print(f"params: {prof.params} ({prof.params / 1e6:.3f}M)")
    if args.latency:
        for b in args.batch:
            print(f"latency_ms[batch={b}]: {latency(model, shape, batch=b):.2f}")
    return 0
