"""Compression methods behind one interface (:class:`~slimcnn.methods.base.Method`).

>>> import slimcnn
>>> m = slimcnn.methods.create("l1", target_macs=0.5)
>>> s = slimcnn.methods.create("dagger+trp", target_macs=0.5)   # a stack: see slimcnn/methods/stack.py
"""
from __future__ import annotations

from typing import Any

from . import registry
from .base import Method
from .registry import list_methods, methods_where, register
from .stack import STACKS, stack_class


def list_stacks() -> list[str]:
    """The stacks ``create`` accepts besides :func:`list_methods`: a channel method, then trp (``"dagger+trp"``)."""
    return list(STACKS)


def method_class(name: str) -> type[Method]:
    """The class registered as method ``name`` (imported on first use); ``"a+b"`` names a stack
    (ValueError, naming what would work, for a stack that is not one)."""
    return stack_class(name) if "+" in name else registry.method_class(name)


def plans_latency(name: str) -> bool:
    """Whether method ``name`` plans on a latency goal itself (``target_latency``: l1, trp, and the stack of the
    two); the others are given the MACs target that measures the goal (:func:`slimcnn.latency_fit.fit_aligned`).

    >>> plans_latency("l1"), plans_latency("dagger"), plans_latency("l1+trp"), plans_latency("dagger+trp")
    (True, False, True, False)
    """
    return "target_latency" in method_class(name).targets


def create(name: str, **kwargs: Any) -> Method:
    """Build method ``name`` (see :func:`list_methods`, :func:`list_stacks`) with its options."""
    return method_class(name)(**kwargs)


__all__ = ["Method", "create", "list_methods", "list_stacks", "method_class", "methods_where", "register"]
