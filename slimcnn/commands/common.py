"""Options shared by several subcommands, and the one place that sets torch's thread count."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
from collections.abc import Iterator
from types import ModuleType

from ..backends import busy_cores_elsewhere  # noqa: F401  (default_threads reads it here; tests patch it)
from ..models import default_input_size


class UserError(Exception):
    """An error the user can fix (bad path, bad option): printed as one line, no traceback."""


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected C,H,W such as 3,32,32, got {text!r}") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive sizes C,H,W, got {text!r}")
    return shape


TRUST_HELP = ("load a slimcnn-saved model whose base model is built by an import path (file.py:factory): this "
              "runs the code that path names, so use it only for files you trust")

MODEL_HELP = ("zoo name, tv:<torchvision classifier name>, timm:<timm name> (the timm extra), or your own builder: "
              "path/to/file.py:factory or package.module:factory; `slimcnn models` lists the names")


def add_model_args(p: argparse.ArgumentParser, weights: bool = True, task: bool = False) -> None:
    """The model options. ``task``: the command also has ``--task``, whose segmentation default (CamVid's 11
    classes) the ``--num-classes`` help then mentions; other commands must not point at an option they lack."""
    p.add_argument("--model", required=True, help=MODEL_HELP)
    classes = "10, or 11 for --task segmentation on CamVid" if task else "10"
    p.add_argument("--num-classes", type=int, default=None, help=f"number of output classes (default: {classes})")
    p.add_argument("--shortcut", choices=["A", "B"], default=None, help="CIFAR ResNet shortcut type (default A)")
    p.add_argument("--width", type=float, default=None,
                   help="CIFAR ResNet width multiplier (e.g. 1.5 to train wide, then `compress --method csgd --squeeze`)")
    p.add_argument("--input", type=parse_shape, default=None, help="input C,H,W (default: the model's own)")
    if weights:
        p.add_argument("--weights", default=None,
                       help="weights for --model: a state dict in a .th/.pth/.pt file (read with weights_only=True) "
                            "or a .safetensors file; or a model saved by slimcnn (its folder or .safetensors file, "
                            "which brings its own architecture)")
        p.add_argument("--trust-builder", action="store_true", help=TRUST_HELP)
    g = p.add_argument_group("feedback gating (RIGNet / DIGNet wrappers around a staged backbone)")
    g.add_argument("--gating", choices=["rig", "dig"], default=None, help="wrap the model in feedback gating")
    g.add_argument("--iterations", type=int, default=None, help="gating: iterations T (default 2)")
    g.add_argument("--gate-type", choices=["spatial", "channel", "both"], default=None, help="gating: gate shape")
    g.add_argument("--variant", choices=["cascaded", "same_stage", "previous_stage", "top_only", "none"], default=None,
                   help="dig: where feedback comes from (cascaded = DIGNet; none = feed-forward baseline)")
    g.add_argument("--gate-source", choices=["next", "top"], default=None, help="rig: gate from the next or the top stage")
    g.add_argument("--gate-bn", choices=["shared", "per_iter"], default=None,
                   help="gating: BatchNorm layers shared by all iterations (default) or one set per iteration, so "
                        "gated and ungated activations keep separate statistics")
    g.add_argument("--gate-init", choices=["default", "open", "zero"], default=None,
                   help="gating: gate conv init; default: bias +3 (gates ~0.95); open: weight 0, bias +4 (every gate "
                        "0.982, the plain backbone at first); zero: weight 0, bias 0 (every gate 0.5, steepest)")


def available_cores() -> int:
    """The cores this process may run on. Its CPU affinity, not ``os.cpu_count()``: a container, ``taskset``
    or a cpuset can narrow it, and more threads than cores only makes them wait for each other."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity API (macOS, Windows)
        return os.cpu_count() or 1


def default_threads(measure_load: bool = True) -> int:
    """torch intra-op threads when ``--threads`` is not given.

    ``OMP_NUM_THREADS`` wins when set: the user (or torchrun, which sets it to 1 for several local processes)
    already chose. Otherwise the available cores, shared among torchrun's local processes
    (``LOCAL_WORLD_SIZE``) so that DDP workers on one machine do not oversubscribe it, less the cores other
    processes keep busy (``measure_load``, a 0.3 s sample; outside torchrun only). A core counts as busy from 0.75
    of it: a long job that met a passing blip at its start (a shell command, another process exiting) ran a
    ResNet-56 bench row on 1 of 2 idle cores at half speed. The reason, measured with the
    demo beside a 2-thread ``slimcnn train`` on 2 cores: PyTorch's OpenMP threads spin while they wait for each
    other, so two 2-thread jobs took the demo from 133 s to 803 s; see the README's performance notes.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    local = os.environ.get("LOCAL_WORLD_SIZE", "1")
    procs = int(local) if local.isdigit() and int(local) > 0 else 1
    cores = max(1, available_cores() // procs)
    if measure_load and procs == 1 and cores > 1:
        cores = max(1, cores - int(busy_cores_elsewhere() + 0.25))
    return cores


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    """``--threads N``. The CLI adds it to every command (``slimcnn.cli.build_parser``), so no command sets
    torch's thread count on its own."""
    p.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="torch intra-op threads (default: OMP_NUM_THREADS if set, else the cores this process may "
                        "use less those other processes keep busy, split among torchrun's local processes: "
                        f"{default_threads(measure_load=False)} here when idle)")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the body with ``n`` torch intra-op threads (``None``: :func:`default_threads`), then restore the
    caller's setting, so that calling ``slimcnn.cli.main`` from Python (or a test) leaves its process as it was."""
    import torch

    n = n or default_threads()
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def require_extra(module: str, extra: str, feature: str) -> ModuleType:
    """Import an optional package, or stop with one line that names the extra to install.

    Without this a missing package surfaces as a traceback from deep inside a library (torch's ONNX exporter
    raises ``Module onnx is not installed!``), which does not tell a user what to install.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:

        raise UserError(f'{feature} needs {module} ({e}): pip install -e ".[{extra}]"') from None


def _floats3(text: str) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected three numbers R,G,B such as 0.485,0.456,0.406, got {text!r}")
    return values  # type: ignore[return-value]


def _default_workers() -> int:
    """Decoding workers of an image folder: one per core up to 4, leaving the rest to the model's threads."""
    return min(4, available_cores())


