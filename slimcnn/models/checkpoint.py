"""Load weights into a model: the legacy public ``.th`` checkpoints and our own safetensors files."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import nn


#: The public CIFAR-10 checkpoints (akamaster/pytorch_resnet_cifar10) by the zoo model they fit. The benchmarks,
#: the tests and the docs name a checkpoint through this table, so a renamed or added file changes one line.
PUBLIC_CHECKPOINTS: dict[str, str] = {
    "cifar_resnet20": "cifar10-resnet20-12fca82f.th",
    "cifar_resnet32": "cifar10-resnet32-d509ac18.th",
    "cifar_resnet44": "cifar10-resnet44-014dd654.th",
    "cifar_resnet56": "cifar10-resnet56-4bfd9763.th",
}


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model."""


def public_checkpoint(model_name: str, weights_dir: str | Path) -> Path:
    """The path of ``model_name``'s public checkpoint inside ``weights_dir`` (the file need not exist yet: the
    caller reads it, and :func:`read_state_dict` names a missing file).

    >>> public_checkpoint("cifar_resnet20", "weights").as_posix()
    'weights/cifar10-resnet20-12fca82f.th'
    """
    try:
        return Path(weights_dir) / PUBLIC_CHECKPOINTS[model_name]
    except KeyError:
        raise CheckpointError(f"no public checkpoint for {model_name!r}; known: "
                              f"{', '.join(PUBLIC_CHECKPOINTS)}") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict without pickle-executing anything (safetensors, or ``torch.load(weights_only=True)``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file: name it, say what we expected
        raise CheckpointError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    elif isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors, or one under 'state_dict')")
    # DataParallel / DDP prefixes
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load the weights at ``path`` into ``model`` (strict) and return it.

    >>> m = load_checkpoint(create("cifar_resnet20"), "../shared/weights/cifar10-resnet20-12fca82f.th")  # doctest: +SKIP
    """
    state = read_state_dict(path)
    own = model.state_dict()
    keeps_init = _plain_into_wrapper(model, state, own)
    if keeps_init is not None:
        state = {f"backbone.{k}": v for k, v in state.items()}
    # Old checkpoints predate BN's num_batches_tracked counter; it carries no weights, so keep the model's.
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")
               and not (keeps_init and keeps_init(k))]
    extra = [k for k in state if k not in own]
    wrong = [f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state and state[k].shape != own[k].shape]
    if missing or extra or wrong:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", extra), ("shape mismatches", wrong)):
            if keys:
                parts.append(f"{label} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}")
        raise CheckpointError(f"checkpoint {path} does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=False)
    return model


def _plain_into_wrapper(model: nn.Module, state: dict, own: dict) -> Callable[[str], bool] | None:
    """When ``state`` is a plain network's checkpoint and ``model`` wraps that network as ``model.backbone`` (the
    feedback-gating wrappers RIG and DIG): a test of the keys that keep their initialisation (the gates, and the
    per-iteration BatchNorm copies, which :class:`~slimcnn.gating.rig.IterationBN` fills from iteration 1's
    tensors); else None. This is how a gated model starts from a trained classifier, the fair start the gating
    ablation compares against."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, nn.Module) or any(k.startswith("backbone.") for k in state):
        return None
    inner = {k[len("backbone."):] for k in own if k.startswith("backbone.") and ".others." not in k}
    if not inner or not set(state) <= inner | {k for k in state if k.endswith("num_batches_tracked")}:
        return None  # not the wrapped network's checkpoint: let the strict check name what is off
    return lambda k: not k.startswith("backbone.") or ".others." in k
