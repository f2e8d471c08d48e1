"""Knowledge distillation from the uncompressed model: the strongest lever at short compression budgets.

A compressed network starts close to its base, so the base's softened predictions carry far more signal per
image than the one-hot labels (Hinton et al. 2015). :func:`kd_loss` is the usual temperature-scaled KL
divergence; :class:`Distiller` holds a frozen teacher and mixes that term with the task loss::

    (1 - alpha) * task_loss + alpha * T**2 * KL(softmax(teacher / T) || softmax(student / T))

Choices worth knowing:

- The teacher is put in eval mode and every one of its parameters gets ``requires_grad=False`` once, when the
  :class:`Distiller` is built, and it is run under ``torch.no_grad()``: it never receives a gradient and its
  BatchNorm running statistics never move, whatever the student's mode.
- ``alpha == 0`` never runs the teacher, so a run with a distiller at alpha 0 is bit-for-bit the run without one
  (no extra forward, no RNG drawn, the task loss returned as is).
- Segmentation logits (4-D) are distilled pixel by pixel: KL per pixel, averaged over every pixel (the void label
  too: the teacher has an opinion there as well). If the two maps differ in size, the smaller is resized
  (bilinear) to the larger, the same convention as :func:`slimcnn.engine.evaluate.match_size`.
- The loss is computed in float32 even under AMP: a softmax at temperature T in fp16 loses the small
  probabilities that are the point of distillation.
- Under DDP the teacher is not wrapped: each rank runs its own copy on its own shard.

In your own loop::

    distiller = Distiller(copy.deepcopy(model), alpha=0.7, temperature=4.0)
    logits = student(x)
    loss = distiller.loss(x, logits, F.cross_entropy(logits, y))
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Distiller", "kd_loss"]


def _flatten_pixels(logits: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N*H*W, C): every pixel becomes one row of a classification problem."""
    return logits.permute(0, 2, 3, 1).reshape(-1, logits.shape[1])


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """``KL(softmax(teacher/T) || softmax(student/T)) * T**2``, averaged over images (or pixels for 4-D logits).

    The ``T**2`` factor keeps the gradient scale of the soft term independent of ``T`` (Hinton et al.), so
    ``alpha`` means the same thing at every temperature. Zero when the two logits are equal.

    >>> s = torch.tensor([[2.0, 0.0, -1.0]])
    >>> float(kd_loss(s, s))
    0.0
    >>> float(kd_loss(s, torch.zeros(1, 3))) > 0
    True
    """
    if not temperature > 0:
        raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
    s, t = student_logits.float(), teacher_logits.detach().float()
    if s.dim() != t.dim() or s.shape[:2] != t.shape[:2]:
        raise ValueError(f"student logits {tuple(s.shape)} and teacher logits {tuple(t.shape)} do not match "
                         "(same batch and number of classes needed)")
    if s.dim() == 4:
        if s.shape[-2:] != t.shape[-2:]:
            size = max(s.shape[-2:], t.shape[-2:], key=lambda hw: hw[0] * hw[1])
            s = s if s.shape[-2:] == size else F.interpolate(s, size=size, mode="bilinear", align_corners=False)
            t = t if t.shape[-2:] == size else F.interpolate(t, size=size, mode="bilinear", align_corners=False)
        s, t = _flatten_pixels(s), _flatten_pixels(t)
    elif s.dim() != 2:
        raise ValueError(f"kd_loss takes (N, C) or (N, C, H, W) logits, got {tuple(s.shape)}")
    log_student = F.log_softmax(s / temperature, dim=1)
    log_teacher = F.log_softmax(t / temperature, dim=1)
    # 'batchmean' divides the summed KL by the number of rows: images, or pixels once flattened
    return F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True) * temperature ** 2


class Distiller:
    """A frozen teacher plus the weights that mix its soft targets with the task loss.

    ``alpha`` in [0, 1] is the share of the distillation term; ``temperature`` > 0 softens both distributions.
    The teacher is frozen here, in place (eval mode, ``requires_grad=False``): pass a copy if the same module
    must train elsewhere.

    ``memo``, a dict shared by runs that feed the same teacher the same batches, keeps the teacher's logits per
    batch, keyed by the batch's bytes (so a different batch never gets another's targets): the demo's rows share one
    loader seed, so every row sees the same augmented batches and the teacher runs once per batch instead of once
    per row (3.8 s of a 26 s ResNet-20 row on 2 cores).
    """

    def __init__(self, teacher: nn.Module, alpha: float = 0.7, temperature: float = 4.0,
                 memo: dict | None = None) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"the distillation weight alpha must be in [0, 1], got {alpha}")
        if not temperature > 0:
            raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
        self.teacher = teacher.eval()
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.memo = memo

    @property
    def active(self) -> bool:
        """False at alpha 0: the teacher is then never run."""
        return self.alpha > 0

    def to(self, device: torch.device | str) -> Distiller:
        self.teacher.to(device)
        return self

    @torch.no_grad()
    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The teacher's prediction for ``x`` (its last output if it is an iterative model), without gradient."""
        from .outputs import final_output

        key = None
        if self.memo is not None:
            import hashlib

            key = (tuple(x.shape), str(x.dtype), hashlib.blake2b(x.detach().cpu().numpy().tobytes(),
                                                               digest_size=16).digest())
            if key in self.memo:
                return self.memo[key].to(x.device)
        self.teacher.eval()  # cheap insurance in case someone called .train() on it since
        out = final_output(self.teacher(x))
        if key is not None:
            self.memo[key] = out.cpu()
        return out

    def combine(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                task_loss: torch.Tensor) -> torch.Tensor:
        """``(1 - alpha) * task_loss + alpha * kd_loss``; ``task_loss`` itself when inactive (alpha 0)."""
        if not self.active or teacher_logits is None:
            return task_loss
        return (1.0 - self.alpha) * task_loss + self.alpha * kd_loss(student_logits, teacher_logits, self.temperature)

    def loss(self, x: torch.Tensor, student_logits: torch.Tensor, task_loss: torch.Tensor) -> torch.Tensor:
        """The combined loss for one batch: runs the teacher on ``x`` only when it is needed."""
        return self.combine(student_logits, self.teacher_logits(x) if self.active else None, task_loss)

    def record(self) -> dict[str, float]:
        """The settings, for reports and for checking that a resumed run distils the same way."""
        return {"alpha": self.alpha, "temperature": self.temperature}
