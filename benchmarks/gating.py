"""Feedback gating comparisons (issue 7), every row trained with the same budget through ``slimcnn.engine``.

cifar:  ResNet-20 vs ResNet-20 + RIG vs ResNet-32 / 44 / 56 on the CIFAR-10 JPEG set. By default each row
        starts from its public checkpoint (``--init pretrained``; the RIG gates start fresh) and is fine-tuned
        for the same number of epochs on the same images; ``--init scratch`` trains every row from scratch.
camvid: the segmentation encoder-decoder with DIG variants none / cascaded / same_stage / previous_stage /
        top_only, from scratch, same epochs; mIoU on val and test. previous_stage is RIGNet's top-down gating
        (RIG with gate_source="next"), top_only is RIG with gate_source="top".

Ablations (issue 18) are rows with options: ``resnet20+rig:bn=per_iter,T=3`` (per-iteration BN, three
iterations), ``previous_stage:init=open``, ``none:width=0.68`` (a wider feed-forward net, e.g. of a DIG's MACs);
see ``--rows``. Every row reports MACs (all iterations counted), params, the metric before and after training,
the gates' mean and spread at the last iteration (:func:`slimcnn.gating.collect_gate_stats`, on test) and the
training wall time. Rows are written to ``<out>/gating_<task>.json`` (or ``--name``; merged by row name, so a
long run can be split with ``--rows``) and a markdown table beside it.

    python benchmarks/gating.py cifar --epochs 2
    python benchmarks/gating.py camvid --epochs 40 --rows none,cascaded:bn=per_iter,none:width=0.68
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from common import DATA, RESULTS, add_data_args, checkpoint, command, environment, write_json  # first: slimcnn

import torch

from slimcnn.gating import collect_gate_stats  # importing slimcnn.gating registers the wrappers and seg models
from slimcnn.data import cifar10_loaders
from slimcnn.data.camvid import camvid_loaders
from slimcnn.engine import TrainConfig, evaluate, train
from slimcnn.models import create, load_checkpoint
from slimcnn.profile import profile
from slimcnn.report import atomic_write_text

#: row name -> (zoo model, create() keywords); a pretrained row starts from its zoo model's public checkpoint
CIFAR_ROWS: dict[str, tuple[str, dict[str, Any]]] = {
    "resnet20": ("cifar_resnet20", {}),
    "resnet20+rig": ("cifar_resnet20", {"gating": "rig"}),
    "resnet32": ("cifar_resnet32", {}),
    "resnet44": ("cifar_resnet44", {}),
    "resnet56": ("cifar_resnet56", {}),
}
CAMVID_ROWS: dict[str, dict[str, Any]] = {
    "none": {"gating": "dig", "variant": "none"},
    "cascaded": {"gating": "dig", "variant": "cascaded"},
    "same_stage": {"gating": "dig", "variant": "same_stage"},
    "previous_stage": {"gating": "dig", "variant": "previous_stage"},
    "top_only": {"gating": "dig", "variant": "top_only"},
}
#: short option names of an ablation row, ``row:key=value,...`` (``resnet20+rig:bn=per_iter,T=3``) -> create() keyword
ROW_OPTIONS: dict[str, str] = {"T": "iterations", "bn": "bn", "init": "gate_init", "source": "gate_source",
                               "stages": "gate_stages", "type": "gate_type", "width": "width"}
# RIG on the segmentation encoder is no extra row: RIG(gate_source="next") builds exactly DIG "previous_stage"
# and RIG(gate_source="top") exactly DIG "top_only" (same modules, same outputs; tests/test_gating_dig.py)


def parse_row(spec: str, table: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """``"resnet20+rig:bn=per_iter,T=3"`` -> (``"resnet20+rig"``, ``{"bn": "per_iter", "iterations": 3}``).

    The row's name in the results is the whole spec, so every ablation setting is its own row.

    >>> parse_row("previous_stage:T=3,stages=1;2", CAMVID_ROWS)
    ('previous_stage', {'iterations': 3, 'gate_stages': '1,2'})
    >>> parse_row("resnet20+rig:colour=red", CIFAR_ROWS)
    Traceback (most recent call last):
    ...
    ValueError: row 'resnet20+rig:colour=red': unknown option 'colour'; known: T, bn, init, source, stages, type, width
    """
    base, _, opts = spec.partition(":")
    if base not in table:
        raise ValueError(f"unknown row {base!r}; known: {', '.join(table)}")
    kw: dict[str, Any] = {}
    for item in filter(None, opts.split(",")):
        key, eq, value = item.partition("=")
        if key not in ROW_OPTIONS or not eq:
            raise ValueError(f"row {spec!r}: unknown option {key!r}; known: {', '.join(ROW_OPTIONS)}")
        kw[ROW_OPTIONS[key]] = int(value) if key == "T" else float(value) if key == "width" else value.replace(";", ",")
    camvid = table is CAMVID_ROWS
    base_kw = table[base] if camvid else table[base][1]
    if "width" in kw and not camvid:
        raise ValueError(f"row {spec!r}: width= applies to the camvid rows only")
    if base_kw.get("gating") is None or base_kw.get("variant") == "none":
        if set(kw) - {"width"}:
            raise ValueError(f"row {spec!r}: {base} has no feedback gating; "
                             + ("only width= applies to it" if camvid else "it takes no options"))
    return base, kw


def split_rows(text: str) -> list[str]:
    """Split a ``--rows`` list on commas, keeping a row's own ``key=value`` options with it.

    >>> split_rows("none,cascaded:bn=per_iter,T=3,previous_stage")
    ['none', 'cascaded:bn=per_iter,T=3', 'previous_stage']
    """
    rows: list[str] = []
    for token in filter(None, text.replace(" ", "").split(",")):
        if "=" in token and ":" not in token and rows:
            rows[-1] += "," + token
        else:
            rows.append(token)
    return rows


def gate_summary(stats: dict[str, Any]) -> str:
    """``"s0 0.93±0.04, s1 0.71±0.20"``: each gated stage's gate mean and std at the last iteration."""
    parts = []
    for stage, per_t in stats.items():
        last = per_t[max(per_t, key=int)]
        parts.append(f"s{stage} {last['mean']:.2f}±{last['std']:.2f}")
    return ", ".join(parts) or "-"


