"""Options shared by several subcommands."""
from __future__ import annotations

import argparse

from ..models import default_input_size


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes C,H,W, got {text!r}")
    return shape


TRUST_HELP = ("load a slimcnn save whose base model is built by an import path (file.py:factory): this runs "
              "the code that path names, so use it only for files you trust")


def add_model_args(p: argparse.ArgumentParser, weights: bool = True) -> None:
    p.add_argument("--model", required=True, help="zoo name (see `slimcnn profile --list`), or tv:<torchvision name>")
    p.add_argument("--num-classes", type=int, default=None,
                   help="number of output classes (default: 10, or 11 for --task segmentation on CamVid)")
    p.add_argument("--shortcut", choices=["A", "B"], default=None, help="CIFAR ResNet shortcut type (default A)")
    p.add_argument("--width", type=float, default=None,
                   help="CIFAR ResNet width multiplier (e.g. 1.5 to train wide, then `compress --method csgd --squeeze`)")
    p.add_argument("--input", type=parse_shape, default=None, help="input C,H,W (default: the model's own)")
    if weights:
        p.add_argument("--weights", default=None, help="checkpoint: a public .th file, or a slimcnn save (dir or .safetensors)")
        p.add_argument("--trust-builder", action="store_true", help=TRUST_HELP)
    g = p.add_argument_group("feedback gating (RIGNet / DIGNet wrappers around a staged backbone)")
    g.add_argument("--gating", choices=["rig", "dig"], default=None, help="wrap the model in feedback gating")
    g.add_argument("--iterations", type=int, default=None, help="gating: iterations T (default 2)")
    g.add_argument("--gate-type", choices=["spatial", "channel", "both"], default=None, help="gating: gate shape")
    g.add_argument("--variant", choices=["cascaded", "same_stage", "previous_stage", "top_only", "none"], default=None,
                   help="dig: where feedback comes from (cascaded = DIGNet; none = feed-forward baseline)")
    g.add_argument("--gate-source", choices=["next", "top"], default=None, help="rig: gate from the next or the top stage")


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required, help="CIFAR-10 root: image folder (train/, test/) or the pickle layout")
    p.add_argument("--train-limit", type=int, default=None, help="fixed class-balanced training subset of N images (seeded)")
    p.add_argument("--test-limit", type=int, default=None, help="fixed class-balanced test subset of N images (seeded)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (per process under torchrun; default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for subsets, shuffling and augmentation (default 0)")


def build_model(args: argparse.Namespace):
    """The model named by ``--model`` (and ``--weights`` if given); a slimcnn save is loaded with its own architecture."""
    from pathlib import Path

    from ..models import create, load_checkpoint

    weights = getattr(args, "weights", None)
    if weights and (Path(weights).is_dir() or str(weights).endswith(".safetensors")):
        from ..io import load

        return load(weights, trust_builder=getattr(args, "trust_builder", False))
    kw = {}
    if args.shortcut:
        kw["shortcut"] = args.shortcut
    for key in ("width", "gating", "iterations", "gate_type", "variant", "gate_source"):
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
    model = create(args.model, num_classes=num_classes(args), **kw)
    if weights:
        load_checkpoint(model, weights)
    return model


def num_classes(args: argparse.Namespace) -> int:
    if args.num_classes is not None:
        return args.num_classes
    return 11 if getattr(args, "task", "classification") == "segmentation" else 10


def input_shape(args: argparse.Namespace) -> tuple[int, ...]:
    return tuple(args.input) if args.input else default_input_size(args.model)
