"""``slimcnn demo``: the main job end to end on the embedded default (no arguments, no downloads).

Public ResNet-20 checkpoint + a 1,500/1,000-image class-balanced CIFAR-10 subset shipped in the package:
evaluate, compress to 50% MACs, fine-tune briefly, print a before/after table and write a PNG.
"""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default (ResNet-20, CIFAR-10 subset)",
                       description="Evaluate the public ResNet-20 on an embedded CIFAR-10 subset, compress it to "
                                   "50%% MACs with every method, fine-tune briefly, print before/after tables and write "
                                   "PNGs. About 2 minutes on 2 idle cores.")
    p.add_argument("--methods", default="l1,tp,csgd,dagger,trp",
                   help="comma list of methods to run side by side (default: every method and the Torch-Pruning peer)")
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=4, help="fine-tune epochs on the 1,500 embedded training images")
    p.add_argument("--out", default="runs/demo", help="output folder (reports, models, PNG)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .. import methods
    from ..compress import CompressConfig, compress
    from ..data import Loader, load_demo
    from ..data.embedded import DEMO_WEIGHTS
    from ..models import create, load_checkpoint
    from .compress import print_summary

    base = load_checkpoint(create("cifar_resnet20"), DEMO_WEIGHTS)
    train = Loader(load_demo("train"), batch_size=64, shuffle=True, augment=True, seed=0)
    test = Loader(load_demo("test"), batch_size=250)
    print("slimcnn demo: public CIFAR-10 ResNet-20, embedded subset (1,500 train / 1,000 test JPEG images)")
    summary = []
    for name in [m.strip() for m in args.methods.split(",") if m.strip()]:
        method = methods.create(name, target_macs=args.target_macs)
        cfg = CompressConfig(target_macs=args.target_macs, epochs=args.epochs, lr=0.01,
                             method_epochs=2 if method.trains_before_finalize else 0,
                             out_dir=str(Path(args.out) / name), latency_batches=[1, 128], latency_repeats=9)
        _, report = compress(base, method, train, test, (3, 32, 32), cfg, "cifar_resnet20",
                             {"command": "slimcnn demo", "data": "embedded cifar10-demo subset"})
        print(f"\n== {name}: target {args.target_macs:.0%} MACs, {cfg.method_epochs} method + {args.epochs} "
              f"fine-tune epochs (top-1 on the 1,000 embedded test images)")
        print_summary(report)
        print(f"report: {Path(args.out) / name / 'report.md'}  plot: {Path(args.out) / name / 'widths.png'}")
        summary.append(report)
    if len(summary) > 1:
        print(f"\n== side by side (same base, {args.target_macs:.0%} MACs target, 1,000 embedded test images; "
              "a tiny budget: see benchmarks/ for full-data results)")
        print(f"{'method':<10}{'MACs':>10}{'top-1':>8}{'change':>8}{'latency b=1':>13}{'b=128':>8}")
        for r in summary:
            lat = r["latency_ms"]["ratio"]
            print(f"{r['method']:<10}{r['compressed']['macs'] / 1e6:>9.2f}M{r['compressed']['top1']:>8.2f}"
                  f"{r['top1_change']:>+8.2f}{lat[0]:>13.3f}{lat[-1]:>8.3f}")
        print(f"base      {summary[0]['base']['macs'] / 1e6:>9.2f}M{summary[0]['base']['top1']:>8.2f}")
    return 0
