"""Channel groups and surgery: remove, merge, replace; MACs targeting. :class:`ChannelGraph` holds them all for
one model (one trace); the functions below are the same operations for one-off calls.

>>> import torch
>>> from slimcnn import create
>>> from slimcnn.graph import channel_groups, prune_to_target
>>> model, x = create("cifar_resnet20"), torch.randn(1, 3, 32, 32)
>>> scores = {g.key: torch.rand(g.size) for g in channel_groups(model, x) if g.prunable}
>>> small = prune_to_target(model, x, scores, target=0.5)     # real MACs within 1% of half
"""
from .channel_graph import ChannelGraph
from .costs import CostModel, LayerCost, cost_model, layer_costs, soft_macs
from .groups import ChannelGroup, Member, channel_groups, register_unprunable
from .handlers import LayerHandler, handler_for, register_handler
from .policy import LayerPolicy, layer_policy
from .replace import replace_modules, set_submodule
from .surgery import equalize_clusters, merge_channels, remove_channels
from .targeting import (TargetError, aligned_widths, allocate_widths, check_round_to, prune_to_target,
                        select_and_prune, select_channels)
from .validate import ModelOutputs, SurgeryError, first_output, reference_output, validate

__all__ = ["ChannelGraph", "CostModel", "soft_macs", "LayerHandler", "handler_for", "register_handler",
           "ChannelGroup", "Member", "channel_groups", "register_unprunable", "remove_channels", "merge_channels",
           "replace_modules", "set_submodule", "layer_costs", "LayerCost", "cost_model", "allocate_widths",
           "select_channels", "prune_to_target", "select_and_prune", "TargetError", "SurgeryError", "validate",
           "reference_output", "ModelOutputs", "first_output", "LayerPolicy", "layer_policy", "aligned_widths",
           "check_round_to"]
