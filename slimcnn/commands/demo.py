"""``slimcnn demo``: the main job end to end on the embedded default (no arguments, no downloads).

Public ResNet-20 checkpoint + a 1,500/1,000-image class-balanced CIFAR-10 subset shipped in the package:
evaluate, compress to 50% MACs with every method and both peers under one small epoch budget, print a
side-by-side table with a one-line reading, and write a report and a widths PNG per method.

The demo budgets steps, not quality: every row gets the same ``--epochs`` (2) on the 1,500 embedded images at
batch 32 (94 steps), split by each method's recipe as ``slimcnn compress`` splits it. Three settings differ from
``compress``'s defaults so that a two-minute run still shows each method as it is meant to work, each chosen
with l1 on this subset (2 fine-tune epochs; on its test images, which issue 36 re-checks on a validation split):
- distillation from the uncompressed base (``--distill``, alpha 0.7, T 4) in every row: on 1,500 images the
  teacher's soft labels are worth more than the hard ones, by many points;
- SGD momentum 0.5: far above momentum 0.9 with distillation at either learning rate tried; and C-SGD's
  merge is exact only after ``CSGD.min_steps()`` centripetal steps, 375 at momentum 0.9 but 57 at 0.5 (a
  cluster's spread shrinks at best by sqrt(momentum) per step), so at 0.9 its 94 steps would end in a lossy
  merge (reported as such, with a warning). 94 steps still leave it short: its kernels meet (1e-8) but the BN
  running statistics forget old differences at 0.9 per step (~130 steps), so the demo's C-SGD merge is reported
  lossy with a change of ~0.07 in the logits;
- latency timed for 0.5 s per batch size instead of 5, and 20 batches of BatchNorm recalibration instead of 100
  (ratios on a 2-core machine are noisy either way; see ``benchmarks/`` for the interleaved timings);
- each compressed model scored once, at the end (``stage_evals=False``): the scores before finalize, raw after it
  and after recalibration were 12 of the demo's 19 evaluations of the 1,000 test images, ~14 s of 137 s.
The rows run one after the other and share what does not depend on the method (``compress(..., memo=)``): the
base's evaluation and the teacher's logits for each batch (every row sees the same augmented batches). Two rows
at a time in processes of one thread each was slower on 2 cores (172 s against ~150 s for one row at a time with
two threads before this sharing). The ModelOpt peer is not in the
default rows: its FastNAS search alone took 144 s on 2 idle cores (100 score images; 1,000 take longer), more than
the whole demo's budget; ``--methods l1,tp,modelopt`` adds it (173 s for its row).
"""
from __future__ import annotations

import argparse
import importlib.util

DEFAULT_METHODS = "l1,tp,csgd,dagger,trp"


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the main job on the embedded default (ResNet-20, CIFAR-10 subset)",
                       description="Evaluate the public ResNet-20 on an embedded CIFAR-10 subset, compress it to "
                                   "50%% MACs with every method and both peers under one small epoch budget, print "
                                   "a side-by-side table and write a report and a PNG per method. About 2 minutes "
                                   "on 2 idle CPU cores (the README gives the measured time).")
    p.add_argument("--methods", default=DEFAULT_METHODS,
                   help=f"comma list of methods to run side by side (default: {DEFAULT_METHODS}: every method and "
                        "the Torch-Pruning peer; add modelopt for the ModelOpt peer, about 3 more minutes)")
    p.add_argument("--target-macs", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=2,
                   help="the epoch budget of every row on the 1,500 embedded training images, split by each "
                        "method's recipe as in `slimcnn compress` (default 2)")
    p.add_argument("--out", default="runs/demo", help="output folder (reports, models, PNG)")
    p.set_defaults(func=run)


def _modelopt_installed() -> bool:
    return importlib.util.find_spec("modelopt") is not None


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from .. import methods
    from ..compress import compress, plan_run
    from ..data import Loader, load_demo
    from ..data.embedded import DEMO_WEIGHTS
    from ..methods import method_class
    from ..methods.factor_timing import Deploy
    from ..models import create, load_checkpoint
    from .compress import print_summary

    t0 = time.time()
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "modelopt" in names and not _modelopt_installed():
        print('note: skipping the modelopt row: NVIDIA ModelOpt is not installed (pip install -e ".[peers]")')
        names.remove("modelopt")
    # an unknown method or a budget a method cannot use: one line before any work
    plans = {name: plan_run(method_class(name), args.epochs, target_macs=args.target_macs, lr=0.01, momentum=0.5,
                            distill=True, out_dir=str(Path(args.out) / name), latency_batches=[1, 128],
                            latency_repeats=5, latency_budget_s=0.5, bn_recalib=20, stage_evals=False)
             for name in names}
    base = load_checkpoint(create("cifar_resnet20"), DEMO_WEIGHTS)
    train = Loader(load_demo("train"), batch_size=32, shuffle=True, augment=True, seed=0)
    test = Loader(load_demo("test"), batch_size=500)
    import torch

    print("slimcnn demo: public CIFAR-10 ResNet-20, embedded subset (1,500 train / 1,000 test JPEG images); every "
          f"row: {args.epochs} epochs at batch 32, distilled from the base, SGD momentum 0.5; "
          f"{torch.get_num_threads()} torch thread(s)")
    memo: dict = {}  # the base's evaluation and the teacher's logits, shared by the rows
    summary = []
    for name in names:
        # momentum 0.5 and distillation in every row: measured in the module docstring
        # TRP plans for the first batch the demo times (eager, batch 1): a layer is factorised only where faster
        deploy = ({"deploy": Deploy("eager", 1, torch.get_num_threads())}
                  if "deploy" in method_class(name).options else {})
        method = methods.create(name, target_macs=args.target_macs, **({"momentum": 0.5} if name == "csgd" else {}),
                                **deploy)
        method_epochs, finetune_epochs = plans[name].cfg.method_epochs, plans[name].cfg.epochs
        _, report = compress(base, method, train, test, (3, 32, 32), plans[name], "cifar_resnet20",
                             {"command": "slimcnn demo", "data": "embedded cifar10-demo subset"}, memo=memo)
        print(f"\n== {name}: target {args.target_macs:.0%} MACs, {method_epochs} method + {finetune_epochs} "
              f"fine-tune epoch(s) (top-1 on the 1,000 embedded test images), {report['wall_s']:.0f} s")
        print_summary(report)
        print(f"report: {Path(args.out) / name / 'report.md'}  plot: {Path(args.out) / name / 'widths.png'}")
        summary.append(report)
    if len(summary) > 1:
        _print_table(summary, args.target_macs)
    print(f"\ndemo finished in {time.time() - t0:.0f} s")
    return 0


