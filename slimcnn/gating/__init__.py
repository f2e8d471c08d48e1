"""Feedback gating: RIGNet (recurrent top-down gates) and DIGNet (cascaded propagator gates). **[ours]**

Importing this package registers the wrappers with the model zoo, so that::

    >>> import slimcnn.gating
    >>> from slimcnn.models import create
    >>> m = create("cifar_resnet20", gating="rig", iterations=2)
    >>> type(m).__name__
    'RIG'

``create(..., gating="dig", variant="cascaded")`` builds a :class:`DIG`. Gate modules are declared
unprunable for channel surgery: a gate couples the channels of the stream it gates to those of its source.
"""
from ..models.registry import register_wrapper
from .dig import DIG, VARIANTS
from .rig import GATE_TYPES, RIG, FeedbackNet, Gate, iteration_loss

__all__ = ["RIG", "DIG", "Gate", "FeedbackNet", "GATE_TYPES", "VARIANTS", "iteration_loss"]

register_wrapper("rig", RIG)
register_wrapper("dig", DIG)


def _declare_unprunable() -> None:
    try:  # the graph package may not provide it yet; gating must work without it
        from ..graph import register_unprunable
    except ImportError:
        return
    register_unprunable(Gate, "feedback gate: its 1x1 conv reads the channels of a higher stage and writes one "
                              "gate value per channel of the gated stream, coupling both streams' channels")


_declare_unprunable()