def run_row(name: str, build: Callable[[], torch.nn.Module], loaders: dict, cfg: TrainConfig, task: str,
            input_shape: tuple[int, ...], eval_splits: list[str]) -> dict[str, Any]:
    """Build, profile, evaluate, train, evaluate again: one table row."""
    torch.manual_seed(cfg.seed)
    model = build()
    prof = profile(model, input_shape)
    print(f"[{name}] {prof.summary()}", file=sys.stderr)
    before = {s: evaluate(model, loaders[s], task, progress=cfg.progress) for s in eval_splits}
    t0 = time.perf_counter()
    result = train(model, loaders["train"], cfg)
    seconds = time.perf_counter() - t0
    after = {}
    for s in eval_splits:  # the gates' statistics are those of the last split (test)
        with collect_gate_stats(result.model) as stats:
            after[s] = evaluate(result.model, loaders[s], task, progress=cfg.progress)
    # the same trained weights without feedback: a gated model's backbone alone is its first iteration, so the gap
    # to `after` is what the iterations after the first add
    first = ({s: evaluate(result.model.backbone, loaders[s], task, progress=cfg.progress) for s in eval_splits}
             if getattr(result.model, "gates", None) else None)
    key = "miou" if task == "segmentation" else "top1"
    print(f"[{name}] {key} " + ", ".join(f"{s} {before[s][key]:.2f} -> {after[s][key]:.2f}" for s in eval_splits)
          + f"  ({seconds:.0f} s)", file=sys.stderr)
    return {"macs": prof.macs, "params": prof.params, "before": before, "after": after,
            "train_seconds": round(seconds, 1), "steps": result.steps, "history": result.history,
            "gate_stats": stats.result(), "after_first_iteration": first}


