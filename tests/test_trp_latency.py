"""TRP planned for a deploy runtime (methods/factor_timing.py): the plan follows a fixed table of layer times (no
timing here), a layer whose factors cost more than itself stays whole, resume keeps the plan, and a net slower than
the base is reported in one warning line and in bold."""
from __future__ import annotations

import json

import pytest
import torch

import slimcnn
from slimcnn.data.embedded import DEMO_WEIGHTS
from slimcnn.methods.factor_timing import Deploy, LayerTimes, rank_grid
from slimcnn.methods.trp import TRP, full_rank, plan_decomposition, select_layers
from slimcnn.models import create, load_checkpoint

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def trained_resnet20():
    return load_checkpoint(create("cifar_resnet20"), DEMO_WEIGHTS)


def table(model, slow_stage: str = "layer3", cheap_up_to: int = 1 << 30) -> LayerTimes:
    """Whole layers cost 1 ms. In ``slow_stage`` the factors cost 2 ms at any rank; elsewhere rank r costs r / full
    (cheaper than whole below full rank) up to ``cheap_up_to``, and 1.5 ms above it."""
    whole, factored = {}, {}
    for name in select_layers(model):
        full = full_rank(model.get_submodule(name), "spatial")
        whole[name] = 1.0
        factored[name] = {r: (2.0 if name.startswith(slow_stage) else r / full if r <= cheap_up_to else 1.5)
                          for r in rank_grid(full, 8)}
    return LayerTimes.fixed(whole, factored)


def test_a_layer_whose_factors_cost_more_stays_whole_and_the_target_holds():
    model = trained_resnet20()
    m = TRP(target_macs=0.6, scheme="spatial", layer_times=table(model))
    m.prepare(model, X)
    plans = {p.name: p for p in m._plans}
    assert all(not p.applied for n, p in plans.items() if n.startswith("layer3"))
    assert any(p.applied for n, p in plans.items() if not n.startswith("layer3"))
    assert m.round_to == 8  # a plan for a runtime uses aligned ranks
    assert all(p.rank % 8 == 0 or p.rank == p.full_rank for p in plans.values())
    compact = m.finalize(model)
    base = slimcnn.profile(model, example_input=X[:1]).macs
    assert abs(slimcnn.profile(compact, example_input=X[:1]).macs / base - 0.6) <= 0.006
    assert set(m.report()["latency_plan"]["kept_whole_factors_slower"]) == {n for n in plans if n.startswith("layer3")}
    for name, mod in compact.named_modules():  # the slow stage's convs are still single convs
        if name.startswith("layer3") and name.endswith(("conv1", "conv2")):
            assert isinstance(mod, torch.nn.Conv2d), name


def test_no_layer_is_factorised_above_the_rank_where_its_factors_stop_paying():
    model = trained_resnet20()
    m = TRP(target_macs=0.6, scheme="spatial", layer_times=table(model, slow_stage="none", cheap_up_to=16))
    m.prepare(model, X)
    assert all(p.rank <= 16 for p in m._plans if p.applied)
    assert any(not p.applied for p in m._plans)  # those that needed more rank stay whole


def test_without_a_table_the_plan_is_the_macs_plan():
    model = trained_resnet20()
    plain, timed = TRP(target_macs=0.6, scheme="spatial"), TRP(target_macs=0.6, scheme="spatial",
                                                              layer_times=table(model, slow_stage="none"))
    plain.prepare(model, X)
    timed.prepare(model, X)
    assert plain.round_to is None and all(p.applied for p in timed._plans)  # factors always cheaper: no layer whole


def test_an_unreachable_target_names_the_layers_kept_whole():
    model = trained_resnet20()
    everything_slow = table(model, slow_stage="layer")
    with pytest.raises(slimcnn.graph.TargetError, match="18 of 18 layers stay whole because their factors are slower"):
        plan_decomposition(model, X[:1], "spatial", "target_macs", 0.5, round_to=8, layer_times=everything_slow)


def test_a_target_the_paying_layers_cannot_reach_is_planned_on_macs_with_a_warning(capsys):
    model = trained_resnet20()
    m = TRP(target_macs=0.5, scheme="spatial", layer_times=table(model, slow_stage="layer"))
    m.prepare(model, X)
    assert "planned on MACs alone" in m.report()["latency_plan"]["note"]
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("warning: TRP")]
    assert len(lines) == 1 and "18 of 18 layers stay whole" in lines[0]
    assert all(p.applied for p in m._plans)  # every layer factorised, as on MACs alone


