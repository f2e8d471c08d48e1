"""One rank of the compress-under-torchrun test (tests/test_compress_ddp.py; 2 CPU processes, gloo).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/compress_ddp_worker.py LOGDIR OUT ARGS...

Two checks in one launch (a torchrun start costs more than either):

1. The ranks prune one model to *different* MACs targets (as a data-dependent finalize could), then call
   :func:`slimcnn.engine.replicas.adopt_rank0`; each rank writes its shapes and digest to LOGDIR/adopt-rank<r>.json.
2. ``slimcnn compress ARGS... --out OUT`` runs exactly as ``torchrun -m slimcnn`` would (in the same process group),
   while a Python audit hook records every file or folder this rank creates, writes or renames under OUT; the list
   goes to LOGDIR/writes-rank<r>.json, so the test can tell which rank wrote the outputs.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path


def _record_writes(under: Path) -> list[str]:
    seen: list[str] = []
    root = str(under.resolve())

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
            paths = [path] if writing else []
        elif event in ("os.rename", "os.mkdir", "os.remove"):
            paths = [args[0], args[1]] if event == "os.rename" else [args[0]]
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)):
                full = os.path.abspath(os.fsdecode(p))
                if full.startswith(root):
                    seen.append(f"{event}:{full[len(root):]}")

    sys.addaudithook(hook)
    return seen


def cli(logdir: str, out: str, args: list[str]) -> int:
    from slimcnn.cli import main

    rank = int(os.environ["RANK"])
    seen = _record_writes(Path(out))
    code = main(["compress", *args, "--out", out])  # joins the group diverge() set up, and leaves it at the end
    Path(logdir, f"writes-rank{rank}.json").write_text(json.dumps(seen))
    return code


def diverge(logdir: str) -> None:
    import torch

    from slimcnn import methods
    from slimcnn.engine.distributed import init_distributed
    from slimcnn.engine.replicas import adopt_rank0, state_digest
    from slimcnn.models import create

    rank, world = init_distributed()
    torch.manual_seed(0)
    model = create("cifar_resnet20", num_classes=10)
    target = 0.5 if rank == 0 else 0.7  # another rank, another structure
    method = methods.create("l1", target_macs=target)
    pruned = method.finalize(method.prepare(copy.deepcopy(model), torch.zeros(2, 3, 32, 32)))
    params_before = sum(p.numel() for p in pruned.parameters())
    adopted, rebuilt = adopt_rank0(pruned)
    out = adopted(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    Path(logdir, f"adopt-rank{rank}.json").write_text(json.dumps({
        "world": world, "rebuilt": rebuilt, "params_before": params_before,
        "shapes": [list(p.shape) for p in adopted.parameters()], "digest": state_digest(adopted),
        "output": out.flatten().tolist()}))


if __name__ == "__main__":
    diverge(sys.argv[1])
    sys.exit(cli(sys.argv[1], sys.argv[2], sys.argv[3:]))
