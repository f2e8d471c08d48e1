"""Segmentation metrics from a confusion matrix: per-class IoU, mIoU and pixel accuracy.

Conventions:
- pixels whose target is ``ignore_index`` (CamVid void = 11) or outside [0, num_classes) are not counted at all,
  whatever is predicted there;
- IoU_c = TP_c / (TP_c + FP_c + FN_c). A class absent from both the targets and the predictions of every counted
  pixel has no IoU (0/0): its entry is ``None`` and it is left out of the mean. A class predicted somewhere but
  never present in the targets has IoU 0 and counts (it is a false positive everywhere);
- ``miou`` (mean over the classes that have an IoU) and ``pixel_acc`` are percentages, like top-1.
"""
from __future__ import annotations

import torch


class SegMetrics:
    """Accumulate a confusion matrix over batches, then :meth:`compute`.

    >>> m = SegMetrics(num_classes=3, ignore_index=3)
    >>> m.update(torch.tensor([[0, 1, 1, 2]]), torch.tensor([[0, 1, 2, 3]]))
    >>> r = m.compute()
    >>> r["pixel_acc"], r["iou"]
    (66.66666666666667, [100.0, 50.0, 0.0])
    """

    def __init__(self, num_classes: int = 11, ignore_index: int | None = 11) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.reset()

    def reset(self) -> None:
        #: confusion[target, prediction] pixel counts; sum it across processes to merge shards
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    @torch.no_grad()
    def update(self, output: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``output`` logits (N, C, H, W) or predicted labels (N, H, W); ``target`` (N, H, W)."""
        if output.dim() == target.dim() + 1:
            if output.shape[1] != self.num_classes:
                raise ValueError(f"logits have {output.shape[1]} classes, SegMetrics expects {self.num_classes}")
            output = output.argmax(1)
        if output.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(output.shape)} does not match target {tuple(target.shape)}")
        pred, tgt = output.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = (tgt >= 0) & (tgt < self.num_classes)
        if self.ignore_index is not None:
            keep &= tgt != self.ignore_index
        pred, tgt = pred[keep], tgt[keep]
        if pred.numel() and (pred.min() < 0 or pred.max() >= self.num_classes):
            raise ValueError(f"predicted labels must lie in [0, {self.num_classes}); got {pred.min()}..{pred.max()}")
        k = self.num_classes
        self.confusion += torch.bincount(tgt * k + pred, minlength=k * k).view(k, k)

    def sync(self) -> None:
        """Sum the confusion matrix over all processes (no-op unless torch.distributed is initialised)."""
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            c = self.confusion.to("cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(c)
            self.confusion = c.cpu()

    def compute(self) -> dict:
        """``{"miou", "pixel_acc", "iou": [per class, None where undefined], "pixels"}``."""
        c = self.confusion.double()
        tp = c.diag()
        union = c.sum(0) + c.sum(1) - tp
        iou = [None if u == 0 else float(100 * t / u) for t, u in zip(tp.tolist(), union.tolist())]
        defined = [v for v in iou if v is not None]
        total = float(c.sum())
        return {"miou": sum(defined) / len(defined) if defined else float("nan"),
                "pixel_acc": 100 * float(tp.sum()) / total if total else float("nan"),
                "iou": iou, "pixels": int(total)}
