"""``slimcnn compress``: compress a model with one method, fine-tune, and write model + report.

    torchrun --nproc_per_node 2 -m slimcnn compress ...   # DDP: --batch-size per process; rank 0 prints and writes
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys

from .common import add_data_args, add_model_args, adopt_num_classes, build_model, input_shape

#: the MACs target of a run given neither --target-macs nor --target-latency (nor a method's own budget option)
DEFAULT_TARGET_MACS = 0.5


class _MethodChoices(list):
    """--method's choices: the methods and the stacks; any other 'a+b' passes argparse so that the run can say in
    one line what is wrong with it (an unknown stage, trp+trp: see slimcnn/methods/stack.py)."""

    def __contains__(self, name: object) -> bool:
        return super().__contains__(name) or (isinstance(name, str) and "+" in name)


def _method_options() -> list[tuple[str, dict]]:
    """Every method's own CLI options (first declaration of a flag wins: shared flags mean the same)."""
    from ..methods import list_methods, list_stacks, method_class
    from ..methods.base import option_help

    seen: dict[str, dict] = {}
    for name in list_methods() + list_stacks():
        cls = method_class(name)
        for flag, kw in cls.cli_args:
            dest = kw.get("dest", flag.lstrip("-").replace("-", "_"))
            seen.setdefault(flag, {**kw, "help": option_help(cls, dest, kw.get("help", ""))})
    return list(seen.items())


