"""Remove or merge channels of channel groups, on a copy, and prove the result right before returning it.

Both operations reduce to one edit: each group's channels become a list of *clusters*; cluster ``j`` becomes new
channel ``j``. Producers (``out``, ``dw``, ``bn`` members) keep the rows of the cluster's first channel; consumers
(``in`` members) get the sum of the cluster's input slices. Removing channels is the special case of singleton
clusters of the kept channels.

Checks on every result: a forward pass with the original output shape (a failure names the module that broke);
``remove_channels`` additionally compares with the original model whose consumers have the removed channels
zeroed, which must give the same outputs whatever the weights: a missed consumer or coupling cannot slip through.
``merge_channels`` compares with the original outputs when ``lossless_tol`` is given.

Every layer is edited by its handler (:mod:`slimcnn.graph.handlers`): convs and linears select their output rows
and sum their input columns, norms select their entries, option-A shortcuts (:mod:`slimcnn.layers`) rewrite their
channel maps. A layer that knows why a merge of its channels cannot be exact says so when a lossless check fails.
"""
from __future__ import annotations

import copy
from typing import Mapping, Sequence

import torch
from torch import nn

from .groups import ChannelGroup, channel_groups, groups_by_key
from .handlers import LayerHandler, NewChannel, handler_for, member_module
from .validate import (ModelOutputs, SurgeryError, difference, reference_output, run_modes, run_modes_double,
                       validate)

Clusters = list[list[int]]


def remove_channels(model: nn.Module, example_input: torch.Tensor, keep: Mapping[str, Sequence[int]],
                    groups: list[ChannelGroup] | None = None, tol: float = 1e-4) -> nn.Module:
    """Return a copy of ``model`` keeping only channels ``keep[key]`` (sorted) of each named group; groups not
    named stay whole. The copy is validated (see the module doc; ``tol`` is the relative tolerance of the masked
    comparison). ``model`` is untouched.

    >>> from slimcnn import create
    >>> x = torch.randn(2, 3, 32, 32)
    >>> small = remove_channels(create("cifar_resnet20"), x, {"layer1.0.conv1": [0, 2, 5]})
    >>> small.layer1[0].conv1.out_channels
    3
    """
    by_key, plan = _plan(model, example_input, groups, keep, _kept_as_clusters, "remove_channels")
    ref = reference_output(model, example_input)
    new = _apply(model, by_key, plan)
    what = _describe("remove_channels", by_key, plan)
    got = validate(new, example_input, ref, what)
    _check_against_masked(model, ref, got, by_key, plan, tol, new)
    return new


def merge_channels(model: nn.Module, example_input: torch.Tensor, clusters: Mapping[str, Sequence[Sequence[int]]],
                   lossless_tol: float | None = None, groups: list[ChannelGroup] | None = None) -> nn.Module:
    """Return a copy of ``model`` where each cluster of ``clusters[key]`` (a partition of the group's channels)
    becomes one channel, in the order given: producers keep the cluster's first channel's filter (weight rows,
    bias, norm entries and running statistics); consumers' input slices of the cluster are summed. Lossless when
    every cluster's producer rows and norm entries are identical (norms on the consumer side too, as DenseNet's,
    and see the module doc for option-A shortcuts); ``lossless_tol`` checks it (max abs difference).

    >>> from slimcnn import create
    >>> x = torch.randn(2, 3, 32, 32)
    >>> m = merge_channels(create("cifar_resnet20"), x, {"layer1.0.conv1": [[0, 3], [1, 2]] + [[i] for i in range(4, 16)]})
    >>> m.layer1[0].conv1.out_channels
    14
    """
    by_key, plan = _plan(model, example_input, groups, clusters, _partition, "merge_channels")
    ref = reference_output(model, example_input)
    new = _apply(model, by_key, plan)
    what = _describe("merge_channels", by_key, plan)
    try:
        validate(new, example_input, ref, what, lossless_tol)
    except SurgeryError as e:
        note = _pad_merge_note(model, by_key, plan)
        raise SurgeryError(f"{e}{note}") from None
    return new


@torch.no_grad()
def equalize_clusters(model: nn.Module, groups: list[ChannelGroup], clusters: Mapping[str, Sequence[Sequence[int]]]) -> None:
    """In place: copy each cluster's first channel onto its other members in every producer and norm of the group
    (weight rows, bias, running statistics), so that merging them is exact. What C-SGD reaches by training.

    >>> equalize_clusters(model, groups, {"layer1.0.conv1": [[0, 3], [1, 2]]})  # doctest: +SKIP
    """
    by_key = groups_by_key(groups)
    for key, cl in clusters.items():
        for m in by_key[key].members:
            if m.role == "in":
                continue
            mod = member_module(model, m.module)
            _handler(mod, m.module).equalize(mod, m.offset, cl)


