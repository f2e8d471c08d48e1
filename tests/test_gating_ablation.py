"""Issue 18's gating options: per-iteration BatchNorm, gate initialisation, gate statistics; gradients and MACs
under each option."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import slimcnn.gating  # noqa: F401  (registers the wrappers)
from slimcnn.gating import Gate, IterationBN, collect_gate_stats, iteration_loss
from slimcnn.models import create
from slimcnn.profile import profile

from conftest import CIFAR

SEG = (3, 48, 64)
CASES = {  # name -> (zoo model, create() keywords, input shape, prefix of the stage modules in the backbone)
    "rig": ("cifar_resnet20", dict(num_classes=10, gating="rig"), (3, 32, 32), ("layer1", "layer2", "layer3")),
    "dig": ("seg_tiny", dict(num_classes=11, gating="dig", variant="cascaded"), SEG, ("layers.",)),
}


def _pair(case: str, **kw) -> tuple[nn.Module, nn.Module]:
    """A plain backbone and a gated wrapper whose backbone holds the same weights (loaded strictly)."""
    name, base_kw, _, _ = CASES[case]
    torch.manual_seed(0)
    base = create(name, num_classes=base_kw["num_classes"])
    gated = create(name, **base_kw, **kw)
    gated.backbone.load_state_dict(base.state_dict())
    return base.eval(), gated.eval()


def _norm_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, IterationBN)]


# -- per-iteration BatchNorm ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_per_iter_bn_at_one_iteration_is_the_backbone(case):
    base, gated = _pair(case, iterations=1, bn="per_iter")
    assert list(gated.state_dict()) == [f"backbone.{k}" for k in base.state_dict()]  # the state dict maps 1:1
    assert not _norm_names(gated)
    x = torch.randn(2, *CASES[case][2])
    with torch.no_grad():
        assert torch.equal(gated(x), base(x))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("iterations", [2, 3])
def test_per_iter_bn_state_dict_maps_and_first_iteration_is_the_backbone(case, iterations):
    base, gated = _pair(case, iterations=iterations, bn="per_iter")
    stages = CASES[case][3]
    names = _norm_names(gated)
    plain_bns = [n for n, m in base.named_modules() if isinstance(m, nn.BatchNorm2d) and n.startswith(stages)]
    assert names == [f"backbone.{n}" for n in plain_bns]  # every stage BN (all stages re-run), nothing else
    # the plain state dict's keys are iteration 1's; the others are exactly the copies', and the gates'
    plain_keys = {f"backbone.{k}" for k in base.state_dict()}
    extra = set(gated.state_dict()) - plain_keys
    assert plain_keys <= set(gated.state_dict())
    copies = {k for k in extra if ".others." in k}
    assert copies == {f"{n}.others.{i}.{t}" for n in names for i in range(iterations - 1)
                      for t in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}
    assert all(k.startswith(("gates.", "propagators.")) for k in extra - copies)
    # loading the plain state dict filled every copy with iteration 1's tensors
    sd = gated.state_dict()
    for n in names:
        for i in range(iterations - 1):
            assert torch.equal(sd[f"{n}.others.{i}.running_var"], sd[f"{n}.running_var"])
    x = torch.randn(2, *CASES[case][2])
    with torch.no_grad():
        outs = gated.forward_all(x)
        assert len(outs) == iterations and torch.equal(outs[0], base(x))
        assert not torch.allclose(outs[-1], outs[0])


@pytest.mark.parametrize("case", CASES)
def test_a_shared_bn_model_loads_into_per_iter_with_the_same_outputs(case):
    _, shared = _pair(case, iterations=3)
    _, per_iter = _pair(case, iterations=3, bn="per_iter")
    per_iter.load_state_dict(shared.state_dict())  # strict: the copies start from the shared tensors
    x = torch.randn(2, *CASES[case][2])
    with torch.no_grad():
        assert torch.equal(per_iter(x), shared(x))


@pytest.mark.parametrize("case", CASES)
def test_per_iter_bn_keeps_each_iterations_statistics_apart(case):
    """After one training-mode forward, iteration 1's running statistics are exactly what the plain backbone's
    become on the same batch; with shared BN they are not (the gated iteration updated them too)."""
    x = torch.randn(4, *CASES[case][2])
    stats = {}
    for bn in ("shared", "per_iter"):
        base, gated = _pair(case, iterations=2, bn=bn)
        base.train(), gated.train()
        with torch.no_grad():
            base(x), gated(x)
        key = next(k for k in base.state_dict() if k.startswith(CASES[case][3]) and k.endswith("bn1.running_mean"))
        stats[bn] = (base.state_dict()[key], gated.state_dict()[f"backbone.{key}"])
        if bn == "per_iter":
            copy = gated.state_dict()[f"backbone.{key[:-len('running_mean')]}others.0.running_mean"]
            assert not torch.allclose(copy, stats[bn][1])  # iteration 2 saw gated inputs
    plain, shared_it1 = stats["shared"]
    assert not torch.allclose(shared_it1, plain)
    plain, per_iter_it1 = stats["per_iter"]
    assert torch.allclose(per_iter_it1, plain, atol=1e-6)


def test_per_iter_bn_with_loss_on_every_iteration_splits_the_decoder_too():
    _, gated = _pair("dig", iterations=2, bn="per_iter", loss_all_iterations=True)
    assert "backbone.decoder.fuse.1" in _norm_names(gated)  # the decoder runs at every iteration then
    _, once = _pair("dig", iterations=2, bn="per_iter")
    assert not any(n.startswith("backbone.decoder") for n in _norm_names(once))  # it runs once: one BN suffices


# -- gradients ---------------------------------------------------------------------------------------------------

def _gradients(case: str, gated: nn.Module, steps: int = 1) -> None:
    """``steps`` SGD steps on one random batch; the gradients of the last backward stay in ``.grad``."""
    gated.train()
    shape, n_classes = CASES[case][2], CASES[case][1]["num_classes"]
    x = torch.randn(4, *shape)
    y = torch.randint(0, n_classes, (4,) if case == "rig" else (4, *shape[1:]))
    opt = torch.optim.SGD(gated.parameters(), lr=0.05)
    for step in range(steps):
        opt.zero_grad()
        iteration_loss(gated(x), y, F.cross_entropy).backward()
        if step < steps - 1:
            opt.step()


def _check_every_gate_has_gradient(case: str, gated: nn.Module, kw: dict) -> None:
    gate_params = [(n, p) for n, p in gated.named_parameters() if n.startswith(("gates.", "propagators."))]
    n_sets = kw["iterations"] - 1 if kw.get("share_gates") is False else 1
    n_props = len(gated.gate_stages) - 1 if case == "dig" else 0  # the cascade: every gated stage but the top
    assert len(gate_params) == 2 * n_sets * (len(gated.gate_stages) + n_props)
    for n, p in gate_params:
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    for n in _norm_names(gated):  # every iteration's BN copy is used, so DDP finds no unused parameter
        for p in gated.get_submodule(n).parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, n


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kw", [dict(bn="shared"), dict(bn="per_iter"),
                                dict(bn="per_iter", iterations=3, share_gates=False, gate_type="both"),
                                dict(bn="per_iter", loss_all_iterations=True, gate_type="channel")])
def test_every_gate_parameter_gets_gradient(case, kw):
    kw = {"iterations": 2, **kw}
    _, gated = _pair(case, **kw)
    _gradients(case, gated)
    _check_every_gate_has_gradient(case, gated, kw)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kw", [dict(bn="shared", gate_init="zero", gate_type="both"),
                                dict(bn="per_iter", gate_init="open"),
                                dict(bn="per_iter", gate_init="open", iterations=3, gate_type="channel")])
def test_zero_weight_gates_give_every_gate_gradient_from_the_second_step(case, kw):
    """"open"/"zero" gates start with weight 0, so at the first step only the gates themselves learn (their weights'
    gradient is slope x source, non-zero); what only shapes gate sources (earlier iterations, propagators) gets
    gradient once the gate weights have left 0."""
    kw = {"iterations": 2, **kw}
    _, gated = _pair(case, **kw)
    _gradients(case, gated, steps=1)
    for n, p in gated.named_parameters():
        if n.startswith("gates."):
            assert p.grad.abs().sum() > 0, n
        if n.startswith("propagators."):
            assert not p.grad.any(), n
    _gradients(case, gated, steps=2)
    _check_every_gate_has_gradient(case, gated, kw)


def test_zero_weight_inits_reach_earlier_gate_sets_from_the_second_step():
    """The documented exception: "open"/"zero" gates have zero weights, so at the first step the last gate set
    ignores iteration T-1's features and RIG's earlier per-iteration sets (share_gates=False, T >= 3) get no
    gradient; after one optimiser step the last set's weights are non-zero and every set has gradient."""
    _, gated = _pair("rig", iterations=3, share_gates=False, gate_init="open", bn="per_iter")
    gated.train()
    opt = torch.optim.SGD(gated.parameters(), lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    for step in range(2):
        opt.zero_grad()
        F.cross_entropy(gated(x), y).backward()
        first = [p.grad.abs().sum() for p in gated.gates[0].parameters()]
        last = [p.grad.abs().sum() for p in gated.gates[1].parameters()]
        assert all(g > 0 for g in last)
        assert all(g == 0 for g in first) if step == 0 else all(g > 0 for g in first)
        opt.step()


# -- MACs -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", CASES)
def test_macs_count_every_iteration_whatever_the_bn(case):
    """The documented count: MACs(T) = MACs(backbone) + (T - 1) * (MACs of the re-run stages + of one gate set),
    gates meaning gates and propagators; BN is not counted, so per-iteration BN costs no MACs."""
    shape, stages = CASES[case][2], CASES[case][3]
    base, one = _pair(case, iterations=1, bn="per_iter")
    p_base = profile(base, shape)
    stage_macs = sum(r.macs for r in p_base.layers if r.name.startswith(stages))
    assert profile(one, shape).macs == p_base.macs and stage_macs > 0
    for t in (2, 3):
        for bn in ("shared", "per_iter"):
            _, gated = _pair(case, iterations=t, bn=bn, share_gates=False)
            p = profile(gated, shape)
            gate_macs = sum(r.macs for r in p.layers if r.name.startswith(("gates.", "propagators.")))
            per_set = gate_macs // (t - 1)
            assert per_set > 0 and gate_macs == (t - 1) * per_set
            assert p.macs == p_base.macs + (t - 1) * (stage_macs + per_set), (t, bn)


# -- gate initialisation ------------------------------------------------------------------------------------------

def _gate_outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: seen.append(o)) for m in model.modules() if isinstance(m, Gate)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("init,value", [("open", 1 / (1 + math.exp(-4.0))), ("zero", 0.5)])
def test_open_and_zero_gates_start_at_one_value_for_every_input(case, init, value):
    _, gated = _pair(case, iterations=3, gate_init=init, share_gates=False, gate_type="both")
    seen = _gate_outputs(gated, torch.randn(2, *CASES[case][2]))
    assert len(seen) == 2 * (len(gated.gate_stages) + (len(gated.gate_stages) - 1 if case == "dig" else 0))
    for g in seen:  # gates and propagators alike
        assert torch.allclose(g, torch.full_like(g, value), atol=1e-6)


