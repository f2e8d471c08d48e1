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
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..graph.replace import set_submodule
from ..graph.validate import SurgeryError, reference_output, validate
from ..models.cifar_resnet import PadShortcut
from ..profile import profile
from .base import Method


def shortcut_as_conv(sc: PadShortcut) -> nn.Conv2d:
    """The 1x1 strided conv equal to an option-A shortcut (weight frozen: it is an embedding, not a filter)."""
    conv = nn.Conv2d(sc.in_channels, sc.out_channels, 1, stride=sc.stride, bias=False)
    with torch.no_grad():
        conv.weight.zero_()
        for s, d in zip(sc.src, sc.dst):
            conv.weight[d, s, 0, 0] = 1.0
    conv.weight.requires_grad_(False)
    return conv


class TorchPruningPeer(Method):
    """Torch-Pruning's ``GroupMagnitudeImportance`` pruner at a MACs target (see the module docstring)."""

    name = "tp"
    trains_before_finalize = False
    cli_args = [("--tp-global", {"dest": "global_pruning", "action": "store_const", "const": True, "default": None,
                                 "help": "tp: Torch-Pruning's global ranking instead of a uniform ratio per layer"})]

    def __init__(self, target_macs: float = 0.5, global_pruning: bool = False, p: int = 2, tol: float = 0.01,
                 mode: str | None = None) -> None:
        self.target_macs, self.global_pruning, self.p, self.tol = target_macs, global_pruning, p, tol
        if mode is not None:  # the CLI's --mode: uniform / global
            self.global_pruning = mode == "global"
        self.result: dict = {}

    def prepare(self, model: nn.Module, example_input: torch.Tensor) -> nn.Module:
        self.example_input = example_input
        self.base_macs = profile(model, example_input=example_input[:1]).macs
        shortcuts = [n for n, m in model.named_modules() if isinstance(m, PadShortcut)]
        if not shortcuts:
            return model
        ref = reference_output(model, example_input)
        for name in shortcuts:
            set_submodule(model, name, shortcut_as_conv(model.get_submodule(name)))
        validate(model, example_input, ref, "option-A shortcuts as 1x1 convs", lossless_tol=1e-5)
        self.result["shortcuts_converted"] = len(shortcuts)
        return model

    def _prune(self, model: nn.Module, ratio: float) -> nn.Module:
        import torch_pruning as tp

        m = copy.deepcopy(model)
        x = self.example_input
        out = reference_output(m, x)
        heads = [mod for mod in m.modules() if isinstance(mod, nn.Linear) and mod.out_features == out.shape[1]]
        if ratio > 0:
            pruner = tp.pruner.BasePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=self.p),
                                          pruning_ratio=ratio, global_pruning=self.global_pruning,
                                          ignored_layers=heads)
            pruner.step()
        return m

    def finalize(self, model: nn.Module) -> nn.Module:
        target = self.target_macs * self.base_macs if self.target_macs <= 1 else self.target_macs
        x1 = self.example_input[:1]
        ref = reference_output(model, self.example_input)
        lo, hi, best = 0.0, 0.95, None
        for _ in range(14):  # bisection on Torch-Pruning's channel ratio; MACs fall as the ratio grows
            mid = (lo + hi) / 2
            try:
                cand = self._prune(model, mid)
                macs = profile(cand, example_input=x1).macs
            except Exception as e:  # Torch-Pruning failing on this model is a finding, not a crash
                raise SurgeryError(f"Torch-Pruning failed at pruning_ratio {mid:.3f}: {type(e).__name__}: {e}") from None
            if best is None or abs(macs - target) < abs(best[1] - target):
                best = (cand, macs, mid)
            if abs(macs - target) <= self.tol * target:
                break
            lo, hi = (mid, hi) if macs > target else (lo, mid)
        cand, macs, ratio = best
        validate(cand, self.example_input, ref, f"Torch-Pruning result at pruning_ratio {ratio:.3f}")
        self.result.update({"pruning_ratio": ratio, "macs": macs, "target_macs_abs": target,
                            "within_tol": abs(macs - target) <= self.tol * target})
        return cand

    def report(self) -> dict:
        return {"tp": dict(self.result)}
