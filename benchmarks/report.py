"""Write docs/results.md and the README's results summary from the committed JSON in benchmarks/results/.

    python benchmarks/report.py            # rewrite both
    python benchmarks/report.py --check    # exit 1 if either differs from what the JSON gives

Every figure in those two places comes from here, read from the JSON that the run that measured it wrote; nothing
is typed by hand (tests/test_results_doc.py fails when the committed files differ from what this writes). The
notes beside each group say what was measured and how to read it, never a figure.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "results.md"
README = ROOT / "README.md"
BEGIN, END = "<!-- results summary: written by python benchmarks/report.py -->", "<!-- end of results summary -->"
PEERS = ("tp", "modelopt")

# (file name prefix, section title, what it measures and how to read it), in the order of the document
GROUPS: list[tuple[str, str, str]] = [
    ("bench-cpu-lat", "Every row at one measured latency",
     "Every row, ours and the peers', asked for the same latency (a ratio of the base's time) on one runtime and "
     "batch; methods that plan on latency (l1, trp) do so, the others get the MACs target at which their own net "
     "measures the goal. All rows and the base are timed together, interleaved, at the end; a row counts when its "
     "final ratio is within 10% of the target."),
    ("bench-", "Every method against the peers at equal MACs",
     "Same fine-tuned base per model, same MACs target (every row within 1%), same epochs and recipe, same "
     "BatchNorm recalibration. Top-1 on the full test split of the JPEG copy of CIFAR-10, last epoch."),
    ("latency-", "Latency of compressed nets against the base",
     "Each net and the base timed interleaved in one run on each backend and batch (ratios of the same run)."),
    ("round_to-", "Aligned widths (--round-to)", "Latency of pruned nets with and without widths in multiples of N."),
    ("overhead_", "Step time of each method against plain SGD",
     "Each method's training step timed against a plain SGD step in the same run (a ratio, not milliseconds)."),
    ("gating_", "Feedback gating (RIGNet / DIGNet)", "Ablations and equal-MACs comparisons of the gating models."),
    ("short-budget", "Short-budget recipes of the methods built around training",
     "Dagger and C-SGD variants at the cpu budget, each against the method's default on the same base and data; the "
     "choice is made on the validation split, test top-1 is reported beside it."),
    ("dagger_stability", "Dagger's gates across seeds", "How much Dagger's learned widths vary from seed to seed."),
    ("sweep-networks", "Networks pruned or refused",
     "Every torchvision classification, segmentation and detection builder, a sample of timm families and YOLOv8n, "
     "random weights at a small input: slimcnn's l1 and Torch-Pruning each asked for half the MACs, each network in "
     "its own process with a time and memory limit; a row is the ratio reached or the one line of the refusal."),
]


def load_results(results: Path = RESULTS) -> dict[str, dict[str, Any]]:
    """Every results JSON by name (file stem), in name order."""
    return {p.stem: json.loads(p.read_text()) for p in sorted(results.glob("*.json"))}


def group_of(name: str) -> int:
    return next((i for i, (prefix, _, _) in enumerate(GROUPS) if name.startswith(prefix)), len(GROUPS))


def command_of(name: str, result: dict[str, Any]) -> str:
    """The command that wrote ``result``: recorded in the JSON; for a bench file written before runs recorded
    theirs, the bench command that measures exactly its rows (models, rows, targets)."""
    asked = (result.get("settings") or {}).get("asked")
    if result.get("command"):
        return result["command"]
    rows = result.get("rows", [])
    if asked:
        flags = [f"--{k.replace('_', '-')} {v}" for k, v in sorted(asked.items())
                 if v not in (None, False) and k in ("budget", "models", "rows", "targets", "recipe", "target_latency",
                                                      "latency_backend", "latency_batch", "seed", "name")]
        return "slimcnn bench " + " ".join(flags)
    models = ",".join(sorted({r["model"] for r in rows}))
    labels = ",".join(sorted({r["row"] for r in rows}))
    if "goal" in result:  # a latency bench: its rows' MACs targets were found, not asked
        g = result["goal"]
        ask = f" --target-latency {g['value']:g} --latency-backend {g['backend']} --latency-batch {g['batch']}"
    else:
        ask = " --targets " + ",".join(sorted({str(r["target_macs"]) for r in rows if "target_macs" in r}))
    return (f"slimcnn bench --budget {result.get('budget')} --name {name} --models {models} --rows {labels}{ask}"
            "  (reconstructed from the rows)")


def body_of(name: str, result: dict[str, Any]) -> str:
    """The result's tables: re-rendered from the JSON by the code that writes them where there is such code, else
    the markdown its script wrote beside the JSON, else a plain table of the JSON's fields."""
    render = renderer(name, result)
    if render is not None:
        text = render(result)
    elif (RESULTS / f"{name}.md").is_file():
        text = (RESULTS / f"{name}.md").read_text()
    else:
        text = plain_table(result)
    lines = text.strip().splitlines()
    if lines and lines[0].startswith("# "):  # the section heading here replaces the file's own title
        lines = lines[1:]
    return "\n".join(lines).strip()


