"""``slimcnn compress --task segmentation`` on a tiny CamVid subset: the MACs target is met at the frames' size, the
report scores by mIoU, the fine-tune trains pixel-wise; methods without segmentation support say so."""
from __future__ import annotations

import json

import pytest
import torch

from slimcnn.cli import main
from conftest import CAMVID

pytestmark = pytest.mark.shared  # CamVid

TINY = ["--model", "seg_tiny", "--data", str(CAMVID), "--size", "48,64", "--train-limit", "16", "--test-limit", "8",
        "--batch-size", "8", "--bn-recalib", "2", "--no-latency"]


@pytest.mark.parametrize("method, epochs", [("l1", "1"), ("dagger", "2")])
def test_segmentation_compress_meets_the_target_and_reports_miou(tmp_path, method, epochs, capsys):
    from slimcnn import load
    from slimcnn.profile import profile

    out = tmp_path / method
    assert main(["compress", "--method", method, "--task", "segmentation", "--target-macs", "0.5",
                 "--epochs", epochs, *TINY, "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["task"] == "segmentation" and rep["metric"] == "miou"
    assert "top1" not in rep["base"] and "top1_change" not in rep
    assert 0 <= rep["base"]["miou"] <= 100 and 0 <= rep["compressed"]["miou"] <= 100
    assert rep["miou_change"] == pytest.approx(rep["compressed"]["miou"] - rep["base"]["miou"], abs=0.011)
    assert rep["test_images"] == 8
    # the MACs were counted at the frames' size (48x64), and land within 1% of half the base's
    model = load(out)
    assert profile(model, (3, 48, 64)).macs == rep["compressed"]["macs"]
    assert abs(rep["macs_ratio"] - 0.5) <= 0.005 and rep["within_tol"] is True
    assert model(torch.zeros(1, 3, 48, 64)).shape == (1, 11, 48, 64)  # every class kept
    # finalize figures by mIoU too (and the fine-tune ran: a per-image loss would have failed on the void label 11)
    fin = rep["finalize"]
    assert fin["miou_after"] is not None and "top1_after" not in fin
    assert "mIoU" in (out / "report.md").read_text()
    assert "mIoU" in capsys.readouterr().out


def test_segmentation_refuses_methods_without_support(tmp_path, capsys):
    for method in ("tp", "modelopt", "l1+trp"):
        assert main(["compress", "--method", method, "--task", "segmentation", *TINY,
                     "--out", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{method} is not supported for segmentation" in err, err
    assert not (tmp_path / "x").exists()
