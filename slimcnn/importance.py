"""Channel importance: a scorer takes a channel group and returns one score per channel (higher = keep).

The group (:class:`slimcnn.graph.ChannelGroup`) says which tensors hold its channels; :func:`group_rows` turns
each of them into rows, one per channel, so a scorer never needs to know layer types or roles:

- producers (role ``out``): the filter of each channel (conv weight dim 0, linear rows), plus its bias;
- depthwise convs (``dw``): the channel's own filter, plus its bias;
- consumers (``in``): the input slice every consumer reads from the channel (conv weight dim 1, linear columns);
- norms (``bn``): gamma and beta of the channel.

Scorers (``SCORERS``):

- ``l1``: the paper's (Li et al. 2017): L1 norm of the producing filters, each normalised by its fan-in so that
  wide and narrow producers weigh the same, averaged over producers.
- ``group_l2`` (default for pruning): the squared L2 norm of *everything* the channel owns -- producer filters
  and biases, consumer input slices, BN gamma and beta -- averaged over the group's tensors. With BatchNorm after
  every conv a filter's own norm says little (BN rescales it); what the channel is worth shows in gamma/beta and
  in how strongly the next layers read it. Measured on ResNet-20 at 0.5 MACs (base 86.22, same surgery, same
  widths, 79 fine-tune steps, 5k test images): producers' L1 71.10, producers' L2 71.70, + BN gamma 71.92,
  consumers only 72.86, producers + consumers + BN 74.08.

>>> import torch, slimcnn
>>> from slimcnn.graph import channel_groups
>>> model, x = slimcnn.create("cifar_resnet20"), torch.randn(1, 3, 32, 32)
>>> g = [g for g in channel_groups(model, x) if g.prunable][0]
>>> score("group_l2", model, g).shape == (g.size,)
True
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import nn

from .graph.handlers import handler_for, member_module

Scorer = Callable[[nn.Module, Any], torch.Tensor]


def group_rows(model: nn.Module, group: Any, detach: bool = True) -> Iterator[tuple[str, str, torch.Tensor]]:
    """``(module name, role, rows)`` for every tensor holding ``group``'s channels; ``rows`` has ``group.size``
    rows (one per channel, flattened). Modules without weights (option-A shortcuts) yield nothing."""
    for m in group.members:
        module = member_module(model, m.module)
        sl = slice(m.offset, m.offset + group.size)
        w = getattr(module, "weight", None)
        b = getattr(module, "bias", None)
        if not isinstance(w, torch.Tensor):
            continue
        if detach:
            w = w.detach()
            b = b.detach() if isinstance(b, torch.Tensor) else None
        layer = handler_for(module)
        if layer is not None:
            w = layer.out_first(module, w)  # a transposed conv stores (in, out, ...)
        if m.role in ("out", "dw"):
            yield m.module, "out_weight" if m.role == "out" else "dw_weight", w[sl].flatten(1)
            if isinstance(b, torch.Tensor):
                yield m.module, f"{m.role}_bias", b[sl][:, None]
        elif m.role == "in":
            if w.dim() < 2:
                continue
            yield m.module, "in_weight", w[:, sl].transpose(0, 1).flatten(1)
        elif m.role == "bn":
            if w.dim() != 1:
                continue
            yield m.module, "bn_weight", w[sl][:, None]
            if isinstance(b, torch.Tensor):
                yield m.module, "bn_bias", b[sl][:, None]


def l1_scores(model: nn.Module, group: Any) -> torch.Tensor:
    """The paper's score: mean over producers of the filter's L1 norm divided by its fan-in."""
    parts = [rows.float().abs().mean(1).cpu() for _, kind, rows in group_rows(model, group)
             if kind in ("out_weight", "dw_weight")]
    return torch.stack(parts).mean(0) if parts else torch.zeros(group.size)


def group_l2_scores(model: nn.Module, group: Any) -> torch.Tensor:
    """Squared L2 norm of every row the channel owns (producers, biases, consumers' inputs, BN gamma/beta),
    averaged over the group's tensors (as Torch-Pruning's ``GroupMagnitudeImportance(p=2)`` reduces a group)."""
    parts = [rows.float().pow(2).sum(1).cpu() for _, _, rows in group_rows(model, group)]
    return torch.stack(parts).mean(0) if parts else torch.zeros(group.size)


SCORERS: dict[str, Scorer] = {"l1": l1_scores, "group_l2": group_l2_scores}


def register_scorer(name: str, fn: Scorer) -> None:
    """Add a scorer ``fn(model, group) -> scores``, usable by name wherever a scorer is taken."""
    SCORERS[name] = fn


def check_scorer(name: str) -> str:
    if name not in SCORERS:
        raise ValueError(f"unknown scorer {name!r}; choose one of {', '.join(sorted(SCORERS))}")
    return name


def score(name: str, model: nn.Module, group: Any) -> torch.Tensor:
    """Per-channel scores of ``group`` by the scorer called ``name``."""
    return SCORERS[check_scorer(name)](model, group)
