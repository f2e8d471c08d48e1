"""Channel shuffles, permutes, LayerNorm over channels and bare per-channel parameters (issue 38, item 4):
torchvision's ShuffleNetV2 and ConvNeXt prune to a MACs target through the Python API and run in both modes.

A channel shuffle's ``view`` / ``transpose`` / ``view`` fixes which channel lands where by the channel count in the
forward code, so the channels across it stay whole (with the reason) while the channels inside each branch prune.
ConvNeXt's LayerNorms (channels-last after a ``Permute``, and the channel-first ``LayerNorm2d``) and its
``layer_scale`` parameters are members of the stream's group, pruned with it.
"""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import slimcnn
from slimcnn.graph import channel_groups, handler_for, remove_channels
from slimcnn.graph.handlers import BareParameter, BareParameterHandler, LayerNormHandler, member_module
from slimcnn.profile import profile

X = torch.randn(1, 3, 64, 64)


def _prune(model: nn.Module) -> tuple[nn.Module, float]:
    torch.manual_seed(0)
    m = slimcnn.methods.create("l1", target_macs=0.5)
    net = m.finalize(m.prepare(model, X))
    return net, profile(net, example_input=X).macs / profile(model, example_input=X).macs


def _runs_in_both_modes(net: nn.Module, classes: int = 1000) -> None:
    for mode in ("eval", "train"):
        getattr(net, mode)()
        assert net(torch.randn(2, 3, 64, 64)).shape == (2, classes), mode


def test_shufflenet_prunes_inside_branches_and_keeps_the_shuffled_stream_whole():
    model = torchvision.models.shufflenet_v2_x0_5().eval()
    groups = channel_groups(model, X)
    shuffled = [g for g in groups if "channel shuffle" in g.reason]
    assert shuffled and all(not g.prunable for g in shuffled)
    assert any(g.prunable and g.key.endswith("branch2.0") for g in groups)  # the branch's own channels
    net, ratio = _prune(model)
    assert abs(ratio - 0.5) <= 0.005, ratio
    _runs_in_both_modes(net)


def test_convnext_prunes_its_streams_with_layernorms_and_layer_scales():
    torch.manual_seed(0)
    model = torchvision.models.convnext_tiny().eval()
    stream = channel_groups(model, X)[0]
    assert stream.prunable, stream.reason
    roles = {m.module: m.role for m in stream.members}
    assert roles["features.0.1"] == "bn" and roles["features.1.0.block.2"] == "bn"  # LayerNorm2d, LayerNorm
    assert roles["features.1.0.layer_scale"] == "bn"
    net, ratio = _prune(model)
    assert abs(ratio - 0.5) <= 0.005, ratio
    _runs_in_both_modes(net)
    for block in (m for m in net.modules() if hasattr(m, "layer_scale")):
        dw, norm, fc1, fc2 = block.block[0], block.block[2], block.block[3], block.block[5]
        width = dw.out_channels
        assert norm.weight.shape == norm.bias.shape == (width,) and tuple(norm.normalized_shape) == (width,)
        assert block.layer_scale.shape == (width, 1, 1)
        assert fc1.in_features == fc2.out_features == width
    for stage in (1, 3, 5):
        down_norm, down_conv = net.features[stage + 1]
        assert down_norm.weight.shape == (down_conv.in_channels,)
    assert net.classifier[0].weight.shape == (net.classifier[2].in_features,)


class _Block(nn.Module):
    """A ConvNeXt-style block: depthwise conv, LayerNorm channels-last, a pointwise MLP, a layer scale."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw, self.norm = nn.Conv2d(c, c, 3, padding=1, groups=c), nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.layer_scale = nn.Parameter(torch.rand(c, 1, 1) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(self.dw(x).permute(0, 2, 3, 1))
        y = self.fc2(torch.relu(self.fc1(y))).permute(0, 3, 1, 2)
        return x + self.layer_scale * y


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.block, self.head = nn.Conv2d(3, 8, 3, padding=1), _Block(8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)).mean((2, 3)))


def test_removing_stream_channels_matches_the_kept_channels_layernorm():
    """The masked check normalises over the kept channels, so it stays exact with LayerNorm in the group: a
    removal passes it, and the LayerNorm and layer scale keep the entries of the kept channels."""
    torch.manual_seed(0)
    net, x = _Net().eval(), torch.randn(2, 3, 8, 8)
    stream = channel_groups(net, x)[0]
    assert stream.key == "stem" and stream.prunable
    assert {m.module: m.role for m in stream.members}["block.layer_scale"] == "bn"
    keep = [0, 2, 3, 7]
    small = remove_channels(net, x, {"stem": keep})
    assert torch.equal(small.block.norm.weight, net.block.norm.weight[keep])
    assert torch.equal(small.block.layer_scale, net.block.layer_scale[keep])
    assert small.block.fc1.in_features == small.head.in_features == 4


def test_layernorm_and_bare_parameter_handlers():
    ln, ln2 = nn.LayerNorm(6), nn.LayerNorm((4, 6))
    assert type(handler_for(ln)) is LayerNormHandler and handler_for(ln).role(ln, True) == "bn"
    assert handler_for(ln).width(ln, "in") == 6 and handler_for(ln).problem("ln", ln) is None
    assert "2 dimensions" in handler_for(ln2).problem("ln2", ln2)
    owner = _Block(5)
    ref = member_module(owner, "layer_scale")
    assert isinstance(ref, BareParameter) and type(handler_for(ref)) is BareParameterHandler
    assert handler_for(ref).width(ref, "out") == 5 and ref.weight.shape == (5,)
    assert member_module(owner, "norm") is owner.norm
    with pytest.raises(AttributeError):
        member_module(owner, "nothing")


def test_a_shared_non_channel_parameter_stays_unprunable():
    """A bare parameter that is not one entry per channel (here a per-position bias) is not pruned with them."""

    class PosBias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)
            self.pos = nn.Parameter(torch.zeros(4, 8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x) + self.pos)

    g = channel_groups(PosBias(), torch.randn(1, 3, 8, 8))[0]
    assert not g.prunable and "not one entry per channel" in g.reason
