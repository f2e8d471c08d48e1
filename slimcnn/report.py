"""Reports: ``report.json`` (every figure), ``report.md`` (a table a person reads) and PNG plots."""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import Any

from torch import nn


def environment() -> dict[str, Any]:
    """Versions and machine, recorded beside every measured figure."""
    import torch

    try:
        import torch_pruning
        tp_version = torch_pruning.__version__
    except Exception:  # pragma: no cover - torch-pruning is a dependency, but a report must never fail on it
        tp_version = None
    from . import __version__

    return {"slimcnn": __version__, "torch": torch.__version__, "torch_pruning": tp_version,
            "python": platform.python_version(), "machine": platform.machine(), "processor": platform.processor(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def code_version() -> dict[str, Any]:
    """The git commit the package runs from and whether its code differs from it (results files aside: a bench
    rewrites them as it goes); ``commit`` is None outside a git checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    changes = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results") if commit else None
    version: dict[str, Any] = {"commit": commit, "dirty": bool(changes) if changes is not None else None}
    if changes:  # which uncommitted changes: two sittings on the same edits measure the same code
        import hashlib

        diff = git("diff", "HEAD", "--", "slimcnn", "pyproject.toml") or ""
        version["code_diff_sha256"] = hashlib.sha256(diff.encode()).hexdigest()[:16]
    return version


def code_differs(commit: str | None, diff_sha256: str | None = None) -> bool:
    """Whether the code this process runs (slimcnn/ and pyproject.toml, uncommitted changes included) differs from
    the code at ``commit`` plus the uncommitted changes whose digest is ``diff_sha256`` (None: none); True when
    that cannot be told (no commit recorded, not a git checkout, an unknown commit)."""
    import subprocess

    here = code_version()
    if commit is None or here["commit"] is None:
        return True
    if diff_sha256 is not None:  # measured on uncommitted changes: the same code only as the same edits
        return not (commit == here["commit"] and here.get("code_diff_sha256") == diff_sha256)
    root = Path(__file__).resolve().parent.parent
    # that commit's code against the working tree (uncommitted changes included); exit 0: same code; 1: differs;
    # anything else (an unknown commit): cannot tell
    try:
        done = subprocess.run(["git", "-C", str(root), "diff", "--quiet", commit, "--", "slimcnn", "pyproject.toml"],
                              capture_output=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return True
    return done.returncode != 0


def machine_load(window_s: float = 1.0) -> dict[str, Any]:
    """The 1-minute load average and the share of all cores other processes kept busy over ``window_s`` (this
    process excluded): what tells a figure timed on a loaded machine from one timed idle."""
    from .backends import busy_cores_elsewhere

    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"load_avg_1m": round(load1, 2) if load1 is not None else None,
            "others_cpu_share": round(min(1.0, busy_cores_elsewhere(window_s) / (os.cpu_count() or 1)), 3)}


def provenance() -> dict[str, Any]:
    """What a bench row records at its start and end: code version, load, threads and the versions of the tools
    it compares (torch, torch_pruning, modelopt)."""
    from importlib import metadata

    import torch

    versions = {}
    for dist in ("torch", "torch-pruning", "nvidia-modelopt", "onnxruntime"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    return {**code_version(), **machine_load(), "torch_threads": torch.get_num_threads(), "versions": versions,
            "time": time_stamp()}


def time_stamp() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def layer_widths(model: nn.Module) -> dict[str, int]:
    """Output width of every conv/linear layer by name; a factorised conv (Sequential) reports its inner rank."""
    widths: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)) and not any(name.startswith(k + ".") for k in widths):
            widths[name] = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        elif isinstance(m, nn.Sequential) and len(m) and all(isinstance(c, nn.Conv2d) for c in m):
            widths[name] = m[0].out_channels  # the rank of a decomposition
    return widths


def alignment(model: nn.Module, multiple: int) -> dict[str, Any]:
    """How many conv/linear layers of ``model`` have an output width divisible by ``multiple``.

    Why count it: CPU and GPU kernels are tuned for channel counts in multiples of 8 or 16, so a net pruned to odd
    widths can have fewer MACs and no speed-up. Every conv and linear counts (the factors of a decomposed conv
    too, the classifier head too), so ``layers`` is the same for every method on one model; ``unaligned`` names
    up to 20 of the others with their widths.
    """
    widths = {name: m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features
              for name, m in model.named_modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))}
    off = {name: w for name, w in widths.items() if w % multiple}
    return {"multiple": multiple, "aligned_layers": len(widths) - len(off), "layers": len(widths),
            "unaligned": dict(list(off.items())[:20])}


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def plot_widths(before: dict[str, int], after: dict[str, int], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in before if n in after] or list(before)
    fig, ax = plt.subplots(figsize=(max(6, 0.18 * len(names) + 2), 3.6))
    xs = range(len(names))
    ax.bar(xs, [before[n] for n in names], color="#c8c8c8", label="base")
    ax.bar(xs, [after.get(n, 0) for n in names], color="#2f6db5", width=0.55, label="compressed")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("output channels (rank if factorised)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_gates(gates: dict[str, list[float]], path: Path) -> Path:
    """Dagger's gate values: one row per group, its gates sorted from open to closed, so each row's bright part
    is what the group keeps. One image in one axes: the grid of per-group histograms it replaces took 3.7 s of the
    demo's 137 s on 2 cores (a figure of 24 axes), this takes a fraction of a second."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = list(gates)
    width = max((len(v) for v in gates.values()), default=1)
    grid = np.full((max(1, len(keys)), width), np.nan)
    for i, k in enumerate(keys):
        grid[i, :len(gates[k])] = sorted(gates[k], reverse=True)
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.16 * len(keys)))
    im = ax.imshow(grid, aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(len(keys)))
    ax.set_yticklabels(keys, fontsize=6)
    ax.set_xlabel("channel (sorted by gate)")
    fig.colorbar(im, ax=ax, label="gate")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_series(values: list[float], path: Path, ylabel: str, target: float | None = None) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot(values, color="#2f6db5")
    if target is not None:
        ax.axhline(target, color="#c0392b", ls="--", lw=1, label="target")
        ax.legend(fontsize=8)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _fmt(v: Any, digits: int = 2) -> str:
    return f"{v:.{digits}f}" if isinstance(v, float) else ("-" if v is None else str(v))