def test_default_gate_init_is_unchanged():
    """The default draws the conv's init once, as before the option existed (seeded runs stay reproducible),
    and sets the bias to +3."""
    torch.manual_seed(0)
    ref = nn.Conv2d(32, 16, 1)
    torch.manual_seed(0)
    g = Gate(32, 16, "channel")
    assert torch.equal(g.conv.weight, ref.weight)
    assert torch.equal(g.conv.bias, torch.full((16,), 3.0))
    g.reset_gate("open")
    assert not g.conv.weight.any() and torch.equal(g.conv.bias, torch.full((16,), 4.0))


def test_bad_bn_and_gate_init_are_clear_errors():
    with pytest.raises(ValueError, match="bn must be one of shared, per_iter"):
        create("cifar_resnet20", gating="rig", bn="per_stage")
    with pytest.raises(ValueError, match="gate_init must be one of default, open, zero"):
        create("seg_tiny", gating="dig", gate_init="closed")


# -- gate statistics ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case,kw", [("rig", dict(iterations=3, share_gates=False, gate_type="both")),
                                     ("rig", dict(iterations=2, gate_type="channel", bn="per_iter")),
                                     ("dig", dict(iterations=3, gate_type="spatial", bn="per_iter"))])
def test_gate_stats_structure_and_values(case, kw):
    _, gated = _pair(case, **kw)
    gated.train()  # batch statistics keep an untrained net's activations at a trained scale: gates not saturated
    shape = CASES[case][2]
    batches = [torch.randn(3, *shape), torch.randn(2, *shape)]
    values: dict[tuple[int, int], list[torch.Tensor]] = {}
    hooks = []
    for gate_set in gated.gates:  # an independent record: every gate output, with the iteration it ran at
        for s, gate in gate_set.items():
            hooks.append(gate.register_forward_hook(
                lambda mod, i, o, s=int(s): values.setdefault((s, gated.iteration + 1), []).append(o.flatten())))
    with collect_gate_stats(gated) as stats, torch.no_grad():
        for x in batches:
            gated(x)
    for h in hooks:
        h.remove()
    result = stats.result()
    json.dumps(result)  # JSON-ready
    T = kw["iterations"]
    assert set(result) == {str(s) for s in gated.gate_stages}
    for s, per_t in result.items():
        assert set(per_t) == {str(t) for t in range(2, T + 1)}
        for t, rec in per_t.items():
            assert set(rec) == {"mean", "std", "n"}
            assert 0 <= rec["mean"] <= 1 and 0 <= rec["std"] <= 0.5
            v = torch.cat(values[(int(s), int(t))]).double()
            assert rec["n"] == v.numel()
            assert rec["mean"] == pytest.approx(float(v.mean()), abs=1e-9)
            assert rec["std"] == pytest.approx(float(v.std(unbiased=False)), abs=1e-6)
    # hooks are gone after the block: running again changes nothing
    with torch.no_grad():
        gated(batches[0])
    assert stats.result() == result


