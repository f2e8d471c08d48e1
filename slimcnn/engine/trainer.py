"""The training loop: SGD with a per-step LR schedule, method hooks, atomic checkpoints, exact resume, DDP, AMP.

>>> from slimcnn.engine import TrainConfig, train
>>> cfg = TrainConfig(epochs=2, lr=0.05, out_dir="runs/r20")
>>> result = train(model, loaders["train"], cfg, val_loader=loaders["test"])   # doctest: +SKIP
>>> result.history[-1]["val_top1"]                                             # doctest: +SKIP

Choices worth knowing:

- The LR schedule is stepped **per iteration** (smooth cosine, warm-up that starts at the first step); the
  step schedule decays by ``gamma`` at the ``milestones`` (fractions of the run). ``max_steps`` only stops
  the run early: the schedule always spans ``epochs``, so a run cut short and resumed equals an uninterrupted one.
- A checkpoint (``<out_dir>/last.safetensors``, no pickle) is written atomically after every epoch, and when
  ``max_steps`` stops a run mid-epoch; ``resume=True`` restores model, optimiser, scheduler, AMP scaler, method
  state, RNGs, epoch and step, and skips the batches of a partly done epoch, so the weights end bit-identical
  to an uninterrupted run at the same seed (the loader must be deterministic given its seed and ``set_epoch``).
- A NaN/inf loss raises :class:`TrainingDiverged` before the step is applied; the last checkpoint is untouched.
- Under torchrun (``torch.distributed`` initialised) the model is wrapped in DDP; the method hooks get the
  unwrapped model; train metrics are summed over ranks; only rank 0 prints and writes the checkpoint.
- ``distiller`` (:class:`slimcnn.distill.Distiller`) mixes a frozen teacher's soft targets into the loss, inside
  autocast like the task loss. The teacher is never wrapped in DDP: each rank runs it locally under no_grad.
  An iterative model's every output is distilled against the teacher's final logits. At alpha 0 the teacher is
  not run and training is bit-for-bit the plain run.
- ``ema`` keeps an exponential moving average of the weights (and float buffers) through
  ``torch.optim.swa_utils.AveragedModel``, updated after every optimiser step; it is checkpointed, so a resumed
  run ends bit-identical too, and at the end the returned model holds the averaged weights.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..distill import Distiller
from ..outputs import final_output, iteration_loss
from . import distributed
from .checkpoint import capture_rng, load_state, restore_rng, save_state
from .evaluate import SEG_IGNORE_INDEX, autocast, check_task, evaluate, match_size, task_loss, topk_hits
from .hooks import NoHooks, TrainingHooks

CHECKPOINT_NAME = "last.safetensors"
SCHEDULES = ("cosine", "step", "constant")
# settings that must match for a resumed run to continue the same run
_RESUME_KEYS = ("epochs", "lr", "momentum", "nesterov", "weight_decay", "schedule", "warmup_epochs", "milestones",
                "gamma", "seed", "task", "ema")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message says where and what to try."""


@dataclass
class TrainConfig:
    """Settings of one training run (see the module docstring for the schedule and checkpoint rules)."""

    epochs: int = 1
    lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 0
    seed: int = 0
    device: str = "cpu"
    amp: bool = False
    out_dir: str | Path | None = None
    max_steps: int | None = None
    task: str = "classification"
    #: step schedule: multiply the LR by ``gamma`` at these fractions of the run
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1
    progress: bool = True
    #: decay of a weight EMA updated after every optimiser step (None: no EMA); the run returns the EMA weights
    ema: float | None = None

    def __post_init__(self) -> None:
        check_task(self.task)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.warmup_epochs < 0 or self.warmup_epochs > self.epochs:
            raise ValueError(f"warmup_epochs must be in [0, epochs={self.epochs}], got {self.warmup_epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 (or None), got {self.max_steps}")
        if self.ema is not None and not 0.0 <= self.ema < 1.0:
            # decay 1 would never move away from the first weights
            raise ValueError(f"ema decay must be in [0, 1), got {self.ema}")
        self.milestones = tuple(float(m) for m in self.milestones)