# ---------------------------------------------------------------------------------------------------------------
# Input checks


def _plan(model: nn.Module, x: torch.Tensor, groups: list[ChannelGroup] | None, spec: Mapping,
          to_clusters, op: str) -> tuple[dict[str, ChannelGroup], dict[str, Clusters]]:
    groups = groups if groups is not None else channel_groups(model, x)
    by_key = groups_by_key(groups)
    return by_key, {key: to_clusters(_group(by_key, key, op), value) for key, value in spec.items()}


def _kept_as_clusters(g: ChannelGroup, kept: Sequence[int]) -> Clusters:
    idx = _indices(kept, g, "remove_channels")
    if len(set(idx)) != len(idx):
        raise SurgeryError(f"remove_channels: group {g.key!r}: kept indices repeat: {sorted(idx)}")
    return [[i] for i in sorted(idx)]


def _partition(g: ChannelGroup, clusters: Sequence[Sequence[int]]) -> Clusters:
    if not clusters or any(len(c) == 0 for c in clusters):
        raise SurgeryError(f"merge_channels: group {g.key!r} has an empty cluster (or no cluster at all)")
    plan = [_indices(c, g, "merge_channels") for c in clusters]
    flat = sorted(i for c in plan for i in c)
    if flat != list(range(g.size)):
        missing = sorted(set(range(g.size)) - set(flat))
        dup = sorted({i for i in flat if flat.count(i) > 1})
        raise SurgeryError(f"merge_channels: the clusters of group {g.key!r} must partition its {g.size} channels "
                           f"(missing {missing}, repeated {dup})")
    return plan


def _describe(op: str, by_key: dict[str, ChannelGroup], plan: Mapping[str, Clusters]) -> str:
    return f"{op}(" + ", ".join(f"{k}: {by_key[k].size}->{len(v)}" for k, v in plan.items()) + ")"


def _group(by_key: dict[str, ChannelGroup], key: str, op: str) -> ChannelGroup:
    if key not in by_key:
        near = ", ".join(list(by_key)[:8])
        raise SurgeryError(f"{op}: no channel group {key!r}; groups are keyed by their first producer, e.g. {near}")
    g = by_key[key]
    if not g.prunable:
        raise SurgeryError(f"{op}: group {key!r} cannot be changed: {g.reason}")
    return g


def _indices(values: Sequence[int] | torch.Tensor, g: ChannelGroup, op: str) -> list[int]:
    idx = [int(i) for i in (values.tolist() if isinstance(values, torch.Tensor) else values)]
    if not idx:
        raise SurgeryError(f"{op}: group {g.key!r} would keep no channel (keep at least 1 of {g.size})")
    bad = [i for i in idx if not 0 <= i < g.size]
    if bad:
        raise SurgeryError(f"{op}: group {g.key!r} has channels 0..{g.size - 1}; got out-of-range {bad}")
    return idx


# ---------------------------------------------------------------------------------------------------------------
# The edit


def _axis_plans(by_key: dict[str, ChannelGroup], plan: Mapping[str, Clusters]):
    """{(module, axis): [(offset, size, clusters)]} for every member of every planned group."""
    out: dict[tuple[str, str], list[tuple[int, int, Clusters]]] = {}
    for key, clusters in plan.items():
        g = by_key[key]
        for m in g.members:
            axis = "in" if m.role == "in" else "out"
            out.setdefault((m.module, axis), []).append((m.offset, g.size, clusters))
    return out


def _new_channels(width: int, ranges: list[tuple[int, int, Clusters]]) -> list[NewChannel]:
    """Walk an axis of ``width`` channels: planned ranges become their clusters, the rest stays as it is."""
    result: list[NewChannel] = []
    pos = 0
    for offset, size, clusters in sorted(ranges):
        result += [(i, [i]) for i in range(pos, offset)]
        result += [(offset + c[0], [offset + i for i in c]) for c in clusters]
        pos = offset + size
    result += [(i, [i]) for i in range(pos, width)]
    return result


def _handler(mod: nn.Module, name: str) -> LayerHandler:
    layer = handler_for(mod)
    if layer is None:
        raise SurgeryError(f"cannot edit channels of {name} ({type(mod).__name__})")
    return layer


