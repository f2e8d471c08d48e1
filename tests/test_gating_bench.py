"""benchmarks/gating.py, the script behind the README's gating tables: an ablation row's options reach the model
it trains, the row records the gates' statistics, and a bad row is one clear error."""
from __future__ import annotations

import json

import pytest

from conftest import CAMVID, CIFAR, RESNET20, benchmark_script

WEIGHTS = RESNET20.parent  # the package's assets: the public ResNet-20 under its public name


@pytest.fixture(scope="module")
def gating():
    with benchmark_script("gating") as module:
        yield module


def test_rows_split_on_commas_and_keep_their_options(gating):
    assert gating.split_rows("resnet20,resnet20+rig:bn=per_iter,T=3,stages=1,resnet32") == [
        "resnet20", "resnet20+rig:bn=per_iter,T=3,stages=1", "resnet32"]
    assert gating.parse_row("resnet20+rig:bn=per_iter,T=3,init=open,source=top", gating.CIFAR_ROWS) == (
        "resnet20+rig", {"bn": "per_iter", "iterations": 3, "gate_init": "open", "gate_source": "top"})
    assert gating.parse_row("none:width=0.68", gating.CAMVID_ROWS) == ("none", {"width": 0.68})


def test_cifar_ablation_row_trains_the_model_it_names(gating, tmp_path):
    rows = "resnet20+rig:bn=per_iter,T=3,stages=1,resnet20"
    assert gating.main(["cifar", "--data", str(CIFAR), "--weights-dir", str(WEIGHTS), "--epochs", "1",
                        "--train-limit", "64", "--test-limit", "64", "--batch-size", "32", "--max-steps", "1",
                        "--quiet", "--out", str(tmp_path), "--name", "ablation", "--rows", rows]) == 0
    doc = json.loads((tmp_path / "ablation.json").read_text())
    rig = doc["rows"]["resnet20+rig:bn=per_iter,T=3,stages=1"]
    assert rig["kwargs"] == {"gating": "rig", "iterations": 3, "gate_type": "both", "bn": "per_iter",
                             "gate_stages": "1"}
    plain = doc["rows"]["resnet20"]
    # T=3 repeats stages 1 and 2 twice: more than twice the plain MACs, less than three times
    assert 2 * plain["macs"] < rig["macs"] < 3 * plain["macs"]
    # the public checkpoint was loaded into the gated encoder: it starts where the plain net starts
    assert rig["before"]["test"]["top1"] == pytest.approx(plain["before"]["test"]["top1"], abs=10)
    assert plain["before"]["test"]["top1"] > 50
    assert set(rig["gate_stats"]) == {"1"} and set(rig["gate_stats"]["1"]) == {"2", "3"}
    assert plain["gate_stats"] == {}
    # the gated row also scores its own first iteration (the backbone alone, same trained weights); a plain row has none
    assert 0 < rig["after_first_iteration"]["test"]["top1"] <= 100 and plain["after_first_iteration"] is None
    md = (tmp_path / "ablation.md").read_text()
    assert "| resnet20+rig:bn=per_iter,T=3,stages=1 |" in md and "s1 0." in md


@pytest.mark.shared
def test_a_feed_forward_camvid_row_of_another_width(gating, tmp_path):
    assert gating.main(["camvid", "--data", str(CAMVID), "--epochs", "1", "--size", "48,64", "--train-limit", "8",
                        "--test-limit", "4", "--max-steps", "1", "--quiet", "--out", str(tmp_path),
                        "--rows", "none:width=0.25,none"]) == 0
    doc = json.loads((tmp_path / "gating_camvid.json").read_text())
    narrow, default = doc["rows"]["none:width=0.25"], doc["rows"]["none"]
    assert narrow["kwargs"]["width"] == 0.25 and default["kwargs"]["width"] == 0.5
    assert narrow["macs"] < default["macs"]


@pytest.mark.parametrize("rows, message", [
    ("resnet20+rig:colour=red", "unknown option 'colour'"),
    ("resnet21", "unknown row 'resnet21'"),
    ("resnet32:T=3", "resnet32 has no feedback gating; it takes no options"),
    ("resnet20+rig:width=2", "width= applies to the camvid rows only"),
])
def test_bad_rows_are_one_clear_error(gating, capsys, rows, message):
    with pytest.raises(SystemExit) as e:
        gating.main(["cifar", "--rows", rows])
    assert e.value.code == 2
    assert message in capsys.readouterr().err



def test_camvid_none_row_takes_only_a_width(gating, capsys):
    with pytest.raises(SystemExit):
        gating.main(["camvid", "--rows", "none:bn=per_iter"])
    assert "none has no feedback gating; only width= applies to it" in capsys.readouterr().err