def add_data_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--data", required=required,
                   help="data root: any class-per-folder image tree (train/<class>/<image> plus val/ or test/; any "
                        "size and format Pillow reads), or CIFAR-10 (32x32 image folder or the pickle layout, read "
                        "into memory)")
    p.add_argument("--input-size", type=int, default=None, metavar="N",
                   help="image folder: side of the square crop the model sees (train: random resized crop + flip; "
                        "eval: resize to N/0.875, centre crop). Default: the H of --input, else the model's default "
                        "(224 for tv:, timm: and your own builders; CIFAR-10 stays at 32)")
    p.add_argument("--mean", type=_floats3, default=None, metavar="R,G,B",
                   help="normalisation mean (default ImageNet's 0.485,0.456,0.406)")
    p.add_argument("--std", type=_floats3, default=None, metavar="R,G,B",
                   help="normalisation std (default ImageNet's 0.229,0.224,0.225)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help=f"image folder: decoding processes per DataLoader (default {_default_workers()} here; 0: in "
                        "the main process)")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="image folder: skip images that cannot be decoded (and count them) instead of stopping at "
                        "the first one")
    p.add_argument("--train-limit", type=int, default=None, help="fixed class-balanced training subset of N images (seeded)")
    p.add_argument("--test-limit", type=int, default=None, help="fixed class-balanced test subset of N images (seeded)")
    p.add_argument("--batch-size", type=int, default=128, help="batch size (per process under torchrun; default 128)")
    p.add_argument("--seed", type=int, default=0, help="seed for subsets, shuffling and augmentation (default 0)")


def build_model(args: argparse.Namespace):
    """The model named by ``--model`` (and ``--weights`` if given: a state dict in a .th/.pth/.pt or
    .safetensors file); a slimcnn save is loaded with its own architecture."""
    from ..models import create, load_checkpoint

    from ..io import is_saved_model

    weights = getattr(args, "weights", None)
    if weights and is_saved_model(weights):
        from ..io import load

        return load(weights, trust_builder=getattr(args, "trust_builder", False))
    kw = {}
    if args.shortcut:
        kw["shortcut"] = args.shortcut
    for key in ("width", "gating", "iterations", "gate_type", "variant", "gate_source", "gate_init"):
        if getattr(args, key, None) is not None:
            kw[key] = getattr(args, key)
    if getattr(args, "gate_bn", None) is not None:  # create()'s keyword is bn; the option names what it is for
        kw["bn"] = args.gate_bn
    model = create(args.model, num_classes=num_classes(args), **kw)
    if weights:
        load_checkpoint(model, weights)
    return model


def adopt_num_classes(args: argparse.Namespace, loaders: dict) -> None:
    """Without ``--num-classes``, a classification model gets as many outputs as the data has classes; with it,
    a mismatch is an error now rather than an index error inside the loss later."""
    from ..data import DataError, loader_classes

    if getattr(args, "task", "classification") != "classification" or not loaders:
        return
    classes = loader_classes(next(iter(loaders.values())))
    if args.num_classes is None:
        args.num_classes = len(classes)
    elif args.num_classes < len(classes):
        raise DataError(f"--num-classes {args.num_classes} is fewer than the {len(classes)} class folders of "
                        f"{args.data}")


def num_classes(args: argparse.Namespace) -> int:
    if args.num_classes is not None:
        return args.num_classes
    return 11 if getattr(args, "task", "classification") == "segmentation" else 10


def input_shape(args: argparse.Namespace) -> tuple[int, ...]:
    """(C, H, W) the model is profiled, timed and traced at: ``--input``, else a square ``--input-size``, else
    the model's default."""
    if args.input:
        return tuple(args.input)
    if getattr(args, "input_size", None):
        return (3, args.input_size, args.input_size)
    return default_input_size(args.model)


def classification_data(args: argparse.Namespace, splits: tuple[str, ...] = ("train", "test"), rank: int = 0,
                        world_size: int = 1, augment: bool = True) -> dict:
    """The loaders of ``--data`` with every data option of the command: CIFAR-10 in memory, any other image
    folder through torchvision at the input size the model is profiled at. ``augment=False`` gives training
    images as the test split sees them (e.g. to calibrate a quantised model on)."""
    from ..data import IMAGENET_MEAN, IMAGENET_STD, classification_loaders, is_cifar_layout

    size = None
    if args.input or getattr(args, "input_size", None):
        size = tuple(input_shape(args)[1:])
    elif not is_cifar_layout(args.data):
        try:
            size = tuple(default_input_size(args.model)[1:])
        except KeyError:
            size = None  # an unknown --model name: building the model says so in its own words
    workers = args.workers if getattr(args, "workers", None) is not None else _default_workers()
    return classification_loaders(args.data, args.batch_size, getattr(args, "train_limit", None),
                                  getattr(args, "test_limit", None), args.seed, rank, world_size,
                                  mean=args.mean or IMAGENET_MEAN, std=args.std or IMAGENET_STD, splits=splits,
                                  input_size=size, workers=workers, skip_bad_images=args.skip_bad_images,
                                  augment=augment)
