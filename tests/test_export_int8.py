"""``slimcnn export --int8``: ONNX Runtime static quantisation of a compressed model, calibrated on training
images, with top-1 and latency of the INT8 and the FP32 ONNX model in the folder's report."""
from __future__ import annotations

import json

import pytest
import torch

import slimcnn
from slimcnn.cli import main
from slimcnn.graph import channel_groups, prune_to_target
from slimcnn.importance import score
from conftest import CIFAR, RESNET20
from test_imports import _run_without

pytest.importorskip("onnxruntime")


def test_int8_export_of_a_compressed_resnet20(tmp_path, capsys):
    model = slimcnn.create("cifar_resnet20")
    slimcnn.load_checkpoint(model, str(RESNET20))
    x = torch.randn(2, 3, 32, 32)
    scores = {g.key: score("group_l2", model.eval(), g) for g in channel_groups(model, x) if g.prunable}
    slimcnn.save(prune_to_target(model, x, scores, 0.8, mode="uniform", round_to=8), tmp_path / "c")
    (tmp_path / "c" / "report.json").write_text(json.dumps({"method": "l1"}))  # a report it must extend
    assert main(["export", str(tmp_path / "c"), "--int8", "--data", str(CIFAR), "--calib-images", "128",
                 "--test-limit", "200", "--latency-batch", "1", "8", "--latency-repeats", "3"]) == 0
    out = capsys.readouterr().out
    assert "top1_change" in out and "latency_ratio int8/fp32" in out
    rep = json.loads((tmp_path / "c" / "report.json").read_text())
    assert rep["method"] == "l1"  # kept
    q = rep["int8"]
    assert q["format"] == "QDQ" and q["per_channel"] and q["calibration_images"] == 128
    assert q["reduce_range"] is True and q["calibration_method"] == "percentile"  # the measured defaults
    assert q["test_images"] == 200 and q["calibration_split"] == "train"
    assert q["top1"]["fp32"] > 20, q["top1"]  # a trained net, not chance (10%)
    assert q["top1"]["int8"] >= q["top1"]["fp32"] - 10, q["top1"]
    lat = q["latency_ms"]
    assert lat["batch"] == [1, 8] and lat["repeats"] == 3 and lat["threads"] >= 1
    assert all(v > 0 for v in lat["fp32"] + lat["int8"]) and len(lat["ratio"]) == 2
    assert q["bytes"]["int8"] < q["bytes"]["fp32"]
    assert (tmp_path / "c" / "model.onnx").is_file() and (tmp_path / "c" / "model.int8.onnx").is_file()


def test_int8_needs_data(tmp_path, capsys):
    slimcnn.save(slimcnn.create("cifar_resnet20"), tmp_path / "m")
    assert main(["export", str(tmp_path / "m"), "--int8"]) == 2
    assert "--data" in capsys.readouterr().err


def test_int8_without_onnxruntime_says_which_extra_in_one_line(tmp_path):
    # the check comes before the model is read, so the folder need not exist
    code = f"""
import sys
import slimcnn.cli
slimcnn.cli.COMMANDS = ["export"]  # build only this command's parser: the others import every method
sys.exit(slimcnn.cli.main(["export", {str(tmp_path / "m")!r}, "--int8", "--data", {str(CIFAR)!r}]))
"""
    proc = _run_without(["onnxruntime"], code)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err[-3000:]
    assert len(err.splitlines()) == 1 and 'pip install -e ".[onnx]"' in err and "onnxruntime" in err, err
    assert not (tmp_path / "m" / "model.onnx").exists()


def test_reduce_range_is_on_by_default_and_can_be_turned_off():
    from slimcnn.cli import build_parser
    assert build_parser().parse_args(["export", "d", "--int8"]).reduce_range is True
    assert build_parser().parse_args(["export", "d", "--int8", "--no-reduce-range"]).reduce_range is False
