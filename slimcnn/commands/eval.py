"""``slimcnn eval``: top-1/top-5 of a model on the CIFAR-10 test split (or mIoU on CamVid's).

    slimcnn eval --model cifar_resnet56 --weights ../shared/weights/cifar10-resnet56-4bfd9763.th \\
                 --data ../shared/data/cifar10-jpeg
    top1: ...
"""
from __future__ import annotations

import argparse
from typing import Any

from .common import add_data_args, add_model_args, adopt_num_classes, build_model, parse_shape

TASK_HELP = "classification (an image folder or CIFAR-10) or segmentation (CamVid layout, void label 11 ignored)"


def add_device_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", choices=["classification", "segmentation"], default="classification", help=TASK_HELP)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="where to run (default: cuda if available, else cpu)")
    p.add_argument("--amp", action="store_true", help="mixed precision (fp16 autocast); used only on cuda")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--size", default=None, help="segmentation: resize CamVid to H,W (default: as stored, 180,240)")


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on the test split: top-1/top-5 (or mIoU)",
                       description="Evaluate a model on the test split and print top-1/top-5 in percent "
                                   "(segmentation: mIoU and pixel accuracy).")
    add_model_args(p, task=True)
    add_data_args(p)
    p.add_argument("--limit", type=int, dest="test_limit", default=None, help="same as --test-limit")
    add_device_args(p)
    p.set_defaults(func=run)


def device_of(args: argparse.Namespace) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def data_loaders(args: argparse.Namespace, splits: tuple[str, ...], rank: int = 0, world_size: int = 1) -> dict:
    """The loaders of ``splits`` for ``--data``, with the command's limits, seed and batch size."""
    kw: dict[str, Any] = dict(batch_size=args.batch_size, train_limit=getattr(args, "train_limit", None),
                              test_limit=args.test_limit, seed=args.seed, rank=rank, world_size=world_size,
                              splits=splits)
    if args.task == "segmentation":
        from ..data.camvid import camvid_loaders

        if args.size:
            kw["size"] = tuple(parse_shape("3," + args.size)[1:])
        return camvid_loaders(args.data, **kw)
    from .common import classification_data

    return classification_data(args, splits, rank, world_size)


def print_metrics(metrics: dict[str, Any], task: str) -> None:
    """Print metrics as ``name: value`` lines (percentages with two decimals)."""
    names = ("miou", "pixel_acc") if task == "segmentation" else ("top1", "top5")
    for name in names:
        print(f"{name}: {metrics[name]:.2f}")
    print(f"loss: {metrics['loss']:.4f}")
    print(f"images: {metrics['n']}")


def run(args: argparse.Namespace) -> int:
    from ..engine import evaluate

    if not args.weights:
        print("note: no --weights given: evaluating randomly initialised weights")
    loaders = data_loaders(args, ("test",))
    adopt_num_classes(args, loaders)
    model = build_model(args)
    test = loaders["test"]
    metrics = evaluate(model, test, task=args.task, device=device_of(args), amp=args.amp,
                       progress=not args.no_progress)
    print_metrics(metrics, args.task)
    return 0
