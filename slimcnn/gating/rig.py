"""RIGNet-style recurrent top-down gating around a staged backbone. **[ours]**: no public code exists.

A backbone exposes ``stem(x)``, ``stages`` (a list of modules run in order) and either ``head(h_top)``
(classifiers: our CIFAR ResNets) or ``decode(stage_outputs, size)`` (segmentation: :mod:`slimcnn.models.seg`).
The wrapper runs the stages ``iterations`` = T times with the backbone's weights shared:

- iteration 1 is the plain forward pass, so T = 1 is the backbone itself, bit for bit;
- at iteration t > 1 the input of each gated stage s is multiplied by ``sigma(conv(upsample(h)))`` where h is
  a stage output of iteration t-1: stage s+1's (``gate_source="next"``) or the top stage's (``"top"``).

Design choices (all ours; the ones that matter are parameters):

- ``gate_type``: "spatial" (one map, N x 1 x H x W), "channel" (N x C x 1 x 1, from the globally averaged source:
  a channel gate has no spatial extent, so there is nothing to upsample) or "both" (N x C x H x W).
- The gate conv is 1x1 and runs *before* the bilinear upsampling: both are linear and the bilinear weights sum
  to one, so this equals conv(upsample(h)) exactly while costing the MACs of the coarse resolution.
- ``gate_init`` (how every gate conv starts; DIG's propagators too):

  - ``"default"``: PyTorch's conv weight init and bias +3, gates near 0.95 but input dependent. With shared BN,
    gates far from 1 at the start give iteration t > 1 input statistics unlike iteration 1's: on the public
    ResNet-20 with fresh gates, top-1 fell well below the plain net's at bias 2 and came back towards it at
    biases 3 and 4. Larger biases also flatten the sigmoid (slope g(1-g)), slowing learning.
  - ``"open"``: weight 0, bias +4: every gate is exactly sigmoid(4) = 0.982 for every input, so iteration
    t > 1 starts as the plain pass with each gated stage's input scaled by 0.982 (no random, input-dependent
    modulation from an untrained conv): the first epochs behave like the plain backbone, which is what a
    wrapper around a trained classifier wants. The slope 0.018 still lets the weights learn (their gradient
    is that slope times the source, non-zero at weight 0). The price of zero weights (``"zero"`` too), as for
    any zero-initialised layer: while a gate's weights are 0 its source does not matter, so at the first step
    whatever only shapes gate sources (the iterations before the last, DIG's propagators, with
    ``share_gates=False`` the earlier gate sets) gets zero gradient. It gets gradient once the gates downstream
    have left 0: from the second step with shared gates; with per-iteration gate sets, one iteration further
    back per step (``loss_all_iterations`` gives every iteration's stages gradient at once).
  - ``"zero"``: weight 0, bias 0: every gate starts at exactly 0.5, where the sigmoid is steepest (slope
    0.25), and unbiased toward open or closed. It halves the gated stages' inputs at t > 1, which shared BN
    statistics cannot absorb; meant for ``bn="per_iter"``, where iteration t > 1 has its own statistics.
- ``share_gates``: one set of gate convs for every t > 1, or one set per iteration.
- The stem is computed once (it is never gated), and so are the stages below the lowest gated stage: their
  outputs cannot change between iterations. The head runs once, on the last iteration, unless
  ``loss_all_iterations`` asks for every iteration's logits in training (see :meth:`FeedbackNet.forward`).
  Profiles count exactly what runs: every repeated stage, every gate.
- ``bn``: ``"shared"`` (default; the only choice before issue 18): one set of BN layers for all iterations, so
  their running statistics average ungated (t = 1) and gated (t > 1) activations, and the eval-time statistics
  fit neither. ``"per_iter"``: every BatchNorm2d that runs at more than one iteration (those of the stages from
  the lowest gated stage up; the head's or decoder's too with ``loss_all_iterations``, where it runs every
  iteration) becomes an :class:`IterationBN` with its own running statistics and affine per iteration.
  Iteration 1 keeps the plain BN's tensors under their old names, so T = 1 and the first iteration are still
  the backbone exactly and a plain (or ``"shared"``) state dict loads with ``load_state_dict``, every
  iteration starting from it.
  BN layers that run once (stem, stages below the lowest gate, a head that runs on the last iteration only)
  stay plain. Per-iteration BN adds parameters, no MACs (BN is not counted).

The wrappers (and :class:`Gate`) define no ``get_config`` on purpose: :mod:`slimcnn.io` rebuilds them from the
``create()`` recipe and then records any surgery inside them module by module.
"""
from __future__ import annotations

