"""Evaluation: top-1/top-5 for classification, mIoU and pixel accuracy for segmentation.

>>> from slimcnn.data import cifar10_loaders
>>> test = cifar10_loaders("../shared/data/cifar10-jpeg", test_limit=500, splits=("test",))["test"]  # doctest: +SKIP
>>> evaluate(model, test)                                                                           # doctest: +SKIP
{'top1': ..., 'top5': ..., 'loss': ..., 'n': 500}
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from ..progress import bar as progress_bar, log_line, on_terminal
from ..outputs import final_output

TASKS = ("classification", "segmentation")
#: CamVid's void label: ignored by the segmentation loss and metrics
SEG_IGNORE_INDEX = 11


def check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {', '.join(TASKS)}, got {task!r}")


def match_size(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Segmentation logits resized (bilinear) to the label map when a model predicts at lower resolution."""
    if logits.shape[-2:] != target.shape[-2:]:
        logits = F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
    return logits


def task_loss(task: str, logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy; for segmentation the void label is ignored and logits are resized to the label map."""
    if task == "segmentation":
        logits = match_size(logits, target)
        return F.cross_entropy(logits.float(), target, ignore_index=SEG_IGNORE_INDEX, reduction=reduction)
    return F.cross_entropy(logits.float(), target, reduction=reduction)


def topk_hits(logits: torch.Tensor, target: torch.Tensor, k: int = 5) -> tuple[int, int]:
    """(top-1 hits, top-k hits) in a batch; k is capped at the number of classes."""
    k = min(k, logits.shape[1])
    hit = logits.topk(k, dim=1).indices.eq(target.view(-1, 1))
    return int(hit[:, 0].sum()), int(hit.any(dim=1).sum())


def autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA when ``amp``; a no-op otherwise (AMP is never used on CPU)."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


def seg_metrics(num_classes: int):
    # imported here: slimcnn.metrics belongs to the segmentation work and classification must not need it
    from ..metrics import SegMetrics

    return SegMetrics(num_classes, ignore_index=SEG_IGNORE_INDEX)


@torch.no_grad()
def predict(model: nn.Module, loader: Iterable, device: str | torch.device = "cpu", desc: str = "eval",
            progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Every prediction (float32, on the CPU) and label over ``loader``, to compare two models output by output;
    the model is put in eval mode and left so.

    >>> from torch import nn
    >>> logits, labels = predict(nn.Flatten(), [(torch.eye(3).view(3, 3, 1), torch.tensor([0, 1, 1]))],
    ...                          progress=False)
    >>> logits.shape, top1(logits, labels)
    (torch.Size([3, 3]), 66.67)
    """
    model.eval().to(device)
    outs, labels = [], []
    for x, y in progress_bar(loader, desc=desc, enabled=progress):
        outs.append(final_output(model(x.to(device))).float().cpu())
        labels.append(y)
    return torch.cat(outs), torch.cat(labels)


def top1(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent, rounded to 2 decimals, as the compression report gives it."""
    return round((logits.argmax(1) == labels).float().mean().item() * 100, 2)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, task: str = "classification", device: str | torch.device = "cpu",
             amp: bool = False, progress: bool = True) -> dict[str, Any]:
    """Evaluate ``model`` on every batch of ``loader``.

    Classification returns ``{"top1", "top5", "loss", "n"}`` (accuracies in percent, ``n`` images);
    segmentation returns ``{"miou", "pixel_acc", "iou", "loss", "n"}`` from ``slimcnn.metrics.SegMetrics``
    (void label 11 ignored; ``loss`` per labelled pixel, ``n`` images). Under torchrun a loader sharded over
    ranks (``loader.world_size > 1``) has its sums all-reduced; an unsharded loader gives every rank the full
    result. The model's train/eval mode is restored afterwards.

    >>> evaluate(model, test_loader)["top1"]  # doctest: +SKIP
    83.2
    """
    check_task(task)
    device = torch.device(device)
    sharded = getattr(loader, "world_size", 1) > 1 and distributed.is_distributed()
    was_training = model.training
    model.eval()
    loss_sum, top1, top5, n, pixels = 0.0, 0, 0, 0, 0
    metrics = None
    try:
        bar = progress_bar(loader, desc="eval", enabled=progress and distributed.is_main())
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast(device, amp):
                logits = final_output(model(x))
            if task == "segmentation":
                logits = match_size(logits, y)
            loss_sum += float(task_loss(task, logits, y, reduction="sum"))
            if task == "segmentation":
                if metrics is None:
                    metrics = seg_metrics(logits.shape[1])
                metrics.update(logits, y)
                pixels += int((y != SEG_IGNORE_INDEX).sum())  # the loss is averaged over labelled pixels
            else:
                h1, h5 = topk_hits(logits, y)
                top1, top5 = top1 + h1, top5 + h5
            n += len(y)
    finally:
        model.train(was_training)
    if sharded:
        sums = distributed.all_reduce_sum(torch.tensor([loss_sum, top1, top5, n, pixels], dtype=torch.float64,
                                                        device=device))
        loss_sum, top1, top5, n, pixels = (float(sums[0]), *(int(v) for v in sums[1:].tolist()))
        if metrics is not None:
            metrics.sync()  # sums the confusion matrices of all ranks
    if n == 0:
        raise ValueError("the evaluation loader yielded no samples")
    if task == "segmentation":
        out = dict(metrics.compute())
        out.update(loss=loss_sum / max(pixels, 1), n=n)
    else:
        out = {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss_sum / n, "n": n}
    if progress and distributed.is_main() and not on_terminal():  # a log: this line instead of the bar
        key = "miou" if task == "segmentation" else "top1"
        log_line(f"eval: {key} {out[key]:.2f}  loss {out['loss']:.4f}  ({n} images)")
    return out
