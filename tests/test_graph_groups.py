"""Channel groups: expected groups and members on our CIFAR nets and torchvision models."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimcnn.graph import ChannelGroup, Member, channel_groups, register_unprunable
from slimcnn.models import create


def by_key(groups: list[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {g.key: g for g in groups}


def test_resnet20_option_a_groups():
    groups = channel_groups(create("cifar_resnet20"), torch.randn(1, 3, 32, 32))
    # 3 residual streams + 9 block-internal groups + the classifier output
    assert len(groups) == 13
    g = by_key(groups)
    assert [k for k in g if g[k].prunable] == [k for k in g if k != "linear"]
    assert not g["linear"].prunable and "output" in g["linear"].reason
    # stage 1 stream: stem, every block's conv2/bn2, every conv1 reading it, and the next stage's entry
    s1 = g["conv1"]
    assert s1.size == 16
    assert {m.module for m in s1.producers} == {"conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"}
    assert {m.module for m in s1.consumers} == {"layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1",
                                                "layer2.0.conv1", "layer2.0.shortcut"}
    # the option-A shortcut ends the lower stream (consumer) and feeds the upper one (producer)
    s2 = g["layer2.0.conv2"]
    assert Member("layer2.0.shortcut", "out") in s2.producers
    assert Member("layer3.0.shortcut", "in") in s2.consumers
    assert Member("linear", "in") in g["layer3.0.conv2"].consumers
    inner = g["layer2.1.conv1"]
    assert inner.members == [Member("layer2.1.conv1", "out"), Member("layer2.1.bn1", "bn"), Member("layer2.1.conv2", "in")]


def test_resnet20_option_b_streams_include_projection():
    g = by_key(channel_groups(create("cifar_resnet20", shortcut="B"), torch.randn(1, 3, 32, 32)))
    assert len(g) == 13
    assert Member("layer2.0.shortcut.0", "out") in g["layer2.0.conv2"].producers
    assert Member("layer2.0.shortcut.1", "bn") in g["layer2.0.conv2"].members
    assert Member("layer2.0.shortcut.0", "in") in g["conv1"].consumers


def test_vgg16_one_group_per_conv():
    groups = channel_groups(create("cifar_vgg16"), torch.randn(1, 3, 32, 32))
    assert len(groups) == 14 and sum(g.prunable for g in groups) == 13
    last = by_key(groups)["features.40"]
    assert last.members == [Member("features.40", "out"), Member("features.41", "bn"), Member("classifier", "in")]


def test_mobilenet_v2_depthwise_in_expansion_group():
    g = by_key(channel_groups(create("tv:mobilenet_v2"), torch.randn(1, 3, 64, 64)))
    exp = g["features.2.conv.0.0"]
    assert Member("features.2.conv.1.0", "dw") in exp.members and exp.prunable
    assert [m.module for m in exp.consumers] == ["features.2.conv.2"]


def test_densenet121_concat_offsets():
    g = by_key(channel_groups(create("tv:densenet121"), torch.randn(1, 3, 64, 64)))
    assert len(g) == 121
    first = g["features.denseblock1.denselayer1.conv2"]  # 32 new channels after the 64 stem channels
    assert Member("features.denseblock1.denselayer2.conv1", "in", 64) in first.consumers
    assert Member("features.denseblock1.denselayer3.norm1", "bn", 64) in first.members
    assert Member("features.transition1.conv", "in", 64) in first.consumers
    assert all(g.prunable for g in g.values() if g.key != "classifier")


def test_efficientnet_b0_squeeze_excitation_joins_the_stream():
    g = by_key(channel_groups(create("tv:efficientnet_b0"), torch.randn(1, 3, 64, 64)))
    stem = g["features.0.0"]
    # the SE's scale multiplies the depthwise output, so its fc2 produces the same channels
    assert Member("features.1.0.block.1.fc2", "out") in stem.producers
    assert Member("features.1.0.block.1.fc1", "in") in stem.consumers
    assert Member("features.1.0.block.0.0", "dw") in stem.members
    assert g["features.1.0.block.1.fc1"].members == [Member("features.1.0.block.1.fc1", "out"),
                                                     Member("features.1.0.block.1.fc2", "in")]


class Gate(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.ones(c))

    def forward(self, x):
        return x * self.g.view(1, -1, 1, 1)


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = Gate(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(self.gate(self.a(x)))))


def test_per_channel_parameter_is_pruned_with_its_channels_unless_registered_unprunable():
    x = torch.randn(1, 3, 8, 8)
    g = by_key(channel_groups(Gated(), x))
    assert g["a"].prunable and Member("gate.g", "bn") in g["a"].members  # one entry per channel, as a layer scale
    assert g["b"].prunable
    register_unprunable(Gate, "gates are removed before surgery")
    try:
        g = by_key(channel_groups(Gated(), x))
        assert not g["a"].prunable and "gates are removed before surgery" in g["a"].reason
        assert g["b"].prunable
    finally:
        from slimcnn.graph import groups as groups_module
        groups_module._UNPRUNABLE.pop(Gate)


class ChannelMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(9, 4, 1)

    def forward(self, x):
        y = self.a(x)
        return self.b(torch.cat([y, y.mean(1, keepdim=True)], 1))


def test_channel_reduction_is_not_trusted():
    g = by_key(channel_groups(ChannelMean(), torch.randn(1, 3, 8, 8)))
    assert not g["a"].prunable and "channel" in g["a"].reason


def test_shared_module_is_unprunable():
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 8, 3, padding=1)
            self.b = nn.Conv2d(8, 8, 3, padding=1)
            self.c = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            return self.c(self.b(self.b(self.a(x))))

    g = by_key(channel_groups(Twice(), torch.randn(1, 3, 8, 8)))
    assert not g["a"].prunable and "b run several times per forward" in g["a"].reason


def test_training_mode_restored():
    m = create("cifar_resnet20").train()
    channel_groups(m, torch.randn(1, 3, 32, 32))
    assert m.training


class Odd(nn.Module):
    """Small nets where Torch-Pruning alone gets the channel mapping wrong or cannot know it."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 8, 3, stride=2, padding=1) if kind == "lambda_pad" else nn.Conv2d(7 if kind == "input_cat" else 2, 8, 1)
        self.c = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = torch.relu(self.a(x))
        if self.kind == "lambda_pad":  # the public option-A shortcut, written inline
            return self.c(self.b(y) + F.pad(y[:, :, ::2, ::2], (0, 0, 0, 0, 2, 2)))
        if self.kind == "input_cat":
            return self.c(self.b(torch.cat([x, y], 1)))
        if self.kind == "chunk":
            u, v = torch.chunk(y, 2, 1)
            return self.c(self.b(u) + self.b(v) * 0)
        return self.c(self.b(y[:, 1:3]))  # channel slice