def cifar(args: argparse.Namespace) -> tuple[dict, dict]:
    loaders = cifar10_loaders(args.data, batch_size=args.batch_size, train_limit=args.train_limit,
                              test_limit=args.test_limit, seed=args.seed)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                      max_steps=args.max_steps, progress=not args.quiet)
    rows = {}
    for name, (base, opts) in args.rows.items():
        model_name, kw = CIFAR_ROWS[base]
        if kw.get("gating"):
            kw = {**kw, "iterations": args.iterations, "gate_type": args.gate_type or "both", **opts}

        def build(model_name=model_name, kw=kw):
            m = create(model_name, **kw)
            if args.init == "pretrained":
                load_checkpoint(m, checkpoint(model_name, args.weights_dir))  # a gated model maps it under backbone.
            return m

        rows[name] = {"model": model_name, "kwargs": kw, **run_row(name, build, loaders, cfg, "classification",
                                                                     (3, 32, 32), ["test"])}
    settings = {"task": "cifar", "data": str(args.data), "init": args.init, "gate_type": args.gate_type,
                "iterations": args.iterations, "epochs": args.epochs, "lr": args.lr,
                "weight_decay": args.weight_decay, "batch_size": args.batch_size, "train_limit": args.train_limit,
                "test_limit": args.test_limit, "seed": args.seed, "max_steps": args.max_steps}
    return settings, rows


def camvid(args: argparse.Namespace) -> tuple[dict, dict]:
    size = tuple(int(v) for v in args.size.split(","))
    loaders = camvid_loaders(args.data, batch_size=args.batch_size, size=size, train_limit=args.train_limit,
                             test_limit=args.test_limit, seed=args.seed, scale=(0.75, 1.25))
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, seed=args.seed,
                      max_steps=args.max_steps, task="segmentation", warmup_epochs=min(1, args.epochs),
                      progress=not args.quiet)
    rows = {}
    for name, (base, opts) in args.rows.items():
        kw = {"num_classes": 11, "width": args.width, **CAMVID_ROWS[base]}
        if base != "none":
            kw.update(iterations=args.iterations, gate_type=args.gate_type or "spatial")
        kw.update(opts)

        def build(kw=kw):
            return create(args.model, **kw)

        rows[name] = {"model": args.model, "kwargs": kw, **run_row(name, build, loaders, cfg, "segmentation",
                                                                     (3, *size), ["val", "test"])}
    settings = {"task": "camvid", "data": str(args.data), "model": args.model, "width": args.width, "size": size,
                "gate_type": args.gate_type, "iterations": args.iterations, "epochs": args.epochs, "lr": args.lr,
                "weight_decay": args.weight_decay, "batch_size": args.batch_size, "train_limit": args.train_limit,
                "test_limit": args.test_limit, "seed": args.seed, "max_steps": args.max_steps}
    return settings, rows


