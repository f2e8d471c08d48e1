"""MACs targeting: layer_costs predicts the real count; uniform and global allocation; impossible targets."""
from __future__ import annotations

import re

import pytest
import torch

from slimcnn.graph import (TargetError, allocate_widths, channel_groups, layer_costs, prune_to_target,
                           remove_channels, select_channels)
from slimcnn.graph.costs import cost_model
from slimcnn.models import create
from slimcnn.profile import profile


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model, x = create("cifar_resnet20").eval(), torch.randn(1, 3, 32, 32)
    return model, x, channel_groups(model, x)


def random_scores(groups, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {g.key: torch.rand(g.size, generator=gen) for g in groups if g.prunable}


@pytest.mark.parametrize("name,size", [("cifar_resnet20", 32), ("tv:mobilenet_v2", 64)])
def test_layer_costs_predict_real_macs_exactly(name, size):
    torch.manual_seed(0)
    model, x = create(name).eval(), torch.randn(1, 3, size, size)
    groups = channel_groups(model, x)
    cm = cost_model(model, x, groups)
    assert cm.total == profile(model, example_input=x).macs
    gen = torch.Generator().manual_seed(3)
    keep = {g.key: sorted(torch.randperm(g.size, generator=gen)[:int(torch.randint(1, g.size + 1, (1,), generator=gen))].tolist())
            for g in groups if g.prunable}
    small = remove_channels(model, x, keep, groups=groups)
    assert profile(small, example_input=x).macs == cm.macs_at({k: len(v) for k, v in keep.items()})


def test_layer_cost_fields(resnet):
    model, x, groups = resnet
    costs = {c.name: c for c in layer_costs(model, x, groups)}
    assert (costs["conv1"].in_group, costs["conv1"].out_group) == (None, "conv1")  # the network input is no group
    assert (costs["layer2.0.conv1"].in_group, costs["layer2.0.conv1"].out_group) == ("conv1", "layer2.0.conv1")
    assert (costs["linear"].in_group, costs["linear"].out_group) == ("layer3.0.conv2", "linear")
    assert costs["layer1.0.conv1"].macs == 16 * 16 * 9 * 32 * 32 and costs["linear"].macs == 640
    dw = {c.name: c for c in layer_costs(create("tv:mobilenet_v2"), torch.randn(1, 3, 64, 64))}["features.2.conv.1.0"]
    assert dw.groups == 96 and dw.in_group == dw.out_group == "features.2.conv.0.0"
    assert dw.macs_at({dw.out_group: 48}) == dw.macs // 2  # linear in its one group, not quadratic


def test_concat_consumer_lists_every_part():
    model, x = create("tv:densenet121"), torch.randn(1, 3, 64, 64)
    c = {c.name: c for c in layer_costs(model, x)}["features.denseblock1.denselayer3.conv1"]
    assert c.in_group is None and c.in_channels == 128
    assert [(k, o, s) for k, o, s in c.in_parts] == [("features.conv0", 0, 64),
                                                      ("features.denseblock1.denselayer1.conv2", 64, 32),
                                                      ("features.denseblock1.denselayer2.conv2", 96, 32)]
    assert c.macs_at({"features.conv0": 32}) == c.macs * 96 // 128


@pytest.mark.parametrize("mode", ["uniform", "global"])
@pytest.mark.parametrize("target", [0.3, 0.5, 0.8])
def test_real_macs_within_one_percent(resnet, mode, target):
    model, x, groups = resnet
    small = prune_to_target(model, x, random_scores(groups), target, mode=mode, groups=groups)
    base = profile(model, example_input=x).macs
    assert abs(profile(small, example_input=x).macs - target * base) <= 0.01 * target * base


def test_absolute_target(resnet):
    model, x, groups = resnet
    small = prune_to_target(model, x, random_scores(groups), 15e6, mode="global", groups=groups)
    assert abs(profile(small, example_input=x).macs - 15e6) <= 0.15e6


def test_impossible_target_states_minimum(resnet):
    model, x, groups = resnet
    floor_model = remove_channels(model, x, {g.key: [0] for g in groups if g.prunable}, groups=groups)
    floor = profile(floor_model, example_input=x).macs
    with pytest.raises(TargetError, match="minimum reachable") as e:
        allocate_widths(model, x, 0.001, groups=groups)
    assert f"{floor:,}" in str(e.value)
    with pytest.raises(TargetError, match="above the model"):
        allocate_widths(model, x, 1e12, groups=groups)
    with pytest.raises(TargetError, match="positive"):
        allocate_widths(model, x, 0, groups=groups)


def test_uniform_keeps_a_common_ratio(resnet):
    model, x, groups = resnet
    widths = allocate_widths(model, x, 0.5, groups=groups)
    sizes = {g.key: g.size for g in groups}
    ratios = [widths[k] / sizes[k] for k in widths]
    assert max(ratios) - min(ratios) <= 2 / 16 + 1e-9  # rounding and the final one-channel top-ups
    assert all(w >= 1 for w in widths.values())


def test_selection_keeps_best_scores_and_never_empties(resnet):
    model, x, groups = resnet
    scores = random_scores(groups, seed=5)
    keep = select_channels(model, x, scores, 0.1, mode="global", groups=groups)
    for k, kept in keep.items():
        assert kept and kept == sorted(kept)
        top = set(torch.argsort(scores[k], descending=True)[:len(kept)].tolist())
        assert set(kept) == top


def test_global_normalisation_makes_score_scale_irrelevant(resnet):
    model, x, groups = resnet
    scores = random_scores(groups, seed=7)
    scaled = dict(scores, **{"layer1.0.conv1": scores["layer1.0.conv1"] * 1000})
    widths = allocate_widths(model, x, 0.5, "global", scores, groups=groups)
    assert allocate_widths(model, x, 0.5, "global", scaled, groups=groups) == widths
    raw = allocate_widths(model, x, 0.5, "global", scaled, groups=groups, normalize="none")
    assert raw["layer1.0.conv1"] == 16  # raw scores: the inflated group wins every comparison


def test_only_scored_groups_are_pruned(resnet):
    model, x, groups = resnet
    scores = {k: v for k, v in random_scores(groups).items() if k.endswith("conv1") and k != "conv1"}
    keep = select_channels(model, x, scores, 0.7, mode="uniform", groups=groups)
    assert set(keep) == set(scores)
    floor = remove_channels(model, x, {k: [0] for k in scores}, groups=groups)
    floor_ratio = profile(floor, example_input=x).macs / profile(model, example_input=x).macs
    with pytest.raises(TargetError, match="minimum reachable"):  # the streams stay whole
        allocate_widths(model, x, floor_ratio * 0.95, "uniform", scores, groups=groups)


def test_bad_scores(resnet):
    model, x, groups = resnet
    with pytest.raises(KeyError, match=re.escape("unknown channel groups ['nope']")):
        allocate_widths(model, x, 0.5, "global", {"nope": torch.ones(3)}, groups=groups)
    with pytest.raises(ValueError, match="has 16 channels"):
        allocate_widths(model, x, 0.5, "global", {"conv1": torch.ones(3)}, groups=groups)
    with pytest.raises(ValueError, match="needs per-channel scores"):
        allocate_widths(model, x, 0.5, "global", groups=groups)
    with pytest.raises(ValueError, match="mode must be"):
        allocate_widths(model, x, 0.5, "best", groups=groups)
