"""Training checkpoints without pickle: tensors in safetensors, everything else as a JSON skeleton.

A training state is a nested mix of dicts (sometimes with int keys, like an optimiser's state), lists,
tuples (``random.getstate()`` insists on them), numbers, strings, tensors and numpy arrays. :func:`flatten_state`
splits such an object into a flat ``{name: tensor}`` dict and a JSON-able skeleton that names the tensors;
:func:`unflatten_state` puts it back together exactly (same types, same bits). :func:`save_state` writes both
into ONE safetensors file (the skeleton goes into the header's metadata), atomically: a temp file in the
same folder, fsync, then ``os.replace``, so a crash mid-write never leaves a half-written checkpoint.

>>> import torch
>>> tensors, skel = flatten_state({"step": 3, "state": {0: {"buf": torch.ones(2)}}, "rng": (1, 2)})
>>> sorted(tensors)
['state.0.buf']
>>> unflatten_state(tensors, skel)["state"][0]["buf"]
tensor([1., 1.])
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "slimcnn-state"
VERSION = 1
_META_KEY = "slimcnn_state"


class StateError(ValueError):
    """A state cannot be serialised, or a checkpoint file is not one of ours / is corrupt."""


def _encode_key(key: Any, path: str) -> Any:
    if isinstance(key, (str, int, float, bool)) or key is None:
        return key
    if isinstance(key, tuple):
        return {"__tuple__": [_encode_key(k, path) for k in key]}
    raise StateError(f"cannot serialise dict key {key!r} ({type(key).__name__}) at {path or '<root>'}")


def _decode_key(key: Any) -> Any:
    if isinstance(key, dict) and "__tuple__" in key:
        return tuple(_decode_key(k) for k in key["__tuple__"])
    return key


def flatten_state(obj: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split ``obj`` into (tensors by dotted path, JSON-able skeleton); see :func:`unflatten_state`."""
    tensors: dict[str, torch.Tensor] = {}

    def store(path: str, t: torch.Tensor) -> str:
        name, n = path, 1
        while name in tensors:  # e.g. keys 0 and "0" in one dict
            name, n = f"{path}#{n}", n + 1
        tensors[name] = t
        return name

    def walk(o: Any, path: str) -> Any:
        if isinstance(o, torch.Tensor):
            # a private contiguous CPU copy: safetensors refuses tensors that share storage
            return {"__tensor__": store(path, o.detach().to("cpu", copy=True).contiguous())}
        if isinstance(o, np.ndarray):
            # torch lacks full support for unsigned 16/32/64-bit dtypes; store the same bits as signed
            signed = o.view(o.dtype.str.replace("u", "i")) if o.dtype.kind == "u" and o.itemsize > 1 else o
            name = store(path, torch.from_numpy(np.ascontiguousarray(signed).copy()))
            return {"__ndarray__": name, "dtype": o.dtype.str}
        if isinstance(o, np.generic):
            return walk(o.item(), path)
        if isinstance(o, dict):
            plain = all(isinstance(k, str) and not k.startswith("__") for k in o)
            if plain:
                return {k: walk(v, f"{path}.{k}" if path else k) for k, v in o.items()}
            items = []
            for k, v in o.items():
                items.append([_encode_key(k, path), walk(v, f"{path}.{k}" if path else str(k))])
            return {"__dict__": items}
        if isinstance(o, tuple):
            return {"__tuple__": [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(o)]}
        if isinstance(o, list):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(o)]
        if isinstance(o, (str, int, float, bool)) or o is None:
            return o
        raise StateError(f"cannot serialise {type(o).__name__} at {path or '<root>'}: only tensors, numpy arrays, "
                         "dicts, lists, tuples, numbers, strings and None are stored")

    return tensors, walk(obj, "")


def unflatten_state(tensors: dict[str, torch.Tensor], skeleton: Any) -> Any:
    """Inverse of :func:`flatten_state`."""

    def walk(s: Any) -> Any:
        if isinstance(s, list):
            return [walk(v) for v in s]
        if not isinstance(s, dict):
            return s
        if "__tensor__" in s:
            return tensors[s["__tensor__"]]
        if "__ndarray__" in s:
            return tensors[s["__ndarray__"]].numpy().view(np.dtype(s["dtype"])).copy()
        if "__tuple__" in s:
            return tuple(walk(v) for v in s["__tuple__"])
        if "__dict__" in s:
            return {_decode_key(k): walk(v) for k, v in s["__dict__"]}
        return {k: walk(v) for k, v in s.items()}

    try:
        return walk(skeleton)
    except KeyError as e:
        raise StateError(f"checkpoint skeleton names tensor {e.args[0]!r}, which the file does not hold") from None


def save_state(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` to ``path`` (one safetensors file) atomically and return the path.

    >>> save_state("/tmp/state.safetensors", {"epoch": 1, "w": torch.zeros(3)})  # doctest: +SKIP
    """
    from safetensors.torch import save

    path = Path(path)
    tensors, skeleton = flatten_state(obj)
    header = json.dumps({"format": FORMAT, "version": VERSION, "state": skeleton})
    data = save(tensors, metadata={_META_KEY: header})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_state(path: str | Path) -> Any:
    """Read an object written by :func:`save_state` (no pickle involved)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise StateError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises several types for a truncated or foreign file
        raise StateError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    if _META_KEY not in meta:
        raise StateError(f"{path} is a safetensors file but not a slimcnn training checkpoint (no {_META_KEY!r})")
    header = json.loads(meta[_META_KEY])
    if header.get("format") != FORMAT or header.get("version") != VERSION:
        raise StateError(f"{path}: unsupported checkpoint format {header.get('format')!r} "
                         f"version {header.get('version')!r} (this slimcnn reads {FORMAT!r} version {VERSION})")
    return unflatten_state(tensors, header["state"])


def capture_rng() -> dict[str, Any]:
    """Every RNG a training step may draw from: torch (CPU and CUDA), numpy and Python's ``random``."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                             "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
