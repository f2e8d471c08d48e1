"""`--target-latency`: the per-layer latency table, the width plan on predicted latency, the report, bad input.

Timing is real (no stand-ins) but short (few repeats), so every assertion is on the table's structure and on
predicted values, never on a measured time or ratio: 2 shared cores make those vary run to run.
"""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from conftest import CIFAR, RESNET20, one_line_compress_error
from slimcnn.backends import check_backend, runner, time_runners
from slimcnn.cli import main
from slimcnn.graph import channel_groups
from slimcnn.graph.latency import (LatencyTable, LayerTable, _grid, allocate_latency, build_latency_table,
                                   parse_latency_target, smallest_ratio)
from slimcnn.graph.targeting import TargetError
from slimcnn.models import create

X = torch.randn(1, 3, 32, 32)
COMMON = ["compress", "--method", "l1", "--model", "cifar_resnet20", "--weights", str(RESNET20), "--data",
          str(CIFAR), "--train-limit", "64", "--test-limit", "50", "--bn-recalib", "1", "--latency-batch", "1",
          "--latency-budget", "1"]


@pytest.fixture(scope="module")
def resnet20():
    model = create("cifar_resnet20").eval()
    groups = channel_groups(model, X)
    table = build_latency_table(model, X, "eager", 1, 1, 0.6, groups=groups, repeats=3, calibration_budget_s=1.0)
    return model, groups, table


def test_the_table_has_an_entry_per_group_and_per_layer(resnet20):
    model, groups, table = resnet20
    prunable = [g.key for g in groups if g.prunable]
    curves = table.group_curves(groups)
    assert list(curves) == prunable
    assert all([w for w, _ in curves[g.key]] == _grid(g.size) for g in groups if g.prunable)
    convs = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(table.tables) == sorted(convs)
    # equal shapes share one table: ResNet-20 has 7 (stem, 3 stages, 2 downsampling convs, the head)
    assert table.summary()["layer_shapes"] == 7
    assert [p["what"] for p in table.points] == ["floor", "anchor"]
    assert table.summary()["table_build_s"] > 0 and table.total == table.base_ms > 0


def test_predicted_latency_never_falls_as_a_width_grows_within_its_class(resnet20):
    _, groups, table = resnet20
    for t in {id(t): t for t in table.tables.values()}.values():
        for grid, lines in ((t.out_grid, t.ms), (t.in_grid, list(zip(*t.ms)))):
            for cls in (True, False):
                idx = [j for j, w in enumerate(grid) if (w % 8 == 0 or w == grid[-1]) == cls]
                for line in lines:
                    assert all(line[a] <= line[b] for a, b in zip(idx, idx[1:]))
    for g in groups:
        if g.prunable:
            aligned = [table.raw_at({g.key: w}) for w in _grid(g.size) if w % 8 == 0 or w == g.size]
            assert aligned == sorted(aligned)
    assert table.raw_at({g.key: 1 for g in groups if g.prunable}) < table.raw_at({})


def test_odd_widths_interpolate_between_odd_grid_points():
    t = LayerTable([3], [1, 7, 8, 15, 16], [[1.0, 3.0, 2.0, 5.0, 4.0]], [[1.0, 3.0, 2.0, 5.0, 4.0]])
    assert t.at(3, 8) == 2.0 and t.at(3, 16) == 4.0  # aligned: their own points
    assert t.at(3, 11) == pytest.approx(3.0 + (5.0 - 3.0) * 4 / 8)  # between 7 and 15, never via 8
    assert t.at(3, 4) == pytest.approx(1.0 + (3.0 - 1.0) * 3 / 6)


def test_calibration_is_non_decreasing_through_the_measured_points():
    t = LatencyTable("eager", 1, 1, (3, 32, 32), [], {}, base_ms=10.0)
    t.points = [{"what": "floor", "raw_ratio": 0.1, "ratio": 0.3}, {"what": "anchor", "raw_ratio": 0.5, "ratio": 0.4},
                {"what": "plan 1", "raw_ratio": 0.6, "ratio": 0.35}]  # a noisy point below its left neighbour
    values = [t.calibrated(r / 20) for r in range(1, 30)]
    assert values == sorted(values)
    assert t.calibrated(0.1) == 0.3 and t.calibrated(1.0) == 1.0 and t.calibrated(0.55) == pytest.approx(0.4)
    assert smallest_ratio(t) == 0.3


