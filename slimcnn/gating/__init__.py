"""Feedback gating: RIGNet (recurrent top-down gates) and DIGNet (cascaded propagator gates). **[ours]**

Importing this package registers the wrappers with the model zoo, so that::

    >>> import slimcnn.gating
    >>> from slimcnn.models import create
    >>> m = create("cifar_resnet20", gating="rig", iterations=2)
    >>> type(m).__name__
    'RIG'

``create(..., gating="dig", variant="cascaded")`` builds a :class:`DIG`. Both take ``bn="shared"|"per_iter"``
and ``gate_init="default"|"open"|"zero"`` (:mod:`slimcnn.gating.rig` says what they do and why);
:func:`collect_gate_stats` records the gates' mean and spread per stage and iteration during an evaluation.
Gate modules are declared unprunable for channel surgery: a gate couples the channels of the stream it gates
to those of its source; so are per-iteration BN layers (their copies would have to shrink together).
"""
from ..outputs import iteration_loss  # the training loop's own loss over the iterations' outputs
from ..models.registry import register_wrapper
from .dig import DIG, VARIANTS
from .rig import BN_MODES, GATE_INITS, GATE_TYPES, RIG, FeedbackNet, Gate, IterationBN
from .stats import collect_gate_stats

__all__ = ["RIG", "DIG", "Gate", "FeedbackNet", "IterationBN", "GATE_TYPES", "GATE_INITS", "BN_MODES", "VARIANTS",
           "iteration_loss", "collect_gate_stats"]

register_wrapper("rig", RIG, RIG.options)
register_wrapper("dig", DIG, DIG.options)


def _declare_unprunable() -> None:
    from ..graph import register_unprunable

    register_unprunable(Gate, "feedback gate: its 1x1 conv reads the channels of a higher stage and writes one "
                              "gate value per channel of the gated stream, coupling both streams' channels")
    register_unprunable(IterationBN, "per-iteration BatchNorm: one copy per feedback iteration, which surgery "
                                     "does not resize together")


_declare_unprunable()
