"""The compression pipeline behind ``slimcnn compress`` and ``slimcnn demo``.

evaluate base -> ``method.prepare`` -> train with the method's hooks (``method_epochs``) -> evaluate ->
``method.finalize`` (physically smaller model) -> evaluate -> BatchNorm recalibration (``bn_recalib`` batches,
the same for every method and peer) -> evaluate -> fine-tune (``epochs``) -> evaluate, profile and time both
models side by side -> report.
"""
from __future__ import annotations

import copy
import inspect
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from .methods.base import Method
from .profile import compare_latency, profile
from .report import environment, layer_widths, write_report

#: report.json key under which a method's finalize figures go (the issues name them so)
FINALIZE_KEYS = {"csgd": "merge", "trp": "decompose"}


@dataclass
class CompressConfig:
    target_macs: float | None = 0.5
    method_epochs: int = 0          # training with the method's hooks before finalize (C-SGD, TRP, Dagger search)
    epochs: int = 0                 # fine-tune after finalize
    lr: float = 0.01                # fine-tune learning rate
    method_lr: float | None = None  # learning rate with the method's hooks (default: lr)
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: str = "cosine"
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    out_dir: str | None = None
    latency_batches: list[int] = field(default_factory=lambda: [1, 128])
    latency_repeats: int = 12
    bn_recalib: int = 100           # batches of BatchNorm recalibration after finalize (0: none)


