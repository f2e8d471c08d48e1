"""Prune every network people bring, ours against Torch-Pruning: pruned (MACs ratio) or refused (one line), per network.

    python benchmarks/sweep_networks.py                       # the whole sweep (hours on 2 cores), resumable
    python benchmarks/sweep_networks.py --only resnet18,timm:convnext_atto --out /tmp/s  # a few networks
    python benchmarks/sweep_networks.py --render               # rewrite the .md from the JSON only

The networks (issue 38, item 6): every classification and segmentation builder in torchvision, its detection
builders (the counts that depend on the values capped as in tests/test_graph_detectors.py), one small model per timm
family and ultralytics' YOLOv8n from its yaml (when ultralytics is installed), each with random weights and nothing
downloaded, at a small input (64x64; a network that does not run there, the first larger size it runs at).

Per network, in a fresh subprocess each so that a hang or a blow-up is a recorded line and not a stuck sweep:
- ours: ``methods.create("l1", target_macs=0.5)``, ``prepare``, ``finalize``; the MACs ratio by slimcnn's counter, the
  seconds of prepare + finalize, and a forward of the compact net in eval mode (same output shapes) and in train mode
  (a detector with dummy targets). A compact net that fails either is recorded as ``broken``: the surgery engine
  promises never to return one.
- Torch-Pruning: ``BasePruner`` with ``GroupMagnitudeImportance(p=1)`` (L1, as ours), ``ignored_layers`` = the output
  layers (classifier; the class and box heads of a detector; YOLO's Detect head, as its own YOLOv8 example does),
  and one uniform ``pruning_ratio`` searched (a few steps) to land at 0.5 of the MACs by the same counter; the
  ratio it reached, or its error, and whether its net runs in eval mode.
Each side has ``--timeout`` seconds and ``--memory-gb`` of resident memory; the peak is recorded.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import RESULTS, command, environment

NAME = "sweep-networks"
TARGET, TOL = 0.5, 0.005  # within 1% of the target ratio
TIMM = ["resnet18", "efficientnet_b0", "mobilenetv3_small_050", "convnext_atto", "regnetx_002", "ghostnet_050",
        "vit_tiny_patch16_224", "deit_tiny_patch16_224", "mobilevit_xxs"]
#: roi heads and keypoints: counts that depend on the weights capped low enough to be reached (see the detector tests)
CAPPED = dict(rpn_post_nms_top_n_test=100, box_detections_per_img=10, box_score_thresh=0.0)
SIZES = (64, 96, 128, 160, 224, 299)  # the first at which the base net runs in both modes
#: the last layer of a detector's heads, by the end of its name (SSD's heads are module_list.<level>.1)
HEAD_NAMES = ("cls_logits", "bbox_reg", "bbox_ctrness", "cls_score", "bbox_pred", "mask_fcn_logits", "kps_score_lowres")


@dataclass
class Net:
    name: str  # torchvision builder name, "timm:<name>" or "ultralytics:<yaml>"
    task: str  # classification / segmentation / detection
    model: Any = None
    x: Any = None  # the example input (a batch of one, or a list of one image for torchvision's detectors)


def networks() -> list[tuple[str, str]]:
    """(name, task) of every network in the sweep, in sweep order."""
    import torchvision

    out = [(n, "classification") for n in torchvision.models.list_models(module=torchvision.models)]
    out += [(n, "segmentation") for n in torchvision.models.list_models(module=torchvision.models.segmentation)]
    out += [(n, "detection") for n in torchvision.models.list_models(module=torchvision.models.detection)]
    out += [(f"timm:{n}", "classification") for n in TIMM]
    return out + [("ultralytics:yolov8n.yaml", "detection")]


#: the costliest builders (by parameters and MACs), swept last so that a stopped sweep has covered the most networks
HEAVY = ("convnext_large", "_l_", "_h_", "_b_", "128gf", "32gf", "16gf", "8gf", "b5", "b6", "b7", "v2_m", "v2_l", "101",
         "152", "161", "201", "vgg", "swin_b", "swin_v2_b", "wide", "maxvit", "convnext_base", "convnext_small")


def sweep_order(names: list[tuple[str, str]]) -> list[tuple[str, str]]:
    def rank(item: tuple[str, str]) -> int:
        name, task = item
        return 2 if any(h in name for h in HEAVY) else int(task != "classification" and ":" not in name)

    return sorted(names, key=rank)


def _tv_kwargs(name: str, task: str, size: int) -> dict[str, Any]:
    if task == "detection":
        kw: dict[str, Any] = dict(weights_backbone=None, num_classes=3)
        if not name.startswith("ssd"):
            kw.update(min_size=128, max_size=128)
        if "rcnn" in name:
            kw.update(CAPPED)
        return kw | (dict(num_keypoints=5) if name.startswith("keypoint") else {})
    kw = dict(weights_backbone=None) if task == "segmentation" else {}
    if name.startswith("vit_"):  # torchvision's ViT is built for one image size, a multiple of its patch
        patch = int(name.rsplit("_", 1)[1])
        kw["image_size"] = size // patch * patch
    if name == "maxvit_t":
        kw["input_size"] = (size, size)
    return kw


def _build_once(name: str, task: str, size: int) -> Net:
    import torch

    torch.manual_seed(0)
    if name.startswith("timm:"):
        import timm

        kw = {"img_size": size} if "vit" in name or "deit" in name else {}
        return Net(name, task, timm.create_model(name[5:], pretrained=False, **kw), torch.rand(1, 3, size, size))
    if name.startswith("ultralytics:"):
        from ultralytics.nn.tasks import DetectionModel

        return Net(name, task, DetectionModel(name.split(":", 1)[1], verbose=False), torch.rand(1, 3, size, size))
    import torchvision

    module = {"classification": torchvision.models, "segmentation": torchvision.models.segmentation,
              "detection": torchvision.models.detection}[task]
    model = getattr(module, name)(weights=None, **_tv_kwargs(name, task, size))
    if name.startswith("vit_"):
        size = model.image_size
    if task == "detection":
        return Net(name, task, model, [torch.rand(3, 128, 128)])
    return Net(name, task, model, torch.rand(1, 3, size, size))


def build(name: str, task: str) -> Net:
    """The network at the smallest of ``SIZES`` at which it runs in eval and in train mode."""
    last: Exception | None = None
    fixed = task == "detection" and ":" not in name  # torchvision's detectors resize every image themselves
    for size in SIZES[:1] if fixed else SIZES:
        try:
            net = _build_once(name, task, size)
            run_both_modes(net, net.model)
            return net
        except Exception as e:  # a size too small for this architecture: try the next
            last = e
    raise RuntimeError(f"the base net does not run at any of {SIZES}: {one_line(last)}")


def one_line(e: BaseException | None, keep: int = 400) -> str:
    """The error on one line; a long one keeps its start and its end (a surgery error lists every layer it edited
    first and says what went wrong last)."""
    text = " ".join((f"{type(e).__name__}: {e}" if e is not None else "unknown").split())
    return text if len(text) <= keep else f"{text[:keep // 3]} ... {text[-(2 * keep) // 3:]}"


def dummy_targets(name: str, n: int, size: int = 128) -> list[dict[str, Any]]:
    import torch

    t: dict[str, Any] = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])}
    if name.startswith("mask"):
        t["masks"] = torch.zeros(1, size, size, dtype=torch.uint8)
    if name.startswith("keypoint"):
        t["keypoints"] = torch.tensor([[[20.0, 20.0, 1.0]] * 5])
    return [t] * n


def run_both_modes(net: Net, model: Any) -> list[tuple[str, tuple[int, ...]]]:
    """Forward in train mode (a batch of two: BatchNorm on 1x1 maps; a detector with targets) and in eval mode;
    the eval outputs' paths and shapes past the first dimension (a detector's box counts depend on the values)."""
    import torch

    from slimcnn.outputs import output_items

    model.train()
    if isinstance(net.x, list):
        model(net.x + [net.x[0].flip(-1)], dummy_targets(net.name, 2))
    else:
        model(torch.cat([net.x, net.x.flip(-1)]))
    model.eval()
    with torch.no_grad():
        out = model(net.x)
    return [(p, tuple(t.shape[1:])) for p, t in output_items(out)]


def status_of(ratio: float, runs: bool) -> str:
    if not runs:
        return "broken"
    return "pruned" if abs(ratio - TARGET) <= TOL else "off target"


def run_ours(net: Net, base_macs: int, shapes: list) -> dict[str, Any]:
    """slimcnn's l1 to 0.5 of the MACs through the Python API; the compact net then runs in both modes."""
    from slimcnn import methods
    from slimcnn.profile import profile

    start = time.perf_counter()
    try:
        m = methods.create("l1", target_macs=TARGET)
        small = m.finalize(m.prepare(net.model, net.x))
    except Exception as e:
        return {"status": "refused", "error": one_line(e), "seconds": round(time.perf_counter() - start, 1)}
    seconds = round(time.perf_counter() - start, 1)
    ratio = profile(small, example_input=net.x).macs / base_macs
    return {"macs_ratio": round(ratio, 4), "seconds": seconds} | _runs_like(net, small, shapes, ratio)


