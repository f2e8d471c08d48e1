"""`slimcnn eval` and `slimcnn train` on small real CIFAR-10 subsets, including a 2-process DDP run."""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slimcnn.cli import build_parser, main
from slimcnn.engine.checkpoint import load_state
from slimcnn.engine.distributed import param_digest
from slimcnn.models import create

from conftest import CIFAR as _CIFAR, RESNET20

CIFAR, R20 = str(_CIFAR), str(RESNET20)


def metric(out: str, name: str) -> float:
    m = re.search(rf"^{name}: (\d+\.\d\d)$", out, re.M)
    assert m, f"no '{name}: NN.NN' line in:\n{out}"
    return float(m.group(1))


def test_eval_prints_top1_and_top5(capsys):
    args = ["eval", "--model", "cifar_resnet20", "--weights", R20, "--data", CIFAR, "--no-progress"]
    assert main(args + ["--test-limit", "200"]) == 0
    out = capsys.readouterr().out
    top1, top5 = metric(out, "top1"), metric(out, "top5")
    assert 60 < top1 <= top5 <= 100  # ~81% on the full JPEG test set
    assert "images: 200" in out
    assert main(args + ["--limit", "200"]) == 0  # --limit is --test-limit
    assert capsys.readouterr().out == out


def test_eval_bad_data_path_is_one_clear_error(capsys, tmp_path):
    rc = main(["eval", "--model", "cifar_resnet20", "--data", str(tmp_path / "nowhere"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "data path does not exist" in err and "Traceback" not in err


def model_from_checkpoint(out: Path) -> torch.nn.Module:
    model = create("cifar_resnet20")
    model.load_state_dict(load_state(out / "last.safetensors")["model"])
    return model


TRAIN = ["train", "--model", "cifar_resnet20", "--weights", R20, "--data", CIFAR, "--train-limit", "64",
         "--test-limit", "50", "--batch-size", "16", "--epochs", "2", "--lr", "0.01", "--no-progress"]


def test_train_outputs_and_cli_resume(capsys, tmp_path):
    assert main(TRAIN + ["--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    summary = json.loads((tmp_path / "a" / "train.json").read_text())
    assert summary["steps"] == 8 and len(summary["history"]) == 2 and summary["world_size"] == 1
    assert metric(out, "top1") == pytest.approx(summary["test"]["top1"], abs=0.005)
    assert summary["test"]["n"] == 50
    straight = model_from_checkpoint(tmp_path / "a")
    try:
        import slimcnn.io
    except ModuleNotFoundError:
        pass
    else:  # the final model is saved in slimcnn's own format too
        saved = slimcnn.io.load(tmp_path / "a")
        for k, v in straight.state_dict().items():
            assert torch.equal(saved.state_dict()[k], v), k

    # interrupted after 3 steps (mid-epoch 1), then resumed: the same weights as the straight run
    assert main(TRAIN + ["--out", str(tmp_path / "b"), "--max-steps", "3"]) == 0
    assert json.loads((tmp_path / "b" / "train.json").read_text())["steps"] == 3
    assert main(TRAIN + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    resumed = model_from_checkpoint(tmp_path / "b")
    for (k, v), w in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(v, w), k


def test_train_divergence_is_reported_and_checkpoint_stays_good(capsys, tmp_path):
    rc = main(["train", "--model", "cifar_resnet20", "--data", CIFAR, "--train-limit", "64", "--test-limit", "20",
               "--batch-size", "32", "--epochs", "3", "--lr", "1e6", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "training diverged at epoch" in err and "lower learning rate" in err
    ckpt = tmp_path / "last.safetensors"
    if ckpt.exists():  # whatever was kept is finite
        for k, v in load_state(ckpt)["model"].items():
            assert not v.is_floating_point() or torch.isfinite(v).all(), k


def test_every_train_and_eval_option_has_help():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    own = {"eval": {"--limit", "--task", "--device", "--amp", "--no-progress", "--data", "--test-limit"},
           "train": {"--epochs", "--lr", "--momentum", "--nesterov", "--weight-decay", "--schedule",
                     "--warmup-epochs", "--max-steps", "--out", "--resume", "--task", "--device", "--amp",
                     "--no-progress", "--weights", "--train-limit"}}
    for name, flags in own.items():
        actions = {s: a for a in sub.choices[name]._actions for s in a.option_strings}
        assert flags <= set(actions)
        assert all(actions[f].help for f in flags), name


@pytest.mark.slow
def test_ddp_two_cpu_processes_end_with_identical_weights(tmp_path):
    from slimcnn.data import load_cifar10

    load_cifar10(CIFAR, "train", progress=False)  # decode once here, not twice in parallel
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           "-m", "slimcnn", "train", "--model", "cifar_resnet20", "--data", CIFAR, "--train-limit", "256",
           "--test-limit", "50", "--batch-size", "32", "--epochs", "2", "--lr", "0.05", "--out", str(tmp_path),
           "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "train.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == 8  # 256 images / 2 ranks / 32 per batch = 4 steps per epoch
    digests = summary["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # each rank hashed its own parameters
    assert param_digest(model_from_checkpoint(tmp_path)) == digests[0]  # and rank 0 saved exactly those
    assert all(math.isfinite(r["train_loss"]) for r in summary["history"])
    assert proc.stdout.count("top1:") == 1  # only rank 0 reports