def add_parser(sub) -> None:
    from ..methods import list_methods, list_stacks

    p = sub.add_parser("compress", help="compress a model with one method, fine-tune, report",
                       description="Compress a model (prune / merge / factorise) within one epoch budget, and write "
                                   "DIR/model.json, DIR/model.safetensors, DIR/report.{json,md} and plots. --epochs "
                                   "is the whole budget; each method's recipe splits it between training with the "
                                   "method attached and fine-tuning the compact model (l1, tp, modelopt: all "
                                   "fine-tune; dagger: half gate search; csgd: all centripetal SGD; trp: all "
                                   "trained-rank pruning). A stack such as dagger+trp (a channel method, then trp) "
                                   "takes one --target-macs and one --epochs for both stages: the channel stage "
                                   "trains with its hooks for its recipe's share of half the epochs (dagger: a "
                                   "quarter; csgd: half; l1, tp: none), trp for the rest; see --split.")
    p.add_argument("--method", required=True, choices=_MethodChoices(list_methods() + list_stacks()))
    add_model_args(p, task=True)
    add_data_args(p)
    p.add_argument("--task", choices=["classification", "segmentation"], default="classification",
                   help="classification (top-1) or segmentation (CamVid layout, void label 11 ignored; scored by "
                        "mIoU, fine-tuned with the pixel-wise loss; methods l1, dagger, csgd, trp)")
    p.add_argument("--size", default=None, metavar="H,W",
                   help="segmentation: resize CamVid to H,W (default: as stored, 180,240)")
    p.add_argument("--target-macs", type=float, default=None,
                   help="MACs to keep: a ratio of the base (<= 1) or absolute MACs (> 1); default 0.5 unless "
                        "--target-latency is given (the two cannot be combined: a width plan follows one budget)")
    p.add_argument("--target-latency", default=None, metavar="R",
                   help="latency to keep instead of MACs (l1 and trp, for now): a ratio of the base's (e.g. "
                        "0.5) or milliseconds (e.g. 12ms), timed on --latency-backend at the first --latency-batch with "
                        "--threads threads; a per-layer latency table is measured first, then the plan is "
                        "confirmed by timing it against the base (report: latency_target)")
    p.add_argument("--latency-backend", choices=["eager", "onnxruntime", "cuda"], default="eager",
                   help="the runtime the net will run on: where --target-latency is measured, trp plans its "
                        "factorisation and the report times base and compressed: PyTorch eager on CPU (default), "
                        "ONNX Runtime on CPU, or CUDA (the report's timing then runs on --device)")
    p.add_argument("--epochs", type=int, default=0,
                   help="the whole epoch budget of the run, split by the method's recipe (default 0: no training, "
                        "which only l1, tp and modelopt accept)")
    p.add_argument("--method-epochs", "--search-epochs", dest="method_epochs", type=int, default=None,
                   help="override the recipe: this many of the --epochs train with the method attached before "
                        "finalize, the rest fine-tune")
    p.add_argument("--lr", type=float, default=0.01, help="fine-tune learning rate")
    p.add_argument("--method-lr", type=float, default=None, help="learning rate while the method trains (default --lr)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--schedule", choices=["cosine", "step", "constant"], default="cosine")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--amp", action="store_true", help="mixed precision (cuda only)")
    p.add_argument("--distill", action=argparse.BooleanOptionalAction, default=True,
                   help="distil from the uncompressed base (frozen, eval mode) in every training epoch: "
                        "(1 - alpha) * cross-entropy + alpha * T^2 * KL(teacher || student) at temperature T. "
                        "On by default: it raised every row of the cpu-budget ResNet-56 benchmark at 0.5 MACs "
                        "(+0.65 to +3.36 points, benchmarks/results/bench-cpu-resnet56.md); --no-distill trains "
                        "with cross-entropy alone")
    p.add_argument("--kd-alpha", type=float, default=0.7, help="distillation weight alpha in [0, 1] (with --distill)")
    p.add_argument("--kd-temperature", type=float, default=4.0, help="distillation temperature T (with --distill)")
    p.add_argument("--ema", type=float, default=None, metavar="DECAY",
                   help="keep an exponential moving average of the weights during the fine-tune (e.g. 0.999); the "
                        "averaged weights are evaluated and saved")
    p.add_argument("--bn-recalib", type=int, default=100, metavar="N",
                   help="batches of BatchNorm recalibration after finalize, the same for every method (0: none)")
    p.add_argument("--latency-batch", type=int, nargs="+", default=[1, 128],
                   help="batch sizes timed (a batch too large for the time budget is shrunk; the report says so); "
                        "the first is the batch --target-latency is measured at")
    p.add_argument("--latency-budget", type=float, default=5.0, metavar="SECONDS",
                   help="seconds of latency timing per batch size, both models together (default 5)")
    p.add_argument("--no-latency", action="store_true", help="do not time the models")
    p.add_argument("--no-latency-plan", action="store_true",
                   help="trp (and a stack's trp stage): plan ranks on MACs alone. By default each layer shape is "
                        "timed whole and factorised on --latency-backend at the first --latency-batch, a layer is "
                        "factorised only where that is faster, and ranks are multiples of 8 unless --round-to")
    p.add_argument("--round-to", dest="round_to", type=int, default=None, metavar="N",
                   help="keep channel counts in multiples of N (e.g. 8) in every group at least N wide, for kernels "
                        "that run faster on aligned widths; every method (trp: its ranks; tp: Torch-Pruning's "
                        "round_to; modelopt: its channel divisor). The MACs search only tries aligned widths; the "
                        "report counts the aligned layers")
    lc = p.add_argument_group("layer control (l1, dagger, csgd; --exclude also tp and trp; "
                              "--min-keep also their stacks)")
    lc.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                    help="layers never pruned, by module-name glob (repeatable), e.g. 'head' or 'classifier.*': "
                         "each keeps its exact shape, inputs included")
    lc.add_argument("--min-keep", action="append", default=[], metavar="GLOB=R",
                    help="keep at least fraction R of the channels of the layers GLOB matches (repeatable), "
                         "e.g. 'layer1.*=0.75'")
    p.add_argument("--out", required=True, help="output folder")
    g = p.add_argument_group("method options (each applies to the methods named in its help)")
    for flag, kw in _method_options():
        g.add_argument(flag, **kw)
    p.set_defaults(func=run)


def method_kwargs(args: argparse.Namespace, method: str, target_macs: float | None) -> dict:
    """The options of ``args`` that ``method`` declares (:attr:`~slimcnn.methods.base.Method.options`) and the
    user set, with the run's ``target_macs`` (the user's, else the default; None under a latency goal) unless the
    user set none and another of the method's ``targets`` gives the budget instead."""
    from ..methods import method_class

    cls = method_class(method)
    kw = {k: v for k, v in vars(args).items() if k in cls.options and v is not None}
    kw.pop("target_latency", None)  # the raw text: run() passes the parsed goal
    kw["target_macs"] = target_macs
    if args.target_macs is None and any(k in kw for k in cls.targets - {"target_macs"}):
        del kw["target_macs"]  # a default is no request: the method's own budget option (C-SGD's --rounds) stands
    return kw


