"""The layer registry behind saved models: the only layer types a JSON spec may name, and how one layer is
described and rebuilt (:func:`module_spec`, :func:`build_module`).

It sits below every module that defines layers (``slimcnn.layers``, the models) and below :mod:`slimcnn.io`,
which saves and loads whole models with it: a layer module registers its classes here at import time without
importing the save/load code, which in turn needs the models.
"""
from __future__ import annotations

from typing import Any, TypeVar

from torch import nn

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


