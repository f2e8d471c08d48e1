"""Width alignment and MACs of every method under ``--round-to N``, on random weights (widths only).

What ``--round-to`` promises does not depend on training: every pruned conv keeps a multiple of N output
channels (or its whole width) and the MACs land within 1% of the target. This checks it on any zoo model
without data, one method after another, and writes the MACs ratio and the alignment count per method.

    python benchmarks/round_to.py --model tv:resnet18 --input 3,224,224 --round-to 8 --target 0.5
"""
from __future__ import annotations

import argparse

from common import RESULTS, command, environment, write_json  # first: puts this checkout's slimcnn on the path

import torch

import slimcnn
from slimcnn.profile import profile
from slimcnn.report import alignment

#: (label, method, options): the two l1 modes, and the TRP scheme and C-SGD clustering that run without data
METHODS = [("l1", "l1", {}), ("l1-global", "l1", {"mode": "global"}), ("dagger", "dagger", {}),
           ("csgd", "csgd", {"cluster": "even"}), ("trp-channel", "trp", {"scheme": "channel"}), ("tp", "tp", {})]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tv:resnet18")
    p.add_argument("--input", default="3,224,224", help="input C,H,W")
    p.add_argument("--round-to", type=int, default=8)
    p.add_argument("--target", type=float, default=0.5, help="MACs ratio")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default=None, help="results/<name>.json (default round_to-<model>)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.input.split(","))
    rows = {}
    for label, name, kw in METHODS:
        torch.manual_seed(0)
        model, x = slimcnn.create(args.model).eval(), torch.randn(2, *shape)
        base = profile(model, example_input=x[:1]).macs
        method = slimcnn.methods.create(name, target_macs=args.target, round_to=args.round_to, **kw)
        small = method.finalize(method.prepare(model, x))
        ratio = profile(small, example_input=x[:1]).macs / base
        a = alignment(small, args.round_to)
        rows[label] = {"macs_ratio": round(ratio, 4), "within_1pct": abs(ratio - args.target) <= 0.01 * args.target,
                       "aligned_layers": a["aligned_layers"], "layers": a["layers"], "unaligned": a["unaligned"]}
        print(f"{label}: MACs {ratio:.4f}, aligned {a['aligned_layers']}/{a['layers']}, unaligned {a['unaligned']}",
              flush=True)
    name = args.name or f"round_to-{args.model.replace(':', '_')}"
    write_json(RESULTS / f"{name}.json", {"command": command("round_to.py", argv), "model": args.model,
                                         "round_to": args.round_to, "target": args.target, "rows": rows,
                                         "environment": environment()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