def test_gate_stats_of_open_gates_and_of_models_without_gates():
    _, gated = _pair("rig", iterations=2, gate_init="open")
    with collect_gate_stats(gated) as stats, torch.no_grad():
        gated(torch.randn(2, 3, 32, 32))
    for per_t in stats.result().values():
        assert per_t["2"]["mean"] == pytest.approx(1 / (1 + math.exp(-4.0)), abs=1e-6)
        assert per_t["2"]["std"] < 1e-6
    for model in (create("cifar_resnet20"), create("seg_tiny", gating="dig", variant="none"),
                  create("seg_tiny", gating="dig", iterations=1)):
        with collect_gate_stats(model.eval()) as stats, torch.no_grad():
            model(torch.randn(1, *SEG))
        assert stats.result() == {}


# -- saving and the CLI ---------------------------------------------------------------------------------------

def test_per_iter_model_saves_and_loads(tmp_path):
    import slimcnn.io

    _, model = _pair("dig", iterations=3, bn="per_iter", gate_init="zero", loss_all_iterations=True)
    model.train()
    with torch.no_grad():  # training-mode passes move each iteration's statistics apart
        model(torch.randn(2, *SEG))
    model.eval()
    slimcnn.io.save(model, tmp_path / "m")
    same = slimcnn.io.load(tmp_path / "m")
    assert _norm_names(same) == _norm_names(model) and same.bn == "per_iter" and same.gate_init == "zero"
    x = torch.randn(2, *SEG)
    with torch.no_grad():
        assert torch.equal(same(x), model(x))
    import onnxruntime as ort

    path = slimcnn.io.export_onnx(model, tmp_path / "m.onnx", x)  # traced: each iteration's BN copy is baked in
    (y,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(y), model(x), atol=1e-4)