def _print_table(summary: list[dict], target: float) -> None:
    print(f"\n== side by side (same base, {target:.0%} MACs target, 1,000 embedded test images; a tiny budget: "
          "see benchmarks/ for full-data results)")
    timed = {tuple((r["latency_ms"] or {}).get("batch") or []) for r in summary}
    # the batches actually timed (the latency budget may shrink the largest), not the ones asked for
    first, last = (f"b={t[0]}", f"b={t[-1]}") if len(timed) == 1 and all(timed) else ("first b", "last b")
    print(f"{'method':<10}{'MACs':>10}{'top-1':>8}{'change':>8}{'latency ' + first:>17}{last:>8}{'wall s':>8}")
    for r in summary:
        lat = r["latency_ms"] or {}
        ratio = lat.get("ratio") or [float("nan")]
        mark = "  SLOWER than the base" if _slower(r) else ""
        if len(timed) > 1:
            mark += f"  (timed b={','.join(map(str, lat.get('batch', [])))})"
        print(f"{r['method']:<10}{r['compressed']['macs'] / 1e6:>9.2f}M{r['compressed']['top1']:>8.2f}"
              f"{r['top1_change']:>+8.2f}{ratio[0]:>17.3f}{ratio[-1]:>8.3f}{r['wall_s']:>8.1f}{mark}")
    print(f"{'base':<10}{summary[0]['base']['macs'] / 1e6:>9.2f}M{summary[0]['base']['top1']:>8.2f}"
          f"{'':>8}{1.0:>17.3f}{1.0:>8.3f}")
    print(reading(summary))


def _slower(row: dict) -> bool:
    """Slower than the base at any timed batch (latency ratio above 1)."""
    return any(r > 1.0 for r in ((row.get("latency_ms") or {}).get("ratio") or []))


def reading(summary: list[dict]) -> str:
    """One line under the table: the best row among those faster than the base at every timed batch, the best
    peer among those, and any row that is slower than the base, missed the target or merged lossily.

    >>> rows = [{"method": "trp", "macs_ratio": 0.5, "compressed": {"top1": 80.0}, "top1_change": -3.0,
    ...          "latency_ms": {"ratio": [1.2, 0.9]}},
    ...         {"method": "l1", "macs_ratio": 0.5, "compressed": {"top1": 70.0}, "top1_change": -13.0,
    ...          "latency_ms": {"ratio": [0.8, 0.7]}}]
    >>> reading(rows)
    'reading: best top-1 among nets faster than the base is l1 (70.00, -13.00 vs the base, 0.50 MACs); slower than the base at a timed batch: trp.'
    """
    peers = {"tp", "modelopt"}
    faster = [r for r in summary if not _slower(r)]
    slower = [r["method"] for r in summary if _slower(r)]
    if faster:
        best = max(faster, key=lambda r: r["compressed"]["top1"])
        line = (f"reading: best top-1 among nets faster than the base is {best['method']} "
                f"({best['compressed']['top1']:.2f}, {best['top1_change']:+.2f} vs the base, "
                f"{best['macs_ratio']:.2f} MACs)")
    else:
        line = "reading: no net is faster than the base at every timed batch"
    peer_rows = [r for r in faster if r["method"] in peers]
    ours = [r for r in faster if r["method"] not in peers]
    if peer_rows and ours:
        bp, bo = max(peer_rows, key=lambda r: r["compressed"]["top1"]), max(ours, key=lambda r: r["compressed"]["top1"])
        line += (f"; best peer {bp['method']} {bp['compressed']['top1']:.2f}, best slimcnn method {bo['method']} "
                 f"{bo['compressed']['top1'] - bp['compressed']['top1']:+.2f} points vs it")
    missed = [r["method"] for r in summary if r.get("within_tol") is False]
    lossy = [r["method"] for r in summary if (r.get(r.get("finalize_key", ""), {}) or {}).get("lossless") is False]
    if slower:
        line += f"; slower than the base at a timed batch: {', '.join(slower)}"
    if missed:
        line += f"; more than 1% off the MACs target: {', '.join(missed)}"
    if lossy:
        line += f"; lossy merge: {', '.join(lossy)}"
    return line + "."