def markdown(task: str, doc: dict) -> str:
    s = doc["settings"]
    # one line per distinct command, with the rows it ran written as <row>: each row's own command is in the JSON
    commands = list(dict.fromkeys(re.sub(r"--rows \S+", "--rows <row>", r.get("command", doc["command"]))
                                  for r in doc["rows"].values()))
    lines = [f"# Feedback gating: {task}", "",
             *(f"Command: `{c}`  " for c in commands), f"Budget: {s['epochs']} epoch(s) per row, batch {s['batch_size']}, "
             f"lr {s['lr']} (cosine), same data and seed for every row. Machine: {doc['environment']['processor'] or doc['environment']['machine']}, "
             f"{doc['environment']['torch_threads']} torch threads.  ",
             "MACs: conv/linear multiply-accumulates per image (`slimcnn.profile`), every feedback iteration counted.",
             ""]
    if task == "cifar":
        lines.insert(-1, f"Start: {'each row from its public checkpoint (RIG gates fresh)' if s['init'] == 'pretrained' else 'from scratch'}; "
                         f"RIG: T={s['iterations']}, gate type {s['gate_type'] or 'both'}.")
    lines.insert(-1, "Row options (`row:key=value`, unset ones as above; shared BN, `default` gate init and the next stage "
                     "as gate source unless set): T = iterations, bn = BatchNorm shared | per_iter, init = gate init, "
                     "source = gate source, stages = gated stages (0 = lowest), width = encoder width. "
                     "Gates: mean±std of every gate value at the last iteration on the test split, per gated stage.")
    if task == "cifar":
        lines += ["| row | MACs (M) | params (M) | top-1 before | top-1 after | iteration 1 alone | gates at T (mean±std) | train s |",
                  "|---|---:|---:|---:|---:|---:|---|---:|"]
        for name, r in doc["rows"].items():
            first = (r.get("after_first_iteration") or {}).get("test", {}).get("top1")
            lines.append(f"| {name} | {r['macs'] / 1e6:.2f} | {r['params'] / 1e6:.3f} | "
                         f"{r['before']['test']['top1']:.2f} | {r['after']['test']['top1']:.2f} | "
                         f"{'-' if first is None else f'{first:.2f}'} | "
                         f"{gate_summary(r.get('gate_stats', {}))} | {r['train_seconds']:.0f} |")
    else:
        lines += ["| variant | MACs (G) | params (M) | mIoU val | mIoU test | pixel acc test | iteration 1 alone: mIoU val / test | gates at T (mean±std) | train s |",
                  "|---|---:|---:|---:|---:|---:|---|---|---:|"]
        alias = {"previous_stage": "previous_stage (= RIG)", "top_only": "top_only (= RIG, top source)"}
        for name, r in doc["rows"].items():
            a, f1 = r["after"], r.get("after_first_iteration")
            first = f"{f1['val']['miou']:.2f} / {f1['test']['miou']:.2f}" if f1 else "-"
            lines.append(f"| {alias.get(name, name)} | {r['macs'] / 1e9:.3f} | {r['params'] / 1e6:.3f} | {a['val']['miou']:.2f} | "
                         f"{a['test']['miou']:.2f} | {a['test']['pixel_acc']:.2f} | {first} | "
                         f"{gate_summary(r.get('gate_stats', {}))} | {r['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("task", choices=["cifar", "camvid"])
    add_data_args(p, None, weights=True)
    p.add_argument("--rows", default=None,
                   help="comma list of rows to run (default: all); a row may set gating options: "
                        "'resnet20+rig:bn=per_iter,T=3,init=open,source=top,stages=1,type=both', "
                        "'cascaded:bn=per_iter', 'none:width=0.68' (stages: ';' between several); results merge by name")
    p.add_argument("--epochs", type=int, default=None, help="default: 2 (cifar), 40 (camvid)")
    p.add_argument("--lr", type=float, default=None, help="default: 0.02 (cifar, fine-tune), 0.05 (camvid)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 (cifar), 8 (camvid)")
    p.add_argument("--train-limit", type=int, default=None)
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--max-steps", type=int, default=None, help="stop each row early (smoke tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", choices=["pretrained", "scratch"], default="pretrained", help="cifar rows' start")
    p.add_argument("--model", default="seg_resnet10", help="camvid: segmentation model")
    p.add_argument("--width", type=float, default=0.5, help="camvid: encoder width multiplier")
    p.add_argument("--size", default="180,240", help="camvid: H,W")
    p.add_argument("--gate-type", default=None, help="gate type of the feedback rows (default: both for cifar, "
                                                     "spatial for camvid)")
    p.add_argument("--iterations", type=int, default=2, help="iterations T of the feedback rows (default 2)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--name", default=None, help="results file stem (default: gating_<task>); rows merge within it")
    args = p.parse_args(argv)
    cifar_task = args.task == "cifar"
    args.data = args.data or str(DATA["cifar10" if cifar_task else "camvid"])
    args.epochs = args.epochs or (2 if cifar_task else 40)
    args.lr = args.lr or (0.02 if cifar_task else 0.05)
    args.batch_size = args.batch_size or (128 if cifar_task else 8)
    table = CIFAR_ROWS if cifar_task else CAMVID_ROWS
    try:  # row name -> (table row, its options), parsed once here so that a bad row stops before any work
        args.rows = {r: parse_row(r, table) for r in split_rows(args.rows)} if args.rows else {
            r: (r, {}) for r in table}
    except ValueError as e:
        p.error(str(e))
    if args.threads:
        torch.set_num_threads(args.threads)

    settings, rows = (cifar if cifar_task else camvid)(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{args.name or 'gating_' + args.task}.json"
    doc = {"settings": settings, "rows": {}}
    if json_path.is_file():
        old = json.loads(json_path.read_text())
        if old.get("settings") == json.loads(json.dumps(settings)):
            doc["rows"] = old["rows"]  # same settings: add to the rows already measured
        else:
            print(f"note: {json_path} was written with other settings; replacing it", file=sys.stderr)
    doc["command"] = command("gating.py", argv)
    for r in rows.values():
        r["command"] = doc["command"]
    doc["rows"].update(rows)
    doc["environment"] = environment()
    write_json(json_path, doc)
    table_md = markdown(args.task, doc)
    atomic_write_text(json_path.with_suffix(".md"), table_md)
    print(table_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