def _runs_like(net: Net, small: Any, shapes: list, ratio: float) -> dict[str, Any]:
    try:
        after = run_both_modes(net, small)
    except Exception as e:
        return {"status": "broken", "error": one_line(e)}
    if after != shapes:
        return {"status": "broken", "error": f"eval output shapes changed: {shapes} -> {after}"[:400]}
    return {"status": status_of(ratio, True)}


def tp_output_layers(net: Net, model: Any) -> list[Any]:
    """The layers Torch-Pruning must leave whole: YOLO's Detect head (as its YOLOv8 example does), a torchvision
    detector's class and box heads, else every layer whose width is the class count of an output."""
    import re

    import torch
    from torch import nn

    from slimcnn.outputs import output_items

    if net.name.startswith("ultralytics:"):
        return [model.model[-1]]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if net.task == "detection":
        ssd = re.compile(r"(classification|regression)_head\.module_list\.\d+(\.1)?$")
        return [m for n, m in layers.items() if n.rsplit(".", 1)[-1] in HEAD_NAMES or ssd.search(n)]
    with torch.no_grad():
        classes = {t.shape[1] for _, t in output_items(model.eval()(net.x)) if t.dim() > 1}
    return [m for m in layers.values() if getattr(m, "out_channels", getattr(m, "out_features", None)) in classes]


