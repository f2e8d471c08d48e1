"""Pickle-free training checkpoints: exact round trips of nested state, optimiser state and RNG state."""
from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slimcnn.engine.checkpoint import (StateError, capture_rng, flatten_state, load_state, restore_rng, save_state,
                                       unflatten_state)


def same(a, b) -> bool:
    """Equal values AND equal types, all the way down (tuples stay tuples, int keys stay ints)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(type(k) is type(k2) for k, k2 in zip(a, b)) and \
            all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return a == b


def test_nested_round_trip_keeps_types_and_bits(tmp_path):
    state = {
        "epoch": 3, "lr": 0.1 + 0.2, "name": "x", "flag": True, "none": None, "nan": float("nan"),
        "inf": float("-inf"),
        "state": {0: {"momentum_buffer": torch.randn(3, 2)}, 7: {"step": torch.tensor(5.0)}},
        "tuple": (1, (2.5, "a"), [torch.arange(4, dtype=torch.int64)]),
        "__odd": {"__tensor__": "not a reference"},
        "dtypes": [torch.ones(2, dtype=d) for d in (torch.uint8, torch.bool, torch.bfloat16, torch.float16,
                                                    torch.float64, torch.int32)],
        "np": np.arange(5, dtype=np.uint32) * np.uint32(4_000_000_000 // 5), "npf": np.float64(1 / 3),
        "a.b": torch.zeros(1), "a": {"b": torch.ones(1)},  # same dotted path twice
        "empty": torch.zeros(0, 3),
    }
    path = save_state(tmp_path / "s.safetensors", state)
    back = load_state(path)
    expected = dict(state, npf=1 / 3)  # numpy scalars come back as Python numbers
    assert same(back, expected)


json_leaves = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=5)
tensors = st.builds(lambda shape, seed: torch.randn(shape, generator=torch.Generator().manual_seed(seed)),
                    st.lists(st.integers(0, 3), max_size=3).map(tuple), st.integers(0, 1000))
nested = st.recursive(
    json_leaves | tensors,
    lambda kids: st.lists(kids, max_size=3) | st.lists(kids, max_size=3).map(tuple)
    | st.dictionaries(st.text(max_size=4) | st.integers(-5, 5), kids, max_size=3),
    max_leaves=12,
)


@settings(max_examples=60, deadline=None)
@given(nested)
def test_flatten_unflatten_is_exact(obj):
    tensors_, skeleton = flatten_state(obj)
    assert same(unflatten_state(tensors_, skeleton), obj)


def _trained_optimizer(kind: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 2))
    opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True) if kind == "sgd"
           else torch.optim.Adam([{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 1e-2}]))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(8, 4)).square().mean().backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_optimizer_state_round_trips_and_continues_identically(tmp_path, kind):
    model, opt = _trained_optimizer(kind)
    path = save_state(tmp_path / "opt.safetensors", {"model": model.state_dict(), "opt": opt.state_dict()})
    saved = load_state(path)
    assert same(saved["opt"], opt.state_dict())

    model2, opt2 = _trained_optimizer(kind)  # same history: now continue both from "disk" and memory
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["opt"])
    x = torch.randn(8, 4)
    for m, o in ((model, opt), (model2, opt2)):
        o.zero_grad()
        m(x).square().mean().backward()
        o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_rng_state_round_trips(tmp_path):
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    path = save_state(tmp_path / "rng.safetensors", capture_rng())
    first = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    restore_rng(load_state(path))
    second = (torch.rand(3), np.random.rand(3), random.random(), np.random.randn())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    assert first[2:] == second[2:]


def test_failed_save_keeps_previous_file(tmp_path):
    path = save_state(tmp_path / "last.safetensors", {"epoch": 1, "w": torch.ones(2)})
    with pytest.raises(StateError, match="cannot serialise object at model.bad"):
        save_state(path, {"epoch": 2, "model": {"bad": object()}})
    assert load_state(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.safetensors"]  # no temp file left behind


def test_corrupt_and_foreign_files_are_clear_errors(tmp_path):
    from safetensors.torch import save_file

    path = save_state(tmp_path / "last.safetensors", {"w": torch.ones(100)})
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(StateError, match="cannot read checkpoint .*last.safetensors"):
        load_state(path)
    save_file({"w": torch.ones(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(StateError, match="not a slimcnn training checkpoint"):
        load_state(tmp_path / "plain.safetensors")
    with pytest.raises(StateError, match="not found"):
        load_state(tmp_path / "missing.safetensors")
