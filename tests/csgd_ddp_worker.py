"""One rank of the C-SGD DDP test (run by tests/test_csgd_ddp.py under torchrun, 2 CPU processes, gloo).

Each rank starts from *different* random weights, so identical clusters can only come from C-SGD sharing rank 0's
clustering; the engine's DDP then trains the replicas together. Every rank writes the SHA-256 of its clusters, of
its trained model and of its merged model to OUT/rank<r>.json.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/csgd_ddp_worker.py DATA OUT
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from slimcnn.data import Loader, balanced_subset, load_cifar10
from slimcnn.engine import TrainConfig, train
from slimcnn.engine.distributed import cleanup, init_distributed, param_digest
from slimcnn.methods.csgd import CSGD
from slimcnn.models.cifar_resnet import CifarResNet


def main(data: str, out: str) -> None:
    rank, world = init_distributed()
    torch.set_num_threads(1)
    torch.manual_seed(100 + rank)  # different weights per rank on purpose
    model = CifarResNet(8, width=0.5)
    images = load_cifar10(data, "train", progress=False)
    images = images.subset(balanced_subset(images.labels, 256, 0))
    loader = Loader(images, 16, shuffle=True, augment=True, seed=0, rank=rank, world_size=world)
    method = CSGD(widths=0.5)
    x = torch.zeros(2, 3, 32, 32)
    method.prepare(model, x, total_steps=2 * len(loader), lr=0.05, schedule="constant")
    ids = hashlib.sha256(json.dumps({k: v.tolist() for k, v in method.ids.items()}).encode()).hexdigest()
    cfg = TrainConfig(epochs=2, lr=0.05, schedule="constant", progress=False)
    result = train(model, loader, cfg, method=method)
    merged = method.finalize(result.model)
    record = {"rank": rank, "world": world, "steps": result.steps, "clusters": ids, "eps": method.round_eps,
              "trained": param_digest(result.model), "merged": param_digest(merged),
              "merged_shapes": [list(p.shape) for p in merged.parameters()]}
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    cleanup()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
