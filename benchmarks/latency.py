"""Latency of compressed models relative to their base, timed interleaved in one run on each backend.

MACs do not turn into speed by themselves, and a shared 2-core machine drifts while it runs, so absolute times
mean little: the base and every compressed model are timed round after round in one loop (order reversed each
round, :func:`slimcnn.backends.time_samples`), per backend and batch size, and the table gives median-time
ratios (compressed / base) beside the MACs ratio. The models are slimcnn saves (``slimcnn compress`` output
folders), so the script never retrains anything; what it reads and how they were made go into the results file.

    python benchmarks/latency.py --base /work/bench/cpu/bases/cifar_resnet56-ft1e-lr0.02-n25000-s0 \\
        --model l1=/work/bench/cpu/cifar_resnet56/l1-0.5 --model l1-r8=runs/l1_r8 --threads 2 \\
        --name latency-resnet56
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import RESULTS, command, environment, write_json  # first: puts this checkout's slimcnn on the path

import torch

import slimcnn
from slimcnn.backends import budgeted_repeats, check_backend, runner, time_runners
from slimcnn.report import alignment


def parse_model(spec: str) -> tuple[str, Path]:
    """``label=path/to/saved`` -> (label, path); a bare path is labelled by its folder name."""
    label, sep, path = spec.partition("=")
    return (label, Path(path)) if sep else (Path(spec).name, Path(spec))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="the uncompressed model, saved by slimcnn")
    p.add_argument("--model", action="append", required=True, metavar="LABEL=DIR",
                   help="a compressed model saved by slimcnn (repeat the option)")
    p.add_argument("--backends", default="eager,onnxruntime", help="comma-separated: eager, onnxruntime, cuda")
    p.add_argument("--batches", default="1,128", help="comma-separated batch sizes")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--repeats", type=int, default=0,
                   help="interleaved rounds per backend and batch (0: as many as fit in --budget seconds)")
    p.add_argument("--budget", type=float, default=30.0, help="seconds of timing per backend and batch")
    p.add_argument("--input", default="3,32,32", help="input C,H,W (default: CIFAR's)")
    p.add_argument("--name", default="latency", help="results/<name>.json and .md")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    backends = [check_backend(b) for b in args.backends.split(",")]
    batches = [int(b) for b in args.batches.split(",")]
    base = slimcnn.load(args.base).eval()
    shape = tuple(int(v) for v in args.input.split(","))
    models = {"base": base}
    info: dict[str, dict] = {}
    base_macs = slimcnn.profile(base, shape).macs
    for spec in args.model:
        label, path = parse_model(spec)
        models[label] = slimcnn.load(path).eval()
        report = path / "report.json"
        rep = json.loads(report.read_text()) if report.is_file() else {}
        a = alignment(models[label], 8)
        info[label] = {"path": str(path), "macs_ratio": slimcnn.profile(models[label], shape).macs / base_macs,
                       "top1": (rep.get("compressed") or {}).get("top1"),
                       "round_to": (rep.get("config") or {}).get("round_to"),
                       "recipe": rep.get("recipe"), "aligned8": f"{a['aligned_layers']}/{a['layers']}"}

    timings: dict[str, dict] = {}
    for backend in backends:
        for batch in batches:
            runners = {label: runner(m, shape, batch, backend, args.threads) for label, m in models.items()}
            repeats = args.repeats or budgeted_repeats(runners, args.budget)
            med = time_runners(runners, repeats=repeats, warmup=1)
            timings[f"{backend}/b{batch}"] = {"repeats": repeats, "median_ms": med,
                                              "ratio": {k: med[k] / med["base"] for k in info}}
            print(f"{backend} b{batch}: base {med['base']:.2f} ms; " +
                  ", ".join(f"{k} {med[k] / med['base']:.3f}" for k in info), flush=True)

    doc = {"command": command("latency.py", argv), "environment": environment(), "threads": args.threads,
           "base": args.base, "models": info, "timings": timings}
    out = write_json(RESULTS / f"{args.name}.json", doc)
    (RESULTS / f"{args.name}.md").write_text(markdown(doc))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


def markdown(doc: dict) -> str:
    """The results as a table: one row per model, one latency-ratio column per backend and batch."""
    cols = list(doc["timings"])
    lines = [f"# {Path(doc['base']).name}: latency ratio vs MACs ratio", "",
             f"`{doc['command']}`", "",
             f"Median of interleaved rounds, compressed / base, {doc['threads']} thread(s); base medians: " +
             ", ".join(f"{c} {doc['timings'][c]['median_ms']['base']:.2f} ms" for c in cols) + ".", "",
             "| model | recipe | top-1 | MACs ratio | widths %8 | " + " | ".join(cols) + " |",
             "|---|---|---:|---:|---:|" + "---:|" * len(cols)]
    for label, m in doc["models"].items():
        top1 = f"{m['top1']:.2f}" if m["top1"] is not None else "-"
        lines.append(f"| {label} | {m['recipe'] or '-'} | {top1} | {m['macs_ratio']:.3f} | {m['aligned8']} | " +
                     " | ".join(f"{doc['timings'][c]['ratio'][label]:.3f}" for c in cols) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
