"""One epoch budget per compression run (split by each method's recipe), distillation and EMA in `compress`."""
from __future__ import annotations

import json

import pytest

from slimcnn.bench import ROWS
from slimcnn.cli import main
from slimcnn.compress import CompressConfig, split_budget
from slimcnn.methods import list_methods, method_class
from conftest import CIFAR, RESNET20

COMMON = ["--model", "cifar_resnet20", "--weights", str(RESNET20), "--data", str(CIFAR), "--latency-batch", "1"]


@pytest.mark.parametrize("name", list_methods())
@pytest.mark.parametrize("total", [1, 2, 3, 5, 10])
def test_split_adds_up_for_every_method(name, total):
    cls = method_class(name)
    m, ft = split_budget(cls, total)
    assert m + ft == total and m >= 0 and ft >= 0
    if cls.method_share > 0:
        assert m >= 1 and m == max(1, round(total * cls.method_share))
    else:
        assert m == 0
    assert split_budget(cls, total, method_epochs=1) == (1, total - 1)  # the explicit override
    with pytest.raises(ValueError, match="more than the whole budget"):
        split_budget(cls, total, method_epochs=total + 1)


@pytest.mark.parametrize("name", list_methods())
def test_recipes_are_consistent(name):
    cls = method_class(name)
    # a method whose finalize needs training must spend some of the budget training
    assert (cls.method_share > 0) == cls.trains_before_finalize
    assert 0.0 <= cls.method_share <= 1.0


def test_known_recipes():
    assert {n: method_class(n).method_share for n in list_methods()} == {
        "l1": 0.0, "tp": 0.0, "modelopt": 0.0, "dagger": 0.5, "csgd": 1.0, "trp": 1.0}
    assert split_budget(method_class("dagger"), 4) == (2, 2) and split_budget(method_class("dagger"), 1) == (1, 0)
    # the benchmark takes its split from the method, not from its own table
    assert {r.label: r.method_share for r in ROWS}["csgd"] == 1.0


def test_zero_budget():
    assert split_budget(method_class("l1"), 0) == (0, 0)  # prune, no fine-tune: allowed
    for name in ("csgd", "trp", "dagger"):
        with pytest.raises(ValueError, match=f"{name} needs at least 1 epoch"):
            split_budget(method_class(name), 0)
        with pytest.raises(ValueError, match="--method-epochs 0 leaves it none"):
            split_budget(method_class(name), 3, method_epochs=0)


def test_config_checks():
    with pytest.raises(ValueError, match="kd_alpha"):
        CompressConfig(kd_alpha=2.0)
    with pytest.raises(ValueError, match="ema"):
        CompressConfig(ema=1.0)


def _one_line_error(capsys, argv: list[str]) -> str:
    code = main(argv)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert code == 2 and len(err) == 1 and err[0].startswith("slimcnn compress: error:"), err
    return err[0]


def test_csgd_with_no_epochs_is_one_clear_error(capsys, tmp_path):
    out = tmp_path / "csgd"
    err = _one_line_error(capsys, ["compress", "--method", "csgd", *COMMON, "--epochs", "0", "--out", str(out)])
    assert "centripetal SGD" in err and "--epochs 0" in err
    assert not out.exists()
    err = _one_line_error(capsys, ["compress", "--method", "l1", *COMMON, "--epochs", "1", "--method-epochs", "2",
                                   "--out", str(out)])
    assert "more than the whole budget" in err and not out.exists()


