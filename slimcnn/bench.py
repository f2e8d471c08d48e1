"""Side-by-side benchmark: every method and the Torch-Pruning peer, same base, same MACs, same epoch budget.

For each model: fine-tune the public checkpoint on the JPEG CIFAR-10 training set (cached under
``<work>/bases``; the published checkpoints were trained on lossless CIFAR-10), then for each MACs target run
every row through :func:`slimcnn.compress.compress` with the same total epoch budget, and collect top-1 (full
test split unless the budget limits it), MACs, params, latency ratios and wall time into
``benchmarks/results/<name>.json`` + ``.md`` + PNG plots.

Budgets: ``smoke`` (a minute-long check on tiny subsets), ``cpu`` (sized for about 2 hours on 2 cores: epochs
over a fixed class-balanced 25,000-image half of the training set, test on all 10,000),
``paper`` (the papers' longer recipes, for a GPU: ``--device cuda``).

Each row splits the budget by its method's own recipe (``Method.method_share``). A training recipe applies to
every row alike, the peers included, so that the ranking of methods and the recipe's effect stay separate:
``plain`` (cross-entropy) or ``distill`` (distillation from the uncompressed base). Rows are keyed by (model, row,
target, recipe), so both recipes' rows live side by side in one results file.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .compress import compress, plan_run
from .models.checkpoint import public_checkpoint
from .report import atomic_write_text, environment, provenance


#: training recipes a benchmark run applies to every row: cross-entropy alone, or distillation from the base
RECIPES = ("plain", "distill")


@dataclass
class Row:
    """One method at one setting; how it spends the epoch budget is the method's own recipe
    (``Method.method_share``), so the benchmark and ``slimcnn compress`` split it the same way."""

    label: str
    method: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    #: run when --rows is not given; the stack rows run only when named (each one is a full compression run)
    default: bool = True

    @property
    def method_share(self) -> float:
        from .methods import method_class

        return method_class(self.method).method_share


ROWS = [Row("l1", "l1"), Row("tp-peer", "tp"), Row("dagger", "dagger"), Row("csgd", "csgd"),
        Row("trp-channel", "trp", {"scheme": "channel"}), Row("trp-spatial", "trp", {"scheme": "spatial"}),
        Row("modelopt-peer", "modelopt"),
        # stacks (slimcnn/methods/stack.py): TRP with the spatial scheme, the better single TRP row at the cpu budget
        *(Row(f"{m}+trp", f"{m}+trp", {"scheme": "spatial"}, default=False) for m in ("l1", "dagger", "csgd"))]


@dataclass
class Budget:
    models: list[str]
    targets: list[float]
    base_epochs: int
    epochs: int
    lr: float = 0.01
    base_lr: float = 0.02
    train_limit: int | None = None
    test_limit: int | None = None
    batch_size: int = 128
    latency_batches: list[int] = field(default_factory=lambda: [1, 128])
    #: the distillation settings of the ``distill`` recipe (the same as ``slimcnn compress``'s defaults)
    kd_alpha: float = 0.7
    kd_temperature: float = 4.0
    #: per-method option overrides of this budget (the smoke budget scores ModelOpt's subnets on fewer images)
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: images of the validation split (training images outside the training subset; see data.train_val_indices)
    val_size: int = 5000


BUDGETS = {
    "smoke": Budget(["cifar_resnet20"], [0.5], base_epochs=0, epochs=1, train_limit=256, test_limit=200,
                    batch_size=64, latency_batches=[1, 16], method_options={"modelopt": {"score_images": 64}},
                    val_size=200),
    # ~2 h on 2 cores: epochs over a fixed class-balanced half of the training set (25,000 images)
    "cpu": Budget(["cifar_resnet20", "cifar_resnet56"], [0.5], base_epochs=1, epochs=2, train_limit=25000),
    "paper": Budget(["cifar_resnet20", "cifar_resnet56"], [0.7, 0.5, 0.4], base_epochs=30, epochs=100, lr=0.05,
                    base_lr=0.05),
}


def recipe_of(record: dict[str, Any]) -> str:
    """A stored row's recipe; rows written before recipes existed were plain."""
    return record.get("recipe", "plain")