@pytest.mark.parametrize("mode", ["uniform", "global"])
@pytest.mark.parametrize("ratio", [0.6, 0.8])
def test_the_plan_lands_on_the_target_in_predicted_latency(resnet20, mode, ratio):
    model, groups, table = resnet20
    scores = {g.key: torch.rand(g.size, generator=torch.Generator().manual_seed(0)) for g in groups if g.prunable}
    widths = allocate_latency(table, groups, ratio, mode, scores)
    assert abs(table.ratio_at(widths) - ratio) <= 0.03 * ratio
    assert all(1 <= widths[g.key] <= g.size for g in groups if g.prunable)


def test_round_to_keeps_the_latency_plan_aligned(resnet20):
    _, groups, table = resnet20
    widths = allocate_latency(table, groups, 0.7, round_to=8)
    assert all(widths[g.key] % 8 == 0 or widths[g.key] == g.size for g in groups if g.prunable)
    assert table.ratio_at(widths) <= 1.0


def test_a_target_below_the_smallest_net_names_the_smallest_reachable_ratio(resnet20):
    _, groups, table = resnet20
    floor = smallest_ratio(table)
    with pytest.raises(TargetError, match=f"smallest reachable ratio {floor:.3f}"):
        allocate_latency(table, groups, floor / 2)


def test_parse_latency_target():
    assert parse_latency_target("0.5") == (0.5, "ratio") and parse_latency_target("12ms") == (12.0, "ms")
    for bad in ("12", "0", "fast", "-0.5", "5 s"):
        with pytest.raises(ValueError, match="--target-latency"):
            parse_latency_target(bad)


def test_onnxruntime_backend_times_an_exported_model():
    pytest.importorskip("onnxruntime")
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 3),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()
    ms = time_runners({"m": runner(model, (3, 16, 16), 2, "onnxruntime", 1)}, repeats=3)
    assert ms["m"] > 0
    x = torch.randn(1, 3, 16, 16)
    table = build_latency_table(model, x, "onnxruntime", 1, 1, 0.5, repeats=2, calibration_budget_s=0.5)
    assert table.backend == "onnxruntime" and len(table.group_curves(channel_groups(model, x))) >= 1