def test_the_cli_plans_on_the_runtime_and_the_report_holds_the_table(tmp_path):
    """Timed for real on eager at batch 1 (the plan depends on the timing, so only its consistency is checked)."""
    from conftest import CIFAR

    from slimcnn.cli import main

    out = tmp_path / "trp"
    assert main(["compress", "--method", "trp", "--model", "cifar_resnet20", "--weights", str(DEMO_WEIGHTS),
                 "--data", str(CIFAR), "--train-limit", "64", "--test-limit", "50", "--batch-size", "32",
                 "--epochs", "1", "--scheme", "spatial", "--target-macs", "0.6", "--latency-batch", "1",
                 "--no-latency", "--bn-recalib", "1", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    plan = rep["latency_plan"]
    assert plan["deploy"] == {"backend": "eager", "batch": 1, "threads": 1}
    times = LayerTimes.from_summary(plan)
    for layer in rep["layers"]:  # no layer factorised above the rank where its factors stop paying
        assert not layer["applied"] or layer["rank"] <= times.max_rank(layer["name"]), layer
    assert rep["within_tol"] is True or plan["note"]


def test_resume_keeps_the_plan_and_its_table():
    model = trained_resnet20()
    first = TRP(target_macs=0.6, scheme="spatial", layer_times=table(model))
    first.prepare(model, X)
    state = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    # a resumed run times again and gets another table; the checkpoint's plan and table win
    again = TRP(target_macs=0.6, scheme="spatial", layer_times=table(model, slow_stage="layer1"))
    again.prepare(model, X)
    again.load_state_dict(state)
    assert [vars(p) for p in again._plans] == [vars(p) for p in first._plans]
    assert again.times.summary()["factored_ms"] == first.times.summary()["factored_ms"]


def test_deploy_must_be_a_deploy():
    with pytest.raises(ValueError, match="deploy must be"):
        TRP(target_macs=0.5, deploy="onnxruntime")
    assert str(Deploy("onnxruntime", 128, 2)) == "onnxruntime, batch 128, 2 thread(s)"


def test_a_compressed_net_slower_than_the_base_is_one_warning_line_and_bold_in_the_report(tmp_path, monkeypatch,
                                                                                          capsys):
    """The timing is fixed (the compressed net takes 1.3x the base at batch 1, 0.7x at batch 4): no clock here."""
    import slimcnn.compress as pipeline
    from slimcnn.compress import CompressConfig, compress
    from slimcnn.data import Loader, load_demo

    def fixed_latency(models, input_shape, batch, budget_s, max_repeats):
        return {"base": 1.0, "compressed": 1.3 if batch == 1 else 0.7}, batch, 3

    monkeypatch.setattr(pipeline, "budgeted_latency", fixed_latency)
    data = load_demo("test")
    loader = Loader(data.subset(range(64)), 32)
    cfg = CompressConfig(target_macs=0.5, method_epochs=0, epochs=0, out_dir=str(tmp_path), latency_batches=[1, 4],
                         bn_recalib=1, stage_evals=False)
    _, report = compress(trained_resnet20(), slimcnn.methods.create("l1", target_macs=0.5), loader, loader,
                         (3, 32, 32), cfg, "cifar_resnet20")
    warnings = [ln for ln in capsys.readouterr().out.splitlines() if "SLOWER than the base" in ln]
    assert len(warnings) == 1 and warnings[0].startswith("warning: ") and "batch 1 (1.300x" in warnings[0]
    assert "batch 4" not in warnings[0]
    assert report["latency_ms"]["slower_than_base"] in warnings[0]
    assert f"**Warning: {report['latency_ms']['slower_than_base']}.**" in (tmp_path / "report.md").read_text()


def test_a_time_budget_plan_follows_the_table_and_fits_the_budget():
    from slimcnn.methods.trp import plan_for_time

    model = trained_resnet20()
    times = table(model)  # layer3's factors cost more than the layers: they stay whole
    whole = sum(times.whole.values())
    budget = whole - 4.0  # 4 ms of the 18 whole-layer ms must go
    plans = plan_for_time(model, X[:1], "spatial", times, budget, round_to=8)
    spent = sum(times.cost(p.name, p.rank if p.applied else None) for p in plans)
    assert spent <= budget and all(not p.applied for p in plans if p.name.startswith("layer3"))
    assert all(p.rank <= times.max_rank(p.name) for p in plans if p.applied)
    cheapest = plan_for_time(model, X[:1], "spatial", times, None, round_to=8)
    floor = sum(times.cost(p.name, p.rank if p.applied else None) for p in cheapest)
    with pytest.raises(slimcnn.graph.TargetError, match="cannot get below"):
        plan_for_time(model, X[:1], "spatial", times, floor - 0.5, round_to=8)


def trp_latency_args(out, *extra):
    from conftest import CIFAR

    return ["compress", "--method", "trp", "--model", "cifar_resnet20", "--weights", str(DEMO_WEIGHTS), "--data",
            str(CIFAR), "--train-limit", "64", "--test-limit", "50", "--batch-size", "32", "--epochs", "1",
            "--scheme", "spatial", "--bn-recalib", "1", "--latency-batch", "1", "--latency-budget", "1",
            "--out", str(out), *extra]


def test_trp_takes_a_latency_target_and_reports_it(tmp_path):
    """Timed for real: only the report's form is checked, never a measured value."""
    from slimcnn.cli import main

    out = tmp_path / "trp"
    assert main(trp_latency_args(out, "--target-latency", "0.9")) == 0
    rep = json.loads((out / "report.json").read_text())
    lt = rep["latency_target"]
    assert {"target", "target_ratio", "backend", "batch", "threads", "predicted_ratio", "search_ratio", "plans",
            "measured_ratio"} <= set(lt)
    assert (lt["backend"], lt["batch"], lt["target_ratio"]) == ("eager", 1, 0.9) and rep["target_macs"] is None
    assert 1 <= len(lt["plans"]) <= 3 and rep["latency_plan"]["deploy"]["backend"] == "eager"


def test_trp_latency_target_below_its_smallest_net_is_one_line_naming_its_measured_ratio(capsys, tmp_path):
    from conftest import one_line_compress_error

    out = tmp_path / "o"
    err = one_line_compress_error(capsys, trp_latency_args(out, "--target-latency", "0.01"))
    assert "smallest net its plan allows measures" in err and "of the base" in err and not out.exists()


def test_the_report_times_base_and_compressed_on_the_deploy_runtime(tmp_path):
    pytest.importorskip("onnxruntime")
    from slimcnn.cli import main

    out = tmp_path / "ort"
    assert main(trp_latency_args(out, "--target-macs", "0.6", "--latency-backend", "onnxruntime")) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["latency_ms"]["backend"] == "onnxruntime" and rep["latency_ms"]["batch"] == [1]
    assert rep["latency_plan"]["deploy"]["backend"] == "onnxruntime"
    assert "Latency ratio compressed/base (onnxruntime): batch 1:" in (out / "report.md").read_text()
