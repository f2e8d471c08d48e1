"""The side-by-side benchmark at one measured latency: every row, ours and the peers', asked for the same latency
on the same runtime, trained at the same budget, then all timed again together.

``slimcnn bench --target-latency R --latency-backend B --latency-batch N`` runs this instead of the MACs benchmark
(:mod:`slimcnn.bench`: same budgets, rows, bases and recipes). How each row meets the goal:
- ``l1`` and ``trp`` plan on latency themselves (``target_latency``: a latency table, TRP's factor times);
- every other row (Dagger, C-SGD, the stacks, Torch-Pruning, ModelOpt) compresses to a MACs target with its own
  alignment option at 8 (``round_to``; Torch-Pruning's ``round_to``, ModelOpt's channel divisor). The first guess
  is the MACs ratio at which the base, pruned uniformly to widths in multiples of 8, measures the goal
  (:func:`slimcnn.graph.latency.macs_for_latency`); a method that builds its net without training (the peers,
  C-SGD, Dagger's starting gates, a stack's untrained stages) then has it probed: its own compact net is built and timed at that target and
  the target corrected until it measures the goal (:mod:`slimcnn.latency_fit`); when no net at alignment 8 comes
  within 10% of the goal (its widths step over it: Torch-Pruning's uniform 16-channel stage keeps 8 or 16), the
  fit runs again at alignment 4 and the nearer alignment is kept. A trained net that still misses by more than
  10% is trained once more (a MACs row at the corrected target; ``l1``, whose own plan missed, at alignment 4),
  and the attempt nearer the goal is kept. The stacks' TRP stage plans its factorisation on the same runtime.
At the end the base and every row's saved net are timed together, interleaved, on the goal's backend and batch
(the 10th percentile of the calls, the statistic the plans were made and confirmed on; the median beside it): that
ratio is the row's measured latency, and ``within_10pct`` says whether it is within 10% of the target. Results: ``<results>/<name>.{json,md,png}``; the plot is top-1 against that measured ratio, each
point labelled with its MACs ratio.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from .bench import (BUDGETS, RECIPES, bench_loaders, check_stale, fine_tuned_base, recipe_of, row_name, save_result,
                    select_rows)
from .compress import CompressConfig, compress, plan_run
from .methods import plans_latency
from .report import environment, machine_load, provenance

#: the alignment every row with a ``round_to`` option compresses with (the measured widths were aligned to it), and
#: the finer one it falls back to when no net at the first comes within 10% of the goal (the widths step over it)
ROUND_TO, FINER = 8, 4
PEERS = ("tp", "modelopt")


def run_latency_bench(data: str, weights_dir: str, goal: Any, budget_name: str = "cpu", name: str | None = None,
                      rows: list[str] | None = None, models: list[str] | None = None, work: str = "runs/bench",
                      results: str = "benchmarks/results", device: str = "cpu", seed: int = 0,
                      recipe: str = "plain", timing_budget_s: float = 30.0, keep_stale: bool = False,
                      asked: dict[str, Any] | None = None, quiet_wait_s: float = 300.0) -> dict[str, Any]:
    """Every selected row at latency ``goal`` (a :class:`~slimcnn.graph.latency.LatencyGoal`, as a ratio), resumable:
    rows already in the results file for this goal are kept, and the final timing covers every row of the file.
    Every timing waits, up to ``quiet_wait_s`` (0: not at all; six times that over the whole run), until other
    processes leave the cores quiet (:func:`slimcnn.backends.quiet_timing`)."""
    from .backends import quiet_timing

    with quiet_timing(timeout_s=quiet_wait_s, total_s=6 * quiet_wait_s):
        return _run_latency_bench(data, weights_dir, goal, budget_name, name, rows, models, work, results, device,
                                  seed, recipe, timing_budget_s, keep_stale,
                                  asked or {"rows": rows, "models": models, "recipe": recipe, "seed": seed,
                                            "goal": vars(goal)})


def _run_latency_bench(data: str, weights_dir: str, goal: Any, budget_name: str, name: str | None,
                       rows: list[str] | None, models: list[str] | None, work: str, results: str, device: str,
                       seed: int, recipe: str, timing_budget_s: float, keep_stale: bool,
                       asked: dict[str, Any]) -> dict[str, Any]:
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    if goal.unit != "ratio":
        raise ValueError("the latency benchmark takes --target-latency as a ratio of the base's latency (e.g. 0.6)")
    budget = BUDGETS[budget_name]
    tag = f"lat{goal.value:g}-{goal.backend}-b{goal.batch}"
    name = name or f"bench-{budget_name}-{tag}"
    out_json = Path(results) / f"{name}.json"
    done = json.loads(out_json.read_text()) if out_json.is_file() else {}
    records = {(r["model"], r["row"], recipe_of(r)): r for r in done.get("rows", []) if r.get("tag") == tag}
    check_stale(list(records.values()), keep_stale, out_json)
    # one MACs figure per model for every row that gets one, kept across resumed sittings: the same for every row
    vias: dict[str, dict[str, Any]] = done.get("via", {}) if done.get("tag") == tag else {}
    selected = select_rows(rows)
    loaders = bench_loaders(data, budget, seed)
    work_dir = Path(work) / budget_name
    for model_name in models or budget.models:
        base, base_key = fine_tuned_base(model_name, Path(weights_dir), data, budget, work_dir, device, seed)
        via = vias.get(model_name)
        for row in selected:
            if (model_name, row.label, recipe) in records:
                continue
            if not plans_latency(row.method) and via is None:
                via = vias[model_name] = _macs_for_goal(base, goal)
            try:
                record = _run_row(row, model_name, base, base_key, goal, via, budget, budget_name, loaders, work_dir,
                                  tag, device, seed, recipe)
            except ValueError as e:  # this row cannot be built at this latency: say why, and go on with the others
                print(f"{row.label}: cannot run at latency {goal}: {e}")
                record = {"model": model_name, "row": row.label, "method": row.method, "budget": budget_name,
                          "recipe": recipe, "tag": tag, "goal": vars(goal), "error": str(e)}
            records[(model_name, row.label, recipe)] = record
            _write(records, name, budget_name, budget, goal, out_json, vias, tag, asked)
        _time_together([r for r in records.values() if r["model"] == model_name], base, goal, timing_budget_s)
        _write(records, name, budget_name, budget, goal, out_json, vias, tag, asked)
    return _write(records, name, budget_name, budget, goal, out_json, vias, tag, asked)


def _macs_for_goal(base: torch.nn.Module, goal: Any) -> dict[str, Any]:
    from .graph.latency import macs_for_latency

    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    return macs_for_latency(base, x, goal, ROUND_TO)[1]


def _run_row(row, model_name: str, base, base_key: str, goal, via: dict[str, Any] | None, budget, budget_name: str,
             loaders, work_dir: Path, tag: str, device: str, seed: int, recipe: str) -> dict[str, Any]:
    """Compress ``base`` with ``row`` at the goal and return its record. A row whose trained net misses the goal by
    more than 10% runs once more (:func:`_retry`) in a folder of its own; the record keeps both attempts and
    reports the one that measured nearer the goal (a choice on latency alone)."""
    from . import methods
    from .latency_fit import in_band
    from .methods.factor_timing import Deploy

    cls = methods.method_class(row.method)
    native = plans_latency(row.method)
    kw: dict[str, Any] = {**budget.method_options.get(row.method, {}), **row.kwargs}
    if "round_to" in cls.options:
        kw["round_to"] = ROUND_TO
    if not native and "deploy" in cls.options:  # a stack's trp stage plans for the same runtime
        kw["deploy"] = Deploy(goal.backend, goal.batch, goal.threads)
    plan = plan_run(cls, budget.epochs, target_macs=None, lr=budget.lr, seed=seed, device=device,
                    latency_batches=[goal.batch], latency_backend="onnxruntime" if goal.backend == "onnxruntime"
                    else "eager", distill=recipe == "distill", kd_alpha=budget.kd_alpha,
                    kd_temperature=budget.kd_temperature)
    out_dir = work_dir / model_name / f"{row.label}-{tag}{'' if recipe == 'plain' else '-' + recipe}"
    target_macs, fit = (None, None) if native else _fit_row(row.method, kw, base, goal, via, plan.cfg, loaders,
                                                             out_dir)
    info = {"command": f"slimcnn bench --budget {budget_name} --target-latency {goal.value:g} "
                       f"--latency-backend {goal.backend} --latency-batch {goal.batch}",
            "base_checkpoint": base_key, **({} if native else {"latency_target": dict(via)})}
    t0, started = time.time(), provenance()
    attempts: list[dict[str, Any]] = []
    while True:
        where = out_dir if not attempts else out_dir.with_name(f"{out_dir.name}-try{len(attempts) + 1}")
        kw.update({"target_latency": goal} if native else {"target_macs": target_macs})
        run = replace(plan, cfg=replace(plan.cfg, target_macs=target_macs, out_dir=str(where),
                                        round_to=kw.get("round_to")))
        _, rep = compress(base, methods.create(row.method, **kw), loaders["train"], loaders["test"], (3, 32, 32),
                          run, model_name, info, val_loader=loaders["val"])
        ratio = (rep.get("latency_target") or {}).get("measured_ratio")
        attempts.append({"target_macs": target_macs, "round_to": kw.get("round_to"), "macs_ratio": rep["macs_ratio"],
                         "run_ratio": ratio,
                         "top1": rep["compressed"]["top1"], "out_dir": str(where), "report": rep})
        if ratio is None or in_band(ratio, goal.value) or len(attempts) == 2:
            break
        if not _retry(row.label, native, kw, target_macs, ratio, goal):
            break
        target_macs = kw.get("target_macs")
    kept = min(attempts, key=lambda a: abs(a["run_ratio"] - goal.value) if a["run_ratio"] is not None else 0.0)
    rep = kept.pop("report")
    for a in attempts:
        a.pop("report", None)
    lt = rep.get("latency_target") or {}
    return {"model": model_name, "row": row.label, "method": row.method, "budget": budget_name, "recipe": recipe,
            "tag": tag, "goal": vars(goal), "target_ratio": lt.get("target_ratio"),
            "via": "latency plan" if native else "macs, probed" if fit else "macs", "target_macs": kept["target_macs"],
            "round_to": kept["round_to"],
            **({"probes": fit} if fit else {}), **({"attempts": attempts} if len(attempts) > 1 else {}),
            "method_epochs": plan.cfg.method_epochs, "finetune_epochs": plan.cfg.epochs, "base_top1": rep["base"]["top1"],
            "top1": rep["compressed"]["top1"], "val_top1": rep["compressed"].get("val_top1"),
            "base_val_top1": rep["base"].get("val_top1"),
            "macs": rep["compressed"]["macs"], "macs_ratio": rep["macs_ratio"],
            "params": rep["compressed"]["params"], "run_ratio": kept["run_ratio"], "out_dir": kept["out_dir"],
            "wall_s": round(time.time() - t0, 1), "test_images": rep["test_images"],
            "provenance": {"start": started, "end": provenance()}}


def _retry(label: str, native: bool, kw: dict[str, Any], target_macs: float | None, ratio: float, goal) -> bool:
    """Set ``kw`` for a second attempt after a trained net measured ``ratio``; False when there is none to make.
    A MACs row (its training moved the widths the probe saw: Dagger's gates) goes to the target scaled by the
    secant; a row on its own latency plan to the finer alignment, whose widths lie between the coarse steps."""
    from .latency_fit import next_target

    if native:
        if kw.get("round_to") != ROUND_TO:
            return False
        kw["round_to"] = FINER
        change = f"with widths aligned to {FINER}"
    else:
        kw["target_macs"] = round(next_target([(target_macs, ratio)], goal.value), 4)
        change = f"at {kw['target_macs']:.3f} of the MACs"
    print(f"{label}: the trained net measured {ratio:.3f} of the base (goal {goal.value:g}); once more {change}")
    return True


def _fit_row(method_name: str, kw: dict[str, Any], base, goal, via: dict[str, Any], cfg: CompressConfig, loaders,
             out_dir: Path) -> tuple[float, dict[str, Any]]:
    """The row's MACs target: the latency model's figure, corrected by probing the method's own compact net
    (:func:`slimcnn.latency_fit.fit_aligned`: at alignment 8, and at 4 when no net at 8 comes within 10% of the
    goal; ``kw["round_to"]`` is set to the one kept); the probe record is kept in ``out_dir`` so a resumed row does
    not probe again."""
    from . import methods
    from .compress import prepare_kwargs
    from .latency_fit import fit_aligned, fit_macs_to_latency

    cls = methods.method_class(method_name)
    saved = out_dir / "latency_fit.json"
    if saved.is_file():
        fit = json.loads(saved.read_text())
    else:
        x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        args = (base, x, goal, via["macs_ratio"], prepare_kwargs(cls, cfg, loaders["train"], val_loader=loaders["val"]))
        if "round_to" in kw:
            _, _, fit = fit_aligned(lambda a, m: methods.create(method_name, **{**kw, "round_to": a, "target_macs": m}),
                                    *args)
        else:
            fit = fit_macs_to_latency(lambda m: methods.create(method_name, **{**kw, "target_macs": m}), *args)[1]
        out_dir.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(fit, indent=1))
    if "round_to" in kw:
        kw["round_to"] = fit.get("round_to", kw["round_to"])  # a record from before the fallback: the one it used
    return fit["chosen"]["macs_target"], fit


def _time_together(rows: list[dict[str, Any]], base, goal, budget_s: float) -> None:
    """The base and every row's saved net, timed interleaved on the goal's backend and batch; each row gets
    ``final_ratio`` (10th percentile), ``final_ratio_median`` and ``within_10pct``."""
    from .backends import budgeted_repeats, last_wait, quantile, runner, time_samples
    from .graph.latency import QUANTILE
    from .io import load

    present = [r for r in rows if "out_dir" in r and (Path(r["out_dir"]) / "model.safetensors").is_file()]
    if not present:
        return
    shape = (3, 32, 32)
    runners = {"base": runner(base.eval(), shape, goal.batch, goal.backend, goal.threads)}
    runners.update({r["row"]: runner(load(r["out_dir"]).eval(), shape, goal.batch, goal.backend, goal.threads)
                    for r in present})
    repeats = budgeted_repeats(runners, budget_s)
    samples = time_samples(runners, repeats)
    ms = {k: quantile(v, QUANTILE) for k, v in samples.items()}  # the statistic every plan was made and confirmed on
    median = {k: quantile(v, 0.5) for k, v in samples.items()}
    before, after = dict(last_wait), machine_load()
    for r in present:
        r["final_ratio"] = round(ms[r["row"]] / ms["base"], 4)
        r["final_ratio_median"] = round(median[r["row"]] / median["base"], 4)
        r["within_10pct"] = abs(r["final_ratio"] - goal.value) <= 0.1 * goal.value
        r["final_timing"] = {"base_ms": round(ms["base"], 4), "repeats": repeats, "rows_timed": len(present),
                             "load_before": before, "load_after": after,
                             "statistic": f"{QUANTILE:.0%} quantile of interleaved calls (median beside it)"}


def _write(records: dict, name: str, budget_name: str, budget, goal, out_json: Path, vias: dict[str, Any],
           tag: str, asked: dict[str, Any]) -> dict[str, Any]:
    from dataclasses import asdict

    out_json.parent.mkdir(parents=True, exist_ok=True)
    result = {"name": name, "budget": budget_name, "settings": {**asdict(budget), "asked": asked},
              "goal": vars(goal), "tag": tag, "via": vias,
              "rows": list(records.values()), "environment": environment(),
              "notes": "Top-1 on the JPEG copy of CIFAR-10 (not comparable with published lossless figures); "
                       "final ratio: every row and the base timed together at the end (10th percentile of "
                       "interleaved calls; median in the JSON); run ratio: the run's own confirmation against the "
                       "base."}
    return save_result(result, out_json, latency_markdown, lambda r: plot_latency(r, out_json.with_suffix(".png")))


def best_line(rows: list[dict[str, Any]], target: float) -> str:
    """Best top-1 of ours against the best peer's, among the rows within 10% of the target latency.

    >>> best_line([{"row": "trp-spatial", "method": "trp", "top1": 87.0, "within_10pct": True},
    ...            {"row": "tp-peer", "method": "tp", "top1": 85.0, "within_10pct": True}], 0.6)
    'At latency 0.6: best of ours trp-spatial 87.00, best peer tp-peer 85.00: +2.00 points.'
    """
    ok = [r for r in rows if r.get("within_10pct")]
    ours = [r for r in ok if r["method"] not in PEERS]
    peers = [r for r in ok if r["method"] in PEERS]
    if not ours or not peers:
        return f"At latency {target:g}: not enough rows within 10% of the target to compare ours with a peer."
    bo, bp = max(ours, key=lambda r: r["top1"]), max(peers, key=lambda r: r["top1"])
    return (f"At latency {target:g}: best of ours {bo['row']} {bo['top1']:.2f}, best peer {bp['row']} "
            f"{bp['top1']:.2f}: {bo['top1'] - bp['top1']:+.2f} points.")


def latency_markdown(result: dict[str, Any]) -> str:
    g, s = result["goal"], result["settings"]
    lines = [f"# {result['name']}", "",
             f"Every row asked for latency {g['value']:g} of the base on {g['backend']} at batch {g['batch']} "
             f"({g['threads']} thread(s)); budget `{result['budget']}`: {s['epochs']} epoch(s) per row, train images "
             f"{s['train_limit'] or 'all 50,000'}, test images {s['test_limit'] or 'all 10,000'}. {result['notes']} "
             f"Widths (and TRP's ranks) aligned to {ROUND_TO} unless the row says otherwise.",
             "", "| model | row | recipe | how | MACs ratio | top-1 | val top-1 | base top-1 | run ratio | final ratio | "
             "within 10% | wall s |", "|---|---|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    fmt2 = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for r in sorted(result["rows"], key=lambda r: (r["model"], r["row"])):
        if "error" in r:
            lines.append(f"| {r['model']} | {row_name(r)} | {recipe_of(r)} | not run: {r['error']} | | | | | | | no | |")
            continue
        how = r["via"] + (f", aligned to {r['round_to']}" if r.get("round_to") not in (None, ROUND_TO) else "")
        lines.append(f"| {r['model']} | {row_name(r)} | {recipe_of(r)} | {how} | {r['macs_ratio']:.3f} | "
                     f"{r['top1']:.2f} | {fmt2(r.get('val_top1'))} | {r['base_top1']:.2f} | {fmt(r.get('run_ratio'))} | "
                     f"{fmt(r.get('final_ratio'))} | {'yes' if r.get('within_10pct') else 'no'} | {r['wall_s']:.0f} |")
    for model in sorted({r["model"] for r in result["rows"]}):
        lines += ["", f"{model}: " + best_line([r for r in result["rows"] if r["model"] == model], g["value"])]
    return "\n".join(lines) + "\n"


def plot_latency(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = result["goal"]
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in result["rows"]:
        x = r.get("final_ratio") or r.get("run_ratio")
        if x is None or "error" in r:
            continue
        ax.scatter(x, r["top1"], marker="s" if r["method"] in PEERS else "o", s=26)
        ax.annotate(f"{r['model'].replace('cifar_', '')} {r['row']} ({r['macs_ratio']:.2f} MACs)", (x, r["top1"]),
                    fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.axvline(g["value"], ls="--", color="grey", lw=1)
    ax.axvspan(0.9 * g["value"], 1.1 * g["value"], color="grey", alpha=0.1)
    ax.set_xlabel(f"measured latency ratio ({g['backend']}, batch {g['batch']}; squares: peers)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title(f"accuracy at latency {g['value']:g} of the base (band: within 10%)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
