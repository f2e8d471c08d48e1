"""Dagger: weight-only descriptors, the Dagger module, soft MACs, the FLOPs regulariser, gating and finalize."""
from __future__ import annotations

import copy
from types import SimpleNamespace as NS

import pytest
import torch
from torch import nn

import slimcnn
from slimcnn.methods.dagger import (Dagger, DaggerNet, channel_descriptors, flops_regularizer, soft_macs,
                                    temperature_at)

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def _tiny() -> tuple[nn.Module, NS]:
    """conv(3->8) -> BN -> ReLU -> conv(8->4), with its one channel group written out by hand."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    group = NS(key="0", size=8, prunable=True, members=[NS(module="0", role="out", offset=0),
                                                         NS(module="1", role="bn", offset=0),
                                                         NS(module="3", role="in", offset=0)])
    return model, group


# ------------------------------------------------------------------ descriptors and the module (no graph needed)

def test_descriptors_are_normalised_per_group_and_scale_free():
    model, group = _tiny()
    d = channel_descriptors(model, group)
    assert d.shape == (8, 6)
    assert torch.allclose(d.mean(0), torch.zeros(6), atol=1e-5)
    assert torch.allclose(d.std(0, unbiased=False), torch.ones(6), atol=1e-4)
    # Rescaling the layer (as weight decay does) changes no descriptor: they compare filters within the group.
    with torch.no_grad():
        model[0].weight.mul_(3.0)
        model[1].weight.mul_(0.5)
        model[1].bias.mul_(0.5)
    assert torch.allclose(channel_descriptors(model, group), d, atol=1e-5)


def test_descriptors_follow_the_weights():
    model, group = _tiny()
    d = channel_descriptors(model, group, features=("l1",), normalize="none")
    with torch.no_grad():
        model[0].weight[5].mul_(10)
    d2 = channel_descriptors(model, group, features=("l1",), normalize="none")
    assert d2[5, 0] > 5 * d[5, 0]
    assert torch.equal(d2[:5], d[:5]) and torch.equal(d2[6:], d[6:])
    with pytest.raises(ValueError, match="unknown descriptor"):
        channel_descriptors(model, group, features=("l1", "entropy"))


def test_descriptor_gradient_path_is_detached_unless_asked():
    model, group = _tiny()
    assert not channel_descriptors(model, group).requires_grad
    d = channel_descriptors(model, group, detach=False)
    d[:, 0].pow(2).sum().backward()
    assert model[0].weight.grad is not None and model[0].weight.grad.abs().sum() > 0


def test_dagger_net_shares_the_mlp_and_embeds_groups():
    net = DaggerNet(n_groups=2, n_features=5, init_logit=2.0)
    desc = torch.zeros(6, 5)
    s = net(desc, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert s.shape == (6,)
    # Same descriptor, same group -> same score; the group embedding alone separates groups.
    assert s[0] == s[1] and s[3] == s[4] and s[0] != s[3]
    assert torch.allclose(s, torch.full((6,), 2.0), atol=0.5)


def test_temperature_schedules():
    assert temperature_at(0, 2.0, 0.2, 10) == 2.0
    assert temperature_at(10, 2.0, 0.2, 10) == pytest.approx(0.2)
    assert temperature_at(50, 2.0, 0.2, 10) == pytest.approx(0.2)
    assert temperature_at(5, 2.0, 0.2, 10) == pytest.approx((2.0 * 0.2) ** 0.5)
    assert temperature_at(5, 2.0, 0.2, 10, "linear") == pytest.approx(1.1)
    with pytest.raises(ValueError, match="anneal"):
        temperature_at(5, 2.0, 0.2, 10, "cosine")


def test_soft_macs_on_a_hand_written_cost_table():
    costs = [NS(name="a", macs=1000, in_channels=3, out_channels=8, groups=1, in_group=None, out_group="a"),
             NS(name="dw", macs=100, in_channels=8, out_channels=8, groups=8, in_group="a", out_group="a"),
             NS(name="b", macs=2000, in_channels=8, out_channels=4, groups=1, in_group="a", out_group="b"),
             NS(name="fc", macs=40, in_channels=4, out_channels=10, groups=1, in_group="b", out_group=None)]
    ga = torch.tensor([1.0, 1, 0, 0, 1, 0, 1, 1])
    gb = torch.tensor([1.0, 0, 1, 1])
    expected = 1000 * 5 / 8 + 100 * 5 / 8 + 2000 * (5 / 8) * (3 / 4) + 40 * 3 / 4
    assert soft_macs(costs, {"a": ga, "b": gb}).item() == pytest.approx(expected, rel=1e-12)
    assert soft_macs(costs, {"a": torch.ones(8)}).item() == pytest.approx(3140, rel=1e-12)  # b ungated: full
    half = soft_macs(costs, {"a": torch.full((8,), 0.5), "b": torch.full((4,), 0.5)}).item()
    assert half == pytest.approx(500 + 50 + 500 + 20, rel=1e-12)


def test_regulariser_forms():
    below, above = torch.tensor(40.0), torch.tensor(60.0)
    assert flops_regularizer(above, 50.0).item() == pytest.approx(0.04)
    assert flops_regularizer(below, 50.0).item() == pytest.approx(0.04)
    assert flops_regularizer(below, 50.0, "hinge").item() == 0.0
    assert flops_regularizer(above, 50.0, "hinge").item() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="reg"):
        flops_regularizer(above, 50.0, "cube")


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="MACs target"):
        Dagger()
    with pytest.raises(ValueError, match="gate"):
        Dagger(target_macs=0.5, gate="concrete")
    with pytest.raises(ValueError, match="reg"):
        Dagger(target_macs=0.5, reg="l1")
    m = slimcnn.methods.create("dagger", target_macs=0.5)
    assert isinstance(m, Dagger) and m.trains_before_finalize
    assert {f for f, _ in Dagger.cli_args} >= {"--search-lr", "--lambda-flops", "--gate", "--temperature", "--reg",
                                              "--polarize"}
    import inspect
    params = inspect.signature(Dagger).parameters
    assert all(kw["dest"] in params and kw["default"] is None for _, kw in Dagger.cli_args)


# ------------------------------------------------------------------ on real models (graph engine)

def _resnet20() -> nn.Module:
    from conftest import RESNET20

    return slimcnn.models.load_checkpoint(slimcnn.models.create("cifar_resnet20"), RESNET20)


def _no_traces(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        assert not mod._forward_hooks and not mod._forward_pre_hooks, f"hook left on {name!r}"
        assert "forward" not in mod.__dict__, f"folded gate left on {name!r}"
        assert not isinstance(mod, DaggerNet)


@pytest.fixture(scope="module")
def r20_prepared():
    """ResNet-20 (public weights) with Dagger attached: (model, method)."""
    m = Dagger(target_macs=0.5, seed=0)
    return m.prepare(_resnet20(), X), m


def test_gates_are_data_agnostic(r20_prepared):
    model, m = r20_prepared
    a, b = torch.randn(4, 3, 32, 32), torch.rand(7, 3, 32, 32) * 5
    model.train()
    model(a)
    ga = {k: v.detach().clone() for k, v in m.last_gates.items()}
    model(b)
    gb = m.last_gates
    assert ga.keys() == gb.keys() == {g.key for g in m.groups}
    assert all(torch.equal(ga[k], gb[k]) for k in ga)  # bitwise
    model.eval()
    with torch.no_grad():
        model(a[:1])
    assert all(torch.equal(ga[k], m.last_gates[k]) for k in ga)
    # ... yet they are recomputed from the weights at every forward pass
    probs = {k: torch.sigmoid(v.detach()) for k, v in m.logits(model).items()}
    with torch.no_grad():
        model.conv1.weight[3].mul_(50)
    changed = {k: torch.sigmoid(v.detach()) for k, v in m.logits(model).items()}
    with torch.no_grad():
        model.conv1.weight[3].div_(50)
    assert not torch.equal(probs["conv1"], changed["conv1"])
    assert torch.equal(probs["layer1.0.conv1"], changed["layer1.0.conv1"])


def test_ste_gates_are_hard_and_gating_equals_removal(r20_prepared):
    from slimcnn.graph import remove_channels

    model, m = r20_prepared
    state = copy.deepcopy(m.net.state_dict())
    with torch.no_grad():
        m.net.fc2.bias.zero_()  # about half the channels fall below the threshold (the L1 prior orders them)
    try:
        model.eval()
        with torch.no_grad():
            gated = model(X)
        gates = m.last_gates
        assert all(set(v.unique().tolist()) <= {0.0, 1.0} for v in gates.values())
        off = sum(int((v == 0).sum()) for v in gates.values())
        assert 0.2 < off / sum(v.numel() for v in gates.values()) < 0.8
        keep = {k: v.nonzero()[:, 0].tolist() for k, v in gates.items()}
        m._detach_hooks()
        compact = remove_channels(model, X, keep)
        m._attach(model)
        with torch.no_grad():
            assert torch.allclose(compact.eval()(X), gated, atol=1e-4)
            # the soft-MACs formula at these 0/1 gates is the measured MACs of the pruned model
            assert soft_macs(m.costs, gates, m.rest).item() == slimcnn.profile(compact, example_input=X).macs
    finally:
        m.net.load_state_dict(state)


def test_soft_macs_equals_real_macs_at_random_01_gates(r20_prepared):
    from slimcnn.graph import remove_channels

    model, m = r20_prepared
    m._detach_hooks()
    try:
        gen = torch.Generator().manual_seed(3)
        for _ in range(2):
            gates = {g.key: (torch.rand(g.size, generator=gen) < 0.6).float() for g in m.groups}
            for v in gates.values():
                v[0] = 1.0  # no layer emptied
            keep = {k: v.nonzero()[:, 0].tolist() for k, v in gates.items()}
            real = slimcnn.profile(remove_channels(model, X, keep), example_input=X).macs
            assert soft_macs(m.costs, gates, m.rest).item() == real
        full = {g.key: torch.ones(g.size) for g in m.groups}
        assert soft_macs(m.costs, full, m.rest).item() == m.base_macs == slimcnn.profile(model, example_input=X).macs
    finally:
        m._attach(model)


@pytest.mark.parametrize("target", [0.9, 0.2])
def test_regulariser_gradient_moves_macs_towards_the_target(target):
    m = Dagger(target_macs=target, gate="sigmoid", init_gate=0.6, seed=1)
    net_model = m.prepare(_resnet20(), X)  # soft MACs start near 0.6^2 of the base: below 0.9, above 0.2
    opt = torch.optim.SGD(m.net.parameters(), lr=0.05)
    with torch.no_grad():
        before = soft_macs(m.costs, m.gates(net_model), m.rest).item() / m.base_macs
    assert 0.2 < before < 0.9
    for _ in range(3):
        opt.zero_grad()
        m.loss(net_model).backward()
        opt.step()
    with torch.no_grad():
        after = soft_macs(m.costs, m.gates(net_model), m.rest).item() / m.base_macs
    assert (after > before) if target > before else (after < before)
    assert abs(after - target) < abs(before - target)


@pytest.mark.parametrize("arch", ["cifar_resnet20", "cifar_resnet56"])
def test_finalize_hits_the_target_and_leaves_no_trace(arch):
    torch.manual_seed(0)
    model = slimcnn.models.create(arch)
    m = Dagger(target_macs=0.5)
    hooked = m.prepare(model, X)
    assert hooked is model and any(mod._forward_pre_hooks for mod in model.modules())
    assert any("forward" in mod.__dict__ for mod in model.modules())  # convs gate through their weights
    assert not any(isinstance(mod, DaggerNet) for mod in model.modules())
    hooked(X)
    compact = m.finalize(hooked)
    macs = slimcnn.profile(compact, example_input=X).macs
    assert abs(macs / m.base_macs - 0.5) <= 0.01 * 0.5
    _no_traces(compact)
    _no_traces(model)  # the hooks come off the searched model too
    rep = m.report()
    assert set(rep["widths"]) <= set(rep["base_widths"]) and rep["gates"].keys() == rep["base_widths"].keys()
    assert all(1 <= rep["widths"][k] <= rep["base_widths"][k] for k in rep["widths"])
    assert compact(X).shape == (2, 10)


def test_state_dict_round_trip_before_prepare(r20_prepared):
    model, m = r20_prepared
    opt = torch.optim.SGD(m.param_groups(model, lr=0.05, weight_decay=0.0), lr=0.05)
    for step in range(2):
        m.before_forward(model, step)
        (model(X).sum() * 0 + m.loss(model)).backward()
        opt.step()
        opt.zero_grad()
        m.after_step(model, step)
    state = m.state_dict()
    assert state["step"] == 2 and len(state["trajectory"]) == 2
    fresh = Dagger(target_macs=0.5, seed=7)
    fresh.load_state_dict(state)
    model2 = copy.deepcopy(model)
    for mod in model2.modules():  # the deep copy shares m's hooks and folded gates: drop them, prepare attaches its own
        mod._forward_pre_hooks.clear()
        mod.__dict__.pop("forward", None)
    fresh.prepare(model2, X)
    assert fresh.temperature == m.temperature and fresh.step == 2
    a, b = m.logits(model), fresh.logits(model2)
    assert all(torch.equal(a[k], b[k]) for k in a)
    other = Dagger(target_macs=0.5)
    other.prepare(slimcnn.models.create("cifar_resnet32"), X)
    with pytest.raises(ValueError, match="channel groups differ"):
        other.load_state_dict(state)


def test_search_with_the_engine_on_real_cifar(cifar_root, tmp_path):
    from slimcnn.data import cifar10_loaders
    from slimcnn.engine import TrainConfig, train
    from slimcnn.engine.checkpoint import load_state

    loader = cifar10_loaders(cifar_root, batch_size=16, train_limit=48, splits=("train",))["train"]
    m = Dagger(target_macs=0.6, anneal_steps=3)
    model = m.prepare(_resnet20(), X)
    before = [p.detach().clone() for p in m.net.parameters()]
    res = train(model, loader, TrainConfig(epochs=1, lr=0.01, max_steps=3, progress=False, out_dir=tmp_path),
                method=m)
    assert res.steps == 3
    saved = load_state(res.checkpoint)["method_state"]  # the method's state survives the engine's checkpoint
    assert saved["step"] == 3 and all(torch.equal(saved["net"][k], v) for k, v in m.net.state_dict().items())
    assert any(not torch.equal(a, b) for a, b in zip(before, m.net.parameters()))  # the module learned
    rep = m.report()
    assert rep["soft_macs_steps"] == [0, 1, 2] and all(0 < v <= m.base_macs for v in rep["soft_macs"])
    assert m.temperature == pytest.approx(m.t_end)
    compact = m.finalize(model)
    assert abs(slimcnn.profile(compact, example_input=X).macs / m.base_macs - 0.6) <= 0.006
    _no_traces(compact)


def test_dual_ascent_reaches_the_target_during_the_search_on_trained_weights(cifar_root):
    """Trained weights, a short search: the hard-gate MACs reach the target within 1% before the search ends,
    and finalize then keeps (almost) exactly the channels the search chose."""
    from slimcnn.data import cifar10_loaders
    from slimcnn.engine import TrainConfig, train

    loader = cifar10_loaders(cifar_root, batch_size=32, train_limit=1280, splits=("train",))["train"]
    m = Dagger(target_macs=0.5)
    model = m.prepare(_resnet20(), X, total_steps=40)
    train(model, loader, TrainConfig(epochs=1, lr=0.01, progress=False), method=m)
    rep = m.report()
    assert len(rep["hard_macs"]) == 40
    assert rep["lambdas"][0] == 10.0 and max(rep["lambdas"]) > 10.0  # above target at first: lambda rises
    off = [abs(v / m.target_abs - 1) for v in rep["hard_macs"][-10:]]
    assert min(off) <= 0.01 and off[-1] <= 0.02, off  # met the target, and still near it at the end
    compact = m.finalize(model)
    assert abs(slimcnn.profile(compact, example_input=X).macs / m.base_macs - 0.5) <= 0.005
    total = sum(m.report()["base_widths"].values())
    assert m.report()["channels_changed_at_finalize"] <= 0.02 * total


def test_fixed_lambda_when_asked(r20_prepared):
    m = Dagger(target_macs=0.5, lambda_lr=0.0)
    model = m.prepare(_resnet20(), X)
    model(X)
    m.loss(model)
    m.after_step(model, 0)
    assert m.lambda_flops == 10.0
    with pytest.raises(ValueError, match="lambda_lr"):
        Dagger(target_macs=0.5, lambda_lr=-1)


def test_groups_floored_whole_get_no_gates_and_stay_whole():
    # --min-keep 'conv1=1.0' --min-keep '*.conv2=1.0' keeps a CIFAR ResNet's residual streams: the search gates only
    # the blocks' inner channels, and the pruned net keeps every stream channel
    from slimcnn.graph.policy import layer_policy

    torch.manual_seed(0)
    model = slimcnn.models.create("cifar_resnet20")
    m = Dagger(target_macs=0.5)
    with layer_policy(min_keep={"conv1": 1.0, "*.conv2": 1.0}):
        hooked = m.prepare(model, X)
        assert sorted(g.key for g in m.groups) == sorted(f"layer{s}.{b}.conv1" for s in (1, 2, 3) for b in range(3))
        hooked(X)
        compact = m.finalize(hooked)
    assert abs(slimcnn.profile(compact, example_input=X).macs / m.base_macs - 0.5) <= 0.01 * 0.5
    widths = {n: mod.out_channels for n, mod in compact.named_modules() if isinstance(mod, nn.Conv2d)}
    assert widths["conv1"] == 16 and all(widths[f"layer{s}.{b}.conv2"] == 16 * 2 ** (s - 1)
                                         for s in (1, 2, 3) for b in range(3))
    assert all(widths[f"layer{s}.{b}.conv1"] < 16 * 2 ** (s - 1) for s in (2, 3) for b in range(3))


def test_the_search_freezes_once_the_target_held_and_finalize_keeps_exactly_those_channels(cifar_root):
    """hold_steps: once the hard MACs held the target (5%) for that many steps in a row, at a step within 1% the
    gates stop moving (the rest of the phase trains the gated net), and finalize cuts exactly the frozen set."""
    from slimcnn.data import cifar10_loaders
    from slimcnn.engine import TrainConfig, train

    loader = cifar10_loaders(cifar_root, batch_size=32, train_limit=1280, splits=("train",))["train"]
    m = Dagger(target_macs=0.5, hold_steps=5)
    model = m.prepare(_resnet20(), X, total_steps=40)
    train(model, loader, TrainConfig(epochs=1, lr=0.01, progress=False), method=m)
    rep = m.report()
    assert rep["frozen_at_step"] is not None and rep["frozen_at_step"] < 39, rep["hard_macs"]
    held = rep["hard_macs"][rep["frozen_at_step"] - 4: rep["frozen_at_step"] + 1]
    assert all(abs(v / m.target_abs - 1) <= 0.05 for v in held)  # five steps near the target, then frozen
    assert abs(held[-1] / m.target_abs - 1) <= 0.01
    after = rep["hard_macs"][rep["frozen_at_step"]:]
    assert len(set(after)) == 1 and rep["lambdas"][-1] == rep["lambdas"][rep["frozen_at_step"] + 1]
    assert m.loss(model) == 0.0  # no regulariser once frozen
    state = m.state_dict()
    frozen = {k: v.clone() for k, v in m.frozen.items()}
    compact = m.finalize(model)
    assert "hard gates" in m.report()["finalize_rule"]
    assert m.widths == {k: int(v.sum()) for k, v in frozen.items() if int(v.sum()) < v.numel()}
    assert abs(slimcnn.profile(compact, example_input=X).macs / m.base_macs - 0.5) <= 0.005
    # the frozen gates survive a checkpoint: a resumed run keeps training the same net
    again = Dagger(target_macs=0.5, hold_steps=5)
    again.load_state_dict(state)
    again.prepare(_resnet20(), X, total_steps=40)
    assert again.frozen_at == m.frozen_at and all(torch.equal(again.frozen[k], v) for k, v in frozen.items())
    with pytest.raises(ValueError, match="hold_steps"):
        Dagger(target_macs=0.5, hold_steps=0)
