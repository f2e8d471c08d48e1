"""Gate statistics: the mean and spread of the feedback gates' values per stage and iteration, over a data set.

Collected by forward hooks on the gates of a :class:`~slimcnn.gating.rig.FeedbackNet` while something else runs
the model (an evaluation, typically), so the numbers cost no extra pass::

    >>> with collect_gate_stats(model) as stats:            # doctest: +SKIP
    ...     metrics = evaluate(model, test_loader)
    >>> stats.result()                                       # doctest: +SKIP
    {'0': {'2': {'mean': 0.93, 'std': 0.041, 'n': 1310720}}, '1': {'2': {...}}}

``result()`` maps stage (0 = lowest, the numbering of ``gate_stages``) -> iteration (1-based; gates act at
t = 2..T) -> ``mean`` and ``std`` (population standard deviation) over every gate value computed at that stage
and iteration (every image, channel and position of the gate tensor: N x 1 x H x W for spatial gates,
N x C x 1 x 1 for channel gates, N x C x H x W for both) and ``n``, the number of those values. Gate values lie
in [0, 1] (a sigmoid), so are the means. A gate mean near 1 with a small std says the feedback barely acts; a
large std says it picks out images, channels or positions. DIG's propagator gates are not included: they shape
the cascade's sources, not a stage's input. A model without gates (no feedback, T = 1, ``variant="none"``)
gives ``{}``.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .rig import FeedbackNet


class GateStats:
    """The context manager :func:`collect_gate_stats` returns: hooks on while inside, :meth:`result` after."""

    def __init__(self, model: nn.Module) -> None:
        net = getattr(model, "module", model)  # a DDP-wrapped model's own module
        self.net = net if isinstance(net, FeedbackNet) else None
        # (stage, 1-based iteration) -> [sum, sum of squares, count], float64 tensors kept on the model's device
        self._sums: dict[tuple[int, int], list[torch.Tensor]] = {}
        self._hooks: list[Any] = []

    def _hook(self, stage: int):
        def record(module: nn.Module, inputs: Any, out: torch.Tensor) -> None:
            if self.net is None or self.net.iteration is None:
                return
            g = out.detach().double()
            acc = self._sums.setdefault((stage, self.net.iteration + 1), [g.new_zeros(()), g.new_zeros(()), 0])
            acc[0] += g.sum()
            acc[1] += (g * g).sum()
            acc[2] += g.numel()

        return record

    def __enter__(self) -> "GateStats":
        if self.net is not None:
            for gate_set in self.net.gates:
                for s, gate in gate_set.items():
                    self._hooks.append(gate.register_forward_hook(self._hook(int(s))))
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()

    def result(self) -> dict[str, dict[str, dict[str, float | int]]]:
        """``{stage: {iteration: {"mean", "std", "n"}}}`` with string keys (JSON-ready), sorted."""
        out: dict[str, dict[str, dict[str, float | int]]] = {}
        for (stage, t), (total, squares, n) in sorted(self._sums.items()):
            mean = float(total) / n
            var = max(float(squares) / n - mean * mean, 0.0)  # float64 sums of values in [0, 1]: no cancellation worth fearing
            out.setdefault(str(stage), {})[str(t)] = {"mean": mean, "std": math.sqrt(var), "n": int(n)}
        return out


def collect_gate_stats(model: nn.Module) -> GateStats:
    """Hooks that record the gate values of ``model`` (a RIG or DIG, or DDP around one; any other model
    records nothing) while the ``with`` block runs it; see the module docstring for the result's structure."""
    return GateStats(model)