def run(args: argparse.Namespace) -> int:
    from .. import methods
    from ..compress import plan_run
    from ..graph.policy import parse_min_keep

    # the run is checked first (task, budget split, layer control, the options below): a run that cannot do what
    # it was asked fails before loading or writing anything
    if args.split is not None:  # a stack's option: refused for a single method, or outside (0, 1)
        from ..methods.stack import check_split

        check_split(args.split, args.method)
    if args.round_to is not None:
        from ..graph.targeting import check_round_to

        check_round_to(args.round_to)
        if "round_to" not in methods.method_class(args.method).options:
            raise ValueError(f"{args.method} does not take --round-to")
    goal = latency_goal(args)
    target_macs = args.target_macs if args.target_macs is not None or goal else DEFAULT_TARGET_MACS
    plan = plan_run(methods.method_class(args.method), args.epochs, args.method_epochs, target_macs=target_macs,
                    lr=args.lr, method_lr=args.method_lr, weight_decay=args.weight_decay, schedule=args.schedule,
                    seed=args.seed, device=args.device, amp=args.amp, out_dir=args.out,
                    latency_batches=args.latency_batch, distill=args.distill, kd_alpha=args.kd_alpha,
                    kd_temperature=args.kd_temperature, ema=args.ema, bn_recalib=args.bn_recalib,
                    latency=not args.no_latency, latency_budget_s=args.latency_budget,
                    latency_backend="onnxruntime" if args.latency_backend == "onnxruntime" else "eager",
                    exclude=list(args.exclude), min_keep=dict(parse_min_keep(t) for t in args.min_keep),
                    round_to=args.round_to, task=args.task)
    from ..engine import distributed

    rank, world = distributed.init_distributed(args.device)
    try:
        # under torchrun the other ranks work as hard but stay quiet: rank 0 alone prints (and writes)
        with open(os.devnull, "w") as quiet, (contextlib.redirect_stdout(quiet) if rank else contextlib.nullcontext()):
            _compress_and_report(args, plan, rank, world, goal)
        distributed.barrier()  # the other ranks wait for rank 0's timing and writing before leaving the group
    finally:
        distributed.cleanup()
    return 0


def _compress_and_report(args: argparse.Namespace, plan, rank: int, world: int, goal=None) -> None:
    from .. import methods
    from ..compress import compress
    from .eval import data_loaders

    loaders = data_loaders(args, ("train", "test"), rank, world)  # the train split is sharded over the ranks
    adopt_num_classes(args, loaders)
    model = build_model(args)
    shape = _input_shape(args, loaders["test"])
    info = {"command": "slimcnn " + " ".join(shlex.quote(a) for a in sys.argv[1:]), "data": args.data,
            "weights": args.weights}
    cfg = plan.cfg  # the latency fit below sets its MACs target (and alignment) in place
    if goal and not methods.plans_latency(args.method):
        goal = _latency_as_macs(args, cfg, model, shape, goal, info, loaders["train"])
    method = methods.create(args.method, **method_kwargs(args, args.method, cfg.target_macs),
                            **({"target_latency": goal} if goal else {}), **deploy_option(args))
    _, report = compress(model, method, loaders["train"], loaders["test"], shape, plan, args.model, info)
    print_summary(report)
    print(f"wrote {args.out}/model.safetensors, report.json, report.md")


def _latency_as_macs(args: argparse.Namespace, cfg, model, shape: tuple[int, ...], goal, info: dict,
                     train_loader) -> None:
    """--target-latency for a method that decides its widths by training or by its own search: the MACs ratio at
    which a uniformly pruned net of aligned widths measures the goal (:func:`~slimcnn.graph.latency.macs_for_latency`)
    is the first guess (``uniform_macs_ratio``); then the method's own net, built with no training, is probed and
    the target corrected until it measures the goal (:func:`~slimcnn.latency_fit.fit_macs_to_latency`). Widths in
    multiples of --round-to (default 8); rank 0's figure on every rank. Returns None: the method itself takes no
    latency goal."""
    import json

    import torch

    from .. import methods
    from ..compress import prepare_kwargs
    from ..engine import distributed
    from ..graph.latency import LatencyGoal, macs_for_latency
    from ..latency_fit import fit_macs_to_latency

    round_to = args.round_to or 8
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0))
    macs, record = macs_for_latency(model, x, goal, round_to)
    print(f"latency target {goal} ({goal.backend}, batch {goal.batch}): a uniform net of widths in multiples of "
          f"{round_to} measured {record['search_ratio']:.3f} of the base at {macs:.3f} of its MACs")
    cls = methods.method_class(args.method)
    if "round_to" in cls.options:
        args.round_to = cfg.round_to = round_to
    record["uniform_macs_ratio"] = record["macs_ratio"]
    ratio_goal = LatencyGoal(record["target_ratio"], "ratio", goal.backend, goal.batch, goal.threads)
    macs, record["fit"] = fit_macs_to_latency(
        lambda m: methods.create(args.method, **method_kwargs(args, args.method, m), **deploy_option(args)),
        model, x.repeat(2, 1, 1, 1), ratio_goal, macs, prepare_kwargs(cls, cfg, train_loader))
    macs, record = json.loads(distributed.gather_strings(json.dumps([macs, record]))[0])
    cfg.target_macs = record["macs_ratio"] = macs
    info["latency_target"] = record
    print(f"{args.method} compresses to {macs:.3f} of the MACs")
    return None