def _epochs(budget: dict[str, Any]) -> str:
    """The epoch budget in words: total, split, and the recipe that split it (older reports lack the last two)."""
    m, ft = budget.get("method_epochs", 0), budget.get("finetune_epochs", 0)
    phase = budget.get("method_phase", "training with the method attached")
    text = f"{budget.get('total_epochs', m + ft)} in all = {m} of {phase} + {ft} fine-tune"
    if budget.get("method_share") is not None:
        text += f" (the method's recipe: {budget['method_share']:.0%} of the budget before finalize)"
    if budget.get("recipe"):
        text += f"; training recipe `{budget['recipe']}`"
    if budget.get("plan"):
        text += f". Plan: {budget['plan']}"
    return text


def markdown(report: dict[str, Any]) -> str:
    """report.md: the run's table and the lines a person reads, from report.json."""
    key = report.get("metric", "top1")  # segmentation runs are scored by mIoU
    name = {"top1": "top-1", "miou": "mIoU"}.get(key, key)
    lines = _summary_lines(report, key, name) + _detail_lines(report) + _finalize_lines(report, key, name)
    lines += _stack_lines(report)
    if report.get("within_tol") is False:
        lines.append(f"**MACs missed the target**: ratio {report['macs_ratio']:.4f} vs target {report.get('target_macs')} "
                     "(more than 1% off).")
    lines += ["", f"Command: `{report.get('command')}`", "", f"Wall time: {report.get('wall_s', 0):.0f} s.", ""]
    return "\n".join(lines)


