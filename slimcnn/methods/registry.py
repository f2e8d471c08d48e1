"""The registry of single compression methods (a stack of two is built from it in :mod:`.stack`): name ->
``"module:Class"``, imported on first use so that one method's dependencies never slow the others down."""
from __future__ import annotations

import importlib
from typing import Any, Callable

from .base import Method

_METHODS: dict[str, str] = {
    "l1": "slimcnn.methods.l1:L1Pruning",
    "dagger": "slimcnn.methods.dagger:Dagger",
    "csgd": "slimcnn.methods.csgd:CSGD",
    "tp": "slimcnn.methods.tp_peer:TorchPruningPeer",
    "trp": "slimcnn.methods.trp:TRP",
    "modelopt": "slimcnn.methods.modelopt_peer:ModelOptPeer",
}


def register(name: str, target: str) -> None:
    """Make ``name`` build the class at ``target`` (``"package.module:Class"``), imported when first asked for."""
    _METHODS[name] = target


def list_methods() -> list[str]:
    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    """The class registered as single method ``name`` (imported on first use)."""
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(list_methods())}")
    mod, cls = _METHODS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def create(name: str, **kwargs: Any) -> Method:
    """Build single method ``name`` with its options."""
    return method_class(name)(**kwargs)


def methods_where(test: Callable[[type[Method]], bool]) -> list[str]:
    """The registered methods (no stacks) whose class passes ``test``, in registration order: for messages that
    name the methods able to do something.

    >>> methods_where(lambda cls: cls.finalize_key != "finalize")
    ['csgd', 'trp']
    """
    return [name for name in _METHODS if test(method_class(name))]
