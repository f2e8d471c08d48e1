"""Running a model in train mode and in eval mode, without side effects, for the trace and the surgery checks.

A network's forward can differ between the two modes: GoogLeNet and Inception-v3 add auxiliary heads in training
that read inner feature maps. A trace of eval mode alone never sees those readers, and surgery would hand back a
net that breaks as soon as it trains; so the trace (``groups.py``) and the checks (``validate.py``) run both.

What a run here leaves as it was: every module's train/eval flag, every buffer (a train-mode forward updates
BatchNorm's running statistics) and the global random number generators. Dropout layers stay off in train mode:
a dropout mask is drawn over the tensor's shape, so a pruned net would draw other masks than the original and no
output could be compared; dropout never moves channels, so the trace loses nothing.

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
>>> x = torch.randn(1, 3, 8, 8)
>>> with in_mode(net, "train", x.device):
...     y = net(x)
>>> net.training, int(net[1].num_batches_tracked)      # nothing changed
(False, 0)
>>> [tuple(t.shape) for t in inputs_for(x, "train")]   # a batch of one, then two, for BatchNorm's sake
[(1, 3, 8, 8), (2, 3, 8, 8)]
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from ..inputs import doubled

#: the modes a model is traced and checked in; train first, as its forward runs every branch eval mode runs
MODES = ("train", "eval")


def inputs_for(x: Any, mode: str) -> list[Any]:
    """The example inputs to try in ``mode``, in order: ``x``, then, in train mode and for a batch of one (a tensor
    or a list of one image), a batch of two (the sample and its mirror image). BatchNorm cannot train on one value
    per channel, which is what Inception-v3's auxiliary head sees at batch 1; the larger batch is only a fallback,
    as it costs time."""
    two = doubled(x) if mode == "train" else None
    return [x] if two is None else [x, two]


@contextmanager
def in_mode(model: nn.Module, mode: str, device: torch.device, seed: int = 0) -> Iterator[nn.Module]:
    """``model`` in ``mode`` (``"train"`` or ``"eval"``) for the block, with the random generators seeded by
    ``seed``; afterwards its flags, buffers and the generators are as they were (see the module docstring)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    flags = [(m, m.training) for m in model.modules()]
    buffers = [(m, name, b, b.detach().clone()) for m in model.modules() for name, b in m._buffers.items()
               if b is not None]
    try:
        model.train(mode == "train")
        for m in model.modules():
            if isinstance(m, nn.modules.dropout._DropoutNd):  # every dropout layer, alpha ones too
                m.eval()
        with _seeded(device, seed):
            yield model
    finally:
        with torch.no_grad():
            for m, name, b, value in buffers:
                b.copy_(value)
                setattr(m, name, b)  # a forward that rebound the attribute gets the original tensor back
        for m, flag in flags:
            m.training = flag


@contextmanager
def _seeded(device: torch.device, seed: int) -> Iterator[None]:
    """A fixed seed inside, the caller's generator states outside: the trace and the checks draw the same numbers
    every time and leave a training run's random stream untouched."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        for i in cuda:
            torch.cuda.default_generators[i].manual_seed(seed)
        yield
