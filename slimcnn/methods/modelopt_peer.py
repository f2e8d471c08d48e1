"""The second peer: NVIDIA ModelOpt's FastNAS pruning, driven through ModelOpt's own API (``mtp.prune``).

FastNAS turns every conv / BN / linear into a searchable width, measures how much a score drops when each width
is narrowed on its own (the "sensitivity map", one score per choice), then bisects a threshold on those drops
until the subnet meets a FLOPs bound. So unlike Torch-Pruning and unlike Dagger it **needs data**: it scores
subnets on training images. The report states what it used and found: ``modelopt.score_images``, ``divisor``,
``search_s``, ``macs``, ``within_tol`` and ``score_full_top1`` (the unpruned net's top-1 on the score set).

- **Same function, same shortcut price.** ``prepare`` reuses the Torch-Pruning peer's ``prepare``: option-A
  shortcuts become their exact frozen 1x1 convs (+0.26M MACs on ResNet-20/56, counted by our counter).
- **Data.** ``prepare`` takes the training loader (:func:`slimcnn.compress.compress` passes it) and keeps the
  first ``score_images`` images it yields (augmentation switched off when the loader has an ``augment``
  switch). Those images serve both purposes ModelOpt asks data for: the ``data_loader`` its patched
  ``model.eval()`` recalibrates BatchNorm on for every candidate (split into 50 batches: ModelOpt queues 50
  batches and skips recalibration, with a warning, when its queue is not full), and the ``score_func``, which
  is ModelOpt's recipe: ``model.eval()`` then top-1 on held data (here: the same training images; the test
  split is never touched).
- **MACs target.** ModelOpt counts FLOPs with torchprofile, 2 x our MACs on these nets (measured on the
  converted ResNet-20: 2 x 40,813,184 + 128). The constraint is ``{"flops": 2 x target x (1 + tol)}``; FastNAS returns
  the largest subnet on its threshold path below that bound, and our own counter checks it lands within
  ``tol`` of the target.
- **Channel divisor** (``divisor``; ModelOpt's default is 32). Every searchable width is a multiple of it, so
  it bounds the smallest subnet: on ResNet-20, 16 reaches 0.527 of the base at best, 8 reaches 0.153. By
  default the largest of 32/16/8/4/2/1 whose smallest subnet is under the target's upper tolerance is used,
  falling back to the next smaller one when the search cannot land within ``tol``. A target no divisor can
  reach is a :class:`SurgeryError` naming the smallest reachable MACs. ``round_to=N`` (``--round-to``, shared with
  every method) sets the divisor to ``N``: ModelOpt's own way of keeping widths aligned. A search at that divisor
  that stops outside ``tol`` is then kept as the closest result (``within_tol: false``) instead of failing.
- **Frozen stays frozen.** ModelOpt's export hands every weight back trainable, the frozen shortcut embeddings
  included; ``finalize`` freezes again whatever was frozen after ``prepare``.
- BatchNorm statistics after the search are those of the last subnet ModelOpt scored; the BatchNorm
  recalibration after finalize is :func:`slimcnn.compress.compress`'s, the same for every row.

Needs the ``peers`` extra: ``pip install -e ".[peers]"`` (``nvidia-modelopt==0.47.0`` with
``torchprofile==0.0.4``; 0.1.0 breaks ModelOpt's FLOPs counter).
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import time
from typing import Any

import torch
from torch import nn

from ..graph.validate import SurgeryError, reference_output, validate
from ..profile import profile
from .base import Method, macs_goal
from .tp_peer import TorchPruningPeer

INSTALL = 'the modelopt peer needs NVIDIA ModelOpt and its pins: pip install -e ".[peers]"'
DIVISORS = (32, 16, 8, 4, 2, 1)
#: ModelOpt recalibrates BN from a queue of this many batches (``MODELOPT_QUEUE_MAXLEN``) and only when it is full
CALIB_BATCHES = 50


class ModelOptMissing(ImportError, ValueError):
    """ModelOpt (or a pin it needs) is not installed. Also a ValueError, so the CLI prints it as one line."""


def _modelopt():
    """``(modelopt.torch.prune, modelopt.torch.nas)``, or :class:`ModelOptMissing` saying how to install them."""
    import warnings

    try:
        with warnings.catch_warnings():  # its optional plugins warn on import; none is used here
            warnings.simplefilter("ignore")
            import modelopt.torch.nas as mtn
            import modelopt.torch.prune as mtp
            import torchprofile.profile
    except ImportError as e:
        raise ModelOptMissing(f"{INSTALL} ({type(e).__name__}: {e})") from None
    if not hasattr(torchprofile.profile, "handlers"):  # torchprofile 0.1.0: ModelOpt's FLOPs counter fails
        raise ModelOptMissing(f"{INSTALL} (ModelOpt 0.47 needs torchprofile==0.0.4)")
    return mtp, mtn


class ModelOptPeer(Method):
    """ModelOpt FastNAS at a MACs target (see the module docstring)."""

    name = "modelopt"
    trains_before_finalize = False
    method_share = 0.0  # its recipe: share of the epoch budget before finalize
    prepare_inputs = frozenset({"train_loader"})  # FastNAS scores its subnets on training images
    # no segmentation: it scores subnets by top-1; no layer control: its search space has no per-layer switch
    cli_args = [
        ("--modelopt-divisor", {"dest": "divisor", "type": int, "choices": list(DIVISORS), "default": None,
                                "help": "modelopt: channel divisor of FastNAS's search space (default: the largest "
                                        "that reaches the target)"}),
        ("--score-images", {"dest": "score_images", "type": int, "default": None,
                            "help": "modelopt: training images FastNAS scores subnets on (and recalibrates BN on; "
                                    "at least 50)"}),
    ]

    def __init__(self, target_macs: float = 0.5, divisor: int | None = None, score_images: int = 1000,
                 tol: float = 0.01, round_to: int | None = None) -> None:
        from ..graph.targeting import check_round_to

        self.round_to = check_round_to(round_to)
        if self.round_to and divisor is not None and divisor != self.round_to:
            raise ValueError(f"modelopt: --modelopt-divisor {divisor} and --round-to {self.round_to} ask for two "
                             "different channel divisors; give one")
        if importlib.util.find_spec("modelopt") is None:
            raise ModelOptMissing(INSTALL)
        if divisor is not None and divisor not in DIVISORS and not self.round_to:
            raise ValueError(f"modelopt: divisor must be one of {', '.join(map(str, DIVISORS))}, got {divisor}")
        if score_images < CALIB_BATCHES:
            raise ValueError(f"modelopt: score_images must be >= {CALIB_BATCHES} (ModelOpt recalibrates BN on "
                             f"{CALIB_BATCHES} batches), got {score_images}")
        if self.round_to:
            divisor = self.round_to  # any positive multiple: ModelOpt takes it as it is
        self.target_macs, self.divisor, self.score_images, self.tol = target_macs, divisor, score_images, tol
        self.score_data: tuple[torch.Tensor, torch.Tensor] | None = None
        self.result: dict[str, Any] = {}

    def prepare(self, model: nn.Module, example_input: torch.Tensor, train_loader=None) -> nn.Module:
        """Option-A shortcuts as frozen 1x1 convs (the Torch-Pruning peer's ``prepare``); keep the score set."""
        shortcuts = TorchPruningPeer()
        model = shortcuts.prepare(model, example_input)
        self.example_input, self.base_macs = example_input, shortcuts.base_macs
        self.result["shortcuts_converted"] = shortcuts.result.get("shortcuts_converted", 0)
        self.frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        if train_loader is not None:
            self.score_data = self._take_images(train_loader, self.score_images)
        return model

    @staticmethod
    def _take_images(loader, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``n`` ``(x, y)`` pairs ``loader`` yields (on the CPU), without augmentation if it has a switch."""
        if getattr(loader, "augment", False):
            loader = copy.copy(loader)
            loader.augment = False
        xs, ys, got = [], [], 0
        for x, y in loader:
            xs.append(x[: n - got].cpu())
            ys.append(y[: n - got].cpu())
            got += len(xs[-1])
            if got >= n:
                break
        if got < CALIB_BATCHES:
            raise ValueError(f"modelopt: the training loader gave {got} images; FastNAS needs at least {CALIB_BATCHES}")
        return torch.cat(xs), torch.cat(ys)

    @staticmethod
    def _rules(mtp, divisor: int) -> dict[str, Any]:
        """ModelOpt's default FastNAS rules with every channel / feature divisor set to ``divisor``."""
        rules = mtp.fastnas.FastNASConfig().model_dump()
        for rule in rules.values():
            for layer_rule in rule.values():
                for key in ("channel_divisor", "feature_divisor"):
                    if key in layer_rule:
                        layer_rule[key] = divisor
        return rules

    def _min_macs(self, mtp, mtn, model: nn.Module, divisor: int) -> int:
        """Our MACs of the smallest subnet in FastNAS's search space at ``divisor``."""
        with contextlib.redirect_stdout(io.StringIO()):
            space = mtn.convert(copy.deepcopy(model), [("fastnas", self._rules(mtp, divisor))])
            mtn.sample(space, min)
        with mtn.no_modelopt_patches():  # a plain forward: no BN recalibration on eval() just to count MACs
            return profile(space, example_input=self.example_input[:1]).macs

    def _search(self, mtp, model: nn.Module, divisor: int, upper: float) -> tuple[nn.Module, dict[str, Any]]:
        device = self.example_input.device
        x, y = self.score_data
        calib = list(x.tensor_split(CALIB_BATCHES))
        score_batches = list(zip(x.split(256), y.split(256)))

        @torch.no_grad()
        def score_func(m: nn.Module) -> float:
            m.eval()  # ModelOpt's patched eval(): recalibrates BN of the active subnet on the queued batches
            correct = sum((m(xb.to(device)).argmax(1).cpu() == yb).sum().item() for xb, yb in score_batches)
            return 100.0 * correct / len(y)

        # ModelOpt moves each calibration batch to the model's device itself
        config = {"data_loader": calib, "collect_func": lambda b: b, "max_iter_data_loader": len(calib),
                  "score_func": score_func, "checkpoint": None, "verbose": False}
        with contextlib.redirect_stdout(io.StringIO()):  # ModelOpt prints its progress and advice to stdout
            pruned, state = mtp.prune(copy.deepcopy(model), mode=[("fastnas", self._rules(mtp, divisor))],
                                      constraints={"flops": 2 * upper}, dummy_input=self.example_input[:1],
                                      config=config)
        for key in ("_modelopt_state", "_modelopt_state_version"):  # ModelOpt's bookkeeping, no use after export
            if hasattr(pruned, key):
                delattr(pruned, key)
        return pruned, state

    def finalize(self, model: nn.Module) -> nn.Module:
        mtp, mtn = _modelopt()
        if self.score_data is None:
            raise ValueError("modelopt: FastNAS scores subnets on data; pass the training loader to "
                             "prepare(model, x, train_loader=...) (slimcnn compress does)")
        target = macs_goal(self.target_macs, self.base_macs)
        lo, hi = target * (1 - self.tol), target * (1 + self.tol)
        ref = reference_output(model, self.example_input)
        t0 = time.time()
        tried: list[dict[str, Any]] = []
        min_macs = None
        for divisor in [self.divisor] if self.divisor else DIVISORS:
            min_macs = self._min_macs(mtp, mtn, model, divisor)
            if min_macs > hi:
                continue
            cand, state = self._search(mtp, model, divisor, hi)
            macs = profile(cand, example_input=self.example_input[:1]).macs
            tried.append({"divisor": divisor, "macs": macs, "min_macs": min_macs})
            if lo <= macs <= hi:
                break
        else:
            where = f"with channel divisor {self.divisor}" if self.divisor else "at any channel divisor"
            if not tried:
                raise SurgeryError(
                    f"modelopt: {target / 1e6:.2f}M MACs ({target / self.base_macs:.3f} of the base) is out of "
                    f"FastNAS's reach {where}: its smallest subnet has {min_macs / 1e6:.2f}M MACs "
                    f"({min_macs / self.base_macs:.3f})")
            stops = ", ".join(f"{t['macs'] / 1e6:.2f}M (divisor {t['divisor']})" for t in tried)
            if not self.round_to:
                raise SurgeryError(
                    f"modelopt: FastNAS cannot land within {self.tol:.0%} of {target / 1e6:.2f}M MACs {where}: its "
                    f"search stopped at {stops}; more --score-images give it finer steps")
        search_s = time.time() - t0
        validate(cand, self.example_input, ref, f"ModelOpt FastNAS result at channel divisor {divisor}")
        for name in self.frozen:  # ModelOpt's export hands every weight back trainable
            cand.get_parameter(name).requires_grad_(False)
        self.result.update({
            "score_images": len(self.score_data[1]), "bn_calibration": f"the same images, {CALIB_BATCHES} batches",
            "divisor": divisor, "divisors_tried": tried, "search_s": round(search_s, 1), "macs": macs,
            "min_macs": min_macs, "target_macs_abs": target, "within_tol": lo <= macs <= hi,
            "frozen_params": len(self.frozen), "score_full_top1": state.get("original_score")})
        if self.round_to:
            self.result["round_to"] = self.round_to
        return cand

    def report(self) -> dict[str, Any]:
        return {"modelopt": dict(self.result)}
