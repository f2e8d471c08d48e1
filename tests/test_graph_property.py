"""Property tests: random small conv nets (residual adds, concatenations, depthwise convs, squeeze-excitation,
linear head) with random keep sets and clusters. The masked comparison inside remove_channels proves each
pruned net computes exactly what the original does with the removed channels ignored."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from slimcnn.graph import channel_groups, equalize_clusters, merge_channels, remove_channels
from slimcnn.graph.costs import cost_model
from slimcnn.profile import profile


def conv_bn(c_in: int, c_out: int, k: int = 3, groups: int = 1) -> nn.Sequential:
    bn = nn.BatchNorm2d(c_out)
    with torch.no_grad():  # non-trivial statistics, so a channel mix-up shows in the outputs
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, padding=k // 2, groups=groups, bias=False), bn)


class Block(nn.Module):
    """One drawn block: ``conv``, ``res`` (two convs + identity add), ``cat`` (concatenate a new branch),
    ``dw`` (expand, depthwise, project), ``se`` (squeeze-excitation multiply)."""

    def __init__(self, kind: str, c: int, width: int) -> None:
        super().__init__()
        self.kind = kind
        if kind == "conv":
            self.a, self.c_out = conv_bn(c, width), width
        elif kind == "res":
            self.a, self.b, self.c_out = conv_bn(c, width), conv_bn(width, c), c
        elif kind == "cat":
            self.a, self.c_out = conv_bn(c, width, 1), c + width
        elif kind == "dw":
            self.a, self.b, self.p, self.c_out = conv_bn(c, width, 1), conv_bn(width, width, 3, width), conv_bn(width, c, 1), c
        else:
            self.fc1, self.fc2, self.c_out = nn.Conv2d(c, width, 1), nn.Conv2d(width, c, 1), c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "conv":
            return torch.relu(self.a(x))
        if self.kind == "res":
            return torch.relu(x + self.b(torch.relu(self.a(x))))
        if self.kind == "cat":
            return torch.cat([x, torch.relu(self.a(x))], 1)
        if self.kind == "dw":
            return x + self.p(torch.relu(self.b(torch.relu(self.a(x)))))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return x * s


class RandomNet(nn.Module):
    def __init__(self, stem: int, blocks: list[tuple[str, int]]) -> None:
        super().__init__()
        self.stem = conv_bn(3, stem)
        layers, c = [], stem
        for kind, width in blocks:
            layers.append(Block(kind, c, width))
            c = layers[-1].c_out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.blocks(torch.relu(self.stem(x))).mean((2, 3)), 1))


nets = st.builds(RandomNet, st.integers(2, 6),
                 st.lists(st.tuples(st.sampled_from(["conv", "res", "cat", "dw", "se"]), st.integers(1, 6)),
                          min_size=1, max_size=4))
SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def setup(net: RandomNet, seed: int):
    torch.manual_seed(seed)
    net.eval()
    x = torch.randn(2, 3, 6, 6)
    return x, [g for g in channel_groups(net, x) if g.prunable]


@SETTINGS
@given(net=nets, seed=st.integers(0, 2**16), data=st.data())
def test_random_removal_runs_and_matches_predicted_macs(net, seed, data):
    x, groups = setup(net, seed)
    assert groups, "every drawn net has prunable channels (at least the stem's)"
    keep = {g.key: sorted(data.draw(st.sets(st.integers(0, g.size - 1), min_size=1), label=g.key)) for g in groups}
    small = remove_channels(net, x, keep, groups=groups)  # validated: forward, shape, masked equivalence
    assert small(x).shape == (2, 5)
    predicted = cost_model(net, x, groups).macs_at({k: len(v) for k, v in keep.items()})
    assert profile(small, example_input=x).macs == predicted


@SETTINGS
@given(net=nets, seed=st.integers(0, 2**16))
def test_keeping_everything_and_singleton_merges_are_exact(net, seed):
    x, groups = setup(net, seed)
    ref = net(x)
    full = remove_channels(net, x, {g.key: list(range(g.size)) for g in groups}, groups=groups)
    assert torch.equal(full(x), ref)
    same = merge_channels(net, x, {g.key: [[i] for i in range(g.size)] for g in groups}, groups=groups)
    assert torch.equal(same(x), ref)


@SETTINGS
@given(net=nets, seed=st.integers(0, 2**16), data=st.data())
def test_merging_identical_channels_is_lossless(net, seed, data):
    x, groups = setup(net, seed)
    clusters = {}
    for g in groups:
        perm = data.draw(st.permutations(range(g.size)), label=g.key)
        cuts = sorted(data.draw(st.sets(st.integers(1, g.size - 1), max_size=g.size - 1), label="cuts")) if g.size > 1 else []
        bounds = [0, *cuts, g.size]
        clusters[g.key] = [list(perm[a:b]) for a, b in zip(bounds, bounds[1:])]
    equalize_clusters(net, groups, clusters)
    merged = merge_channels(net, x, clusters, lossless_tol=1e-4, groups=groups)
    assert merged(x).shape == (2, 5)
