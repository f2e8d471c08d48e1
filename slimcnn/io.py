"""Save and load models without pickle (JSON architecture spec + safetensors weights), and export them.

A model built by :func:`slimcnn.create` remembers its recipe (``model.slimcnn_spec``). Saving records that
recipe plus every module that surgery changed (a pruned conv, a factorised conv, a re-mapped shortcut) as plain
JSON; loading rebuilds the base model, swaps those modules in and loads the weights strictly. So a pruned or
decomposed network loads in a fresh process with no Python objects unpickled.

>>> import slimcnn
>>> slimcnn.save(model, "out/model")          # writes out/model/model.json + out/model/model.safetensors  # doctest: +SKIP
>>> same = slimcnn.load("out/model")                                                                      # doctest: +SKIP
"""
from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .models import create
from .models.checkpoint import CheckpointError

FORMAT = "slimcnn-model/1"

# Constructor arguments of the torch layers surgery produces; anything else must define get_config().
_TORCH_LAYERS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                "padding_mode"),
    nn.ConvTranspose2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding",
                         "groups", "dilation", "padding_mode"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
}
_PLAIN = (nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Flatten, nn.Dropout)


class SpecError(ValueError):
    """A model cannot be described by a JSON spec (or a spec cannot be rebuilt)."""


def _qualname(m: nn.Module) -> str:
    return f"{type(m).__module__}:{type(m).__qualname__}"


def _config(m: nn.Module) -> dict[str, Any] | None:
    """The constructor arguments that rebuild ``m`` (children excluded), or None if we cannot tell."""
    t = type(m)
    if t in _TORCH_LAYERS:
        cfg = {k: getattr(m, k) for k in _TORCH_LAYERS[t]}
        if t in (nn.Conv2d, nn.ConvTranspose2d, nn.Linear):
            cfg["bias"] = m.bias is not None
        return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}
    if t in _PLAIN:
        return {k: getattr(m, k) for k in ("inplace", "p") if hasattr(m, k)}
    if hasattr(m, "get_config"):
        return m.get_config()
    return None


def module_spec(m: nn.Module) -> dict[str, Any]:
    """JSON description of ``m`` and its children, enough to rebuild it with fresh weights."""
    if type(m) is nn.Sequential:
        return {"type": "torch.nn:Sequential", "children": [[n, module_spec(c)] for n, c in m.named_children()]}
    cfg = _config(m)
    if cfg is None:
        raise SpecError(f"cannot describe module of type {type(m).__name__} as JSON: give it get_config() "
                        "(and a constructor taking those keywords)")
    spec = {"type": _qualname(m), "config": cfg}
    if hasattr(m, "get_config"):
        return spec  # a get_config module builds its own children
    if any(True for _ in m.children()):
        raise SpecError(f"module of type {type(m).__name__} has children but no get_config()")
    return spec


def build_module(spec: dict[str, Any]) -> nn.Module:
    mod_name, _, cls_name = spec["type"].partition(":")
    if not (mod_name == "torch.nn" or mod_name.startswith("torch.nn.") or mod_name.startswith("slimcnn.")):
        raise SpecError(f"refusing to build {spec['type']!r}: only torch.nn and slimcnn modules are allowed")
    cls = importlib.import_module(mod_name)
    for part in cls_name.split("."):
        cls = getattr(cls, part)
    if cls is nn.Sequential:
        seq = nn.Sequential()
        for name, child in spec["children"]:
            seq.add_module(name, build_module(child))
        return seq
    cfg = dict(spec.get("config", {}))
    return cls(**cfg)


def _same(a: nn.Module, b: nn.Module) -> bool:
    """Same type and constructor arguments (children are compared separately)."""
    return type(a) is type(b) and _config(a) == _config(b)