def deploy_option(args: argparse.Namespace) -> dict:
    """``{"deploy": Deploy(...)}`` for a method that plans on the deploy runtime (TRP, a stack ending in it): the
    run's --latency-backend at its first --latency-batch (the deploy batch, as for --target-latency) with torch's
    threads; empty with --no-latency-plan."""
    import torch

    from ..backends import check_backend
    from ..methods import method_class
    from ..methods.factor_timing import Deploy

    if args.no_latency_plan or "deploy" not in method_class(args.method).options:
        return {}
    return {"deploy": Deploy(check_backend(args.latency_backend), args.latency_batch[0], torch.get_num_threads())}


def _input_shape(args: argparse.Namespace, test_loader) -> tuple[int, ...]:
    """The (C, H, W) the model is profiled, timed and traced at; a segmentation model at its data's frame size
    (MACs grow with the pixels, so the target must be met at the size it runs at)."""
    if args.task == "segmentation" and not args.input:
        return (3, *test_loader.data.images.shape[1:3])
    return input_shape(args)


def latency_goal(args: argparse.Namespace):
    """The run's :class:`~slimcnn.graph.latency.LatencyGoal` (None without --target-latency), checked before anything
    loads."""
    import torch

    from .. import methods
    from ..backends import check_backend
    from ..graph.latency import LatencyGoal, parse_latency_target

    if args.target_latency is None:
        return None
    if args.target_macs is not None:
        raise ValueError("--target-latency and --target-macs are two budgets for one width plan: give one (the report "
                         "gives the MACs of a latency-targeted run)")
    value, unit = parse_latency_target(args.target_latency)
    return LatencyGoal(value, unit, check_backend(args.latency_backend), args.latency_batch[0],
                       torch.get_num_threads())


def print_summary(report: dict) -> None:
    b, c = report["base"], report["compressed"]
    key = report.get("metric", "top1")
    lat = report["latency_ms"] or {"batch": [], "base": [], "compressed": [], "ratio": []}
    print(f"{'':<12}{'MACs':>10}{'params':>10}{'mIoU' if key == 'miou' else 'top-1':>8}"
          + "".join(f"{'ms b=' + str(n):>12}" for n in lat["batch"]))
    for label, row in (("base", b), ("compressed", c)):
        print(f"{label:<12}{row['macs'] / 1e6:>9.2f}M{row['params'] / 1e6:>9.3f}M{row[key]:>8.2f}"
              + "".join(f"{v:>12.2f}" for v in lat[label]))
    print(f"macs_ratio: {report['macs_ratio']:.4f}  {key}_change: {report[key + '_change']:+.2f}  "
          f"latency_ratio: {', '.join(f'{r:.3f}' for r in lat['ratio']) or 'not timed'}")
    for st in report.get("stages") or []:  # a stack's stages
        top = f"top-1 {st['top1']:.2f}" if st.get("top1") is not None else "top-1 not measured"
        print(f"stage {st['stage']} {st['method']}: MACs ratio {st['macs_ratio']:.4f}  {top}  "
              f"{st['epochs']} epoch(s)  {st['time_s']:.0f} s")
    if report.get("ddp"):
        d = report["ddp"]
        print(f"ddp: {d['world_size']} ranks, " + ("identical models on every rank" if d["ranks_identical"]
                                                   else "the ranks ended with DIFFERENT models"))
    lt = report.get("latency_target")
    if lt:
        predicted, measured = lt.get("predicted_ratio") or float("nan"), lt.get("measured_ratio", float("nan"))
        print(f"latency target {lt['target']} ({lt['backend']}, batch {lt['batch']}, {lt['threads']} thread(s)): "
              f"predicted {predicted:.3f}, measured {measured:.3f}")
    budget = report.get("epoch_budget") or {}
    if "plan" in budget:
        print(f"budget: {budget['total_epochs']} epoch(s): {budget['plan']}")
