"""Model registry: ``create(name, **kw)`` and ``list_models()``, in the style of timm.

Builders return plain ``nn.Module`` objects. Each created model remembers how it was built
(``model.slimcnn_spec``) so that :mod:`slimcnn.io` can rebuild the architecture without pickle.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

from torch import nn

Builder = Callable[..., nn.Module]

_REGISTRY: dict[str, Builder] = {}
_INPUT_SIZE: dict[str, tuple[int, int, int]] = {}
# Wrappers selected by a keyword of create(), e.g. gating="rig", and the keywords of create() that belong to them.
# Higher layers (slimcnn.gating) register themselves here, so models never import them (the dependency direction
# is gating -> models; ``import slimcnn`` registers them before any model can be created).
_WRAPPERS: dict[str, Callable[..., nn.Module]] = {}
_WRAPPER_KEYWORDS: set[str] = set()


def register_wrapper(kind: str, wrap: Callable[..., nn.Module], keywords: Iterable[str] = ()) -> None:
    """Let ``create(name, gating=kind, **opts)`` return ``wrap(base_model, **opts)``; ``keywords`` are the options
    of ``create`` that go to the wrapper rather than to the backbone's builder."""
    _WRAPPERS[kind] = wrap
    _WRAPPER_KEYWORDS.update(keywords)


def register(name: str, input_size: tuple[int, int, int] = (3, 32, 32)) -> Callable[[Builder], Builder]:
    """Decorator: register ``fn`` as the builder of model ``name``."""

    def wrap(fn: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        _REGISTRY[name] = fn
        _INPUT_SIZE[name] = input_size
        return fn

    return wrap


def list_models(pattern: str | None = None) -> list[str]:
    """Names accepted by :func:`create`; ``tv:<name>`` (any torchvision classifier) is accepted too.

    >>> "cifar_resnet56" in list_models()
    True
    """
    import fnmatch

    names = sorted(_REGISTRY)
    return [n for n in names if pattern is None or fnmatch.fnmatch(n, pattern)]


def default_input_size(name: str) -> tuple[int, int, int]:
    """The (C, H, W) input a model named ``name`` expects by default: 224 px for torchvision, timm and a user's
    builder (ImageNet-style models are the common case; ``--input`` / ``--input-size`` say otherwise)."""
    from .external import is_import_path

    if name.startswith(("tv:", "timm:")) or is_import_path(name):
        return (3, 224, 224)
    if name not in _INPUT_SIZE:
        raise KeyError(_unknown(name))
    return _INPUT_SIZE[name]


def _unknown(name: str) -> str:
    return (f"unknown model {name!r}; known: {', '.join(list_models())}, or tv:<torchvision name>, "
            "timm:<timm name>, path/to/file.py:factory, package.module:factory")


def create(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """Build model ``name`` with fresh weights.

    >>> m = create("cifar_resnet20")
    >>> m = create("cifar_resnet56", shortcut="B")
    >>> m = create("tv:resnet18", num_classes=10)
    >>> type(create("cifar_resnet20", gating="rig", iterations=2)).__name__
    'RIG'

    Not run as doctests: the first needs the timm extra, the second a user's file.

    >>> m = create("timm:resnet18", num_classes=10)                # doctest: +SKIP
    >>> m = create("nets/mine.py:build", num_classes=10)           # doctest: +SKIP

    A user's builder runs the code it names; the recipe records its file as an absolute path, so a saved model
    rebuilds from any working directory (:func:`slimcnn.load` asks for ``trust_builder=True`` first).
    """
    from .external import build_from_import_path, build_timm, canonical_import_path, is_import_path

    if is_import_path(name) and name not in _REGISTRY:
        name = canonical_import_path(name)
    spec_kwargs = dict(kwargs)
    gating = kwargs.pop("gating", None)
    gating_kw = {k: kwargs.pop(k) for k in list(kwargs) if k in _WRAPPER_KEYWORDS}
    if name.startswith("tv:"):
        from .torchvision_models import build_torchvision

        model = build_torchvision(name[3:], num_classes=num_classes, **kwargs)
    elif name.startswith("timm:"):
        model = build_timm(name[5:], num_classes=num_classes, **kwargs)
    elif is_import_path(name) and name not in _REGISTRY:
        model = build_from_import_path(name, num_classes=num_classes, **kwargs)
    elif name in _REGISTRY:
        model = _REGISTRY[name](num_classes=num_classes, **kwargs)
    else:
        raise KeyError(_unknown(name))
    if gating is not None:
        if gating not in _WRAPPERS:
            raise KeyError(f"unknown gating {gating!r}; known: {', '.join(sorted(_WRAPPERS)) or 'none'}")
        model = _WRAPPERS[gating](model, **gating_kw)
    model.slimcnn_spec = {"name": name, "num_classes": num_classes, "kwargs": spec_kwargs}
    return model
