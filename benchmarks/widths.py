"""Per-row layer widths and MACs of a ``slimcnn bench`` work folder, to check that a refactor changed nothing.

``slimcnn bench`` saves every row's compressed model (``model.json`` + ``model.safetensors``) and its
``report.json`` under ``<work>/<budget>/<model>/<row>-<target>[-<recipe>]/``. This script reads them back and
writes, per row, the output width of every conv and linear layer and the MACs, params and MACs ratio measured
by the run. Widths come from the weight shapes in the safetensors file, not from rebuilding the model, so a
folder written before a refactor reads the same after it even if the classes a spec names have moved.

    python benchmarks/widths.py /work/smoke_before/smoke --out /work/smoke_before/widths.json
    python benchmarks/widths.py /work/smoke_after/smoke --out /work/smoke_after/widths.json \\
        --compare /work/smoke_before/widths.json      # exit 1 and list every difference
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from common import write_json

#: figures of report.json that must not move when behaviour is unchanged (top-1 and timings may, on another
#: machine or thread count, so they are not compared)
REPORT_KEYS = ("macs", "params")


def weight_widths(safetensors: Path) -> dict[str, int]:
    """Output width of every conv (4-d weight) and linear (2-d weight) by layer name, from the file's header."""
    from safetensors import safe_open

    widths = {}
    with safe_open(str(safetensors), framework="pt") as f:
        for key in f.keys():
            if key.endswith(".weight") and len(shape := f.get_slice(key).get_shape()) in (2, 4):
                widths[key[: -len(".weight")]] = int(shape[0])
    return dict(sorted(widths.items()))


def row_record(folder: Path) -> dict[str, Any]:
    rep = json.loads((folder / "report.json").read_text())
    return {"method": rep.get("method"), "target_macs": rep.get("target_macs"),
            **{k: rep["compressed"][k] for k in REPORT_KEYS}, "base_macs": rep["base"]["macs"],
            "macs_ratio": rep["macs_ratio"], "within_tol": rep.get("within_tol"),
            "widths": weight_widths(folder / "model.safetensors")}


def collect(work: Path) -> dict[str, dict[str, Any]]:
    """Every finished row under ``work`` (a folder holding both report.json and model.safetensors), keyed by its
    path relative to ``work``; the cached bases and training checkpoints hold no report.json and are skipped."""
    rows = {}
    for rep in sorted(work.rglob("report.json")):
        if (rep.parent / "model.safetensors").is_file():
            rows[rep.parent.relative_to(work).as_posix()] = row_record(rep.parent)
    return rows


def differences(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> list[str]:
    """One line per row, figure or layer that differs between two ``rows`` maps."""
    out = [f"{k}: only {'before' if k in before else 'after'}" for k in sorted(set(before) ^ set(after))]
    for key in sorted(set(before) & set(after)):
        b, a = before[key], after[key]
        out += [f"{key}: {f} {b.get(f)} -> {a.get(f)}" for f in ("method", "target_macs", *REPORT_KEYS, "base_macs")
                if b.get(f) != a.get(f)]
        wb, wa = b["widths"], a["widths"]
        out += [f"{key}: {layer} width {wb.get(layer)} -> {wa.get(layer)}" for layer in sorted(set(wb) | set(wa))
                if wb.get(layer) != wa.get(layer)]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", help="a bench work folder (<--work>/<budget>, or any folder above the rows)")
    p.add_argument("--out", default=None, help="write the JSON here (default: print it)")
    p.add_argument("--compare", default=None, help="a widths JSON written earlier: list differences, exit 1 if any")
    args = p.parse_args(argv)
    rows = collect(Path(args.work))
    if not rows:
        raise SystemExit(f"no finished rows (report.json + model.safetensors) under {args.work}")
    doc = {"work": str(Path(args.work).resolve()), "rows": rows}
    if args.out:
        write_json(args.out, doc)
        print(f"{len(rows)} rows -> {args.out}")
    else:
        print(json.dumps(doc, indent=1))
    for key, r in rows.items():
        print(f"{key:<40} MACs {r['macs']:>10}  ratio {r['macs_ratio']:.4f}  layers {len(r['widths'])}",
              file=sys.stderr)
    if args.compare:
        diff = differences(json.loads(Path(args.compare).read_text())["rows"], rows)
        print("\n".join(diff) if diff else f"same widths and MACs as {args.compare} in every row")
        return 1 if diff else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