def tp_prune(net: Net, ratio: float, base_macs: int) -> tuple[Any, float]:
    import torch_pruning as tp

    from slimcnn.profile import profile

    model = copy.deepcopy(net.model)
    pruner = tp.pruner.BasePruner(model, net.x, importance=tp.importance.GroupMagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=tp_output_layers(net, model),
                                  forward_fn=lambda m, x: m(x))
    pruner.step()
    return model, profile(model.eval(), example_input=net.x).macs / base_macs


def run_tp(net: Net, base_macs: int, shapes: list, progress: Path, steps: int = 6) -> dict[str, Any]:
    """One uniform pruning ratio, searched: channels kept scale MACs about quadratically, so the first guess is
    1 - sqrt(0.5) and each next one corrects by the square root of the miss, inside the bracket found so far."""
    start, tries, best = time.perf_counter(), [], None
    ratio, lo, hi = 1 - TARGET ** 0.5, 0.0, 0.95
    for _ in range(steps):
        try:
            model, q = tp_prune(net, ratio, base_macs)
        except Exception as e:
            return {"status": "error", "error": one_line(e), "tries": tries,
                    "seconds": round(time.perf_counter() - start, 1)}
        tries.append([round(ratio, 4), round(q, 4)])
        progress.write_text(json.dumps({"status": "searching", "tries": tries}))
        if best is None or abs(q - TARGET) < abs(best[1] - TARGET):
            best = (model, q, ratio)
        if abs(q - TARGET) <= TOL:
            break
        lo, hi = (ratio, hi) if q > TARGET else (lo, ratio)
        guess = 1 - (1 - ratio) * (TARGET / q) ** 0.5
        ratio = guess if lo < guess < hi else (lo + hi) / 2
        del model
    model, q, ratio = best
    out = {"macs_ratio": round(q, 4), "pruning_ratio": round(ratio, 4), "tries": tries,
           "seconds": round(time.perf_counter() - start, 1)}
    return out | _runs_like(net, model, shapes, q)


