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
from typing import Any, TypeVar

import torch
from torch import nn

# slimcnn.models (and the other layer modules) import this module to register their layers, so it must not
# import them at module level: create, CheckpointError and set_submodule are imported where they are used.

FORMAT = "slimcnn-model/1"

# Constructor arguments of the torch layers surgery produces; anything else must define get_config(). ``bias``
# is the constructor's flag (whether the layer has one), read from the layer's bias tensor.
_TORCH_LAYERS: dict[type, tuple[str, ...]] = {
    nn.Conv2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                "padding_mode", "bias"),
    nn.ConvTranspose2d: ("in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding",
                         "groups", "dilation", "padding_mode", "bias"),
    nn.Linear: ("in_features", "out_features", "bias"),
    nn.BatchNorm1d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.BatchNorm2d: ("num_features", "eps", "momentum", "affine", "track_running_stats"),
    nn.MaxPool2d: ("kernel_size", "stride", "padding", "dilation", "return_indices", "ceil_mode"),
    nn.AvgPool2d: ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"),
    nn.AdaptiveAvgPool2d: ("output_size",),
    nn.AdaptiveMaxPool2d: ("output_size", "return_indices"),
}
_PLAIN = (nn.Identity, nn.ReLU, nn.ReLU6, nn.SiLU, nn.Sigmoid, nn.Flatten, nn.Dropout)


class SpecError(ValueError):
    """A model cannot be described by a JSON spec (or a spec cannot be rebuilt, or would run untrusted code)."""


def _type_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _qualname(m: nn.Module) -> str:
    return _type_name(type(m))


# The only classes a spec may name, keyed by the type string module_spec writes. Resolving a spec's type by
# import instead would let a hand-edited file call anything importable (slimcnn's own CLI entry point included).
_LAYERS: dict[str, type[nn.Module]] = {}
for _cls in (*_TORCH_LAYERS, *_PLAIN, nn.Sequential):
    _LAYERS[_type_name(_cls)] = _cls
    _LAYERS[f"torch.nn:{_cls.__name__}"] = _cls  # the short public spelling, stable across torch versions
del _cls

_L = TypeVar("_L", bound=type)


def register_layer(cls: _L) -> _L:
    """Class decorator: let saved specs name ``cls``, a layer that surgery can put into a model.

    Loading builds only registered types, so a layer that is not registered cannot be saved either (saving
    checks the same registry, so every file slimcnn writes loads again). The layer needs ``get_config()``,
    returning the keyword arguments of its constructor. Register at import time of the layer's module, and make
    sure ``import slimcnn`` imports that module: loading never imports anything a spec names.
    """
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise TypeError(f"register_layer expects an nn.Module subclass, got {cls!r}")
    if not callable(getattr(cls, "get_config", None)):
        raise TypeError(f"{cls.__qualname__} needs get_config() (its constructor keywords) to be saved in a spec")
    _LAYERS[_type_name(cls)] = cls
    return cls


def register_layer_alias(type_name: str, cls: type[nn.Module]) -> None:
    """Let specs that name a registered layer ``cls`` by an older ``module:QualName`` (from before the class
    moved) still load. Saving always writes the current name."""
    if _LAYERS.get(_type_name(cls)) is not cls:
        raise TypeError(f"register {cls.__qualname__} with register_layer before giving it an alias")
    _LAYERS[type_name] = cls


def _config(m: nn.Module) -> dict[str, Any] | None:
    """The constructor arguments that rebuild ``m`` (children excluded), or None if we cannot tell."""
    t = type(m)
    if t in _TORCH_LAYERS:
        cfg = {k: (m.bias is not None) if k == "bias" else getattr(m, k) for k in _TORCH_LAYERS[t]}
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
    if _LAYERS.get(_qualname(m)) is not type(m):
        raise SpecError(f"cannot save a module of type {_qualname(m)}: it is not a registered layer type, so the "
                        "file would not load (mark the class with slimcnn.io.register_layer)")
    spec = {"type": _qualname(m), "config": cfg}
    if hasattr(m, "get_config"):
        return spec  # a get_config module builds its own children
    if any(True for _ in m.children()):
        raise SpecError(f"module of type {type(m).__name__} has children but no get_config()")
    return spec


def build_module(spec: dict[str, Any]) -> nn.Module:
    """Rebuild one layer (fresh weights) from its JSON description.

    The type is looked up in the layer registry, never imported: the spec comes from a file, and "any class in
    torch.nn or slimcnn" includes functions and entry points that act when called.
    """
    kind = spec.get("type") if isinstance(spec, dict) else None
    cls = _LAYERS.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise SpecError(f"refusing to build {kind!r}: not a registered layer type (a spec may name only the torch "
                        "layers surgery produces and slimcnn layers marked with register_layer)")
    if cls is nn.Sequential:
        children = spec.get("children", [])
        if not isinstance(children, list) or not all(isinstance(c, list) and len(c) == 2 for c in children):
            raise SpecError("a Sequential spec needs 'children': a list of [name, spec] pairs")
        seq = nn.Sequential()
        for name, child in children:
            seq.add_module(str(name), build_module(child))
        return seq
    cfg = spec.get("config", {})
    if not isinstance(cfg, dict):
        raise SpecError(f"the config of {kind!r} must be a JSON object, got {type(cfg).__name__}")
    return cls(**cfg)


def _same(a: nn.Module, b: nn.Module) -> bool:
    """Same type and constructor arguments (children are compared separately)."""
    return type(a) is type(b) and _config(a) == _config(b)


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