def _edit(model: nn.Module, name: str, out: list[NewChannel] | None, inp: list[NewChannel] | None) -> None:
    mod = member_module(model, name)
    _handler(mod, name).edit(model, name, mod, out, inp)


def _apply(model: nn.Module, by_key: dict[str, ChannelGroup], plan: Mapping[str, Clusters]) -> nn.Module:
    new = copy.deepcopy(model)
    axes = _axis_plans(by_key, plan)
    for name in dict.fromkeys(n for n, _ in axes):
        mod = member_module(new, name)
        out = _new_channels(_width(mod, "out"), axes[(name, "out")]) if (name, "out") in axes else None
        inp = _new_channels(_width(mod, "in"), axes[(name, "in")]) if (name, "in") in axes else None
        try:
            _edit(new, name, out, inp)
        except SurgeryError:
            raise
        except Exception as e:
            raise SurgeryError(f"editing {name} ({type(mod).__name__}) failed: {type(e).__name__}: {e}") from None
    return new


def _width(mod: nn.Module, axis: str) -> int:
    layer = handler_for(mod)
    if layer is None:  # _edit names the module and its type
        return mod.out_channels if axis == "out" else mod.in_channels
    return layer.width(mod, axis)


# ---------------------------------------------------------------------------------------------------------------
# Verification


def masked_copy(model: nn.Module, by_key: dict[str, ChannelGroup], plan: Mapping[str, Clusters]) -> nn.Module:
    """A copy of ``model`` at full width in which every consumer ignores the channels ``plan`` drops (and a norm
    whose statistics run over channels takes them over the kept ones): what the pruned model must compute exactly,
    if the groups list every reader of every channel."""
    masked = copy.deepcopy(model)
    for key, clusters in plan.items():
        g = by_key[key]
        dropped = sorted(set(range(g.size)) - {i for c in clusters for i in c})
        for m in g.members:
            mod = member_module(masked, m.module)
            layer = _handler(mod, m.module)
            if m.role == "in":
                layer.mask_inputs(masked, m.module, mod, [m.offset + i for i in dropped])
            else:  # a norm whose statistics run over its channels computes them over the kept ones
                layer.mask_own(masked, m.module, mod, [m.offset + i for i in dropped])
    return masked


def _check_against_masked(model: nn.Module, ref: ModelOutputs, got: ModelOutputs, by_key: dict[str, ChannelGroup],
                          plan: Mapping[str, Clusters], tol: float, new: nn.Module | None = None) -> None:
    """The pruned outputs ``got`` must equal the masked copy's in every mode of ``ref`` (but one whose forward
    draws random numbers, see :meth:`ModelOutputs.repeatable`); else name the first group whose analysis is wrong.
    A difference is confirmed in float64 first (``new``: the pruned model), so float32 rounding that a train-mode
    BatchNorm over few values amplifies (ResNet-50 at 64 px: 2e-4) is not taken for a missed reader."""
    masked = masked_copy(model, by_key, plan)
    found = difference(got.modes, run_modes(masked, ref), tol, ref)
    if found is not None and new is not None:
        pruned64, masked64 = run_modes_double(new, ref), run_modes_double(masked, ref)
        if pruned64 is not None and masked64 is not None and difference(pruned64, masked64, tol, ref) is None:
            return
    if found is None:
        return
    culprit = ""
    for key in plan:  # find the group whose analysis is wrong, to name it
        one = {key: plan[key]}
        if difference(run_modes(_apply(model, by_key, one), ref), run_modes(masked_copy(model, by_key, one), ref),
                      tol, ref):
            culprit = f" in group {key!r} (members: {', '.join(m.module for m in by_key[key].members)})"
            break
    diff, where = found
    raise SurgeryError(f"remove_channels: the pruned model differs by {diff:.3g} ({where}) from the original with "
                       f"those channels masked{culprit}: some reader of the removed channels was missed")


def _pad_merge_note(model: nn.Module, by_key: dict[str, ChannelGroup], plan: Mapping[str, Clusters]) -> str:
    notes = []
    for key, clusters in plan.items():
        for m in by_key[key].producers:
            mod = member_module(model, m.module)
            layer = handler_for(mod)
            note = layer.merge_note(mod, m.offset, clusters, key) if layer is not None else None
            if note:
                notes.append(f"{m.module} {note}")
    return ("; note: " + "; ".join(notes)) if notes else ""