def _summary_lines(report: dict[str, Any], key: str, name: str) -> list[str]:
    b, c = report["base"], report["compressed"]
    lat = report.get("latency_ms") or {}
    lines = [f"# slimcnn compress: {report['method']} on {report['model']}", "",
             (f"Target latency: {report['latency_target'].get('target')}" if report.get("target_macs") is None
              and isinstance(report.get("latency_target"), dict) else f"Target MACs: {report.get('target_macs')}")
             + f". Epochs: {_epochs(report.get('epoch_budget') or {})}. "
             f"{'Top-1' if key == 'top1' else name} on {report.get('test_images')} test images ({report.get('data')}).",
             "",
             f"| | MACs | params | {name} |" + "".join(f" latency b={n} (ms) |" for n in lat.get("batch", [])),
             "|---|---:|---:|---:|" + "---:|" * len(lat.get("batch", []))]
    for label, row in (("base", b), ("compressed", c)):
        lat_cells = "".join(f" {v:.2f} |" for v in lat.get(label, []))
        lines.append(f"| {label} | {row['macs'] / 1e6:.2f}M | {row['params'] / 1e6:.3f}M | {_fmt(row[key])} |{lat_cells}")
    lines += ["", f"MACs ratio {report['macs_ratio']:.3f} ({report['speedup']:.2f}x fewer), "
                  f"{name} change {_fmt(report[key + '_change'])} pt."]
    if lat.get("ratio"):
        lines.append(f"Latency ratio compressed/base ({lat.get('backend', 'eager')}): " + ", ".join(
            f"batch {n}: {r:.3f}" for n, r in zip(lat["batch"], lat["ratio"])) + ".")
    if lat.get("slower_than_base"):
        lines.append(f"**Warning: {lat['slower_than_base']}.**")
    elif report.get("latency_ms") is None and "latency_ms" in report:
        lines.append("Latency: not timed (--no-latency).")
    if f"val_{key}" in c:
        lines.append(f"Validation split: {name} {_fmt(b.get(f'val_{key}'))} (base), {_fmt(c[f'val_{key}'])} (compressed).")
    return lines


