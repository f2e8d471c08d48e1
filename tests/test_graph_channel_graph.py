"""ChannelGraph: one trace from prepare to finalize, the same answers as the one-off functions, and no stale
groups after the model changes."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import slimcnn
from slimcnn.graph import ChannelGraph, channel_groups, cost_model, layer_policy, prune_to_target
from slimcnn.graph import groups as groups_module
from slimcnn.methods.csgd import CSGD
from slimcnn.methods.l1 import L1Pruning

X = torch.randn(2, 3, 32, 32)


@pytest.fixture
def traces(monkeypatch) -> list[int]:
    """Counts every trace (Torch-Pruning dependency graph) of any model."""
    calls: list[int] = []
    real = groups_module._trace

    def counting(model, example_input):
        calls.append(1)
        return real(model, example_input)

    monkeypatch.setattr(groups_module, "_trace", counting)
    return calls


def _as_data(groups) -> list:
    return [(g.key, g.size, g.prunable, g.reason, g.min_keep, [(m.module, m.role, m.offset) for m in g.members])
            for g in groups]


def test_lazy_then_one_trace_with_the_same_groups_and_costs(traces):
    model = slimcnn.create("cifar_resnet20")
    graph = ChannelGraph(model, X)
    assert not traces  # nothing asked yet: nothing traced
    assert _as_data(graph.groups) == _as_data(channel_groups(model, X))
    costs = graph.costs()
    assert len(traces) == 2  # the graph once, channel_groups once
    ref = cost_model(model, X)
    assert costs.total == ref.total and [(c.name, c.macs, c.in_parts, c.out_parts) for c in costs.layers] == \
        [(c.name, c.macs, c.in_parts, c.out_parts) for c in ref.layers]
    graph.by_key, graph.prunable, graph.costs()
    assert graph.traces == 1


def test_prune_to_target_matches_the_function():
    model = slimcnn.create("cifar_resnet20")
    graph = ChannelGraph(model, X)
    torch.manual_seed(0)
    scores = {g.key: torch.rand(g.size) for g in graph.prunable}
    keep, small = graph.select_and_prune(scores, 0.5, "global")
    ref = prune_to_target(model, X, scores, 0.5, "global")
    assert [tuple(p.shape) for p in small.parameters()] == [tuple(p.shape) for p in ref.parameters()]
    assert graph.macs_at({k: len(v) for k, v in keep.items()}) == slimcnn.profile(small, example_input=X).macs


def test_soft_macs_with_01_gates_is_macs_at():
    model = slimcnn.create("cifar_resnet20")
    graph = ChannelGraph(model, X)
    gates = {g.key: (torch.arange(g.size) < g.size // 2 + 1).double() for g in graph.prunable}
    widths = {k: int(v.sum()) for k, v in gates.items()}
    assert graph.soft_macs(gates).item() == graph.macs_at(widths)


def test_l1_finalize_traces_once(traces):
    model = slimcnn.create("cifar_resnet20")
    m = L1Pruning(target_macs=0.5)
    small = m.finalize(m.prepare(model, X))
    assert len(traces) == 1  # was 2: scores and prune_to_target each traced
    assert abs(slimcnn.profile(small).macs / slimcnn.profile(model).macs - 0.5) <= 0.005


def test_csgd_prepare_and_finalize_trace_once(traces):
    model = slimcnn.create("cifar_resnet20")
    m = CSGD(target_macs=0.5)
    model = m.prepare(model, X, total_steps=10)
    compact = m.finalize(model)
    assert len(traces) == 1  # was 3: prepare, the width search and the merge each traced
    assert compact(X).shape == (2, 10)


def test_a_graph_passed_to_prepare_is_used(traces):
    model = slimcnn.create("cifar_resnet20")
    graph = ChannelGraph(model, X)
    graph.groups
    m = L1Pruning(target_macs=0.5)
    m.finalize(m.prepare(model, X, graph=graph))
    assert m.graph is graph and len(traces) == 1


def test_surgery_result_needs_a_new_graph():
    model = slimcnn.create("cifar_resnet20")
    graph = ChannelGraph(model, X)
    small = graph.remove({"layer1.0.conv1": [0, 1, 2]})
    assert graph.fits(model) and not graph.fits(small)
    fresh = graph.rebuild(small)
    assert fresh.by_key["layer1.0.conv1"].size == 3 and graph.by_key["layer1.0.conv1"].size == 16


def test_a_model_changed_in_place_is_traced_again(traces):
    model = slimcnn.create("cifar_resnet20")
    graph = ChannelGraph(model, X)
    assert graph.by_key["layer1.0.conv1"].size == 16
    model.layer1[0].conv1 = nn.Conv2d(16, 8, 3, padding=1, bias=False)  # and its readers, to keep it running
    model.layer1[0].bn1 = nn.BatchNorm2d(8)
    model.layer1[0].conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    assert not graph.fits(model)
    assert graph.by_key["layer1.0.conv1"].size == 8  # no stale groups: traced again
    assert graph.traces == 2
    graph.invalidate()
    graph.groups
    assert graph.traces == 3


def test_weights_do_not_stale_a_graph():
    model = slimcnn.create("cifar_resnet20")
    graph = ChannelGraph(model, X)
    graph.groups
    trained = copy.deepcopy(model)
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(2)
    assert graph.fits(trained)
    graph.groups_for(trained)
    assert graph.traces == 1


def test_layer_policy_applies_at_each_use_on_one_trace():
    model = slimcnn.create("cifar_resnet20")
    graph = ChannelGraph(model, X)
    assert graph.by_key["conv1"].prunable
    with layer_policy(exclude=["layer1.0.conv1"], min_keep={"layer2.*": 0.5}):
        inside = graph.by_key
        assert not inside["layer1.0.conv1"].prunable and "excluded" in inside["layer1.0.conv1"].reason
        assert inside["layer2.1.conv1"].min_keep == 16
        assert _as_data(graph.groups) == _as_data(channel_groups(model, X))
    assert graph.by_key["layer1.0.conv1"].prunable and graph.by_key["layer2.1.conv1"].min_keep == 1
    with layer_policy(min_keep={"conv1": 1.0, "layer2.1.conv1": 0.99}):  # a floor of the whole width, 0.99 rounded up
        inside = graph.by_key
        for key in ("conv1", "layer2.1.conv1"):
            assert not inside[key].prunable and "--min-keep floors it at its whole width" in inside[key].reason
        assert inside["layer2.2.conv1"].prunable
    assert graph.by_key["conv1"].prunable
    assert graph.traces == 1