@dataclass
class TrainResult:
    """The trained (unwrapped) model, one history record per epoch, and the number of optimiser steps taken.

    ``replica_digests`` (under DDP): every rank's SHA-256 of its parameters; all equal when the replicas agree.
    """

    model: nn.Module
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    checkpoint: Path | None = None
    replica_digests: list[str] | None = None


class Schedule:
    """LR multiplier for optimiser step ``step``: linear warm-up, then cosine / step decay / constant.

    A plain object (not a closure) so that ``LambdaLR.state_dict()`` saves its settings.

    >>> s = Schedule("cosine", total_steps=100, warmup_steps=10)
    >>> s(0), s(9), round(s(55), 3)
    (0.1, 1.0, 0.5)
    """

    def __init__(self, kind: str, total_steps: int, warmup_steps: int = 0,
                 milestones: Iterable[int] = (), gamma: float = 0.1) -> None:
        self.kind, self.total_steps, self.warmup_steps = kind, total_steps, warmup_steps
        self.milestones, self.gamma = list(milestones), gamma

    @classmethod
    def of_run(cls, kind: str, total_steps: int, warmup_steps: int = 0,
               milestones: Iterable[float] = (0.5, 0.75), gamma: float = 0.1) -> Schedule:
        """The schedule of a run of ``total_steps`` with the step decay's ``milestones`` given as fractions of the
        run (:class:`TrainConfig`'s form), as :func:`train` builds it."""
        return cls(kind, total_steps, warmup_steps, [round(m * total_steps) for m in milestones], gamma)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "step":
            return self.gamma ** sum(step >= m for m in self.milestones)
        if self.kind == "cosine":
            p = min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps))
            return 0.5 * (1.0 + math.cos(math.pi * p))
        return 1.0


def checkpoint_path(out_dir: str | Path) -> Path:
    """Where :func:`train` keeps the last checkpoint of a run in ``out_dir``."""
    return Path(out_dir) / CHECKPOINT_NAME


def _device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} was asked for, but torch.cuda.is_available() is False; use cpu")
        if dev.index is None:
            dev = torch.device("cuda", distributed.local_rank() if distributed.is_distributed() else 0)
    return dev


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def config_record(cfg: TrainConfig) -> dict[str, Any]:
    """The settings of ``cfg`` as a JSON-able dict (stored in checkpoints and train.json)."""
    rec = asdict(cfg)
    rec["out_dir"] = None if cfg.out_dir is None else str(cfg.out_dir)
    return rec


def _check_resume(path: Path, state: dict[str, Any], cfg: TrainConfig, steps_per_epoch: int, method: TrainingHooks,
                  distiller: Distiller | None) -> None:
    saved = state["config"]
    problems = [f"{k}={saved.get(k)!r} (this run: {getattr(cfg, k)!r})" for k in _RESUME_KEYS
                if saved.get(k) != getattr(cfg, k)]
    distill = distiller.record() if distiller is not None and distiller.active else None
    if state.get("distill") != distill:
        problems.append(f"distillation {state.get('distill')!r} (this run: {distill!r})")
    if state["steps_per_epoch"] != steps_per_epoch:
        problems.append(f"{state['steps_per_epoch']} steps per epoch (this run: {steps_per_epoch}; "
                        "same data, batch size and number of processes?)")
    if state["method"] != method.name:
        problems.append(f"method {state['method']!r} (this run: {method.name!r})")
    if problems:
        raise ValueError(f"cannot resume from {path}: it was written with {'; '.join(problems)}. Resume with the "
                         "same settings, or start a fresh run in another out_dir")


class _EpochStats:
    """Running sums of one epoch on this rank: loss x samples, correct, counted, images, images this session.

    The first four survive a mid-epoch checkpoint; the last only times this session's throughput.
    """

    def __init__(self, saved: list[float] | None = None) -> None:
        self.values = [*saved[:4], 0.0] if saved else [0.0] * 5

    def add(self, task: str, loss: float, logits: torch.Tensor, y: torch.Tensor) -> None:
        if task == "segmentation":  # pixel accuracy over labelled pixels
            labelled = y != SEG_IGNORE_INDEX
            pred = match_size(logits.detach(), y).argmax(1)
            correct, count = int((pred.eq(y) & labelled).sum()), int(labelled.sum())
        else:
            correct, count = topk_hits(logits.detach(), y, k=1)[0], len(y)
        for i, v in enumerate((loss * len(y), correct, count, len(y), len(y))):
            self.values[i] += v

    def reduced(self, device: torch.device) -> list[float]:
        t = torch.tensor(self.values, dtype=torch.float64, device=device)
        return distributed.all_reduce_sum(t).tolist()