def test_compress_reports_budget_distillation_and_ema(capsys, tmp_path):
    out = tmp_path / "l1kd"
    # 2 epochs in all: 1 with the (hook-less) method attached and 1 fine-tune, both distilled; EMA in the fine-tune
    assert main(["compress", "--method", "l1", *COMMON, "--train-limit", "64", "--test-limit", "50", "--batch-size",
                 "32", "--epochs", "2", "--method-epochs", "1", "--distill", "--kd-alpha", "0.5",
                 "--ema", "0.9", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    budget = rep["epoch_budget"]
    assert (budget["total_epochs"], budget["method_epochs"], budget["finetune_epochs"]) == (2, 1, 1)
    assert budget["method_share"] == 0.0 and budget["recipe"] == rep["recipe"] == "distill"
    assert rep["distill"]["alpha"] == 0.5 and rep["distill"]["temperature"] == 4.0
    assert rep["distill"]["phases"] == ["method", "finetune"]
    assert rep["ema"] == {"decay": 0.9, "applied": True}
    md = (out / "report.md").read_text()
    assert "2 in all = 1 of" in md and "training recipe `distill`" in md and "alpha 0.5" in md and "EMA 0.9" in md


def test_cli_distils_by_default_and_no_distill_turns_it_off():
    # the CLI's default recipe is the one that measured best at the cpu budget (distillation); the Python
    # CompressConfig keeps it off so that library callers' figures never change under them
    from slimcnn.cli import build_parser
    base = ["compress", "--method", "l1", *COMMON, "--out", "o"]
    assert build_parser().parse_args(base).distill is True
    assert build_parser().parse_args([*base, "--no-distill"]).distill is False
    assert CompressConfig().distill is False


def test_recipe_text_names_distillation_only_when_something_trains():
    from slimcnn.compress import recipe_text
    cls = method_class("l1")
    assert "distilled" in recipe_text(cls, CompressConfig(epochs=1, distill=True))
    assert "distilled" not in recipe_text(cls, CompressConfig(epochs=0, distill=True))


def test_a_run_is_checked_and_split_once_by_its_plan():
    """plan_run is the one check every caller goes through (the CLI, the benchmarks, the demo): the budget split by
    the method's recipe, the task, the layer control, and the phases the run walks."""
    from slimcnn.compress import RunPlan, check_run, plan_run

    plan = plan_run(method_class("dagger"), 4, target_macs=0.5, bn_recalib=0, latency=False)
    assert isinstance(plan, RunPlan) and (plan.cfg.method_epochs, plan.cfg.epochs) == (2, 2)
    assert plan.phases == ("measure base", "prepare", "train with the method (2 epochs)", "finalize",
                           "fine-tune (2 epochs)", "measure compressed")
    assert plan_run(method_class("l1"), 1, method_epochs=0).phases[2] == "finalize"  # nothing trains before it
    with pytest.raises(ValueError, match="needs at least 1 epoch"):
        plan_run(method_class("csgd"), 0)
    with pytest.raises(ValueError, match="not supported for segmentation"):
        plan_run(method_class("tp"), 2, task="segmentation")
    with pytest.raises(ValueError, match="does not support --exclude"):
        plan_run(method_class("modelopt"), 2, exclude=["fc"])
    # a config built by hand gets the same check, its split as given
    with pytest.raises(ValueError, match="needs at least 1 epoch"):
        check_run(method_class("csgd"), CompressConfig(method_epochs=0, epochs=2))


def test_compress_takes_the_plan_and_reports_its_phases(tmp_path):
    import slimcnn
    from slimcnn import methods
    from slimcnn.compress import compress, plan_run
    from slimcnn.data import cifar10_loaders

    loaders = cifar10_loaders(str(CIFAR), 32, 64, 64, 0)
    base = slimcnn.load_checkpoint(slimcnn.create("cifar_resnet20"), RESNET20)
    plan = plan_run(method_class("l1"), 1, target_macs=0.6, bn_recalib=1, latency=False)
    _, report = compress(base, methods.create("l1", target_macs=0.6), loaders["train"], loaders["test"], (3, 32, 32),
                         plan)
    assert report["phases"] == list(plan.phases) and report["epoch_budget"]["finetune_epochs"] == 1
    with pytest.raises(ValueError, match="planned for l1, not trp"):
        compress(base, methods.create("trp", target_macs=0.6), loaders["train"], loaders["test"], (3, 32, 32), plan)
    # the layer control's globs are checked against the model itself
    bad = plan_run(method_class("l1"), 1, exclude=["no_such_layer*"])
    with pytest.raises(ValueError, match="no_such_layer"):
        compress(base, methods.create("l1"), loaders["train"], loaders["test"], (3, 32, 32), bad)