@pytest.mark.parametrize("kind,reason", [
    ("lambda_pad", "ConstantPadNdBackward0 acts on the channel dimension"),
    ("input_cat", "concatenation with a tensor from outside the traced graph"),
    ("chunk", "split whose sizes are fixed"),
    ("slice", "slice whose sizes are fixed"),
])
def test_unverifiable_channel_maps_are_unprunable(kind, reason):
    g = by_key(channel_groups(Odd(kind), torch.randn(1, 3, 8, 8)))
    a_groups = [grp for k, grp in g.items() if k.startswith("a")]
    assert a_groups and all(not grp.prunable and reason in grp.reason for grp in a_groups)


def test_flatten_into_linear_is_unprunable_but_earlier_groups_are_fine():
    class Flat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.fc = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 6, 3, 2, 1), nn.Linear(96, 5)

        def forward(self, x):
            return self.fc(torch.flatten(torch.relu(self.b(torch.relu(self.a(x)))), 1))

    groups = channel_groups(Flat(), torch.randn(1, 3, 8, 8))
    assert groups[0].key == "a" and groups[0].prunable
    flat = [grp for grp in groups if grp.key.startswith("b")]
    assert flat and all("flatten" in grp.reason for grp in flat)


def test_transposed_conv_groups():
    class Up(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.t = nn.Conv2d(3, 5, 3, 2, 1), nn.ConvTranspose2d(5, 6, 2, stride=2)
            self.bn, self.c = nn.BatchNorm2d(6), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.c(torch.relu(self.bn(self.t(torch.relu(self.a(x))))))

    g = by_key(channel_groups(Up(), torch.randn(1, 3, 8, 8)))
    assert g["a"].prunable and Member("t", "in") in g["a"].consumers
    assert g["t"].prunable and g["t"].members == [Member("t", "out"), Member("bn", "bn"), Member("c", "in")]