def _detail_lines(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    control = report.get("layer_control")
    if control:
        parts = []
        if control.get("exclude"):
            parts.append(f"never pruned: {', '.join(control['exclude'])} (layers {', '.join(control['excluded_layers'])}"
                         f" kept their shape; {len(control['excluded_groups'])} channel group(s) left whole)")
        if control.get("min_keep"):
            floors = ", ".join(f"{k}>={v}" for k, v in control["floors"].items())
            parts.append(f"kept-fraction floors {control['min_keep']} ({floors or 'no group affected'})")
        lines.append("Layer control: " + "; ".join(parts) + ".")
    aligned = report.get("alignment")
    if isinstance(aligned, dict) and aligned.get("layers"):
        how = f"--round-to {aligned['round_to']}" if aligned.get("round_to") else "no --round-to"
        lines.append(f"Aligned widths ({how}): {aligned['aligned_layers']} of {aligned['layers']} conv/linear layers "
                     f"have an output width divisible by {aligned['multiple']} (base: "
                     f"{aligned.get('base_aligned_layers')}).")
    q = report.get("int8")
    if isinstance(q, dict) and q.get("top1"):
        lat = q.get("latency_ms") or {}
        lines.append(f"INT8 ONNX ({lat.get('runtime', 'onnxruntime')}, static {q.get('format')}, per-channel weights, "
                     f"{q.get('calibration_images')} calibration images): top-1 {_fmt(q['top1']['fp32'])} (FP32 ONNX) "
                     f"-> {_fmt(q['top1']['int8'])} on {q.get('test_images')} test images; latency ratio INT8/FP32 "
                     + ", ".join(f"batch {b}: {r:.3f}" for b, r in zip(lat.get("batch", []), lat.get("ratio", [])))
                     + f" ({lat.get('threads')} thread(s)).")
    lt = report.get("latency_target")
    if isinstance(lt, dict) and lt.get("predicted_ratio") is not None:
        lines.append(f"Latency target {lt.get('target')} on {lt.get('backend')} (batch {lt.get('batch')}, "
                     f"{lt.get('threads')} thread(s)): predicted ratio {_fmt(lt.get('predicted_ratio'), 3)}, measured "
                     f"{_fmt(lt.get('measured_ratio'), 3)} ({_fmt(lt.get('measured_compressed_ms'), 3)} vs "
                     f"{_fmt(lt.get('measured_base_ms'), 3)} ms, timed interleaved, {lt.get('statistic')}; by the "
                     f"median {_fmt(lt.get('measured_ratio_median'), 3)}); latency table "
                     f"{lt.get('layer_shapes')} layer shapes, {lt.get('grid_points')} grid points, built in "
                     f"{_fmt(lt.get('table_build_s'), 1)} s.")
    if report.get("skipped_images"):
        lines.append(f"Skipped {report['skipped_images']} image(s) that could not be decoded (--skip-bad-images).")
    return lines


def _finalize_lines(report: dict[str, Any], key: str, name: str) -> list[str]:
    lines: list[str] = []
    fin = report.get(report.get("finalize_key", "finalize"))
    if isinstance(fin, dict) and fin.get(f"{key}_before") is not None:
        change = (f", max |logit change| {_fmt(fin.get('max_logit_change'), 6)}"
                  if fin.get("max_logit_change") is not None else "")
        lines.append(f"At {report.get('finalize_key', 'finalize')}: {name} {_fmt(fin[f'{key}_before'])} -> "
                     f"{_fmt(fin[f'{key}_after'])}{change}.")
    elif isinstance(fin, dict) and fin.get(f"{key}_after") is not None:
        lines.append(f"{'Top-1' if key == 'top1' else name} right after {report.get('finalize_key', 'finalize')}, before "
                     f"fine-tuning: {_fmt(fin[f'{key}_after'])}.")
    if isinstance(fin, dict) and fin.get(f"{key}_recalibrated") is not None:
        lines.append(f"After BatchNorm recalibration ({fin['bn_recalib_batches']} batches): "
                     f"{name} {_fmt(fin[f'{key}_recalibrated'])}.")
    if report.get("ddp"):
        d = report["ddp"]
        lines.append(f"Ran on {d['world_size']} ranks (torchrun); every rank ended with "
                     + ("the same model." if d.get("ranks_identical") else "**different models**."))
    if isinstance(fin, dict) and fin.get("lossless") is False:
        lines.append(f"**The merge was not lossless**: {fin.get('warning', '')}")
    return lines


def _stage_target(record: dict[str, Any]) -> str:
    """A stack stage's target as its record names it: MACs, or latency (a ratio of the stage's base's time).

    >>> [_stage_target(r) for r in ({"target_macs": 0.5}, {"channel_ratio": 0.7}, {"target_latency_ratio": 0.894})]
    ['0.5000 MACs', '0.7000 MACs', '0.894 latency']
    """
    if "target_latency_ratio" in record:
        return f"{record['target_latency_ratio']:.3f} latency"
    return f"{record.get('target_macs', record.get('channel_ratio')):.4f} MACs"


def _stack_lines(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if report.get("stages"):  # a stack (slimcnn/methods/stack.py): one row per stage
        st = report.get("stack") or {}
        lines += ["", f"Stack {' + '.join(st.get('stages', []))}, split {st.get('split')} ({st.get('split_source')}: "
                  f"{st.get('split_rule')}).", "",
                  "| stage | method | target | MACs ratio | epochs | top-1 after its finalize | time s |",
                  "|---:|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['stage']} | {r['method']} | {_stage_target(r)} | {r['macs_ratio']:.4f} | {r['epochs']} | "
                  f"{_fmt(r.get('top1'))} | {r['time_s']:.0f} |" for r in report["stages"]]
        for r in report["stages"]:
            merge = (r.get("details") or {}).get("merge") or {}
            if merge.get("lossless") is False:
                lines += ["", f"**Stage {r['stage']}'s merge was not lossless**: {merge.get('warning', '')}", ""]
        for t in (st.get("search") or {}).get("tried", []):
            lines.append(f"- split {t['split']} (channel stage {_stage_target(t)}): "
                         + (f"proxy top-1 {_fmt(t['top1'])}, MACs ratio {t['macs_ratio']:.4f}" if "top1" in t
                            else f"not reachable: {t['error']}"))
        alone = (st.get("search") or {}).get("alone")
        if alone:
            lines.append(f"- {alone['method']} alone (no channel stage): "
                         + (f"proxy top-1 {_fmt(alone['top1'])}" if alone.get("top1") is not None
                            else f"not reachable: {alone.get('error')}"))
        if (st.get("search") or {}).get("warning"):
            lines.append(f"**{st['search']['warning']}**")
        lines.append("")
    return lines


def write_report(report: dict[str, Any], out_dir: Path, widths_before: dict[str, int],
                 widths_after: dict[str, int]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    pngs = {"widths": plot_widths(widths_before, widths_after, out_dir / "widths.png",
                                  f"{report['method']} on {report['model']}: per-layer widths").name}
    if isinstance(report.get("gates"), dict) and report["gates"]:
        pngs["gates"] = plot_gates(report["gates"], out_dir / "gates.png").name
    if isinstance(report.get("soft_macs"), list) and report["soft_macs"]:
        pngs["soft_macs"] = plot_series(report["soft_macs"], out_dir / "soft_macs.png", "soft MACs",
                                        report.get("target_macs_abs")).name
    report["plots"] = pngs
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=1, default=float))
    md = markdown(report) + "".join(f"\n![{k}]({v})\n" for k, v in pngs.items())
    atomic_write_text(out_dir / "report.md", md)
