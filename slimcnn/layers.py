"""Layers slimcnn puts into models, with their channel handlers.

:class:`PadShortcut`, the option-A shortcut of the CIFAR ResNets, lives here rather than in the model file
because channel surgery edits it (its handler says how) and the graph package must not depend on any model file.
``slimcnn.models`` re-exports it, and saved specs that name it by its old place still load.

>>> sc = PadShortcut(16, 32, 2)
>>> sc(torch.ones(1, 16, 8, 8)).shape, sc.dst[:2]
(torch.Size([1, 32, 4, 4]), [8, 9])
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .graph.handlers import LayerHandler, NewChannel, register_handler
from .graph.replace import set_submodule
from .layer_specs import register_layer, register_layer_alias


@register_layer
class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and place the input channels into a wider, zero-filled output.

    The original form is ``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))``: input channel ``i`` lands on output
    channel ``i + p``. We store that map explicitly (``src`` input channels go to ``dst`` output channels) so that
    channel surgery can prune the input stream and the output stream independently and the shapes still line up;
    this is equivalent to a stride-``s`` 1x1 conv whose weight is a fixed 0/1 embedding.
    It is a real module (not a lambda) so models can be deep-copied, traced and exported.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2,
                 src: list[int] | None = None, dst: list[int] | None = None) -> None:
        super().__init__()
        if src is None or dst is None:
            pad = (out_channels - in_channels) // 2
            src = list(range(in_channels))
            dst = [i + pad for i in range(in_channels)]
        if len(src) != len(dst):
            raise ValueError("PadShortcut: src and dst must have the same length")
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride
        self.src, self.dst = list(src), list(dst)
        gather = [in_channels] * out_channels  # in_channels: the zero channel forward appends
        for i, j in zip(self.src, self.dst):
            gather[j] = i
        # Not persistent: the public checkpoints have no keys for the shortcut.
        self.register_buffer("_gather", torch.tensor(gather, dtype=torch.long), persistent=False)
        embed = torch.zeros(out_channels, in_channels, 1, 1)
        embed[self.dst, self.src, 0, 0] = 1.0
        self.register_buffer("_embed", embed, persistent=False)
        # Contiguous placement of all inputs is a plain pad: cheapest, and the form ONNX runtimes like best.
        self._pad: tuple[int, int] | None = None
        if self.src == list(range(in_channels)) and self.dst == list(range(self.dst[0] if self.dst else 0,
                                                                            (self.dst[0] if self.dst else 0) + len(self.dst))):
            before = self.dst[0] if self.dst else 0
            self._pad = (before, out_channels - before - len(self.dst))

    def get_config(self) -> dict:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels, "stride": self.stride,
                "src": self.src, "dst": self.dst}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.onnx.is_in_onnx_export():
            # Exported as the strided 1x1 conv it is (fixed 0/1 weight), base and pruned nets alike: ONNX Runtime
            # runs one conv faster than the slices and pad or gather. Measured (2 cores, ResNet-56, interleaved):
            # the base itself 7-8% faster; L1 --round-to 8 at 0.5 MACs, both nets rewritten, from 0.73 to 0.68
            # of the base's latency at batch 1 and from 0.59 to 0.58 at batch 128. Its in x out x H x W
            # multiply-adds (0.26M on ResNet-56, 0.2% of it) are not in slimcnn's MACs, which count the module.
            return F.conv2d(x, self._embed.to(x.dtype), stride=self.stride)
        x = x[:, :, :: self.stride, :: self.stride]
        if self._pad is not None:
            return F.pad(x, (0, 0, 0, 0, *self._pad))
        # One gather over the input with a zero channel appended: output channel j copies input channel
        # _gather[j], or the zero channel; it copies whole H x W planes. The earlier index_copy exported as
        # ScatterElements over an index tensor the size of the activation. Measured on ONNX Runtime, ResNet-56
        # pruned by L1 to 0.5 MACs with --round-to 8, the two forms timed interleaved on 2 shared cores:
        # 0.723 -> 0.638 of the base's latency at batch 128, 0.739 -> 0.697 at batch 1.
        # The zero channel is a pad, not a cat with new zeros: the channel tracer reads a cat with a tensor from
        # outside the traced graph as unprunable (it froze the whole stage-1 stream of a merged ResNet).
        return F.pad(x, (0, 0, 0, 0, 0, 1)).index_select(1, self._gather)

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}, kept={len(self.src)}"


register_layer_alias("slimcnn.models.cifar_resnet:PadShortcut", PadShortcut)  # its home until issue 16


class PadShortcutHandler(LayerHandler):
    """The option-A shortcut in channel groups: it produces the upper stream (role ``out``, its ``dst``) and reads
    the lower one (role ``in``, its ``src``); surgery rewrites the two maps.

    As a consumer of the lower stream, a map entry reading a merged-away channel now reads the cluster's kept
    channel (exact: the members are identical once merged); as a producer of the upper stream, only the entry of
    the cluster's first channel survives, so merging upper-stream channels is lossless only when the shortcut
    maps the cluster's channels identically (all unmapped, or all from the same source channel).
    """

    types = (PadShortcut,)
    opaque_to_tracer = True

    def edit(self, model: nn.Module, name: str, module: nn.Module, out: list[NewChannel] | None,
             inp: list[NewChannel] | None) -> None:
        new_dst = {rep: j for j, (rep, _) in enumerate(out)} if out is not None else {d: d for d in module.dst}
        new_src = ({i: j for j, (_, members) in enumerate(inp) for i in members} if inp is not None
                   else {s: s for s in module.src})
        pairs = [(new_src[s], new_dst[d]) for s, d in zip(module.src, module.dst) if s in new_src and d in new_dst]
        n_in = len(inp) if inp is not None else module.in_channels
        n_out = len(out) if out is not None else module.out_channels
        shortcut = PadShortcut(n_in, n_out, module.stride, [s for s, _ in pairs], [d for _, d in pairs])
        shortcut.to(module._gather.device)
        set_submodule(model, name, shortcut)

    def mask_inputs(self, model: nn.Module, name: str, module: nn.Module, channels: list[int]) -> None:
        dropped = set(channels)
        pairs = [(s, d) for s, d in zip(module.src, module.dst) if s not in dropped]
        masked = PadShortcut(module.in_channels, module.out_channels, module.stride, [s for s, _ in pairs],
                             [d for _, d in pairs])
        set_submodule(model, name, masked.to(module._gather.device))

    def equalize(self, module: nn.Module, offset: int, clusters: Sequence[Sequence[int]]) -> None:
        pass  # no weights: what it puts into a channel is its map, which merging rewrites

    def merge_note(self, module: nn.Module, offset: int, clusters: Sequence[Sequence[int]], group: str) -> str | None:
        where = dict(zip(module.dst, module.src))
        for c in clusters:
            if len({where.get(offset + i) for i in c}) > 1:
                return (f"maps channels {c} of group {group!r} from different inputs, so merging them cannot be "
                        "exact (the shortcut keeps only the first channel's mapping)")
        return None


register_handler(PadShortcutHandler())