@dataclass
class _Loop:
    """One training run's moving parts, built once by :func:`_start`, and its position (``step``, ``history``)."""

    model: nn.Module
    net: nn.Module  # the model, wrapped in DDP under torchrun
    cfg: TrainConfig
    method: TrainingHooks
    distiller: Distiller | None
    ema: AveragedModel | None
    opt: torch.optim.Optimizer
    sched: LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    use_amp: bool
    show: bool
    ckpt: Path | None
    steps_per_epoch: int
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)

    def save(self, epoch_done: int, partial_values: list[float] | None) -> None:
        if self.ckpt is None or not distributed.is_main():
            return
        save_state(self.ckpt, {
            "epoch": epoch_done, "step": self.step, "steps_per_epoch": self.steps_per_epoch,
            "model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(), "method": self.method.name, "method_state": self.method.state_dict(),
            "rng": capture_rng(), "history": self.history, "partial": partial_values, "config": config_record(self.cfg),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "distill": self.distiller.record() if self.distiller is not None else None})


def train(model: nn.Module, train_loader: Iterable, cfg: TrainConfig, method: TrainingHooks | None = None,
          val_loader: Iterable | None = None, resume: bool = False,
          distiller: Distiller | None = None) -> TrainResult:
    """Train ``model`` on ``train_loader`` with SGD, driving ``method``'s hooks; see the module docstring.

    The loader yields ``(x, y)`` batches; if it has ``set_epoch`` it is called every epoch (needed for exact
    resume and for per-epoch shuffles). ``val_loader`` is evaluated after every complete epoch (the EMA
    weights when ``cfg.ema`` is set: those are what the run returns). ``distiller`` adds distillation from its
    teacher to the loss.

    >>> result = train(model, loader, TrainConfig(epochs=1, lr=0.01))   # doctest: +SKIP
    >>> result.history[0]["train_loss"]                                 # doctest: +SKIP
    """
    from tqdm import tqdm

    loop = _start(model, train_loader, cfg, method, distiller)
    start_epoch, partial = _resume(loop, resume)
    run_history = list(loop.history)
    for epoch in range(start_epoch, cfg.epochs):
        if cfg.max_steps is not None and loop.step >= cfg.max_steps:
            break
        rec, stopped, stats = _epoch(loop, train_loader, epoch, partial)
        if stopped:
            rec["complete"] = False
            run_history.append(rec)
            loop.save(epoch, stats.values[:4])
            break
        if val_loader is not None:
            val = evaluate(loop.ema.module if loop.ema is not None else model, val_loader, cfg.task, loop.device,
                           amp=loop.use_amp, progress=loop.show)
            rec.update({f"val_{k}": v for k, v in val.items() if k != "iou"})
        loop.history.append(rec)
        run_history.append(rec)
        loop.save(epoch + 1, None)
        if loop.show:
            tqdm.write("  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()))
    if loop.ema is not None and int(loop.ema.n_averaged) > 0:
        _load_ema_weights(model, loop.ema)
    digests = distributed.gather_digests(model) if distributed.is_distributed() else None
    if digests and distributed.is_main() and len(set(digests)) > 1:
        print(f"warning: DDP replicas ended with different weights: {digests}")
    return TrainResult(model=model, history=run_history, steps=loop.step,
                       checkpoint=loop.ckpt if loop.ckpt is not None and loop.ckpt.is_file() else None,
                       replica_digests=digests)


def _start(model: nn.Module, train_loader: Iterable, cfg: TrainConfig, method: TrainingHooks | None,
           distiller: Distiller | None) -> _Loop:
    """Seeds, optimiser, schedule, AMP scaler, EMA and the DDP wrapper of a run."""
    device = _device(cfg.device)
    method = method if method is not None else NoHooks()
    _seed_everything(cfg.seed)
    model.to(device)
    opt = torch.optim.SGD(method.param_groups(model, cfg.lr, cfg.weight_decay), lr=cfg.lr, momentum=cfg.momentum,
                          nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(train_loader)  # type: ignore[arg-type]
    if steps_per_epoch == 0:
        raise ValueError("the training loader yields no batches (empty data set, or drop_last with too few samples)")
    sched = LambdaLR(opt, Schedule.of_run(cfg.schedule, cfg.epochs * steps_per_epoch,
                                          round(cfg.warmup_epochs * steps_per_epoch), cfg.milestones, cfg.gamma))
    use_amp = cfg.amp and device.type == "cuda"
    net: nn.Module = model
    if distributed.is_distributed():
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return _Loop(model, net, cfg, method,
                 distiller.to(device) if distiller is not None and distiller.active else None,
                 _make_ema(model, cfg.ema) if cfg.ema is not None else None, opt, sched,
                 torch.amp.GradScaler("cuda", enabled=use_amp), device, use_amp,
                 cfg.progress and distributed.is_main(),
                 checkpoint_path(cfg.out_dir) if cfg.out_dir is not None else None, steps_per_epoch)


def _resume(loop: _Loop, resume: bool) -> tuple[int, list[float] | None]:
    """(first epoch to run, the partial epoch's statistics) after restoring the last checkpoint when asked."""
    if not resume:
        return 0, None
    if loop.ckpt is None:
        raise ValueError("resume=True needs cfg.out_dir (the folder holding the run's last checkpoint)")
    if not loop.ckpt.is_file():
        if loop.show:
            print(f"no checkpoint at {loop.ckpt}; starting from scratch")
        return 0, None
    state = load_state(loop.ckpt)
    _check_resume(loop.ckpt, state, loop.cfg, loop.steps_per_epoch, loop.method, loop.distiller)
    _restore(state, loop.model, loop.opt, loop.sched, loop.scaler, loop.method, loop.ema)
    loop.step, loop.history = state["step"], state["history"]
    if loop.show:
        print(f"resuming from {loop.ckpt}: epoch {state['epoch']}/{loop.cfg.epochs}, step {loop.step}")
    return state["epoch"], state["partial"]


def _epoch(loop: _Loop, train_loader: Iterable, epoch: int, partial: list[float] | None
           ) -> tuple[dict[str, Any], bool, _EpochStats]:
    """One epoch (the rest of it after a resume): (its record, whether max_steps stopped it, its statistics)."""
    from ..progress import bar as progress_bar

    cfg = loop.cfg
    if hasattr(train_loader, "set_epoch"):
        train_loader.set_epoch(epoch)
    skip = loop.step - epoch * loop.steps_per_epoch  # batches of this epoch done before a resume
    stats = _EpochStats(partial if skip else None)
    loop.net.train()
    stopped, t0, last_lr = False, time.perf_counter(), loop.opt.param_groups[0]["lr"]
    bar = progress_bar(total=loop.steps_per_epoch, initial=skip, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                       enabled=loop.show)
    for i, (x, y) in enumerate(train_loader):
        if i < skip:
            continue
        if cfg.max_steps is not None and loop.step >= cfg.max_steps:
            stopped = True
            break
        try:
            loss_value, logits, y, last_lr = _step(loop, x, y, epoch)
        except TrainingDiverged:
            bar.close()
            raise
        stats.add(cfg.task, loss_value, logits, y)
        bar.update(1)
        bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{last_lr:.3g}")
    bar.close()
    seconds = time.perf_counter() - t0
    loss_sum, correct, count, images, fresh = stats.reduced(loop.device)
    acc_name = "train_pixel_acc" if cfg.task == "segmentation" else "train_top1"
    rec: dict[str, Any] = {"epoch": epoch + 1, "step": loop.step, "lr": last_lr,
                           "train_loss": loss_sum / max(images, 1), acc_name: 100.0 * correct / max(count, 1),
                           "img_per_s": fresh / seconds if seconds > 0 else float("nan")}
    # a finite loss can hide broken weights (BN renormalises huge activations); BN buffers differ per rank
    bad = _first_nonfinite(loop.model)
    if distributed.all_reduce_sum(torch.tensor([float(bad is not None)], device=loop.device)).item() > 0:
        what = f"{bad} holds NaN/inf values" if bad else "another rank's weights hold NaN/inf values"
        raise TrainingDiverged(_diverged_message(what, epoch, cfg, loop.step, last_lr, loop.ckpt))
    return rec, stopped, stats


def _step(loop: _Loop, x: torch.Tensor, y: torch.Tensor, epoch: int
          ) -> tuple[float, torch.Tensor, torch.Tensor, float]:
    """One optimiser step with the method's hooks around it: (loss, logits, labels on the device, its lr)."""
    cfg, method, model, distiller = loop.cfg, loop.method, loop.model, loop.distiller
    # contiguous NCHW: the in-memory loaders yield channels-last views, and torch 2.14's CPU backward of a
    # 1x1 stride-2 conv with an odd input width (5, as pruning leaves) on channels-last input corrupts the
    # heap (measured: "double free or corruption", a pruned seg_tiny's shortcut)
    x, y = x.to(loop.device, non_blocking=True).contiguous(), y.to(loop.device, non_blocking=True)
    method.before_forward(model, loop.step)
    loop.opt.zero_grad(set_to_none=True)
    with autocast(loop.device, loop.use_amp):
        out = loop.net(x)
        logits = final_output(out)
        soft = distiller.teacher_logits(x) if distiller is not None else None

        def loss_of(o: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            hard = task_loss(cfg.task, o, target)
            return hard if distiller is None else distiller.combine(o, soft, hard)

        # an iterative model is trained on every iteration's output
        loss = iteration_loss(out, y, loss_of) + method.loss(model)
    # every rank must agree to stop, or the others would wait forever in the next all-reduce
    seen = distributed.all_reduce_sum(loss.detach().float().reshape(1).clone())
    if not torch.isfinite(seen).all():
        raise TrainingDiverged(_diverged_message(f"the loss is {float(loss.detach())}", epoch, cfg, loop.step,
                                                 loop.opt.param_groups[0]["lr"], loop.ckpt))
    loss_value = float(loss.detach())
    loop.scaler.scale(loss).backward()
    loop.scaler.unscale_(loop.opt)  # hooks see true gradients under AMP too
    method.after_backward(model, loop.step)
    loop.scaler.step(loop.opt)
    loop.scaler.update()
    method.after_step(model, loop.step)
    if loop.ema is not None:
        loop.ema.update_parameters(model)
    last_lr = loop.opt.param_groups[0]["lr"]
    loop.sched.step()
    loop.step += 1
    return loss_value, logits, y, last_lr


def _restore(state: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, sched: LambdaLR,
             scaler: torch.amp.GradScaler, method: TrainingHooks, ema: AveragedModel | None = None) -> None:
    """Load a checkpoint's model, optimiser, scheduler, AMP scaler, method, EMA and RNG states."""
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if state["scaler"] and scaler.is_enabled():
        scaler.load_state_dict(state["scaler"])
    method.load_state_dict(state["method_state"])
    if ema is not None and state.get("ema") is not None:
        ema.load_state_dict(state["ema"])
    restore_rng(state["rng"])


def _make_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA of ``model``'s parameters and buffers (BatchNorm statistics follow the averaged weights)."""
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


@torch.no_grad()
def _load_ema_weights(model: nn.Module, ema: AveragedModel) -> None:
    """Copy the averaged float tensors into ``model`` in place (DDP keeps its references). Integer buffers
    (BatchNorm's ``num_batches_tracked``) are counters, not weights: the model keeps its own."""
    averaged = ema.module.state_dict()
    for name, t in model.state_dict().items():
        if t.is_floating_point():
            t.copy_(averaged[name])


def _first_nonfinite(model: nn.Module) -> str | None:
    """Name of the first parameter or float buffer holding a NaN/inf, or None."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def _diverged_message(what: str, epoch: int, cfg: TrainConfig, step: int, lr: float, ckpt: Path | None) -> str:
    kept = (f"the last good checkpoint {ckpt} is kept" if ckpt is not None and ckpt.is_file()
            else "no checkpoint had been written yet")
    return (f"training diverged at epoch {epoch + 1}/{cfg.epochs}, step {step} (lr {lr:.4g}): {what}; {kept}. "
            "Try a lower learning rate (e.g. lr/10), a warm-up (warmup_epochs), or check the input data and "
            "the method's regulariser strength")
