"""C-SGD's clusters (:mod:`slimcnn.methods.csgd`): which channels of a group go together, how many clusters each
group gets, and how far a cluster's members still are from their mean.

Apart from the method because these are functions of tensors and channel groups alone (no hooks, no training
state): they can be read, tested and reused on their own, e.g. by the ``csgd+trp`` stack
(:mod:`slimcnn.methods.stack`), which needs :func:`cluster_lists` without the method.
"""
from __future__ import annotations

import math
import warnings
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn

from ..graph.handlers import member_module

if TYPE_CHECKING:
    from ..graph import ChannelGraph


# ----------------------------------------------------------------------------------------------- clusters
def canonical_ids(labels: Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Renumber cluster labels in order of each cluster's first member.

    >>> canonical_ids([2, 2, 0, 1, 0]).tolist()
    [0, 0, 1, 2, 1]
    """
    order: dict[int, int] = {}
    out = [order.setdefault(int(v), len(order)) for v in torch.as_tensor(labels).tolist()]
    return torch.tensor(out, dtype=torch.long)


def cluster_lists(ids: torch.Tensor) -> list[list[int]]:
    """Cluster ids -> clusters as sorted member lists, ordered by first member (the form merge_channels takes).

    >>> cluster_lists(torch.tensor([0, 1, 0, 2]))
    [[0, 2], [1], [3]]
    """
    out: dict[int, list[int]] = {}
    for i, c in enumerate(ids.tolist()):
        out.setdefault(c, []).append(i)
    return [out[c] for c in sorted(out, key=lambda c: out[c][0])]


def even_clusters(n: int, k: int) -> torch.Tensor:
    """Cluster ids of ``n`` channels in ``k`` contiguous blocks whose sizes differ by at most one.

    >>> even_clusters(10, 3).tolist()
    [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
    """
    _check_k(n, k)
    return torch.arange(n) * k // n


def kmeans_clusters(features: torch.Tensor, k: int, seed: int = 0, n_init: int = 3) -> torch.Tensor:
    """Cluster ids of the rows of ``features`` (n, d) by k-means (k-means++ starts, best of ``n_init``) with a
    fixed seed: exactly ``k`` clusters.

    >>> kmeans_clusters(torch.tensor([[0.0], [10.0], [0.1], [10.1]]), 2).tolist()
    [0, 1, 0, 1]
    """
    n = features.shape[0]
    _check_k(n, k)
    if k == n:
        return torch.arange(n)
    if k == 1:
        return torch.zeros(n, dtype=torch.long)
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from threadpoolctl import threadpool_limits

    # one thread: measured 4x faster than the default threads on small and large (512 x 4608) problems alike
    with warnings.catch_warnings(), threadpool_limits(limits=1):
        warnings.simplefilter("ignore", ConvergenceWarning)  # duplicate rows find fewer clusters; fixed below
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
        labels = km.fit(features.detach().double().cpu().numpy()).labels_
    ids = canonical_ids(labels)
    while int(ids.max()) + 1 < k:  # split the largest cluster until there are k
        sizes = torch.bincount(ids)
        big = int(torch.argmax(sizes))
        last = int(torch.nonzero(ids == big).flatten()[-1])
        ids[last] = int(ids.max()) + 1
        ids = canonical_ids(ids)
    return ids


def partitioned_clusters(k: int, classes: Sequence[int] | torch.Tensor, features: torch.Tensor | None = None,
                         seed: int = 0) -> torch.Tensor:
    """``k`` clusters of which none spans two ``classes``: k-means on ``features`` within each class (``None``:
    contiguous blocks). Clusters are shared out over the classes in proportion to their sizes (at least one each).

    >>> partitioned_clusters(3, [0, 0, 1, 1, 1, 1]).tolist()
    [0, 0, 1, 1, 2, 2]
    """
    cls = canonical_ids(classes)
    n_cls = int(cls.max()) + 1
    if n_cls > k:
        raise ValueError(f"{n_cls} kinds of channel that may not share a cluster, but only {k} clusters")
    sizes = torch.bincount(cls).tolist()
    alloc = [1] * n_cls
    for _ in range(k - n_cls):  # highest size per cluster next (D'Hondt), never more clusters than channels
        c = max((c for c in range(n_cls) if alloc[c] < sizes[c]), key=lambda c: sizes[c] / alloc[c])
        alloc[c] += 1
    ids = torch.empty(len(cls), dtype=torch.long)
    first = 0
    for c in range(n_cls):
        idx = torch.nonzero(cls == c).flatten()
        local = (kmeans_clusters(features[idx], alloc[c], seed) if features is not None
                 else even_clusters(len(idx), alloc[c]))
        ids[idx] = local + first
        first += alloc[c]
    return canonical_ids(ids)


def _check_k(n: int, k: int) -> None:
    if not 1 <= k <= n:
        raise ValueError(f"cannot make {k} clusters of {n} channels (need 1 <= k <= {n})")


def cluster_means(x: torch.Tensor, ids: torch.Tensor, inv_counts: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of the rows of ``x`` (n, d) per cluster: (k, d). ``inv_counts`` (k, 1) may be precomputed."""
    k = int(ids.max()) + 1
    if inv_counts is None:
        inv_counts = 1.0 / torch.bincount(ids, minlength=k).to(x.dtype).unsqueeze(1)
    return x.new_zeros(k, x.shape[1]).index_add_(0, ids, x).mul_(inv_counts)


def relative_distances(rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Per row: ``||P_i - mean_c|| / ||mean_c||`` with ``mean_c`` the mean of its cluster (0 for singletons)."""
    rows = rows.detach().double().reshape(rows.shape[0], -1)
    mean = cluster_means(rows, ids).index_select(0, ids)
    return (rows - mean).norm(dim=1) / mean.norm(dim=1).clamp_min(1e-12)


# ------------------------------------------------------------- what k-means sees, what may share a cluster
def producer_features(model: nn.Module, group: Any, first_only: bool = False) -> torch.Tensor:
    """The rows k-means sees for a channel group: its producers' kernels (concatenated, or only the first one with
    ``first_only``), each producer scaled to unit norm so that no layer dominates."""
    blocks = []
    for m in group.members:
        if m.role not in ("out", "dw"):
            continue
        w = getattr(member_module(model, m.module), "weight", None)
        if not isinstance(w, torch.Tensor):
            continue  # a parameter-free producer, e.g. an option-A shortcut
        rows = w.detach()[m.offset: m.offset + group.size].reshape(group.size, -1).double().cpu()
        blocks.append(rows / rows.norm().clamp_min(1e-12))
        if first_only:
            break
    if not blocks:
        raise ValueError(f"C-SGD: channel group {group.key!r} has no producer with weights to cluster")
    return torch.cat(blocks, dim=1)


def shortcut_classes(model: nn.Module, group: Any, readers: dict[str, list[tuple[str, int, int]]],
                     done: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per channel of ``group``: what parameter-free producers (option-A shortcuts) put into it. Channels may share
    a cluster only if they get the same: nothing, or the same (cluster of) source channel; training cannot make two
    different sources equal, so merging them would not be lossless. ``readers``: module -> the (group key, offset,
    size) slices of its input; ``done``: the cluster ids of the groups clustered so far."""
    from ..layers import PadShortcut

    sig: list[tuple] = [() for _ in range(group.size)]
    for m in group.producers:
        module = member_module(model, m.module)
        if isinstance(getattr(module, "weight", None), torch.Tensor):
            continue
        if not isinstance(module, PadShortcut):
            raise ValueError(f"C-SGD cannot merge channels of group {group.key!r}: producer {m.module!r} "
                             f"({type(module).__name__}) has no weights to train")
        source = dict(zip(module.dst, module.src))
        for c in range(group.size):
            s = source.get(m.offset + c)
            sig[c] += (m.module, _source_cluster(readers, m.module, s, done) if s is not None else None)
    order: dict[tuple, int] = {}
    return torch.tensor([order.setdefault(t, len(order)) for t in sig], dtype=torch.long)


def _source_cluster(readers: dict[str, list[tuple[str, int, int]]], module: str, channel: int,
                    done: dict[str, torch.Tensor]) -> tuple[str, int]:
    """The (group, cluster) that input ``channel`` of ``module`` belongs to (its own index when unclustered)."""
    for key, offset, size in readers.get(module, []):
        if offset <= channel < offset + size:
            ids = done.get(key)  # groups are clustered in forward order: the sources come first
            return key, int(ids[channel - offset]) if ids is not None else channel - offset
    return "", channel


# ----------------------------------------------------------------------------------------------- widths
def _explicit_widths(widths: float | dict[str, float], sizes: dict[str, int]) -> dict[str, int]:
    """Widths given as one fraction, or per group key / stage prefix (an int count or a float fraction)."""
    def count(v: float, n: int) -> int:
        return int(v) if isinstance(v, int) else max(1, math.floor(v * n + 1e-9))

    if isinstance(widths, (int, float)):
        return {k: count(float(widths), n) for k, n in sizes.items()}
    out, used = {}, set()
    for key, n in sizes.items():
        # the most specific entry wins: the key itself, else the longest module-name prefix (a stage)
        match = max((w for w in widths if w == key or key.startswith(w + ".")), key=len, default=None)
        if match is not None:
            out[key] = count(widths[match], n)
            used.add(match)
    unused = set(widths) - used
    if unused:
        raise ValueError(f"C-SGD widths: {', '.join(sorted(unused))} match no prunable group; "
                         f"groups: {', '.join(sizes)}")
    return out


def squeeze_widths(model: nn.Module, example_input: torch.Tensor, reference: nn.Module | None = None,
                   graph: ChannelGraph | None = None) -> dict[str, int]:
    """Group widths of ``reference`` (default: ``model``'s recipe rebuilt at width 1) for a wide ``model``
    (``graph``: ``model``'s :class:`~slimcnn.graph.ChannelGraph`, when the caller has one).

    >>> from slimcnn.models import create
    >>> wide = create("cifar_resnet20", width=1.5)
    >>> squeeze_widths(wide, torch.zeros(1, 3, 32, 32))["conv1"]                # doctest: +SKIP
    16
    """
    from ..graph import ChannelGraph, channel_groups

    if reference is None:
        spec = getattr(model, "slimcnn_spec", None)
        if spec is None or spec["kwargs"].get("width", 1.0) == 1.0:
            raise ValueError("C-SGD squeeze needs a model built wide, e.g. create('cifar_resnet56', width=1.5), "
                             "or an explicit reference model")
        from ..models import create

        kwargs = {k: v for k, v in spec["kwargs"].items() if k != "width"}
        reference = create(spec["name"], num_classes=spec["num_classes"], **kwargs)
    graph = graph if graph is not None else ChannelGraph(model, example_input)
    wide = {g.key: g.size for g in graph.groups_for(model) if g.prunable}
    narrow = {g.key: g.size for g in channel_groups(reference, example_input)}
    missing = sorted(set(wide) - set(narrow))
    if missing:
        raise ValueError(f"C-SGD squeeze: the reference model has no channel group {', '.join(missing)}")
    return {k: narrow[k] for k in wide}
