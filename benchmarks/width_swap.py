"""Widths from one compressed row, channels and training from the L1 recipe: is it the widths or the method?

A method's row mixes two things: how wide it leaves each channel group, and the weights it hands over. This takes
only the widths of a ``slimcnn compress`` / ``slimcnn bench`` output (its report.json ``widths``, per group), picks
those many channels of every group from the base by the ``group_l2`` score (what ``l1`` does), recalibrates BN and
fine-tunes with the cpu bench's recipe. Same widths as the row, L1's start: the difference to the row is the
method's weights; the difference to the L1 row is the widths.

    python benchmarks/width_swap.py --base /work/bench/cpu/bases/cifar_resnet20-ft1e-lr0.02-n25000-s0 \\
        --widths-from /work/bench/cpu/cifar_resnet20/dagger-0.5 --epochs 2
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import add_data_args  # first: puts this checkout's slimcnn on the path

import torch

import slimcnn
from slimcnn.compress import CompressConfig
from slimcnn.data import cifar10_loaders
from slimcnn.engine import evaluate, train
from slimcnn.engine.recalibrate import recalibrate_bn
from slimcnn.graph.groups import channel_groups
from slimcnn.graph.surgery import remove_channels
from slimcnn.graph.targeting import keep_top
from slimcnn.importance import score


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the uncompressed model, saved by slimcnn")
    p.add_argument("--widths-from", required=True, help="a compress output folder whose report.json has widths")
    add_data_args(p)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--train-limit", type=int, default=25000)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    base = slimcnn.load(args.base).eval()
    widths = json.loads((Path(args.widths_from) / "report.json").read_text())["widths"]
    x = torch.randn(1, 3, 32, 32)
    groups = channel_groups(base, x)
    keep = keep_top({g.key: score("group_l2", base, g) for g in groups if g.key in widths}, widths)
    pruned = remove_channels(base, x, keep, groups=groups)
    loaders = cifar10_loaders(args.data, 128, args.train_limit, None, 0)
    ratio = slimcnn.profile(pruned, example_input=x).macs / slimcnn.profile(base, example_input=x).macs
    print(f"MACs ratio {ratio:.4f}; top-1 right after pruning {evaluate(pruned, loaders['test'])['top1']:.2f}")
    cfg = CompressConfig(epochs=args.epochs, lr=args.lr)  # the fine-tune recipe of slimcnn compress and the bench
    recalibrate_bn(pruned, loaders["train"], cfg.bn_recalib)
    print(f"after BN recalibration {evaluate(pruned, loaders['test'])['top1']:.2f}")
    pruned = train(pruned, loaders["train"], cfg.train_config(cfg.epochs)).model
    print(f"after {args.epochs} fine-tune epoch(s) {evaluate(pruned, loaders['test'])['top1']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