def child(name: str, task: str, side: str, result: Path) -> None:
    """One side on one network, in this process (the parent watches time and memory); the result as JSON."""
    import warnings

    import torch

    from slimcnn.profile import profile

    warnings.simplefilter("ignore")  # the record is the result line, not the library's advice
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        net = build(name, task)
        shapes = run_both_modes(net, net.model)
        base = profile(net.model, example_input=net.x).macs
    except Exception as e:
        result.write_text(json.dumps({"status": "base fails", "error": one_line(e)}))
        return
    out = run_ours(net, base, shapes) if side == "ours" else run_tp(net, base, shapes, result)
    shape = net.x[0].shape if isinstance(net.x, list) else net.x.shape[1:]
    out |= {"input": list(shape), "base_mmacs": round(base / 1e6, 1),
            "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024}
    result.write_text(json.dumps(out))


def _rss_mb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) // 1024
    except OSError:
        pass
    return 0


def run_side(name: str, task: str, side: str, timeout: float, memory_gb: float) -> dict[str, Any]:
    """``child`` in a subprocess, killed past ``timeout`` seconds or ``memory_gb`` of resident memory: a hang or a
    blow-up is then this network's one line, and the sweep goes on."""
    with tempfile.TemporaryDirectory() as tmp:
        result, log = Path(tmp) / "result.json", Path(tmp) / "stderr.txt"
        cmd = [sys.executable, __file__, "--child", name, "--task", task, "--side", side, "--result", str(result)]
        start, peak, why = time.monotonic(), 0, None
        with log.open("w") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err)
            while proc.poll() is None:
                time.sleep(0.5)
                peak = max(peak, _rss_mb(proc.pid, "VmHWM:"))
                if time.monotonic() - start > timeout:
                    why = f"no answer in {timeout:g} s"
                elif peak > memory_gb * 1024:
                    why = f"over {memory_gb:g} GB of memory"
                if why:
                    proc.kill()
                    proc.wait()
        out = json.loads(result.read_text()) if result.is_file() else {}
        if why or not out.get("status") or out["status"] == "searching":
            tail = log.read_text().strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
            out = {"status": "refused" if side == "ours" else "error", "error": why or tail[0][:400],
                   "seconds": round(time.monotonic() - start, 1)} | ({"tries": out["tries"]} if "tries" in out else {})
        return out | {"peak_mb": max(peak, out.get("peak_mb", 0))}


