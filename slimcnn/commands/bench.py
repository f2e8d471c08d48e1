"""``slimcnn bench``: every method vs the Torch-Pruning peer, same base, same MACs, same epochs."""
from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from ..bench import BUDGETS, RECIPES, ROWS

    p = sub.add_parser("bench", help="side-by-side benchmark of every method and the Torch-Pruning peer",
                       description="Fine-tune the public checkpoints on the data (cached), then compress with every "
                                   "method and the peer at the same MACs targets and epoch budget; writes "
                                   "benchmarks/results/<name>.{json,md,png}. Rows already measured are kept (resume).")
    p.add_argument("--budget", choices=sorted(BUDGETS), default="smoke",
                   help="smoke: a minute-long check; cpu: ~2 h on 2 cores; paper: long recipes for a GPU")
    p.add_argument("--data", required=True, help="CIFAR-10 root (image folder or pickle layout)")
    p.add_argument("--weights-dir", required=True, help="folder with the public cifar10-resnet*.th checkpoints")
    p.add_argument("--recipe", choices=RECIPES, default="plain",
                   help="training recipe for every row alike, the peers included: plain (cross-entropy) or distill "
                        "(distillation from the uncompressed base); rows of both recipes coexist in one results file")
    p.add_argument("--rows", default=None,
                   help=f"comma list of rows (default: {', '.join(r.label for r in ROWS if r.default)}; also "
                        f"{', '.join(r.label for r in ROWS if not r.default)})")
    p.add_argument("--models", default=None, help="comma list of models (default: the budget's)")
    p.add_argument("--targets", default=None, help="comma list of MACs ratios (default: the budget's)")
    p.add_argument("--name", default=None, help="results name (default bench-<budget>)")
    p.add_argument("--work", default="runs/bench", help="folder for bases, models and per-row reports")
    p.add_argument("--results", default="benchmarks/results", help="folder for the JSON/markdown/PNG results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet-wait", type=float, default=300.0, metavar="S",
                   help="--target-latency: before each timing, wait up to S seconds for other processes to leave "
                        "the cores quiet (0: do not wait; at most 6xS over the run; the rows record the load)")
    p.add_argument("--keep-stale", action="store_true",
                   help="resume into a results file that holds rows measured with other code (another commit "
                        "whose slimcnn/ differs, or uncommitted changes): keep them, marked (stale) in the table; "
                        "without it such a file is refused")
    p.add_argument("--latency-backend", choices=["eager", "onnxruntime", "cuda"], default=None,
                   help="the deploy runtime the trp rows (and the stacks' trp stage) plan on: each layer shape is "
                        "timed whole and factorised there and factorised only where that is faster (default: "
                        "plan on MACs alone, as before)")
    p.add_argument("--latency-batch", type=int, default=1, help="the batch --latency-backend is timed at")
    p.add_argument("--target-latency", default=None, metavar="R",
                   help="every row at this latency (a ratio of the base's, e.g. 0.6) on --latency-backend (default "
                        "eager) at --latency-batch instead of at MACs targets: l1 and trp plan on latency, the other "
                        "rows and the peers get the MACs that a uniform net of widths in multiples of 8 needs, with "
                        "their own alignment at 8; all rows and the base are timed together at the end "
                        "(slimcnn/bench_latency.py)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..backends import check_backend
    from ..bench import run_bench
    from ..methods.factor_timing import Deploy

    if args.target_latency is not None:
        return _run_latency(args)
    deploy = (Deploy(check_backend(args.latency_backend), args.latency_batch, torch.get_num_threads())
              if args.latency_backend else None)
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()] if s else None  # noqa: E731
    result = run_bench(args.data, args.weights_dir, args.budget, args.name, split(args.rows), split(args.models),
                       [float(t) for t in split(args.targets)] if args.targets else None, args.work, args.results,
                       args.device, args.seed, args.recipe, deploy, args.keep_stale, _asked(args))
    print(open(f"{args.results}/{result['name']}.md").read())
    return 0


def _run_latency(args: argparse.Namespace) -> int:
    import torch

    from ..backends import check_backend
    from ..bench_latency import run_latency_bench
    from ..graph.latency import LatencyGoal, parse_latency_target

    if args.targets:
        raise ValueError("--target-latency and --targets are two budgets for one row: give one")
    value, unit = parse_latency_target(args.target_latency)
    goal = LatencyGoal(value, unit, check_backend(args.latency_backend or "eager"), args.latency_batch,
                       torch.get_num_threads())
    split = lambda s: [v.strip() for v in s.split(",") if v.strip()] if s else None  # noqa: E731
    result = run_latency_bench(args.data, args.weights_dir, goal, args.budget, args.name, split(args.rows),
                               split(args.models), args.work, args.results, args.device, args.seed, args.recipe,
                               keep_stale=args.keep_stale, asked=_asked(args), quiet_wait_s=args.quiet_wait)
    print(open(f"{args.results}/{result['name']}.md").read())
    return 0


def _asked(args: argparse.Namespace) -> dict:
    """The command's options as given (what the run was asked), for the results' ``settings``."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "command") and not callable(v)}