def renderer(name: str, result: dict[str, Any]) -> Callable[[dict[str, Any]], str] | None:
    if "goal" in result and "rows" in result:
        from slimcnn.bench_latency import latency_markdown

        return latency_markdown
    if name.startswith("bench-") and "rows" in result:
        from slimcnn.bench import results_markdown

        return results_markdown
    return None


def plain_table(result: dict[str, Any]) -> str:
    """Scalars as a two-column table and each mapping of scalars (per method, per row) as its own table."""
    scalars = {k: v for k, v in result.items() if isinstance(v, (int, float, str)) and k != "command"}
    out = ["| field | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in scalars.items()]
    for key, value in result.items():
        if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
            out += ["", f"| {key} | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in value.items()]
        elif isinstance(value, list) and value and all(isinstance(r, dict) for r in value) and key == "rows":
            cols = [c for c in value[0] if isinstance(value[0][c], (int, float, str))]
            out += ["", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
            out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in value]
    return "\n".join(out)


def document(results: dict[str, dict[str, Any]]) -> str:
    lines = ["# Measured results", "",
             "Written by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not edit by hand. Every "
             "figure was measured on this project's 2-core CPU machine by the command shown above its table. Top-1 "
             "is on the JPEG copy of CIFAR-10 (or CamVid), not comparable with published lossless figures.", ""]
    for i, (_, title, note) in enumerate(GROUPS + [("", "Other results", "")]):
        names = [n for n in results if group_of(n) == i]
        if not names:
            continue
        lines += [f"## {title}", "", note, ""] if note else [f"## {title}", ""]
        for name in names:
            lines += [f"### {name}", "", "```bash", command_of(name, results[name]), "```", "",
                      body_of(name, results[name]), ""]
            if (RESULTS / f"{name}.png").is_file():
                lines += [f"![{name}](../benchmarks/results/{name}.png)", ""]
    return "\n".join(lines).rstrip() + "\n"


def headline(name: str, result: dict[str, Any]) -> list[str]:
    """Best of ours against the best peer in each comparison of a bench file (model, target, recipe, deploy)."""
    rows = [r for r in result.get("rows", []) if "top1" in r and "error" not in r]
    if "goal" in result:
        from slimcnn.bench_latency import best_line

        g = result["goal"]
        return [f"- `{name}`, {m} ({g['backend']}, batch {g['batch']}): "
                + best_line([r for r in rows if r["model"] == m], g["value"]) for m in sorted({r["model"] for r in rows})]
    keys = sorted({(r["model"], r["target_macs"], r.get("recipe", "plain")) for r in rows})
    out = []
    for model, target, recipe in keys:
        same = [r for r in rows if (r["model"], r["target_macs"], r.get("recipe", "plain")) == (model, target, recipe)]
        ours = [r for r in same if r["method"] not in PEERS]
        peers = [r for r in same if r["method"] in PEERS]
        if ours and peers:
            bo, bp = max(ours, key=lambda r: r["top1"]), max(peers, key=lambda r: r["top1"])
            out.append(f"- `{name}`, {model} at {target} MACs ({recipe}): best of ours {bo['row']} {bo['top1']:.2f}, "
                       f"best peer {bp['row']} {bp['top1']:.2f}: {bo['top1'] - bp['top1']:+.2f} points.")
    return out


def summary(results: dict[str, dict[str, Any]]) -> str:
    lines = [BEGIN, "", "Best of ours against the best peer in each committed comparison (full tables, commands and "
             "plots: [docs/results.md](docs/results.md)):", ""]
    for name in results:
        if name.startswith("bench-"):
            lines += headline(name, results[name])
    return "\n".join(lines + ["", END])


def with_summary(readme: str, block: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md has no results markers ({BEGIN} ... {END})")
    head, rest = readme.split(BEGIN, 1)
    return head + block + rest.split(END, 1)[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--check", action="store_true", help="exit 1 if docs/results.md or the README summary is stale")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))  # this checkout's slimcnn renders the tables
    results = load_results()
    doc, readme = document(results), with_summary(README.read_text(), summary(results))
    if args.check:
        stale = [str(p.relative_to(ROOT)) for p, text in ((DOC, doc), (README, readme))
                 if not p.is_file() or p.read_text() != text]
        if stale:
            print(f"stale: {', '.join(stale)}; run python benchmarks/report.py")
        return 1 if stale else 0
    DOC.parent.mkdir(exist_ok=True)
    DOC.write_text(doc)
    README.write_text(readme)
    print(f"wrote {DOC.relative_to(ROOT)} and the README summary from {len(results)} result file(s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
