"""The method interface every compression method implements.

A method is driven by the engine, and is equally usable from a user's own training loop::

    m = slimcnn.methods.create("l1", target_macs=0.5)
    model = m.prepare(model, example_input)      # attach gates / clusters / wrappers; returns the model to train
    opt = torch.optim.SGD(m.param_groups(model, lr=0.01, weight_decay=5e-4), lr=0.01, momentum=0.9)
    for step, (x, y) in enumerate(loader):
        m.before_forward(model, step)
        loss = criterion(model(x), y) + m.loss(model)
        loss.backward()
        m.after_backward(model, step)
        opt.step(); opt.zero_grad()
        m.after_step(model, step)
    compact = m.finalize(model)                  # physically smaller nn.Module, validated, no method traces left

A method never touches data loading.
"""
from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..engine.hooks import NoHooks

if TYPE_CHECKING:
    from ..graph import ChannelGraph


def macs_goal(target: float, base_macs: float) -> float:
    """The MACs a target asks for: a ratio of ``base_macs`` when ``target`` <= 1, else absolute MACs.

    >>> macs_goal(0.5, 40e6), macs_goal(12e6, 40e6)
    (20000000.0, 12000000.0)
    """
    return target * base_macs if target <= 1 else target


def within_tol(macs: float, base_macs: float, target: float | None, tol: float = 0.01) -> bool | None:
    """Whether ``macs`` is within ``tol`` (relative) of the target (see :func:`macs_goal`); None without a target.

    >>> within_tol(20.1e6, 40e6, 0.5), within_tol(19.7e6, 40e6, 0.5), within_tol(1.0, 2.0, None)
    (True, False, None)
    """
    if target is None:
        return None
    goal = macs_goal(target, base_macs)
    return abs(macs - goal) <= tol * goal


def constructor_keywords(cls: type) -> dict[str, inspect.Parameter]:
    """The keyword parameters of ``cls.__init__`` (``**kwargs`` and ``*args`` aside), by name."""
    return {k: p for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def option_help(cls: type, dest: str, text: str) -> str:
    """``text`` with the option's default, read from ``cls.__init__``, appended: a default of None or False (the
    option is off, or the text says what stands in) adds nothing.

    >>> class M(Method):
    ...     def __init__(self, energy: float = 0.9, layers: str | None = None) -> None: ...
    >>> option_help(M, "energy", "energy kept"), option_help(M, "layers", "layer patterns")
    ('energy kept (default: 0.9)', 'layer patterns')
    """
    default = constructor_keywords(cls)[dest].default
    return text if default in (None, False, inspect.Parameter.empty) else f"{text} (default: {default:g})" \
        if isinstance(default, float) else f"{text} (default: {default})"


class Method(NoHooks):
    """Base class: every hook is a no-op (:class:`~slimcnn.engine.hooks.NoHooks`: one parameter group, no extra
    loss, nothing to save), so a method overrides only what it needs; ``param_groups`` is where a method turns
    weight decay off for tensors it regularises itself."""

    name = "base"
    #: CLI options of ``slimcnn compress`` for this method: (flag, argparse kwargs); each ``dest`` must be a
    #: keyword of ``__init__``. Options set to None on the command line are not passed (the default applies). The
    #: help says what the option does; its default is appended from the signature (:func:`option_help`).
    cli_args: ClassVar[list[tuple[str, dict[str, Any]]]] = []
    #: whether the method wants a training phase before ``finalize`` (L1 does not: it prunes, then fine-tunes)
    trains_before_finalize = False
    #: its recipe for one epoch budget: the fraction trained with the method attached before ``finalize``; the rest
    #: fine-tunes the compact model (see :func:`slimcnn.compress.split_budget`). A method whose finalize needs
    #: training (``trains_before_finalize``) must declare a share > 0.
    method_share: ClassVar[float] = 0.0
    #: what the epochs with the method attached do, in words, for reports ("centripetal SGD", "gate search", ...)
    method_phase: ClassVar[str] = "training with the method attached"
    #: every keyword option of ``__init__``, read from its signature when the class is defined (never written by
    #: hand). ``slimcnn compress`` passes each one it holds a value for (the method's own ``cli_args`` and the
    #: run's shared flags: --target-macs, --round-to, --seed, ...), and a stack hands each of its stages the
    #: options that stage lists.
    options: ClassVar[frozenset[str]] = frozenset()
    #: the options each of which sets the compression budget on its own (C-SGD's ``rounds``, L1's
    #: ``target_latency``): the pipeline's default ``target_macs`` is a fallback, passed only when none is set
    targets: ClassVar[frozenset[str]] = frozenset({"target_macs"})
    #: keywords of ``prepare`` beyond ``(model, example_input)`` that the pipeline supplies: ``total_steps``, ``lr``,
    #: ``schedule`` (the budget of the method phase; given only when that phase trains), ``train_loader``,
    #: ``test_loader``, ``val_loader`` (the validation split, when the run has one: what a choice made from accuracy
    #: is scored on), ``cfg`` (the run's :class:`~slimcnn.compress.CompressConfig`)
    prepare_inputs: ClassVar[frozenset[str]] = frozenset()
    #: report.json key of the finalize figures (scores before and after, the method's own finalize record)
    finalize_key: ClassVar[str] = "finalize"
    #: whether it compresses segmentation models (the pipeline refuses the task otherwise)
    segmentation: ClassVar[bool] = False
    #: which layer controls of the run it obeys: ``exclude`` and/or ``min_keep`` (graph/policy.py)
    layer_control: ClassVar[frozenset[str]] = frozenset()
    #: epochs of the method phase already spent inside ``prepare`` (a stack trains its first stage there)
    epochs_in_prepare: int = 0
    #: the channel alignment the method keeps its widths to (None: none); the report counts aligned layers by it
    round_to: int | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "options" not in cls.__dict__:  # a built stack class declares its stages' options besides its own
            cls.options = frozenset(constructor_keywords(cls))

    def prepare(self, model: nn.Module, example_input: torch.Tensor, graph: ChannelGraph | None = None) -> nn.Module:
        """Keep the example input and the model's :class:`~slimcnn.graph.ChannelGraph` (``graph`` when the caller
        has one, else a new one: it traces only when first asked, so methods that need no groups pay nothing).
        Methods call this first from their own ``prepare`` and ask ``self.graph`` for groups, costs and surgery,
        so the model is traced once from prepare to finalize."""
        from ..graph import ChannelGraph

        self.example_input = example_input
        self.graph = graph if graph is not None else ChannelGraph(model, example_input)
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        return model

    def report(self) -> dict[str, Any]:
        """Method-specific figures for report.json (e.g. C-SGD's cluster distances)."""
        return {}