def test_cli_report_has_the_latency_target_block(tmp_path, capsys):
    out = tmp_path / "lt"
    assert main([*COMMON, "--target-latency", "0.7", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    lt = rep["latency_target"]
    assert {"backend", "batch", "threads", "target", "target_ratio", "predicted_ratio", "measured_ratio",
            "measured_base_ms", "measured_compressed_ms", "table_build_s", "calibration", "groups"} <= set(lt)
    assert (lt["backend"], lt["batch"], lt["threads"], lt["target_ratio"]) == ("eager", 1, 1, 0.7)
    assert abs(lt["predicted_ratio"] - 0.7) <= 0.03 * 0.7
    assert rep["target_macs"] is None and rep["within_tol"] is None
    md = (out / "report.md").read_text()
    assert "Target latency: 0.7 of the base latency." in md
    assert "Latency target 0.7 of the base latency on eager (batch 1" in md


@pytest.mark.parametrize("extra,expected", [
    (["--target-latency", "0.5", "--target-macs", "0.5"], "two budgets for one width plan"),
    (["--target-latency", "0.5", "--round-to", "0"], "positive integer"),
    (["--target-latency", "12"], "must be in (0, 1]"),
])
def test_bad_input_is_one_line_before_anything_loads(extra, expected, capsys, tmp_path):
    out = tmp_path / "o"
    err = one_line_compress_error(capsys, [*COMMON, "--out", str(out), *extra])
    assert expected in err and not out.exists()


@pytest.mark.parametrize("method", ["dagger", "tp+trp"])
def test_a_method_without_a_latency_plan_gets_the_macs_target_that_measures_the_goal(method, tmp_path, capsys):
    """Dagger decides its widths by training and a stack that starts with the peer by its split: the goal becomes
    a MACs target, found on a uniformly pruned net of aligned widths. Timed for real: only the report's form is
    checked."""
    out = tmp_path / method
    assert main([*COMMON, "--method", method, "--epochs", "2", "--target-latency", "0.8", "--no-latency-plan",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    lt = rep["latency_target"]
    assert lt["via"] == "macs" and lt["round_to"] == 8 and (lt["backend"], lt["batch"]) == ("eager", 1)
    assert rep["target_macs"] == pytest.approx(lt["macs_ratio"], abs=1e-4) and 0 < lt["macs_ratio"] < 1
    assert "measured_ratio" in lt
    # the method's own net, built with no training, was probed from the uniform net's figure
    assert lt["fit"]["chosen"]["macs_target"] == pytest.approx(lt["macs_ratio"], abs=1e-4)
    assert lt["fit"]["probes"][0]["macs_target"] == pytest.approx(lt["uniform_macs_ratio"], abs=1e-4)
    assert f"{method} compresses to {lt['macs_ratio']:.3f} of the MACs" in capsys.readouterr().out


def test_unknown_backend_and_missing_cuda(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*COMMON, "--target-latency", "0.5", "--latency-backend", "tpu", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "invalid choice: 'tpu'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown latency backend"):
        check_backend("tpu")
    if not torch.cuda.is_available():
        err = one_line_compress_error(capsys, [*COMMON, "--target-latency", "0.5", "--latency-backend", "cuda",
                                       "--out", str(tmp_path / "o")])
        assert "needs a CUDA GPU" in err
    assert not (tmp_path / "o").exists()


def test_a_target_below_the_smallest_net_is_one_line_and_writes_nothing(capsys, tmp_path):
    out = tmp_path / "o"
    err = one_line_compress_error(capsys, [*COMMON, "--target-latency", "0.001", "--out", str(out)])
    assert "smallest reachable ratio" in err and "on eager at batch 1" in err and not out.exists()


def test_l1_trp_plans_a_latency_goal_stage_by_stage_on_the_runtime(tmp_path):
    """l1+trp takes the goal itself: the channel stage's own latency plan to goal**split, then TRP's plan the rest
    of the way: the goal over what the channel stage's net measured. Timed for real: the form is checked, and the
    targets each stage was given, which follow from the goal and the first stage's record."""
    out = tmp_path / "stack"
    assert main([*COMMON, "--method", "l1+trp", "--epochs", "1", "--target-latency", "0.8", "--split", "0.9",
                 "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    lt = rep["latency_target"]
    assert (lt["backend"], lt["batch"], lt["target_ratio"]) == ("eager", 1, 0.8) and lt["measured_ratio"] > 0
    assert "via" not in lt and rep["target_macs"] is None  # no MACs fit: planned on the runtime
    # split 0.9: on eager at batch 1 factorising saves little time, so the channel stage takes most of the goal
    assert rep["stack"]["split"] == 0.9 and "log latency reduction" in rep["stack"]["split_rule"]
    first, last = rep["stages"]
    assert first["target_latency_ratio"] == pytest.approx(0.8 ** 0.9, abs=1e-6)
    reached = first["details"]["latency_target"]["search_ratio"]
    assert last["target_latency_ratio"] == pytest.approx(0.8 / reached, abs=1e-5)
    assert last["details"]["latency_target"]["backend"] == "eager"


def test_a_latency_goal_for_a_stack_whose_first_stage_cannot_plan_one_is_refused():
    from slimcnn import methods
    from slimcnn.graph.latency import LatencyGoal

    assert methods.plans_latency("l1+trp") and not methods.plans_latency("dagger+trp")
    with pytest.raises(ValueError, match="both stages plan on latency"):
        methods.create("dagger+trp", target_latency=LatencyGoal(0.6))


@pytest.mark.slow
def test_the_stack_searches_its_split_at_equal_latency(cifar_root):
    """Without --split every candidate split is built at the same latency goal (the channel stage to goal**s,
    TRP the rest) and scored; the search's record names each split's stage target."""
    from slimcnn import methods
    from slimcnn.data import cifar10_loaders
    from slimcnn.graph.latency import LatencyGoal
    from slimcnn import load_checkpoint

    loaders = cifar10_loaders(str(cifar_root), 16, 64, 32, 0, splits=("train", "test"))
    model = load_checkpoint(create("cifar_resnet20"), RESNET20).eval()
    stack = methods.create("l1+trp", target_latency=LatencyGoal(0.8, "ratio", "eager", 1, 1), splits=(0.5, 0.9),
                           search_images=32)
    stack.prepare(model, X.repeat(2, 1, 1, 1), train_loader=loaders["train"], test_loader=loaders["test"])
    tried = stack.search["tried"]
    assert [t["split"] for t in tried] == [0.5, 0.9]
    assert [t["target_latency_ratio"] for t in tried] == [round(0.8 ** 0.5, 6), round(0.8 ** 0.9, 6)]
    assert stack.chosen_split in (0.5, 0.9) and stack.report()["latency_target"]["target_ratio"] == 0.8
