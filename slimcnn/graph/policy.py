"""Layer control: layers that are never pruned (``exclude``) and per-layer floors on the kept fraction
(``min_keep``), applied where every channel-pruning method gets its groups.

A method never sees the policy itself. :func:`slimcnn.graph.channel_groups` applies the active one (set with
:func:`layer_policy`, a context manager) to the groups it returns: an excluded group becomes unprunable, with the
reason, and a floored group carries ``min_keep``, the fewest channels the width allocators
(:mod:`slimcnn.graph.targeting`) may leave it. So L1, Dagger and C-SGD (and any method built on the groups) obey
it with no code of their own, and a user's own loop gets it by wrapping ``prepare`` ... ``finalize``::

    with layer_policy(exclude=["head"], min_keep={"layer1.*": 0.75}):
        model = method.prepare(model, x)
        ...
        compact = method.finalize(model)

Matching: a glob (``fnmatch``, case-sensitive) matches a module when it matches its name or the name of a module
that contains it, so ``head`` covers ``head.fc1`` and ``head.fc2``, and a method's wrapper inside a layer does not
hide the layer.

- ``exclude``: a matched layer keeps its exact shape. Every group the layer produces, reads or normalises is left
  whole, so both its outputs and its inputs keep their width (a head stays whole, not just its inner widths).
- ``min_keep``: a group whose producer (or depthwise conv) matches keeps at least ``ceil(R * size)`` channels;
  when several floors match, the highest applies. A floor of the whole width makes the group unprunable.
"""
from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .group_types import ChannelGroup


def matches(name: str, pattern: str) -> bool:
    """Whether ``pattern`` matches module ``name`` or a module containing it."""
    parts = name.split(".")
    return any(fnmatch.fnmatchcase(".".join(parts[:i]), pattern) for i in range(len(parts), 0, -1))


@dataclass(frozen=True)
class LayerPolicy:
    """Globs of layers never pruned, and ``(glob, ratio)`` floors on the fraction of channels kept."""

    exclude: tuple[str, ...] = ()
    min_keep: tuple[tuple[str, float], ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        for pattern, ratio in self.min_keep:
            if not 0.0 < ratio <= 1.0:
                raise ValueError(f"--min-keep {pattern}={ratio}: the kept fraction must be in (0, 1]")

    def __bool__(self) -> bool:
        return bool(self.exclude or self.min_keep)

    def excluded(self, name: str) -> str | None:
        """The first exclude glob matching module ``name``, or None."""
        return next((p for p in self.exclude if matches(name, p)), None)

    def floor(self, name: str) -> float:
        """The highest min-keep ratio matching module ``name`` (0 when none does)."""
        return max((r for p, r in self.min_keep if matches(name, p)), default=0.0)

    def check(self, model: nn.Module) -> None:
        """Every glob must match at least one layer with weights: a typo would otherwise exclude nothing, silently."""
        names = [n for n, m in model.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
        for flag, pattern in [("--exclude", p) for p in self.exclude] + [("--min-keep", p) for p, _ in self.min_keep]:
            if not any(matches(n, pattern) for n in names):
                shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
                raise ValueError(f"{flag} {pattern!r} matches no layer of the model; its layers: {shown}")

    def apply(self, groups: Iterable[ChannelGroup]) -> None:
        """Mark excluded groups unprunable and set each floored group's ``min_keep`` (in place)."""
        for g in groups:
            hit = next(((m.module, p) for m in g.members if (p := self.excluded(m.module))), None)
            if hit is not None:
                g.prunable = False
                why = f"excluded: {hit[0]} matches --exclude {hit[1]!r}"
                g.reason = f"{g.reason}; {why}" if g.reason else why
                continue
            ratio = max((self.floor(m.module) for m in g.members if m.role in ("out", "dw")), default=0.0)
            if ratio > 0:
                g.min_keep = max(g.min_keep, min(g.size, math.ceil(ratio * g.size - 1e-9)))
            if g.min_keep >= g.size and g.prunable:
                # nothing left to prune: unprunable for every method, so no search (Dagger's gates) spends its
                # budget on channels the allocator must keep
                g.prunable = False
                why = f"--min-keep floors it at its whole width ({g.size} channels)"
                g.reason = f"{g.reason}; {why}" if g.reason else why

    def record(self) -> dict[str, Any]:
        """The policy as report.json states it."""
        return {"exclude": list(self.exclude), "min_keep": {p: r for p, r in self.min_keep}}


_ACTIVE: ContextVar[LayerPolicy | None] = ContextVar("slimcnn_layer_policy", default=None)


def active_policy() -> LayerPolicy | None:
    """The policy :func:`layer_policy` set for the code running now, if any."""
    return _ACTIVE.get()


@contextlib.contextmanager
def layer_policy(exclude: Iterable[str] = (), min_keep: Mapping[str, float] | None = None,
                 policy: LayerPolicy | None = None) -> Iterator[LayerPolicy]:
    """Apply ``exclude`` / ``min_keep`` (or a ready ``policy``) to every channel group built in the body."""
    pol = policy if policy is not None else LayerPolicy(tuple(exclude), tuple((min_keep or {}).items()))
    token = _ACTIVE.set(pol)
    try:
        yield pol
    finally:
        _ACTIVE.reset(token)


def parse_min_keep(text: str) -> tuple[str, float]:
    """``GLOB=R`` from the command line."""
    pattern, sep, ratio = text.rpartition("=")
    try:
        value = float(ratio)
    except ValueError:
        value = float("nan")
    if not sep or not pattern or not 0.0 < value <= 1.0:
        raise ValueError(f"--min-keep expects GLOB=R with R in (0, 1], such as 'layer1.*=0.5'; got {text!r}")
    return pattern, value
