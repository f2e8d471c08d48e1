"""End-to-end CLI runs on real data subsets (the slow tests of the suite)."""
import json
import subprocess
import sys

import pytest

from slimcnn.cli import main
from conftest import CIFAR, RESNET20, top1_on_test_subset


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "slimcnn", *args], capture_output=True, text=True, timeout=600)


def test_profile_prints_published_counts(capsys):
    assert main(["profile", "--model", "cifar_resnet56"]) == 0
    out = capsys.readouterr().out
    assert "macs: 125485696 (125.49M)" in out and "params: 853018" in out


def test_help_everywhere(capsys):
    for cmd in ["profile", "eval", "train", "compress", "export", "demo"]:
        with pytest.raises(SystemExit) as e:
            main([cmd, "--help"])
        assert e.value.code == 0 and "usage" in capsys.readouterr().out, cmd


def test_user_errors_are_one_line():
    r = run_cli("eval", "--model", "cifar_resnet20", "--data", "/nonexistent/cifar")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "does not exist" in r.stderr
    r = run_cli("profile", "--model", "resnet_nope")
    assert r.returncode == 2 and "unknown model" in r.stderr and "Traceback" not in r.stderr


def test_compress_l1_then_export(tmp_path):
    out = tmp_path / "l1"
    r = run_cli("compress", "--method", "l1", "--model", "cifar_resnet20", "--weights", str(RESNET20),
                "--data", str(CIFAR), "--target-macs", "0.5", "--epochs", "1", "--train-limit", "256",
                "--test-limit", "200", "--latency-batch", "1", "8", "--out", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads((out / "report.json").read_text())
    for key in ("method", "model", "target_macs", "base", "compressed", "latency_ms"):
        assert key in rep
    assert set(rep["base"]) >= {"macs", "params", "top1"} and rep["latency_ms"]["batch"] == [1, 8]
    assert abs(rep["compressed"]["macs"] / rep["base"]["macs"] - 0.5) <= 0.005
    assert rep["test_images"] == 200 and rep["base"]["top1"] > 60  # the public ResNet-20: ~81% on the JPEG test set
    # the report's top-1 is the saved model's on the same 200 images, counted independently
    assert abs(rep["compressed"]["top1"] - top1_on_test_subset(out, 200)) < 0.01
    assert (out / "report.md").is_file() and (out / "widths.png").stat().st_size > 1000
    r = run_cli("export", str(out), "--onnx", str(tmp_path / "m.onnx"), "--torchscript", str(tmp_path / "m.ts"),
                "--check")
    assert r.returncode == 0, r.stderr
    diff = float(r.stdout.split("max_abs_diff:")[1].split()[0])
    assert diff <= 1e-4


@pytest.mark.slow
def test_demo_runs_on_embedded_default(tmp_path):
    r = run_cli("demo", "--out", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    assert "side by side" in r.stdout and "reading: " in r.stdout
    # a log, not a terminal: no per-batch bars, one line per epoch and per evaluation (757 lines before)
    log = (r.stdout + r.stderr).replace("\r", "\n").splitlines()
    assert len(log) < 100, len(log)
    timed = {tuple(json.loads((tmp_path / "demo" / m / "report.json").read_text())["latency_ms"]["batch"])
             for m in ["l1", "tp", "csgd", "dagger", "trp"]}
    header = next(ln for ln in log if ln.startswith("method "))
    if len(timed) == 1:  # the header names the batches that were timed, not the ones asked for
        (batches,) = timed
        assert f"latency b={batches[0]}" in header and f"b={batches[-1]}" in header, header
    for method in ["l1", "tp", "csgd", "dagger", "trp"]:
        assert (tmp_path / "demo" / method / "widths.png").is_file()
        rep = json.loads((tmp_path / "demo" / method / "report.json").read_text())
        assert rep["base"]["top1"] > 70  # public ResNet-20 on the embedded JPEG subset
        assert rep["within_tol"], (method, rep["macs_ratio"])
        assert sum(rep["epoch_budget"][k] for k in ("method_epochs", "finetune_epochs")) == 2
        assert rep["distill"]["alpha"] == 0.7
    # every row shares the base's evaluation (compress(memo=)): the same base top-1 everywhere
    assert len({json.loads((tmp_path / "demo" / m / "report.json").read_text())["base"]["top1"]
                for m in ["l1", "tp", "csgd", "dagger", "trp"]}) == 1
