"""Every torchrun rank holds rank 0's model: structure and tensors come from rank 0, and the end result is checked.

DDP keeps the *parameters* of a training run equal, but a compression run has other places where ranks can part:
BatchNorm running statistics follow each rank's last batches (and BN recalibration reads each rank's own shard),
and a method whose finalize reads data or draws at random may keep other channels on another rank. Rather than
trust every method to be deterministic, the pipeline makes every rank adopt rank 0's model where they could part
(:func:`adopt_rank0`) and records at the end whether all ranks hold bit-identical tensors (:func:`state_digests`).
Outside torchrun both are no-ops: there is one rank, and it is rank 0.

>>> model, rebuilt = adopt_rank0(nn.Linear(2, 2))  # under torchrun: every rank now holds rank 0's model
>>> rebuilt, len(state_digests(model)), len(set(state_digests(model))) == 1
(False, 1, True)
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from . import distributed


def _shapes(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def _device(model: nn.Module) -> torch.device:
    t = next(iter(model.state_dict().values()), None)
    return t.device if t is not None else torch.device("cpu")


def _rank0_spec(model: nn.Module) -> dict | str:
    """Rank 0's architecture spec (slimcnn.io), or why it has none."""
    from ..io import SpecError, model_spec

    try:
        return model_spec(model)
    except SpecError as e:
        return str(e)


@torch.no_grad()
def adopt_rank0(model: nn.Module) -> tuple[nn.Module, bool]:
    """Make this rank's model rank 0's: same structure, same parameters and buffers. Returns the model (this
    rank's own module, updated in place, or one rebuilt from rank 0's spec where its structure differed) and
    whether any rank had to rebuild. A collective: every rank must call it at the same point.

    A rebuild uses ``trust_builder=True``: the spec comes from rank 0 of this same job, whose builder every rank
    already ran to build its base model.
    """
    if not distributed.is_distributed():
        return model, False
    ref = [_shapes(model) if distributed.is_main() else None]
    dist.broadcast_object_list(ref, src=0)
    differs = _shapes(model) != ref[0]
    device = _device(model)
    rebuilt = distributed.all_reduce_sum(torch.tensor([float(differs)], device=device)).item() > 0
    if rebuilt:  # some rank finalized another structure (a data-dependent or random choice): take rank 0's
        spec = [_rank0_spec(model) if distributed.is_main() else None]
        dist.broadcast_object_list(spec, src=0)
        if isinstance(spec[0], str):  # every rank raises, so none waits forever in the next collective
            raise RuntimeError(f"the ranks finalized different structures, and rank 0's model cannot be described "
                               f"to the others: {spec[0]}")
        if differs:
            from ..io import build_from_spec

            mode = model.training
            model = build_from_spec(spec[0], trust_builder=True).to(device).train(mode)
    for t in model.state_dict().values():
        if t.is_contiguous():
            dist.broadcast(t, src=0)
        else:  # broadcast works on contiguous memory only
            tmp = t.contiguous()
            dist.broadcast(tmp, src=0)
            t.copy_(tmp)
    return model, rebuilt


def state_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter *and buffer* (BatchNorm statistics included): equal digests, identical models."""
    return distributed.tensors_digest(model.state_dict().items())


def state_digests(model: nn.Module) -> list[str]:
    """Every rank's :func:`state_digest`, in rank order (one entry outside torchrun). A collective."""
    return distributed.gather_strings(state_digest(model))