def _diff(saved: nn.Module, base: nn.Module, prefix: str, out: dict[str, Any]) -> None:
    if not _same(saved, base):
        out[prefix] = module_spec(saved)
        return
    if hasattr(saved, "get_config"):
        return
    base_children = dict(base.named_children())
    for name, child in saved.named_children():
        path = f"{prefix}.{name}" if prefix else name
        if name not in base_children:
            out[path] = module_spec(child)
        else:
            _diff(child, base_children[name], path, out)


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The JSON architecture spec of ``model``: its recipe plus every module surgery changed."""
    recipe = getattr(model, "slimcnn_spec", None)
    if recipe is None:
        raise SpecError("this model was not built by slimcnn.create(), so it has no recipe to save; "
                        "build it with slimcnn.create(name) or save its state_dict yourself")
    base = create(recipe["name"], num_classes=recipe["num_classes"], **recipe.get("kwargs", {}))
    overrides: dict[str, Any] = {}
    _diff(model, base, "", overrides)
    if "" in overrides:
        raise SpecError("the model's top-level module differs from its recipe; cannot save it as a spec")
    return {"format": FORMAT, "recipe": recipe, "modules": overrides}


def build_from_spec(spec: dict[str, Any]) -> nn.Module:
    from .graph.replace import set_submodule

    if spec.get("format") != FORMAT:
        raise SpecError(f"not a slimcnn model spec (format {spec.get('format')!r}, expected {FORMAT!r})")
    recipe = spec["recipe"]
    model = create(recipe["name"], num_classes=recipe["num_classes"], **recipe.get("kwargs", {}))
    for path in sorted(spec["modules"], key=lambda p: p.count(".")):
        set_submodule(model, path, build_module(spec["modules"][path]))
    model.slimcnn_spec = recipe
    return model


def _paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix == ".safetensors":
        return p.with_suffix(".json"), p
    return p / "model.json", p / "model.safetensors"


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save(model: nn.Module, path: str | Path) -> Path:
    """Save ``model`` to ``path``: a folder (``model.json`` + ``model.safetensors``) or ``NAME.safetensors``
    (with ``NAME.json`` beside it). The spec is also stored in the safetensors metadata, so the weights file
    alone is enough to load. Writes are atomic."""
    from safetensors.torch import save

    spec = model_spec(model)
    json_path, st_path = _paths(path)
    st_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    text = json.dumps(spec, indent=1, sort_keys=True)
    _atomic_write_bytes(st_path, save(state, metadata={"slimcnn_spec": text}))
    _atomic_write_bytes(json_path, text.encode())
    return st_path


def load(path: str | Path, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a model saved by :func:`save` (folder or ``.safetensors`` file). No pickle involved."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    json_path, st_path = _paths(path)
    if not st_path.is_file():
        raise CheckpointError(f"no saved model at {path} (expected {st_path})")
    try:
        with safe_open(str(st_path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(st_path), device=str(map_location))
    except Exception as e:
        raise CheckpointError(f"cannot read {st_path}: {type(e).__name__}: {e}") from None
    text = meta.get("slimcnn_spec") or (json_path.read_text() if json_path.is_file() else None)
    if text is None:
        raise CheckpointError(f"{st_path} has no slimcnn spec (not saved by slimcnn.save?)")
    try:
        model = build_from_spec(json.loads(text))
    except (KeyError, TypeError, json.JSONDecodeError, AttributeError, ImportError) as e:
        raise CheckpointError(f"corrupt model spec in {st_path}: {type(e).__name__}: {e}") from None
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    wrong = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or extra or wrong:
        raise CheckpointError(f"{st_path} does not match its spec: missing {missing[:5]}, unexpected {extra[:5]}, "
                              f"shape mismatches {wrong[:5]}")
    model.load_state_dict(state)
    return model.eval()


def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor, opset: int = 17) -> Path:
    """Export to ONNX with a dynamic batch axis (input name ``input``, output ``output``)."""
    import warnings

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter is chatty about constant folding
        torch.onnx.export(model, (example_input,), str(path), dynamo=False, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
                          opset_version=opset)
    return path


def export_torchscript(model: nn.Module, path: str | Path, example_input: torch.Tensor) -> Path:
    """Export a traced TorchScript module (``torch.jit.load`` reads it back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        traced = torch.jit.trace(model.eval(), example_input)
    traced.save(str(path))
    return path
