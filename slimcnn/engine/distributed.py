"""Multi-process training under ``torchrun``: process-group set-up and the few collectives the engine needs.

``torchrun --nproc_per_node 2 -m slimcnn train ...`` starts one process per rank with ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in the environment;
:func:`init_distributed` reads them and joins the group (gloo on CPU, nccl on GPU). Without them every
helper here behaves as a single process, so the same code runs with and without torchrun.

>>> rank, world = init_distributed()   # (0, 1) outside torchrun
"""
from __future__ import annotations

from collections.abc import Iterable

import hashlib
import os

import torch
import torch.distributed as dist
from torch import nn


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Join the process group described by torchrun's environment; return ``(rank, world_size)``.

    ``device`` picks the backend: nccl for ``cuda``, gloo otherwise. Calling it twice is harmless.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        cuda = device.startswith("cuda")
        if cuda:
            if not torch.cuda.is_available():
                raise ValueError("--device cuda was asked for, but torch.cuda.is_available() is False")
            torch.cuda.set_device(local_rank())
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    """True on the process that prints and writes files (rank 0)."""
    return rank() == 0


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (in place, and returned); a no-op in a single process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once at the end of a torchrun job)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 over each tensor's name, dtype, shape and bytes: equal digests mean bit-identical tensors."""
    h = hashlib.sha256()
    for name, t in named:
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def param_digest(model: nn.Module) -> str:
    """:func:`tensors_digest` over every parameter: equal digests mean bit-identical weights."""
    return tensors_digest(model.named_parameters())


def gather_strings(mine: str) -> list[str]:
    """Every rank's ``mine``, in rank order (one entry in a single process). A collective under torchrun."""
    if not is_distributed():
        return [mine]
    out: list[str] = [""] * world_size()
    dist.all_gather_object(out, mine)
    return out


def gather_digests(model: nn.Module) -> list[str]:
    """Every rank's :func:`param_digest`, in rank order (one entry in a single process)."""
    return gather_strings(param_digest(model))