def test_train_cli_takes_the_options_and_reports_gate_stats(tmp_path, capsys):
    from slimcnn.cli import main

    rc = main(["train", "--model", "cifar_resnet20", "--gating", "rig", "--iterations", "2", "--gate-bn", "per_iter",
               "--gate-init", "open", "--data", str(CIFAR), "--train-limit", "20", "--test-limit", "10",
               "--batch-size", "10", "--max-steps", "1", "--lr", "0.01", "--out", str(tmp_path), "--no-progress"])
    capsys.readouterr()
    assert rc == 0
    report = json.loads((tmp_path / "train.json").read_text())
    assert {k: report["gating"][k] for k in ("wrapper", "iterations", "bn", "gate_init")} == \
        {"wrapper": "RIG", "iterations": 2, "bn": "per_iter", "gate_init": "open"}
    stats = report["gating"]["gate_stats"]
    assert set(stats) == {"0", "1"} and all(set(v) == {"2"} for v in stats.values())
    for per_t in stats.values():
        assert 0 <= per_t["2"]["mean"] <= 1 and per_t["2"]["n"] > 0
    import slimcnn.io

    saved = slimcnn.io.load(tmp_path)
    assert saved.bn == "per_iter" and saved.gate_init == "open" and _norm_names(saved)


@pytest.mark.parametrize("gating,kw", [("rig", dict(bn="per_iter", iterations=2)), ("rig", dict(iterations=1)),
                                       ("dig", dict(variant="cascaded", iterations=2))])
def test_plain_classifier_checkpoint_initialises_the_gated_encoder(gating, kw, tmp_path):
    # the fair start of the ablation: the encoder from the trained classifier, gates and BN copies from their init
    from slimcnn.models import CheckpointError, load_checkpoint

    from conftest import RESNET20
    plain = load_checkpoint(create("cifar_resnet20"), RESNET20).eval()
    torch.manual_seed(0)
    model = create("cifar_resnet20", gating=gating, **kw)
    gates_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("backbone.")}
    load_checkpoint(model, RESNET20).eval()
    for k, v in plain.state_dict().items():
        assert torch.equal(model.backbone.state_dict()[k], v), k
    assert all(torch.equal(model.state_dict()[k], v) for k, v in gates_before.items())
    copies = {k: v for k, v in model.backbone.state_dict().items() if ".others." in k}
    for k, v in copies.items():  # every per-iteration copy starts from iteration 1's trained tensors
        assert torch.equal(v, plain.state_dict()[k.replace(".others.0.", ".")]), k
    if kw.get("iterations") == 1:  # T = 1 is the classifier itself
        x = torch.randn(2, 3, 32, 32)
        out = model(x)
        assert torch.equal(out[-1] if isinstance(out, (list, tuple)) else out, plain(x))
    resnet56 = tmp_path / "resnet56.th"  # another network's checkpoint still fails
    torch.save({"state_dict": create("cifar_resnet56").state_dict()}, resnet56)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(create("cifar_resnet20", gating=gating, **kw), resnet56)