def pareto_front(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows no other row beats on both axes (fewer or equal MACs and higher or equal top-1), by MACs.

    The front is what a user picks from: every other row is dominated by one of them.

    >>> rows = [{"macs": 10, "top1": 80}, {"macs": 10, "top1": 78}, {"macs": 20, "top1": 79}, {"macs": 20, "top1": 85}]
    >>> [(r["macs"], r["top1"]) for r in pareto_front(rows)]
    [(10, 80), (20, 85)]
    """
    front: list[dict[str, Any]] = []
    for r in sorted(rows, key=lambda r: (r["macs"], -r["top1"])):
        if not front or r["top1"] > front[-1]["top1"]:
            front.append(r)
    return front


def fine_tuned_base(model_name: str, weights_dir: Path, data: str, budget: Budget, work: Path, device: str,
                    seed: int = 0):
    """The public checkpoint fine-tuned for ``budget.base_epochs`` on the data (cached: trained once)."""
    from .data import cifar10_loaders
    from .engine import TrainConfig, train
    from .io import load, save
    from .models import create, load_checkpoint

    key = f"{model_name}-ft{budget.base_epochs}e-lr{budget.base_lr}-n{budget.train_limit or 'all'}-s{seed}"
    cached = work / "bases" / key
    if (cached / "model.safetensors").is_file():
        return load(cached), key
    model = load_checkpoint(create(model_name), public_checkpoint(model_name, weights_dir))
    if budget.base_epochs > 0:
        loaders = cifar10_loaders(data, budget.batch_size, budget.train_limit, budget.test_limit, seed, splits=("train",))
        cfg = TrainConfig(epochs=budget.base_epochs, lr=budget.base_lr, weight_decay=1e-4, seed=seed, device=device,
                          out_dir=str(cached / "ckpt"))
        model = train(model, loaders["train"], cfg).model
        save(model, cached)
    return model, key


def run_bench(data: str, weights_dir: str, budget_name: str = "smoke", name: str | None = None,
              rows: list[str] | None = None, models: list[str] | None = None, targets: list[float] | None = None,
              work: str = "runs/bench", results: str = "benchmarks/results", device: str = "cpu",
              seed: int = 0, recipe: str = "plain", deploy: Any = None, keep_stale: bool = False,
              asked: dict[str, Any] | None = None) -> dict[str, Any]:
    """``deploy`` (a :class:`~slimcnn.methods.factor_timing.Deploy`): the runtime that rows taking it (TRP and the
    stacks) plan their factorisation on; such rows record it and are keyed apart from rows planned on MACs.
    Rows kept from an earlier sitting with other code are refused unless ``keep_stale`` (:func:`check_stale`);
    ``asked`` (what the run was asked: the command's options) is recorded in the results."""
    from . import methods

    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; known: {', '.join(RECIPES)}")
    budget = BUDGETS[budget_name]
    name = name or f"bench-{budget_name}"
    work_dir = Path(work) / budget_name
    out_json = Path(results) / f"{name}.json"
    # resume a partly done benchmark: rows already measured with these settings are kept
    done: dict[str, Any] = json.loads(out_json.read_text()) if out_json.is_file() else {}
    records = {(r["model"], r["row"], r["target_macs"], recipe_of(r))
               + ((_row_label(r),) if r.get("deploy") else ()): r
               for r in done.get("rows", []) if r.get("budget") == budget_name}
    check_stale(list(records.values()), keep_stale, out_json)
    asked = asked or {"rows": rows, "models": models, "targets": targets, "recipe": recipe, "seed": seed}
    selected = select_rows(rows)
    loaders = bench_loaders(data, budget, seed)
    for model_name in models or budget.models:
        base, base_key = fine_tuned_base(model_name, Path(weights_dir), data, budget, work_dir, device, seed)
        for target in targets or budget.targets:
            for row in selected:
                takes_deploy = "deploy" in methods.method_class(row.method).options
                plans_on = deploy if deploy is not None and takes_deploy else None
                key = (model_name, row.label, target, recipe) + (
                    (_row_label({"row": row.label, "deploy": vars(plans_on)}),) if plans_on else ())
                if key in records:
                    continue
                method = methods.create(row.method, target_macs=target,
                                        **{**budget.method_options.get(row.method, {}), **row.kwargs},
                                        **({"deploy": plans_on} if plans_on else {}))
                suffix = "" if recipe == "plain" else f"-{recipe}"  # plain keeps the folders it always had
                suffix += f"-{plans_on.backend}-b{'-'.join(map(str, plans_on.batches))}" if plans_on else ""
                plan = plan_run(method, budget.epochs, target_macs=target, lr=budget.lr, seed=seed, device=device,
                                latency_batches=budget.latency_batches,
                                latency_backend="onnxruntime" if deploy and deploy.backend == "onnxruntime"
                                else "eager",
                                out_dir=str(work_dir / model_name / f"{row.label}-{target}{suffix}"),
                                distill=recipe == "distill", kd_alpha=budget.kd_alpha,
                                kd_temperature=budget.kd_temperature)
                cfg = plan.cfg
                t0, started = time.time(), provenance()
                _, rep = compress(base, method, loaders["train"], loaders["test"], (3, 32, 32), plan, model_name,
                                  {"command": f"slimcnn bench --budget {budget_name} --recipe {recipe}",
                                   "base_checkpoint": base_key}, val_loader=loaders["val"])
                records[key] = {
                    "model": model_name, "row": row.label, "method": row.method, "budget": budget_name,
                    "recipe": recipe, "distill": rep.get("distill"),
                    **({"deploy": vars(plans_on), "latency_plan_note": (rep.get("latency_plan") or {}).get("note")}
                       if plans_on else {}),
                    "target_macs": target, "method_epochs": cfg.method_epochs, "finetune_epochs": cfg.epochs,
                    "base_top1": rep["base"]["top1"], "top1": rep["compressed"]["top1"],
                    "base_val_top1": rep["base"].get("val_top1"), "val_top1": rep["compressed"].get("val_top1"),
                    "top1_change": rep["top1_change"], "macs": rep["compressed"]["macs"],
                    "base_macs": rep["base"]["macs"], "macs_ratio": rep["macs_ratio"], "within_tol": rep["within_tol"],
                    "params": rep["compressed"]["params"], "base_params": rep["base"]["params"],
                    "latency_ratio": dict(zip(map(str, rep["latency_ms"]["batch"]), rep["latency_ms"]["ratio"])),
                    "latency_backend": rep["latency_ms"].get("backend", "eager"),
                    "finalize": rep.get(rep["finalize_key"]), "wall_s": round(time.time() - t0, 1),
                    **({"stages": [{k: v for k, v in st.items() if k != "details"} for st in rep["stages"]],
                        "split": rep["stack"]["split"]} if "stages" in rep else {}),
                    "test_images": rep["test_images"], "provenance": {"start": started, "end": provenance()}}
                write_results(records, budget_name, budget, out_json, name, asked)
    return write_results(records, budget_name, budget, out_json, name, asked)


def select_rows(rows: list[str] | None) -> list[Row]:
    """The rows named (default: the default rows), in table order; ValueError naming any unknown one."""
    unknown = sorted(set(rows or []) - {r.label for r in ROWS})
    if unknown:
        raise ValueError(f"unknown row(s) {', '.join(unknown)}; rows: {', '.join(r.label for r in ROWS)}")
    return [r for r in ROWS if (r.label in rows if rows is not None else r.default)]


def bench_loaders(data: str, budget: Budget, seed: int) -> dict[str, Any]:
    """The budget's training subset, the validation split (training images outside it, for every choice made from
    accuracy) and the test split."""
    from .data import cifar10_loaders

    return cifar10_loaders(data, budget.batch_size, budget.train_limit, budget.test_limit, seed,
                           splits=("train", "val", "test"), val_size=budget.val_size)


def check_stale(rows: list[dict[str, Any]], keep_stale: bool, where: Path) -> None:
    """Rows kept from an earlier sitting that other code measured (:func:`slimcnn.report.code_differs` on the
    commit each row recorded at its start; a row without one counts as other code) are refused in one line, or,
    with ``keep_stale``, kept and marked ``"stale": True`` (the tables name them)."""
    from .report import code_differs

    def code(r: dict[str, Any]) -> tuple[str | None, str | None]:
        start = r.get("provenance", {}).get("start", {})
        return start.get("commit"), start.get("code_diff_sha256")

    differ = {c for c in {code(r) for r in rows} if code_differs(*c)}
    stale = [r for r in rows if code(r) in differ]
    if stale and not keep_stale:
        named = ", ".join(sorted((c[:10] if c else "none recorded") + (" with edits" if d else "") for c, d in differ))
        raise ValueError(f"{len(stale)} row(s) in {where} were measured with other code (commit {named}): rerun "
                         "them (remove them or the file) or pass --keep-stale to keep them, marked in the table")
    for r in rows:
        r["stale"] = r in stale


def row_name(record: dict[str, Any]) -> str:
    """A row's label in a table: marked when it was kept from other code (--keep-stale).

    >>> row_name({"row": "l1"}), row_name({"row": "l1", "stale": True})
    ('l1', 'l1 (stale)')
    """
    return f"{record['row']} (stale)" if record.get("stale") else record["row"]


def write_results(records: dict, budget_name: str, budget: Budget, out_json: Path, name: str,
                  asked: dict[str, Any] | None = None) -> dict[str, Any]:
    from dataclasses import asdict

    out_json.parent.mkdir(parents=True, exist_ok=True)
    result = {"name": name, "budget": budget_name, "settings": {**asdict(budget), "asked": asked},
              "rows": list(records.values()),
              "environment": environment(),
              "notes": "Top-1 on the JPEG copy of CIFAR-10 (not comparable with published lossless figures). "
                       f"{base_note(list(records.values()))}; MACs by slimcnn's op-level counter "
                       "(conv+linear); the tp-peer row runs on option-A shortcuts converted to 1x1 convs (+MACs, counted)."}
    return save_result(result, out_json, results_markdown, lambda r: plot_results(r, out_json.with_suffix("")))


def save_result(result: dict[str, Any], out_json: Path, markdown, plot) -> dict[str, Any]:
    """``result`` as ``out_json``, its markdown beside it, and its plot once it has rows (atomic writes)."""
    atomic_write_text(out_json, json.dumps(result, indent=1))
    atomic_write_text(out_json.with_suffix(".md"), markdown(result))
    if result["rows"]:
        plot(result)
    return result


def base_note(rows: list[dict[str, Any]]) -> str:
    """Whether every row of a model starts from the same fine-tuned base: rows kept from an earlier run (resume)
    may come from a base fine-tuned again elsewhere, which the same recipe does not reproduce to the last digit.

    >>> base_note([{"model": "m", "base_top1": 88.22}, {"model": "m", "base_top1": 88.22}])
    'Every row starts from the same fine-tuned base (one per model)'
    >>> base_note([{"model": "m", "base_top1": 88.22}, {"model": "m", "base_top1": 88.25}])[:69]
    'Rows of m come from 2 fine-tunes of its base (base top-1 88.22, 88.25'
    """
    bases: dict[str, set[float]] = {}
    for r in rows:
        bases.setdefault(r["model"], set()).add(r["base_top1"])
    mixed = {m: sorted(b) for m, b in bases.items() if len(b) > 1}
    if not mixed:
        return "Every row starts from the same fine-tuned base (one per model)"
    return "; ".join(f"Rows of {m} come from {len(b)} fine-tunes of its base (base top-1 {', '.join(map(str, b))}; "
                     "same recipe, run again): compare rows with the same base top-1" for m, b in mixed.items())


def _row_label(r: dict[str, Any]) -> str:
    """The row's name, with the runtime it planned on when it did (``trp-spatial @onnxruntime b128``).

    >>> _row_label({"row": "trp-spatial", "deploy": {"backend": "onnxruntime", "batch": 128, "threads": 2}})
    'trp-spatial @onnxruntime b128'
    """
    d = r.get("deploy")
    batches = "/".join(map(str, d["batch"])) if d and isinstance(d["batch"], list) else d and d["batch"]
    return f"{row_name(r)} @{d['backend']} b{batches}" if d else row_name(r)


def results_markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# {result['name']}", "",
             f"Budget `{result['budget']}`: base fine-tune {s['base_epochs']} epoch(s); {s['epochs']} epoch(s) per row "
             f"(method + fine-tune); train images {s['train_limit'] or 'all 50,000'}, test images "
             f"{s['test_limit'] or 'all 10,000'}. Recipe: plain = cross-entropy; distill = distillation from the "
             f"uncompressed base (alpha {s.get('kd_alpha', 0.7)}, T {s.get('kd_temperature', 4.0)}), in every row's "
             f"training epochs. {result['notes']}", "",
             "| model | row | recipe | target | epochs (method+ft) | base top-1 | top-1 | val top-1 | change | MACs | "
             "MACs ratio | within 1% | params | latency ratio (batch timed) | latency ratio (batch timed) | "
             "at finalize | wall s |",
             "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---|---:|"]
    for r in sorted(result["rows"], key=lambda r: (r["model"], -r["target_macs"], r["row"], recipe_of(r))):
        # each cell names its batch: a batch over the timing budget is shrunk, so rows may differ
        lat = [f"{v:.3f} (b={b}{', ' + r['latency_backend'] if r.get('latency_backend') == 'onnxruntime' else ''})"
               for b, v in r["latency_ratio"].items()]
        lines.append(f"| {r['model']} | {_row_label(r)} | {recipe_of(r)} | {r['target_macs']} | "
                     f"{r['method_epochs']}+{r['finetune_epochs']} | "
                     f"{r['base_top1']:.2f} | {r['top1']:.2f} | "
                     f"{'-' if r.get('val_top1') is None else format(r['val_top1'], '.2f')} | {r['top1_change']:+.2f} | {r['macs'] / 1e6:.2f}M | "
                     f"{r['macs_ratio']:.3f} | {_yes(r.get('within_tol'))} | {r['params'] / 1e6:.3f}M | {lat[0]} | "
                     f"{lat[-1]} | {finalize_cell(r.get('finalize'))} | {r['wall_s']:.0f} |")
    lines.append("")
    for (model, recipe), front in sorted(_fronts(result["rows"]).items()):
        text = ", ".join(f"{r['row']} {r['macs_ratio']:.3f} -> {r['top1']:.2f}" for r in front)
        lines.append(f"Pareto front, {model}, {recipe} (MACs ratio -> top-1; every other row is dominated): {text}")
    return "\n".join(lines) + "\n"


def _fronts(rows: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """The Pareto front per (model, recipe), for those with rows at more than one target (a front over one target
    is just its best row)."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["model"], recipe_of(r)), []).append(r)
    return {k: pareto_front(g) for k, g in groups.items() if len({r["target_macs"] for r in g}) > 1}


def _yes(v: bool | None) -> str:
    return "?" if v is None else ("yes" if v else "**no**")


def finalize_cell(fin: dict[str, Any] | None) -> str:
    """Top-1 around finalize: trained-with-method -> right after finalize -> after BN recalibration."""
    if not fin:
        return ""
    parts = [f"{fin['top1_before']:.2f}"] if fin.get("top1_before") is not None else []
    parts.append(f"{fin['top1_after']:.2f}")
    if fin.get("top1_recalibrated") is not None:
        parts.append(f"{fin['top1_recalibrated']:.2f} (BN)")
    cell = " -> ".join(parts)
    if fin.get("lossless") is False:
        cell += " lossy merge"
    return cell


def plot_results(result: dict[str, Any], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    series = lambda r: _row_label(r) if recipe_of(r) == "plain" else f"{_row_label(r)} ({recipe_of(r)})"  # noqa: E731
    labels = sorted({series(r) for r in rows})
    colors = {k: plt.get_cmap("tab20" if len(labels) > 10 else "tab10")(i) for i, k in enumerate(labels)}
    models = sorted({r["model"] for r in rows})
    markers = dict(zip(models, "oD^v"))
    fronts = _fronts(rows)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for model in models:
        base = next(r["base_top1"] for r in rows if r["model"] == model)
        axes[0].scatter([1.0], [base], marker="*", s=90, color="black")
        axes[0].annotate(f"{model.replace('cifar_', '')} base", (1.0, base), fontsize=7, xytext=(-60, 5),
                         textcoords="offset points")
        for label in labels:
            pts = sorted((r["macs_ratio"], r["top1"]) for r in rows if r["model"] == model and series(r) == label)
            if pts:
                axes[0].plot(*zip(*pts), marker=markers[model], color=colors[label], ls="-",
                             label=f"{model.replace('cifar_', '')} {label}")
        if front := fronts.get((model, "plain")):
            axes[0].plot([r["macs_ratio"] for r in front], [r["top1"] for r in front], ls="--", lw=2.5, alpha=0.35,
                         color="black", zorder=0, label=f"{model.replace('cifar_', '')} Pareto front (plain)")
    axes[0].set_xlim(0, 1.08)
    axes[0].set_xlabel("MACs ratio (compressed / base)")
    axes[0].set_ylabel("top-1 (%)")
    axes[0].set_title("accuracy vs MACs (same epochs for every row)", fontsize=9)
    axes[0].legend(fontsize=6, ncol=2)
    for r in rows:
        for i, (b, v) in enumerate(r["latency_ratio"].items()):
            axes[1].scatter(r["macs_ratio"], v, color=colors[series(r)], marker="o" if i == 0 else "s", s=22,
                            label=f"{series(r)} b={b}")
    axes[1].plot([0, 1], [0, 1], ls="--", color="grey", lw=1, label="ideal: latency ratio = MACs ratio")
    handles, names = axes[1].get_legend_handles_labels()
    uniq = dict(zip(names, handles))
    axes[1].legend(uniq.values(), uniq.keys(), fontsize=6, ncol=2)
    axes[1].set_xlim(0, 1.05)
    axes[1].set_ylim(0, max([1.05] + [v * 1.05 for r in rows for v in r["latency_ratio"].values()]))
    axes[1].set_xlabel("MACs ratio")
    axes[1].set_ylabel("CPU latency ratio (compressed / base)")
    axes[1].set_title("latency vs MACs (o: batch 1, s: large batch)", fontsize=9)
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=110)
    plt.close(fig)
