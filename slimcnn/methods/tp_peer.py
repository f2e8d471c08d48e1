"""The peer: Torch-Pruning's own magnitude pruner, driven through its own API, for side-by-side comparison.

Torch-Pruning (DepGraph) cannot see through our option-A shortcut (a parameter-free channel scatter; on the
public option-A ResNet it silently returns a model that fails at forward). So, before handing the model to
Torch-Pruning, ``prepare`` replaces every :class:`~slimcnn.models.PadShortcut` with its exact equivalent: a
stride-2 1x1 convolution whose fixed (frozen) weight embeds input channel ``src[i]`` into output channel
``dst[i]``. That is lossless (checked) but costs extra MACs (+0.26M on ResNet-20/56); the figures we report
count them, with our own counter, so the peer is measured on the same function at an honest price.

``finalize`` runs ``torch_pruning.pruner.BasePruner`` with ``GroupMagnitudeImportance`` (L2 by default) and
bisects its ``pruning_ratio`` until our MACs count lands within ``tol`` of the target (a ratio of the MACs of
the model given to ``prepare``, or absolute MACs), then checks that the result still runs.

Fairness (the peer gets exactly what our rows get, no more):

- **MACs within 1% of the target.** One uniform ratio moves every layer of the same width at once (on ResNet-20
  all 16-channel layers lose a channel at the same ratio), so the bisection alone landed at 0.506 of the base
  for a 0.5 target. When it cannot get within ``tol``, the two ratios around the target are mixed through
  Torch-Pruning's own ``pruning_ratio_dict``: the first ``k`` convs (in model order) take the higher ratio, the
  rest the lower one, and ``k`` is bisected. Still off by more than ``tol``: :class:`SurgeryError`.
- **Frozen shortcuts stay frozen.** Torch-Pruning re-wraps every pruned weight as a new ``nn.Parameter``, so the
  frozen 1x1 shortcut convs came back trainable (~1.3k extra trainable weights on ResNet-20, worth ~1 point);
  ``finalize`` freezes them again.
- BatchNorm recalibration after finalize is done by :func:`slimcnn.compress.compress` for every row alike.
- **Aligned widths** (``round_to=N``) go to Torch-Pruning's own ``round_to`` argument, as our methods take theirs.
  Its MACs then jump and are not monotone in the ratio, so when the bisection misses, a scan of ratios and split
  points follows (``_scan_aligned``, with the measurement). Still no result within ``tol``: the closest is kept
  (``within_tol: false`` in the report) rather than failing, as for our methods.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..graph.replace import set_submodule
from ..graph.validate import SurgeryError, prediction, reference_output, validate
from ..layers import PadShortcut
from ..profile import profile
from .base import Method, macs_goal, within_tol

if TYPE_CHECKING:
    from ..graph import ChannelGraph


def shortcut_as_conv(sc: PadShortcut) -> nn.Conv2d:
    """The 1x1 strided conv equal to an option-A shortcut (weight frozen: it is an embedding, not a filter)."""
    conv = nn.Conv2d(sc.in_channels, sc.out_channels, 1, stride=sc.stride, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for s, d in zip(sc.src, sc.dst):
            conv.weight[d, s, 0, 0] = 1.0
    conv.weight.requires_grad_(False)
    return conv


def _excluded_producers(graph: ChannelGraph, model: nn.Module) -> list[str]:
    """--exclude for Torch-Pruning: the producers of every channel group the active layer policy leaves whole,
    as its ``ignored_layers``, so the peer keeps the same layers whole as our methods do (inputs included)."""
    from ..graph.policy import active_policy

    if not active_policy():
        return []
    return sorted({m.module for g in graph.groups_for(model) if "excluded:" in g.reason
                   for m in g.members if m.role in ("out", "dw")})


class TorchPruningPeer(Method):
    """Torch-Pruning's ``GroupMagnitudeImportance`` pruner at a MACs target (see the module docstring)."""

    name = "tp"
    trains_before_finalize = False
    method_share = 0.0  # its recipe: share of the epoch budget before finalize
    # no segmentation: Torch-Pruning protects only a final nn.Linear, so it would prune a conv classifier's classes
    layer_control = frozenset({"exclude"})  # as Torch-Pruning's ignored_layers
    cli_args = [("--tp-global", {"dest": "global_pruning", "action": "store_const", "const": True, "default": None,
                                 "help": "tp: Torch-Pruning's global ranking instead of a uniform ratio per layer"})]

    def __init__(self, target_macs: float = 0.5, global_pruning: bool = False, p: int = 2, tol: float = 0.01,
                 mode: str | None = None, round_to: int | None = None) -> None:
        from ..graph.targeting import check_round_to

        self.target_macs, self.global_pruning, self.p, self.tol = target_macs, global_pruning, p, tol
        self.round_to = check_round_to(round_to)
        if mode is not None:  # the CLI's --mode: uniform / global
            self.global_pruning = mode == "global"
        self.result: dict = {}

    def prepare(self, model: nn.Module, example_input: torch.Tensor, graph: ChannelGraph | None = None) -> nn.Module:
        super().prepare(model, example_input, graph)
        self.base_macs = profile(model, example_input=example_input[:1]).macs
        self.excluded = _excluded_producers(self.graph, model)
        shortcuts = [n for n, m in model.named_modules() if isinstance(m, PadShortcut)]
        if not shortcuts:
            return model
        ref = reference_output(model, example_input)
        for name in shortcuts:
            set_submodule(model, name, shortcut_as_conv(model.get_submodule(name)))
        validate(model, example_input, ref, "option-A shortcuts as 1x1 convs", lossless_tol=1e-5)
        self.graph.invalidate()  # the model changed in place: its groups must be traced again if asked for
        self.result["shortcuts_converted"] = len(shortcuts)
        self.shortcuts = shortcuts
        return model

    def _prune(self, model: nn.Module, ratio: float, mix: tuple[float, int] | None = None) -> nn.Module:
        """A pruned copy at ``ratio``; ``mix=(other ratio, k)`` gives the first ``k`` convs the other ratio."""
        import torch_pruning as tp

        m = copy.deepcopy(model)
        x = self.example_input
        out = prediction(m, x)
        heads = [mod for mod in m.modules() if isinstance(mod, nn.Linear) and mod.out_features == out.shape[1]]
        per_layer = None
        if mix is not None:
            convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
            per_layer = {mod: (mix[0] if i < mix[1] else ratio) for i, mod in enumerate(convs)}
        ignored = heads + [m.get_submodule(n) for n in getattr(self, "excluded", [])]  # --exclude
        if ratio > 0 or per_layer:
            pruner = tp.pruner.BasePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=self.p),
                                          pruning_ratio=ratio, pruning_ratio_dict=per_layer,
                                          global_pruning=self.global_pruning, ignored_layers=ignored,
                                          round_to=self.round_to)
            pruner.step()
        return m

    def _lands(self, macs: float) -> bool:
        return bool(within_tol(macs, self.base_macs, self.target_macs, self.tol))

    def _measure(self, model: nn.Module, ratio: float, mix: tuple[float, int] | None = None) -> tuple[nn.Module, int]:
        try:
            cand = self._prune(model, ratio, mix)
            return cand, profile(cand, example_input=self.example_input[:1]).macs
        except Exception as e:  # Torch-Pruning failing on this model is a finding, not a crash
            raise SurgeryError(f"Torch-Pruning failed at pruning_ratio {ratio:.3f}: {type(e).__name__}: {e}") from None

    def finalize(self, model: nn.Module) -> nn.Module:
        target = macs_goal(self.target_macs, self.base_macs)
        ref = reference_output(model, self.example_input)
        lo, hi, best = 0.0, 0.95, None
        for _ in range(14):  # bisection on Torch-Pruning's channel ratio; MACs fall as the ratio grows
            mid = (lo + hi) / 2
            cand, macs = self._measure(model, mid)
            if best is None or abs(macs - target) < abs(best[1] - target):
                best = (cand, macs, mid, None)
            if self._lands(macs):
                break
            lo, hi = (mid, hi) if macs > target else (lo, mid)
        if not self._lands(best[1]):
            # lo leaves too many MACs, hi too few: give the first k convs hi, bisect k
            n_convs = sum(isinstance(mod, nn.Conv2d) for mod in model.modules())
            k_lo, k_hi = 0, n_convs
            while k_hi - k_lo > 1:
                k = (k_lo + k_hi) // 2
                cand, macs = self._measure(model, lo, (hi, k))
                if abs(macs - target) < abs(best[1] - target):
                    best = (cand, macs, lo, (hi, k))
                if self._lands(macs):
                    break
                k_lo, k_hi = (k, k_hi) if macs > target else (k_lo, k)
        if not self._lands(best[1]) and self.round_to:
            best = self._scan_aligned(model, target, best)
        cand, macs, ratio, mix = best
        within = self._lands(macs)
        if not within and not self.round_to:
            raise SurgeryError(f"Torch-Pruning cannot land within {self.tol:.0%} of {target / 1e6:.2f}M MACs on this "
                               f"model: closest {macs / 1e6:.2f}M at pruning_ratio {ratio:.3f}")
        validate(cand, self.example_input, ref, f"Torch-Pruning result at pruning_ratio {ratio:.3f}")
        frozen = self._refreeze(cand)
        self.result.update({"pruning_ratio": ratio, "mixed_ratio": None if mix is None else
                            {"first_convs_ratio": mix[0], "first_convs": mix[1]},
                            "macs": macs, "target_macs_abs": target, "within_tol": within, "frozen_shortcuts": frozen})
        if self.round_to:
            self.result["round_to"] = self.round_to
        return cand

    def _scan_aligned(self, model: nn.Module, target: float, best: tuple) -> tuple:
        """The search for ``round_to``, where MACs are not monotone in the ratio, so bisection misses landings.

        Torch-Pruning floors each kept width to a multiple of ``round_to``: a 16-wide layer asked to lose one
        channel loses 8, and a layer whose floor is 0 is left whole. Measured on ResNet-56 with ``round_to=8``:
        ratios 0.01 / 0.13 / 0.26 / 0.38 give 0.522 / 0.456 / 0.297 / 0.251 of the MACs, but 0.51 / 0.63 / 0.76 give
        0.411 / 0.385 / 0.678, and the bisection's best was 0.484. So: every ratio on a 0.01 grid, then every split
        point ``k`` between the grid's closest ratio above the target and its closest below, either one taking the
        first ``k`` convs: 0.13 for the first 45 convs and 0.01 for the rest lands at 0.497 there.
        """
        def keep(cand: nn.Module, macs: int, ratio: float, mix: tuple[float, int] | None) -> bool:
            nonlocal best
            if abs(macs - target) < abs(best[1] - target):
                best = (cand, macs, ratio, mix)
            return self._lands(best[1])

        grid = {}
        for i in range(96):
            cand, grid[i / 100] = self._measure(model, i / 100)
            if keep(cand, grid[i / 100], i / 100, None):
                return best
        above = [r for r in grid if grid[r] > target]
        below = [r for r in grid if grid[r] < target]
        if not above or not below:
            return best
        lo = min(above, key=lambda r: grid[r] - target)
        hi = min(below, key=lambda r: target - grid[r])
        n_convs = sum(isinstance(mod, nn.Conv2d) for mod in model.modules())
        for k in range(1, n_convs):
            for rest, first in ((lo, hi), (hi, lo)):  # which ratio the first convs take matters as much as k
                cand, macs = self._measure(model, rest, (first, k))
                if keep(cand, macs, rest, (first, k)):
                    return best
        return best

    def _refreeze(self, model: nn.Module) -> int:
        """Freeze the shortcut convs again: Torch-Pruning hands back every pruned weight as a new trainable
        ``nn.Parameter``. Returns how many were frozen."""
        for name in getattr(self, "shortcuts", []):
            model.get_submodule(name).weight.requires_grad_(False)
        return len(getattr(self, "shortcuts", []))

    def report(self) -> dict:
        return {"tp": dict(self.result)}
