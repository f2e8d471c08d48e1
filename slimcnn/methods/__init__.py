"""Compression methods behind one interface (:class:`~slimcnn.methods.base.Method`).

>>> import slimcnn
>>> m = slimcnn.methods.create("l1", target_macs=0.5)
>>> s = slimcnn.methods.create("dagger+trp", target_macs=0.5)   # a stack: see slimcnn/methods/stack.py
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

from .base import Method

# name -> "module:Class"; imported lazily so one method's dependencies never slow the others down
_METHODS: dict[str, str] = {
    "l1": "slimcnn.methods.l1:L1Pruning",
    "dagger": "slimcnn.methods.dagger:Dagger",
    "csgd": "slimcnn.methods.csgd:CSGD",
    "tp": "slimcnn.methods.tp_peer:TorchPruningPeer",
    "trp": "slimcnn.methods.trp:TRP",
    "modelopt": "slimcnn.methods.modelopt_peer:ModelOptPeer",
}


def register(name: str, target: str) -> None:
    _METHODS[name] = target


def list_methods() -> list[str]:
    return sorted(_METHODS)


def list_stacks() -> list[str]:
    """The stacks ``create`` accepts besides :func:`list_methods`: a channel method, then trp (``"dagger+trp"``)."""
    from .stack import STACKS

    return list(STACKS)


def method_class(name: str) -> type[Method]:
    """The class registered as method ``name`` (imported on first use); ``"a+b"`` names a stack
    (ValueError, naming what would work, for a stack that is not one)."""
    if "+" in name:
        from .stack import stack_class

        return stack_class(name)
    if name not in _METHODS:
        raise KeyError(f"unknown method {name!r}; known: {', '.join(list_methods())}")
    mod, cls = _METHODS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def methods_where(test: Callable[[type[Method]], bool]) -> list[str]:
    """The registered methods (no stacks) whose class passes ``test``, in registration order: for messages that
    name the methods able to do something.

    >>> methods_where(lambda cls: cls.finalize_key != "finalize")
    ['csgd', 'trp']
    """
    return [name for name in _METHODS if test(method_class(name))]


def plans_latency(name: str) -> bool:
    """Whether method ``name`` plans on a latency goal itself (``target_latency``); the others, the stacks too, are
    given the MACs target that measures the goal (:func:`slimcnn.graph.latency.macs_for_latency`).

    >>> plans_latency("l1"), plans_latency("dagger"), plans_latency("l1+trp")
    (True, False, False)
    """
    return "+" not in name and "target_latency" in method_class(name).options


def create(name: str, **kwargs: Any) -> Method:
    """Build method ``name`` (see :func:`list_methods`) with its options."""
    return method_class(name)(**kwargs)


__all__ = ["Method", "create", "list_methods", "list_stacks", "method_class", "methods_where", "register"]
