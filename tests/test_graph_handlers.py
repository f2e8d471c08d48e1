"""Per-layer-type handlers: lookup, the edits they make, the MACs formula, and the graph package's independence
from model files."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import slimcnn
from slimcnn.graph import ChannelGraph, LayerHandler, handler_for, register_handler
from slimcnn.graph.handlers import BatchNormHandler, ConvHandler, LinearHandler, conv_macs
from slimcnn.layers import PadShortcut, PadShortcutHandler
from slimcnn.methods import trp


class _MyLinear(nn.Linear):
    pass


@pytest.mark.parametrize("module, handler", [
    (nn.Conv2d(4, 8, 3), ConvHandler), (nn.ConvTranspose2d(4, 8, 3), ConvHandler), (nn.Conv1d(4, 8, 3), ConvHandler),
    (nn.Linear(4, 8), LinearHandler), (_MyLinear(4, 8), LinearHandler), (nn.BatchNorm2d(8), BatchNormHandler),
    (PadShortcut(4, 8), PadShortcutHandler), (nn.ReLU(), type(None)), (nn.GroupNorm(2, 8), type(None))])
def test_lookup_by_type_and_base_class(module, handler):
    assert type(handler_for(module)) is handler


def test_roles_widths_and_shapes():
    dw, grouped, lin, bn = nn.Conv2d(8, 8, 3, groups=8), nn.Conv2d(8, 8, 3, groups=2), nn.Linear(5, 7), nn.BatchNorm1d(6)
    assert handler_for(dw).role(dw, True) == "dw" and handler_for(dw).problem("dw", dw) is None
    assert "grouped" in handler_for(grouped).problem("g", grouped)
    assert (handler_for(lin).width(lin, "in"), handler_for(lin).width(lin, "out"), handler_for(lin).layer_shape(lin)) \
        == (5, 7, (5, 7, 1))
    assert handler_for(bn).role(bn, False) == "bn" and handler_for(bn).width(bn, "in") == 6
    assert handler_for(bn).layer_shape(bn) is None and handler_for(PadShortcut(4, 8)).layer_shape(PadShortcut(4, 8)) is None
    tconv, conv = nn.ConvTranspose2d(4, 8, 3), nn.Conv2d(4, 8, 3)
    assert handler_for(tconv).out_first(tconv, tconv.weight).shape[:2] == (8, 4)  # stored as (in, out, ...)
    assert handler_for(conv).out_first(conv, conv.weight) is conv.weight


def test_conv_shrinks_outputs_and_merges_inputs():
    conv = nn.Conv2d(4, 3, 1, bias=True)
    w, b = conv.weight.detach().clone(), conv.bias.detach().clone()
    # outputs: keep 2 then 0; inputs: channel 0 <- 0 + 3, channel 1 <- 1
    handler_for(conv).edit(None, "conv", conv, [(2, [2]), (0, [0])], [(0, [0, 3]), (1, [1])])
    assert (conv.out_channels, conv.in_channels) == (2, 2)
    assert torch.equal(conv.bias, b[[2, 0]])
    assert torch.allclose(conv.weight[:, 0], w[[2, 0]][:, 0] + w[[2, 0]][:, 3])
    assert torch.equal(conv.weight[:, 1], w[[2, 0]][:, 1])


def test_pad_shortcut_rewrites_its_maps():
    model = nn.Sequential(PadShortcut(4, 8, 1, src=[0, 1, 2, 3], dst=[2, 3, 4, 5]))
    sc = model[0]
    # upper stream keeps 2, 3, 6 (6 is padding); lower stream drops input 1
    handler_for(sc).edit(model, "0", sc, [(2, [2]), (3, [3]), (6, [6])], [(0, [0]), (2, [2]), (3, [3])])
    new = model[0]
    assert (new.in_channels, new.out_channels, new.src, new.dst) == (3, 3, [0], [0])
    x = torch.randn(1, 3, 2, 2)
    assert torch.equal(new(x)[:, 0], x[:, 0]) and not new(x)[:, 1:].any()


def test_register_a_new_layer_type():
    class Scale(nn.Module):
        def __init__(self, n: int) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(n))

    class ScaleHandler(LayerHandler):
        types = (Scale,)

        def role(self, module, is_out):
            return "bn"

        def width(self, module, axis):
            return len(module.weight)

    register_handler(ScaleHandler())
    assert isinstance(handler_for(Scale(3)), ScaleHandler)
    with pytest.raises(TypeError):
        register_handler(LayerHandler())


def test_one_macs_formula_for_profiler_trp_and_handler():
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2)
    x = torch.randn(1, 8, 15, 15)
    measured = slimcnn.profile(nn.Sequential(conv), example_input=x).macs
    out_hw = conv(x).shape[-2:]
    assert measured == trp.conv_macs(conv, (15, 15)) == ConvHandler.macs(conv, out_hw) == conv_macs(16 * 8 * 8, 4, 9)
    for scheme in ("channel", "spatial", "nd"):
        plain = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        thin = trp.decompose_conv(plain, scheme, 3)
        assert trp.decomposed_macs(plain, scheme, 3, (15, 15)) == slimcnn.profile(thin, example_input=x).macs


def test_dagger_soft_macs_is_the_cost_models():
    from slimcnn.graph.costs import soft_macs as graph_soft_macs
    from slimcnn.methods.dagger import soft_macs

    assert soft_macs is graph_soft_macs
    graph = ChannelGraph(slimcnn.create("cifar_resnet20"), torch.randn(1, 3, 32, 32))
    ones = {g.key: torch.ones(g.size) for g in graph.prunable}
    assert graph.soft_macs(ones).item() == graph.costs().total


def test_graph_package_imports_no_model_file():
    root = Path(slimcnn.__file__).parent / "graph"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                names = [("." * node.level) + (node.module or "")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            assert not any("models" in n for n in names), f"{path.name} imports {names}"


def test_pad_shortcut_moved_but_old_names_work(tmp_path):
    from slimcnn.io import build_module
    from slimcnn.models import PadShortcut as from_models
    from slimcnn.models.cifar_resnet import PadShortcut as from_file

    assert from_models is from_file is PadShortcut
    old = {"type": "slimcnn.models.cifar_resnet:PadShortcut",
           "config": {"in_channels": 4, "out_channels": 8, "stride": 2, "src": [0], "dst": [3]}}
    assert isinstance(build_module(old), PadShortcut)
    model = slimcnn.create("cifar_resnet20")
    assert not any("shortcut" in k for k in model.state_dict())  # still no keys: checkpoints load as before


def test_a_general_shortcut_map_leaves_its_streams_prunable():
    """A shortcut whose map is no longer a plain pad (after pruning or merging) must not freeze the streams it
    joins: its zero channel once came from a cat with fresh zeros, which the tracer reads as an outside tensor."""
    from slimcnn.models.cifar_resnet import CifarResNet

    torch.manual_seed(2)
    model = CifarResNet(8, width=0.5)
    x = torch.zeros(2, 3, 32, 32)
    before = {g.key for g in ChannelGraph(model, x).prunable}
    sc = model.layer2[0].shortcut
    model.layer2[0].shortcut = PadShortcut(sc.in_channels, sc.out_channels, 2, sc.src[:-2], sc.dst[:-2])
    assert model.layer2[0].shortcut._pad is None  # the general path, not the plain pad
    assert {g.key for g in ChannelGraph(model, x).prunable} == before
