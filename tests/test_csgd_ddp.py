"""C-SGD under DDP (2 CPU processes, gloo): every rank holds the same clusters and the same merged model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pathlib import Path

WORKER = Path(__file__).with_name("csgd_ddp_worker.py")


@pytest.mark.slow
def test_ranks_hold_identical_clusters_and_merged_models(tmp_path, cifar_root):
    from slimcnn.data import load_cifar10

    load_cifar10(cifar_root, "train", progress=False)  # decode once here, not twice in parallel
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1", "--nproc_per_node", "2",
           str(WORKER), str(cifar_root), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["world"], r1["world"]) == (2, 2)
    assert r0["steps"] == r1["steps"] == 16  # 256 images / 2 ranks / 16 per batch, 2 epochs
    assert r0["clusters"] == r1["clusters"]
    assert r0["eps"] == r1["eps"] and r0["eps"][0] > 0
    assert r0["trained"] == r1["trained"]
    assert r0["merged"] == r1["merged"]
    assert r0["merged_shapes"] == r1["merged_shapes"]
    assert r0["merged_shapes"][0][0] == 4  # the 8-channel stem was merged to 4