from typing import ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..models.seg import upsample

GATE_TYPES = ("spatial", "channel", "both")
GATE_INITS = ("default", "open", "zero")
BN_MODES = ("shared", "per_iter")
#: gate conv bias of ``gate_init="default"`` (gates near 0.95) and ``"open"`` (weight 0: every gate 0.982)
GATE_BIAS = 3.0
GATE_OPEN_BIAS = 4.0


class Gate(nn.Module):
    """A multiplicative gate in (0, 1) for a tensor with ``out_channels`` channels, computed from a source tensor
    with ``in_channels`` channels: ``sigmoid(upsample(conv1x1(src)))``.

    >>> g = Gate(64, 16, "spatial")
    >>> g(torch.randn(2, 64, 8, 8), (32, 32)).shape
    torch.Size([2, 1, 32, 32])
    """

    def __init__(self, in_channels: int, out_channels: int, gate_type: str = "spatial", init: str = "default") -> None:
        super().__init__()
        if gate_type not in GATE_TYPES:
            raise ValueError(f"gate_type must be one of {', '.join(GATE_TYPES)}; got {gate_type!r}")
        self.in_channels, self.out_channels, self.gate_type = in_channels, out_channels, gate_type
        self.conv = nn.Conv2d(in_channels, 1 if gate_type == "spatial" else out_channels, 1)
        if init == "default":  # the conv's own init just ran: drawing it again would shift every seeded run
            nn.init.constant_(self.conv.bias, GATE_BIAS)
        else:
            self.reset_gate(init)

    @torch.no_grad()
    def reset_gate(self, init: str = "default") -> None:
        """Re-initialise the gate conv: ``"default"`` (PyTorch's weight init, bias +3), ``"open"`` (weight 0,
        bias +4: the gate is 0.982 everywhere) or ``"zero"`` (weight 0, bias 0: 0.5 everywhere); see the module
        docstring for why."""
        if init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {', '.join(GATE_INITS)}; got {init!r}")
        if init == "default":
            self.conv.reset_parameters()
            nn.init.constant_(self.conv.bias, GATE_BIAS)
        else:
            nn.init.zeros_(self.conv.weight)
            nn.init.constant_(self.conv.bias, GATE_OPEN_BIAS if init == "open" else 0.0)

    def forward(self, src: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
        if self.gate_type == "channel":
            return torch.sigmoid(self.conv(F.adaptive_avg_pool2d(src, 1)))
        return torch.sigmoid(upsample(self.conv(src), size))

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, {self.gate_type}"


class IterationBN(nn.BatchNorm2d):
    """A BatchNorm2d with one copy per feedback iteration: running statistics and affine of iteration 1 are this
    module's own tensors (the names a plain BN has), those of iteration t > 1 are ``others[t - 2]``. The
    wrapper sets ``iteration`` (0-based) before each iteration runs; 0 outside a forward.

    A state dict without entries for the copies (a plain backbone's, or a ``bn="shared"`` model's) loads with
    every copy taking iteration 1's tensors, so per-iteration BN can start from a trained shared BN.

    >>> bn = IterationBN.from_bn(nn.BatchNorm2d(8), iterations=3)
    >>> len(bn.others), bn.iteration
    (2, 0)
    """

    def __init__(self, num_features: int, iterations: int = 2, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.others = nn.ModuleList(nn.BatchNorm2d(num_features, eps, momentum, affine, track_running_stats)
                                    for _ in range(int(iterations) - 1))
        self.iteration = 0

    @classmethod
    def from_bn(cls, bn: nn.BatchNorm2d, iterations: int) -> "IterationBN":
        """An IterationBN whose every iteration starts as a copy of ``bn`` (tensors, device, dtype, mode)."""
        new = cls(bn.num_features, iterations, bn.eps, bn.momentum, bn.affine, bn.track_running_stats)
        ref = next(iter([*bn.parameters(), *bn.buffers()]), None)
        if ref is not None:
            new.to(device=ref.device)
            if bn.affine:
                new.to(dtype=bn.weight.dtype)
        new.load_state_dict(bn.state_dict())  # the copies are filled from iteration 1's tensors
        return new.train(bn.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.iteration == 0:
            return super().forward(x)
        return self.others[self.iteration - 1](x)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        # torch hands every module the same (copied) dict, parent first: entries added here reach the copies
        own = [n for n, _ in [*self.named_parameters(recurse=False), *self.named_buffers(recurse=False)]]
        for i in range(len(self.others)):
            sub = f"{prefix}others.{i}."
            if not any(k.startswith(sub) for k in state_dict):
                for n in own:
                    if prefix + n in state_dict:
                        state_dict[sub + n] = state_dict[prefix + n]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, iterations={len(self.others) + 1}"


def _parse_stages(stages: Sequence[int] | str | int | None) -> list[int] | None:
    if stages is None:
        return None
    if isinstance(stages, int):
        return [stages]
    if isinstance(stages, str):
        return [int(s) for s in stages.replace(" ", "").split(",") if s]
    return [int(s) for s in stages]


@torch.no_grad()
def stage_channels(backbone: nn.Module) -> tuple[int, list[int]]:
    """(channels of the stem output, channels of each stage output), read off a small dry run in eval mode."""
    for name in ("stem", "stages"):
        if not hasattr(backbone, name):
            raise TypeError(f"{type(backbone).__name__} is not a staged backbone: it has no {name!r} "
                            "(gating needs stem(x), stages and head(h) or decode(features, size))")
    if not (hasattr(backbone, "head") or hasattr(backbone, "decode")):
        raise TypeError(f"{type(backbone).__name__} has neither head(h) nor decode(features, size)")
    first = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    in_ch = first.in_channels if first is not None else 3
    device = next((p.device for p in backbone.parameters()), torch.device("cpu"))
    was = backbone.training
    backbone.eval()  # never touch BN running statistics
    try:
        h = backbone.stem(torch.zeros(1, in_ch, 64, 64, device=device))
        stem_c, outs = h.shape[1], []
        for stage in backbone.stages:
            h = stage(h)
            outs.append(h.shape[1])
    finally:
        backbone.train(was)
    return stem_c, outs


class FeedbackNet(nn.Module):
    """Shared machinery of :class:`RIG` and :class:`~slimcnn.gating.dig.DIG`: run the stages T times, gating the
    inputs of ``gate_stages`` at t > 1 with gates fed by sources computed from iteration t-1.

    Subclasses define ``_src_index(s)`` (which stage output of iteration t-1 the gate of stage s reads; an index
    past the top means stage s cannot be gated), may transform those outputs before they are read
    (``_transform``, e.g. DIG's cascade) and may add modules in ``_build_extra``.
    """

    def __init__(self, backbone: nn.Module, iterations: int = 2, gate_type: str = "spatial",
                 gate_stages: Sequence[int] | str | int | None = None, share_gates: bool = True,
                 loss_all_iterations: bool = False, bn: str = "shared", gate_init: str = "default") -> None:
        super().__init__()
        if int(iterations) < 1:
            raise ValueError(f"iterations must be >= 1, got {iterations}")
        if gate_type not in GATE_TYPES:
            raise ValueError(f"gate_type must be one of {', '.join(GATE_TYPES)}; got {gate_type!r}")
        if bn not in BN_MODES:
            raise ValueError(f"bn must be one of {', '.join(BN_MODES)}; got {bn!r}")
        if gate_init not in GATE_INITS:
            raise ValueError(f"gate_init must be one of {', '.join(GATE_INITS)}; got {gate_init!r}")
        self.backbone = backbone
        self.iterations, self.gate_type, self.bn, self.gate_init = int(iterations), gate_type, bn, gate_init
        self.iteration: int | None = None  # 0-based index of the iteration running now (read by gate hooks)
        self.share_gates, self.loss_all_iterations = bool(share_gates), bool(loss_all_iterations)
        self.stem_channels, self.out_channels = stage_channels(backbone)
        self.in_channels = [self.stem_channels] + self.out_channels[:-1]
        possible = [s for s in range(len(self.out_channels)) if self._has_source(s)]
        stages = _parse_stages(gate_stages)
        if stages is None:
            stages = possible
        bad = [s for s in stages if s not in possible]
        if bad:
            raise ValueError(f"cannot gate stage(s) {bad}: {self._describe()} can gate stages {possible} "
                             f"(0 = lowest of {len(self.out_channels)})")
        self.gate_stages = sorted(set(stages))
        n_sets = 0 if self.iterations == 1 or not self.gate_stages else (1 if share_gates else self.iterations - 1)
        self.gates = nn.ModuleList(
            nn.ModuleDict({str(s): Gate(self._source_channels(s), self.in_channels[s], gate_type, gate_init)
                           for s in self.gate_stages})
            for _ in range(n_sets))
        self._build_extra(n_sets)
        if bn == "per_iter" and n_sets:
            self._split_norms()

    def _split_norms(self) -> None:
        """Replace every BatchNorm2d that runs at more than one iteration by an :class:`IterationBN`."""
        stages = self.backbone.stages
        targets = [(stages[s], name) for s in range(self.gate_stages[0], len(stages))
                   for name, m in stages[s].named_modules() if type(m) is nn.BatchNorm2d]
        if self.loss_all_iterations:  # the head or decoder then runs at every iteration too
            targets += [(self.backbone, name) for name in self._head_norms()]
        for root, name in targets:
            parent, _, leaf = name.rpartition(".")
            owner = root.get_submodule(parent) if parent else root
            setattr(owner, leaf, IterationBN.from_bn(getattr(owner, leaf), self.iterations))

    @torch.no_grad()
    def _head_norms(self) -> list[str]:
        """Names (in the backbone) of the BatchNorm2d layers the head or decoder runs, found by a dry run."""
        names = {m: n for n, m in self.backbone.named_modules() if type(m) is nn.BatchNorm2d}
        first = next((m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)), None)
        device = next((p.device for p in self.backbone.parameters()), torch.device("cpu"))
        x = torch.zeros(1, first.in_channels if first is not None else 3, 64, 64, device=device)
        was = self.backbone.training
        self.backbone.eval()  # never touch BN running statistics
        seen: list[str] = []
        try:
            h, feats = self.backbone.stem(x), []
            for stage in self.backbone.stages:
                h = stage(h)
                feats.append(h)
            hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(names[mod])) for m in names]
            try:
                self._head(feats, x)
            finally:
                for hk in hooks:
                    hk.remove()
        finally:
            self.backbone.train(was)
        return list(dict.fromkeys(seen))

    # -- subclass interface ------------------------------------------------------------------------------------
    def _src_index(self, s: int) -> int:
        raise NotImplementedError

    def _transform(self, feats: list[torch.Tensor], t: int) -> list[torch.Tensor]:
        return feats

    def _has_source(self, s: int) -> bool:
        return self._src_index(s) < len(self.out_channels)

    def _source_channels(self, s: int) -> int:
        return self.out_channels[self._src_index(s)]

    def _sources(self, feats: list[torch.Tensor], t: int) -> dict[int, torch.Tensor]:
        """The tensor each gated stage's gate reads at iteration t, from iteration t-1's stage outputs."""
        src = self._transform(feats, t)
        return {s: src[self._src_index(s)] for s in self.gate_stages}

    def _describe(self) -> str:
        return type(self).__name__

    def _build_extra(self, n_sets: int) -> None:
        pass

    # -- running -----------------------------------------------------------------------------------------------
    def _set(self, t: int) -> int:
        """Index of the gate set used at (0-based) iteration t >= 1."""
        return 0 if self.share_gates else t - 1

    def _head(self, feats: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if hasattr(self.backbone, "decode"):
            return self.backbone.decode(feats, x.shape[-2:])
        return self.backbone.head(feats[-1])

    def forward_all(self, x: torch.Tensor, all_heads: bool = True) -> list[torch.Tensor]:
        """Logits of every iteration (``all_heads``) or of the last one only, as a list."""
        stages = self.backbone.stages
        norms = [m for m in self.backbone.modules() if isinstance(m, IterationBN)]
        h0 = self.backbone.stem(x)
        iterations = self.iterations if self.gates else 1
        outs: list[torch.Tensor] = []
        feats: list[torch.Tensor] = []
        try:
            for t in range(iterations):
                self.iteration = t
                for m in norms:
                    m.iteration = t
                if t == 0:
                    h, start, gated, sources = h0, 0, {}, {}
                else:
                    # stages below the lowest gated one see the same input as in iteration t-1: reuse their outputs
                    start = self.gate_stages[0]
                    h = feats[start - 1] if start > 0 else h0
                    gated, sources = self.gates[self._set(t)], self._sources(feats, t)
                new = feats[:start]
                for s in range(start, len(stages)):
                    if str(s) in gated:
                        h = h * gated[str(s)](sources[s], h.shape[-2:])
                    h = stages[s](h)
                    new.append(h)
                feats = new
                if all_heads or t == iterations - 1:
                    outs.append(self._head(feats, x))
        finally:  # outside a forward, the backbone is the plain one (iteration 1's BN)
            self.iteration = None
            for m in norms:
                m.iteration = 0
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """The last iteration's logits. With ``loss_all_iterations`` and in training mode: the list of every
        iteration's logits (last one last), for a loss averaged over iterations
        (:func:`slimcnn.outputs.iteration_loss`)."""
        if self.training and self.loss_all_iterations:
            return self.forward_all(x, all_heads=True)
        return self.forward_all(x, all_heads=False)[-1]


class RIG(FeedbackNet):
    """Recurrent iterative gating: at t > 1, the input of stage s is gated by stage s+1's output of iteration
    t-1 (``gate_source="next"``, default; the top stage cannot be gated) or by the top stage's (``"top"``).

    >>> from slimcnn.models import create
    >>> m = RIG(create("cifar_resnet20"), iterations=2, gate_type="spatial")
    >>> m(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    """

    #: its keywords, which ``slimcnn.create(name, gating="rig", ...)`` hands to it rather than to the backbone
    options: ClassVar[frozenset[str]] = frozenset({"iterations", "gate_type", "gate_stages", "share_gates",
                                                   "loss_all_iterations", "gate_source", "bn", "gate_init"})

    def __init__(self, backbone: nn.Module, iterations: int = 2, gate_type: str = "spatial",
                 gate_stages: Sequence[int] | str | int | None = None, share_gates: bool = True,
                 loss_all_iterations: bool = False, gate_source: str = "next", bn: str = "shared",
                 gate_init: str = "default") -> None:
        if gate_source not in ("next", "top"):
            raise ValueError(f"gate_source must be 'next' or 'top', got {gate_source!r}")
        self.gate_source = gate_source
        super().__init__(backbone, iterations, gate_type, gate_stages, share_gates, loss_all_iterations, bn,
                         gate_init)

    def _describe(self) -> str:
        return f"RIG with gate_source={self.gate_source!r}"

    def _src_index(self, s: int) -> int:
        return s + 1 if self.gate_source == "next" else len(self.out_channels) - 1
