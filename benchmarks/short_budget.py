"""Recipes for the methods built around training, at a short budget, chosen on the validation split (issue 39).

Each variant compresses the cpu budget's fine-tuned base (the bench's: same data half, epochs, learning rate and
plain recipe) to the MACs target and records top-1 on the validation split (what a choice is made on) and on the
test split (reported only). Variants: each method's default, Dagger with its search ended once the target held
(``hold_steps``), C-SGD merged half-way and the merged net fine-tuned (``--method-epochs``).

    python benchmarks/short_budget.py --models cifar_resnet20 --seeds 0,1,2

Results: ``benchmarks/results/short-budget-cpu.{json,md}``, resumed variant by variant (the key: model, variant,
seed); the table gives the mean over the seeds run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from common import RESULTS, add_data_args

#: name -> (method, its options, epochs with the method attached: None for its recipe's split)
VARIANTS: dict[str, tuple[str, dict[str, Any], int | None]] = {
    "dagger": ("dagger", {}, None),
    "dagger-hold30": ("dagger", {"hold_steps": 30}, None),
    "csgd": ("csgd", {}, None),
    "csgd-merge-half": ("csgd", {}, 1),
}


def run_variant(name: str, model: str, seed: int, data: str, weights: str, work: Path) -> dict[str, Any]:
    from slimcnn import methods
    from slimcnn.bench import BUDGETS, bench_loaders, fine_tuned_base
    from slimcnn.compress import compress, plan_run
    from slimcnn.report import provenance

    budget = BUDGETS["cpu"]
    method, options, method_epochs = VARIANTS[name]
    loaders = bench_loaders(data, budget, seed)
    base, key = fine_tuned_base(model, Path(weights), data, budget, work / "cpu", "cpu", seed)
    plan = plan_run(methods.method_class(method), budget.epochs, method_epochs, target_macs=budget.targets[0],
                    lr=budget.lr, seed=seed, latency=False, out_dir=str(work / "short-budget" / model / f"{name}-{seed}"))
    t0, started = time.time(), provenance()
    _, rep = compress(base, methods.create(method, target_macs=budget.targets[0], seed=seed, **options),
                      loaders["train"], loaders["test"], (3, 32, 32), plan, model, {"base_checkpoint": key},
                      val_loader=loaders["val"])
    return {"model": model, "variant": name, "seed": seed, "method": method, "options": options,
            "method_epochs": plan.cfg.method_epochs, "finetune_epochs": plan.cfg.epochs,
            "val_top1": rep["compressed"].get("val_top1"), "top1": rep["compressed"]["top1"],
            "base_val_top1": rep["base"].get("val_top1"), "base_top1": rep["base"]["top1"],
            "macs_ratio": rep["macs_ratio"], "wall_s": round(time.time() - t0, 1),
            "provenance": {"start": started, "end": provenance()}}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["# Short-budget recipes, chosen on the validation split", "",
             "cpu budget (2 epochs on the 25,000-image half, plain recipe), 0.5 MACs; mean over the seeds run. "
             "Validation: 5,000 training images outside the half (the public checkpoints trained on them, so "
             "their figures run above test); test: the full 10,000, reported only.", "",
             "| model | variant | seeds | val top-1 | test top-1 | epochs (method + fine-tune) |", "|---|---|---:|---:|---:|---|"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["variant"]), []).append(r)
    for (model, variant), rs in sorted(groups.items()):
        val = statistics.mean(r["val_top1"] for r in rs)
        test = statistics.mean(r["top1"] for r in rs)
        lines.append(f"| {model} | {variant} | {len(rs)} | {val:.2f} | {test:.2f} | "
                     f"{rs[0]['method_epochs']} + {rs[0]['finetune_epochs']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(p, weights=True)
    p.add_argument("--models", default="cifar_resnet20", help="comma-separated zoo models (default: cifar_resnet20)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p.add_argument("--work", default="runs/bench", help="where the bases and runs are kept (default: runs/bench)")
    args = p.parse_args()
    out = RESULTS / "short-budget-cpu.json"
    done = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    have = {(r["model"], r["variant"], r["seed"]) for r in done["rows"]}
    for model in args.models.split(","):
        for name in args.variants.split(","):
            for seed in map(int, args.seeds.split(",")):
                if (model, name, seed) in have:
                    continue
                done["rows"].append(run_variant(name, model, seed, args.data, args.weights_dir, Path(args.work)))
                done["command"] = "python benchmarks/short_budget.py " + " ".join(
                    f"--{k} {v}" for k, v in (("models", args.models), ("variants", args.variants),
                                              ("seeds", args.seeds)))
                out.write_text(json.dumps(done, indent=1, default=str))
                out.with_suffix(".md").write_text(markdown(done["rows"]))
                print(f"{model} {name} seed {seed}: val {done['rows'][-1]['val_top1']}  "
                      f"test {done['rows'][-1]['top1']}", flush=True)


if __name__ == "__main__":
    main()
