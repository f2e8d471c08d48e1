"""Save and load models without pickle (JSON architecture spec + safetensors weights), and export them.

A model built by :func:`slimcnn.create` remembers its recipe (``model.slimcnn_spec``). Saving records that
recipe plus every module that surgery changed (a pruned conv, a factorised conv, a re-mapped shortcut) as plain
JSON; loading rebuilds the base model, swaps those modules in and loads the weights strictly. So a pruned or
decomposed network loads in a fresh process with no Python objects unpickled.

A spec is data read from a file, so loading never lets it choose what code runs: every layer it names must be in
an explicit registry (the torch layers surgery produces, plus slimcnn layers marked with :func:`register_layer`),
and a base model built by a user's import path (``file.py:factory``, ``package.module:factory``) is rebuilt only
when the caller passes ``trust_builder=True``.

>>> import slimcnn
>>> slimcnn.save(model, "out/model")          # writes out/model/model.json + out/model/model.safetensors  # doctest: +SKIP
>>> same = slimcnn.load("out/model")                                                                      # doctest: +SKIP
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

# re-exported: the registry's public names have always been reachable as slimcnn.io.*
from .layer_specs import (SpecError, _config, _qualname, _same, build_module, module_spec,  # noqa: F401
                          register_layer, register_layer_alias)

FORMAT = "slimcnn-model/1"

#: channel-count attributes a resized module may carry; the only attributes a ``resize`` entry may set
_RESIZE_ATTRS = ("num_features", "in_channels", "out_channels", "groups", "in_features", "out_features",
                 "num_channels", "num_groups", "normalized_shape")


def _own_shapes(m: nn.Module) -> dict[str, list[int]]:
    return {n: list(t.shape) for n, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
            if t is not None}


def _resize_spec(m: nn.Module) -> dict[str, Any]:
    """A module of a type slimcnn cannot construct (a library's or a user's BatchNorm subclass, say) whose tensors
    surgery resized: recorded as data, the new shapes of its own tensors and its channel counts, so loading
    resizes the module the base model builds in place instead of constructing one."""
    attrs = {}
    for a in _RESIZE_ATTRS:
        v = getattr(m, a, None)
        if isinstance(v, int) and not isinstance(v, bool) or (isinstance(v, (tuple, list)) and
                                                              all(isinstance(i, int) for i in v)):
            attrs[a] = list(v) if isinstance(v, (tuple, list)) else v
    return {"resize": {"of": _qualname(m), "shapes": _own_shapes(m), "attrs": attrs}}


def _apply_resize(model: nn.Module, path: str, entry: Any) -> None:
    """Resize, in place, module ``path`` of a freshly built base as a ``resize`` entry says (fresh tensors of the
    recorded shapes; the weights file fills them). Only tensor shapes and the channel-count attributes above
    are read from the file, never a type to build."""
    spec = entry.get("resize") if isinstance(entry, dict) else None
    ok = (isinstance(spec, dict) and isinstance(spec.get("shapes"), dict) and isinstance(spec.get("attrs", {}), dict)
          and all(isinstance(v, list) and all(isinstance(i, int) and i >= 0 for i in v) for v in spec["shapes"].values()))
    if not ok:
        raise SpecError(f"malformed resize entry for {path!r}")
    try:
        m = model.get_submodule(path)
    except AttributeError:
        raise SpecError(f"the spec resizes {path!r}, which the base model does not have") from None
    if _qualname(m) != spec.get("of"):
        raise SpecError(f"the spec resizes {path!r} as a {spec.get('of')}, but the base model builds a {_qualname(m)}")
    own = dict(m.named_parameters(recurse=False))
    bufs = dict(m.named_buffers(recurse=False))
    for name, shape in spec["shapes"].items():
        if name in own:
            setattr(m, name, nn.Parameter(torch.empty(shape, dtype=own[name].dtype), own[name].requires_grad))
        elif name in bufs and bufs[name] is not None:
            m.register_buffer(name, torch.empty(shape, dtype=bufs[name].dtype))
        else:
            raise SpecError(f"the spec resizes {path}.{name}, which {_qualname(m)} does not have")
    for a, v in spec.get("attrs", {}).items():
        if a not in _RESIZE_ATTRS or not hasattr(m, a):
            raise SpecError(f"the spec sets {path}.{a}, which is not a channel count slimcnn may set")
        setattr(m, a, tuple(v) if isinstance(getattr(m, a), tuple) else v)


def _diff(saved: nn.Module, base: nn.Module, prefix: str, out: dict[str, Any]) -> None:
    if not _same(saved, base):
        out[prefix] = module_spec(saved)
        return
    if _config(saved) is None and _own_shapes(saved) != _own_shapes(base):
        out[prefix] = _resize_spec(saved)  # its children are compared below, as for any unchanged container
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
    from .models import create

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


def import_path_builder(name: str) -> str | None:
    """``name`` if it names a user's builder by import path (``file.py:factory``, ``package.module:factory``,
    or any path-like name), else None for zoo, torchvision (``tv:``) and timm (``timm:``) names.

    Such a builder is the user's own code: rebuilding the base model runs it, so a file naming one is trusted
    only on request. Path-like names without a colon count too, so no spelling of a file slips through.
    """
    from .models.external import is_import_path

    return name if is_import_path(name) else None


def _build_base(recipe: dict[str, Any], trust_builder: bool) -> nn.Module:
    """The base model a recipe names, with fresh weights. Every way a spec names its base goes through here,
    so an import-path builder is refused in one place however it is recorded."""
    from .models import create

    name = recipe["name"]
    if not isinstance(name, str):
        raise SpecError(f"the recipe's model name must be a string, got {type(name).__name__}")
    builder = import_path_builder(name)
    if builder is not None and not trust_builder:
        raise SpecError(f"this file's base model is built by {builder!r}, which is code outside slimcnn; loading "
                        "it runs that code. If you trust the file, load it with trust_builder=True "
                        "(CLI: --trust-builder)")
    kwargs = recipe.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise SpecError(f"the recipe's kwargs must be a JSON object, got {type(kwargs).__name__}")
    return create(name, num_classes=recipe["num_classes"], **kwargs)


def build_from_spec(spec: dict[str, Any], trust_builder: bool = False) -> nn.Module:
    """Rebuild the architecture a spec describes (fresh weights). ``trust_builder`` allows a base model built
    by a user's import path; see :func:`import_path_builder`."""
    from .graph.replace import set_submodule

    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        found = spec.get("format") if isinstance(spec, dict) else type(spec).__name__
        raise SpecError(f"not a slimcnn model spec (format {found!r}, expected {FORMAT!r})")
    recipe = spec["recipe"]
    # Check every layer before the base is built: a refused spec must not run anything, the builder included.
    modules = {path: build_module(sub) for path, sub in spec["modules"].items()
               if not (isinstance(sub, dict) and "resize" in sub)}
    model = _build_base(recipe, trust_builder)
    for path in sorted(spec["modules"], key=lambda p: p.count(".")):
        if path in modules:
            set_submodule(model, path, modules[path])
        else:
            _apply_resize(model, path, spec["modules"][path])
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