def sweep(names: list[tuple[str, str]], out_dir: Path, timeout: float, memory_gb: float, argv: list[str]) -> dict:
    """Each network through both sides, the JSON and the .md rewritten after each (a stopped sweep resumes)."""
    path = out_dir / f"{NAME}.json"
    done = {r["name"]: r for r in json.loads(path.read_text())["networks"]} if path.is_file() else {}
    result = {"command": command("sweep_networks.py", argv),
              "settings": {"method": "l1", "target_macs": TARGET, "tolerance": TOL, "timeout_s": timeout,
                           "memory_gb": memory_gb, "sizes": list(SIZES), "tp_importance": "GroupMagnitudeImportance(p=1)"},
              "environment": environment(), "networks": list(done.values())}
    for name, task in names:
        if name in done:
            continue
        row = {"name": name, "task": task}
        if name.startswith("ultralytics:") and not _has("ultralytics"):
            row["ours"] = row["tp"] = {"status": "not installed", "error": "pip install ultralytics (extra: yolo)"}
        else:
            row["ours"] = run_side(name, task, "ours", timeout, memory_gb)
            row["tp"] = run_side(name, task, "tp", timeout, memory_gb)
        result["networks"].append(row)
        print(f"{name}: ours {cell(row['ours'])}; tp {cell(row['tp'])}", flush=True)
        write(result, out_dir)
    return result


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def write(result: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{NAME}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{NAME}.md").write_text(markdown(result))


def cell(side: dict[str, Any]) -> str:
    """One table cell: the MACs ratio reached, or the status and its one line."""
    ratio = f"{side['macs_ratio']:.4f}" if "macs_ratio" in side else ""
    if side["status"] == "pruned":
        return ratio
    words = f"{side['status']}" + (f" {ratio}" if ratio else "") + (f": {side['error']}" if side.get("error") else "")
    return words.replace("|", "\\|").replace("\n", " ")


def counts(result: dict[str, Any], side: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for row in result["networks"]:
        out[row[side]["status"]] = out.get(row[side]["status"], 0) + 1
    return out


def summary_line(result: dict[str, Any]) -> str:
    def said(side: str) -> str:
        return ", ".join(f"{n} {s}" for s, n in sorted(counts(result, side).items(), key=lambda kv: -kv[1]))

    return (f"{len(result['networks'])} networks at {TARGET} of the MACs (pruned: within {TOL / TARGET:.0%} and runs "
            f"in eval and train mode). slimcnn l1: {said('ours')}. Torch-Pruning: {said('tp')}.")


def markdown(result: dict[str, Any]) -> str:
    s = result["settings"]
    lines = [f"# Networks pruned or refused: slimcnn l1 against Torch-Pruning at {TARGET} of the MACs", "",
             summary_line(result), "",
             f"Random weights, nothing downloaded; each side in its own process with {s['timeout_s']:g} s and "
             f"{s['memory_gb']:g} GB; a cell is the MACs ratio reached (slimcnn's counter) or the status and its line.",
             "", "| network | task | input | slimcnn l1 | s | peak MB | Torch-Pruning | s |", "|---|---|---|---|---:|---:|---|---:|"]
    tasks = ("classification", "segmentation", "detection")
    for row in sorted(result["networks"], key=lambda r: (tasks.index(r["task"]), ":" in r["name"], r["name"])):
        o, t = row["ours"], row["tp"]
        shape = "x".join(map(str, o.get("input", t.get("input", []))))
        lines.append(f"| {row['name']} | {row['task']} | {shape} | {cell(o)} | {o.get('seconds', '')} | "
                     f"{o.get('peak_mb', '')} | {cell(t)} | {t.get('seconds', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", help="comma-separated network names (as in the table); default: all")
    p.add_argument("--out", type=Path, default=RESULTS, help=f"folder of {NAME}.json / .md (default: {RESULTS})")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per network and side (default 120)")
    p.add_argument("--memory-gb", type=float, default=8.0, help="resident memory per network and side (default 8)")
    p.add_argument("--render", action="store_true", help="only rewrite the .md from the JSON")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--side", choices=["ours", "tp"], help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.task, args.side, args.result)
        return 0
    if args.render:
        write(json.loads((args.out / f"{NAME}.json").read_text()), args.out)
        return 0
    names = sweep_order(networks())
    if args.only:
        wanted = args.only.split(",")
        names = [n for n in names if n[0] in wanted]
    result = sweep(names, args.out, args.timeout, args.memory_gb, sys.argv[1:] if argv is None else argv)
    print(summary_line(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
