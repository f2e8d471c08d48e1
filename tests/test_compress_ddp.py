"""``slimcnn compress`` under torchrun (2 CPU processes, gloo): every rank ends with the same compressed model, and
rank 0 alone writes. Also (same launch): ranks that finalized different structures all take rank 0's."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import CIFAR, RESNET20

WORKER = Path(__file__).with_name("compress_ddp_worker.py")
EXPECTED = {"model.json", "model.safetensors", "report.json", "report.md"}


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           str(WORKER), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.mark.slow
@pytest.mark.parametrize("method, epochs", [("l1", "1"), ("dagger", "2")])
def test_ranks_end_with_one_model_and_rank0_alone_writes(tmp_path, method, epochs):
    from slimcnn import load
    from slimcnn.data import load_cifar10
    from slimcnn.engine.replicas import state_digest

    load_cifar10(CIFAR, "train", progress=False)  # decode once here, not twice in parallel
    out = tmp_path / "out"
    proc = _torchrun(str(tmp_path), str(out), "--method", method, "--model", "cifar_resnet20",
                     "--weights", str(RESNET20), "--data", str(CIFAR), "--train-limit", "128", "--test-limit", "40",
                     "--batch-size", "32", "--epochs", epochs, "--bn-recalib", "2", "--target-macs", "0.5",
                     "--no-latency")
    rep = json.loads((out / "report.json").read_text())
    ddp = rep["ddp"]
    assert ddp["world_size"] == 2 and len(ddp["digests"]) == 2
    assert ddp["ranks_identical"] is True and ddp["digests"][0] == ddp["digests"][1]
    # deterministic finalize on equal inputs: no rank had to be rebuilt from rank 0's structure
    assert ddp["structure_from_rank0"] is False
    assert state_digest(load(out)) == ddp["digests"][0]  # rank 0 saved exactly the model every rank holds
    assert rep["within_tol"] is True and rep["test_images"] == 40
    assert rep["epoch_budget"]["method_epochs"] == (1 if method == "dagger" else 0)
    # every output comes from rank 0: rank 1 created, wrote or renamed nothing under the output folder
    w0, w1 = (json.loads((tmp_path / f"writes-rank{r}.json").read_text()) for r in (0, 1))
    assert w1 == []
    assert {Path(w.split(":", 1)[1]).name for w in w0 if w.startswith("os.rename")} >= {"model.safetensors",
                                                                                        "report.json"}
    assert EXPECTED <= {p.name for p in out.iterdir()}
    assert proc.stdout.count("macs_ratio:") == 1 and "ddp: 2 ranks, identical models" in proc.stdout

    # the worker's first check: ranks that finalized different structures all take rank 0's
    r0, r1 = (json.loads((tmp_path / f"adopt-rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world"], r1["world"]) == (2, 2)
    assert r1["params_before"] > r0["params_before"]  # rank 1 really had kept more channels
    assert r0["rebuilt"] is True and r1["rebuilt"] is True
    assert r0["shapes"] == r1["shapes"] and r0["digest"] == r1["digest"]
    assert r0["output"] == r1["output"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["l1+trp", "csgd+trp"])
def test_stack_ranks_take_rank0s_searched_split(tmp_path, method):
    """Each rank scores a stack's splits on its own shard of the data; every rank must take rank 0's choice, or
    l1+trp's ranks build different nets (DDP stopped at mismatched shapes) and csgd+trp's ranks train different
    clusters and ranks (replicas that differ at the end)."""
    from slimcnn.data import load_cifar10

    load_cifar10(CIFAR, "train", progress=False)
    out = tmp_path / "out"
    proc = _torchrun(str(tmp_path), str(out), "--method", method, "--scheme", "spatial", "--model", "cifar_resnet20",
                     "--weights", str(RESNET20), "--data", str(CIFAR), "--train-limit", "128", "--test-limit", "40",
                     "--batch-size", "32", "--epochs", "1", "--bn-recalib", "2", "--target-macs", "0.5",
                     "--no-latency")
    rep = json.loads((out / "report.json").read_text())
    assert rep["stack"]["split_source"] == "searched" and rep["within_tol"] is True
    assert rep["ddp"]["ranks_identical"] is True and rep["ddp"]["structure_from_rank0"] is False
    assert "replicas ended with different weights" not in proc.stdout + proc.stderr