def is_saved_model(path: str | Path) -> bool:
    """Whether ``path`` is a model saved by :func:`save` (a folder, or a ``.safetensors`` file carrying a slimcnn
    spec in its metadata or beside it), as opposed to a plain weights file that needs ``--model`` to say what it
    fits. A plain ``.safetensors`` state dict (timm's, a user's) is a weights file."""
    p = Path(path)
    if p.is_dir():
        return True
    if p.suffix != ".safetensors" or not p.is_file():
        return False
    if p.with_suffix(".json").is_file():
        return True
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            return "slimcnn_spec" in (f.metadata() or {})
    except Exception:  # noqa: BLE001  (unreadable: let the weights loader name the problem)
        return False


def load(path: str | Path, map_location: str | torch.device = "cpu", trust_builder: bool = False) -> nn.Module:
    """Load a model saved by :func:`save` (folder or ``.safetensors`` file). No pickle involved.

    The spec (from the safetensors metadata, else ``model.json`` beside the weights) may name only registered
    layer types. A base model built by a user's import path runs that user's code, so it loads only with
    ``trust_builder=True``; zoo, torchvision and timm bases need no opt-in.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file

    from .models.checkpoint import CheckpointError

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
        model = build_from_spec(json.loads(text), trust_builder=trust_builder)
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