@torch.no_grad()
def predict(model: nn.Module, loader, device: str = "cpu", desc: str = "eval") -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels over ``loader`` (eval mode)."""
    model.eval().to(device)
    outs, labels = [], []
    for x, y in tqdm(loader, desc=desc, leave=False):
        outs.append(model(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return round((logits.argmax(1) == labels).float().mean().item() * 100, 2)


def within_tol(macs: float, base_macs: float, target: float | None, tol: float = 0.01) -> bool | None:
    """Whether ``macs`` is within ``tol`` (relative) of the target (a ratio of ``base_macs`` if <= 1, else absolute
    MACs); None without a target."""
    if target is None:
        return None
    goal = target * base_macs if target <= 1 else target
    return abs(macs - goal) <= tol * goal


def _train(model: nn.Module, loader, cfg: CompressConfig, epochs: int, lr: float, method: Method | None,
           out: Path | None) -> nn.Module:
    from .engine import TrainConfig, train

    tcfg = TrainConfig(epochs=epochs, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                       schedule=cfg.schedule, seed=cfg.seed, device=cfg.device, amp=cfg.amp,
                       out_dir=str(out) if out else None)
    return train(model, loader, tcfg, method=method).model


def compress(model: nn.Module, method: Method, train_loader, test_loader, input_shape: tuple[int, ...],
             cfg: CompressConfig, model_name: str = "", info: dict[str, Any] | None = None
             ) -> tuple[nn.Module, dict[str, Any]]:
    """Compress ``model`` with ``method``; returns the compact model and the report (``model`` is untouched)."""
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir) if cfg.out_dir else None
    example = torch.randn(2, *input_shape, generator=torch.Generator().manual_seed(cfg.seed))
    base_prof = profile(model, input_shape)
    base_logits, labels = predict(model, test_loader, cfg.device, "eval base")
    base_top1 = top1(base_logits, labels)
    tqdm.write(f"base: top1 {base_top1:.2f}  MACs {base_prof.macs / 1e6:.2f}M  params {base_prof.params / 1e6:.3f}M")

    budget = {"total_steps": len(train_loader) * cfg.method_epochs, "lr": cfg.method_lr or cfg.lr,
              "schedule": cfg.schedule}
    accepted = inspect.signature(method.prepare).parameters
    work = method.prepare(copy.deepcopy(model), example.to(cfg.device),
                          **{k: v for k, v in budget.items() if k in accepted and cfg.method_epochs > 0},
                          **({"train_loader": train_loader} if "train_loader" in accepted else {}))  # data-scored peers
    if cfg.method_epochs > 0:
        work = _train(work, train_loader, cfg, cfg.method_epochs, cfg.method_lr or cfg.lr, method,
                      out / "method_ckpt" if out else None)
    finalize_key = FINALIZE_KEYS.get(method.name, "finalize")
    before_logits = before_top1 = None
    if method.trains_before_finalize:
        before_logits, _ = predict(work, test_loader, cfg.device, f"eval before {finalize_key}")
        before_top1 = top1(before_logits, labels)
    compact = method.finalize(work).to(cfg.device)
    after_logits, _ = predict(compact, test_loader, cfg.device, f"eval after {finalize_key}")
    finalize = {"top1_before": before_top1, "top1_after": top1(after_logits, labels),
                "max_logit_change": (after_logits - before_logits).abs().max().item()
                if before_logits is not None else None}
    if before_top1 is not None:
        finalize["gap"] = round(finalize["top1_after"] - before_top1, 2)
    fin_warning = (method.report().get(finalize_key) or {}).get("warning") if method.trains_before_finalize else None
    if fin_warning:
        tqdm.write(f"warning: {fin_warning}")
    from .engine.recalibrate import recalibrate_bn

    finalize["bn_recalib_batches"] = recalibrate_bn(compact, train_loader, cfg.bn_recalib, cfg.device)
    if finalize["bn_recalib_batches"]:
        after_logits, _ = predict(compact, test_loader, cfg.device, "eval after BN recalibration")
        finalize["top1_recalibrated"] = top1(after_logits, labels)
    if cfg.epochs > 0:
        compact = _train(compact, train_loader, cfg, cfg.epochs, cfg.lr, None, out / "finetune_ckpt" if out else None)
        final_logits, _ = predict(compact, test_loader, cfg.device, "eval compressed")
    else:
        final_logits = after_logits
    comp_prof = profile(compact, input_shape)
    comp_top1 = top1(final_logits, labels)

    cpu_base, cpu_comp = copy.deepcopy(model).cpu().eval(), copy.deepcopy(compact).cpu().eval()
    lat_base, lat_comp = [], []
    for b in tqdm(cfg.latency_batches, desc="latency", leave=False):
        reps = cfg.latency_repeats if b <= 16 else max(3, cfg.latency_repeats // 4)
        t = compare_latency({"base": cpu_base, "compressed": cpu_comp}, input_shape, batch=b, repeats=reps)
        lat_base.append(round(t["base"], 3))
        lat_comp.append(round(t["compressed"], 3))

    method_report = method.report()
    fin_extra = method_report.pop(finalize_key, {}) if isinstance(method_report.get(finalize_key), dict) else {}
    report: dict[str, Any] = {
        "method": method.name, "model": model_name, "target_macs": cfg.target_macs,
        "base": {"macs": base_prof.macs, "params": base_prof.params, "top1": base_top1},
        "compressed": {"macs": comp_prof.macs, "params": comp_prof.params, "top1": comp_top1},
        "macs_ratio": comp_prof.macs / base_prof.macs, "speedup": base_prof.macs / comp_prof.macs,
        "within_tol": within_tol(comp_prof.macs, base_prof.macs, cfg.target_macs),
        "params_ratio": comp_prof.params / base_prof.params, "top1_change": round(comp_top1 - base_top1, 2),
        "latency_ms": {"batch": list(cfg.latency_batches), "base": lat_base, "compressed": lat_comp,
                       "ratio": [round(c / b, 4) for b, c in zip(lat_base, lat_comp)]},
        "finalize_key": finalize_key, finalize_key: {**fin_extra, **finalize},
        "epoch_budget": {"method_epochs": cfg.method_epochs, "finetune_epochs": cfg.epochs},
        "test_images": len(labels), "config": asdict(cfg), "environment": environment(), **(info or {}),
    }
    # the method's own figures (TRP's layers, Dagger's gates, ...) sit at the top level of the report
    report.update({k: v for k, v in method_report.items() if k not in report})
    if report["within_tol"] is False:
        tqdm.write(f"warning: MACs ratio {report['macs_ratio']:.4f} is more than 1% off the target {cfg.target_macs}")
    report["wall_s"] = round(time.time() - t0, 1)
    if out:
        from .io import save

        save(compact, out)
        write_report(report, out, layer_widths(model), layer_widths(compact))
    return compact, report
