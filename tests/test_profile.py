import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from slimcnn import create, profile


def independent_macs(model, shape):
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model.eval()(torch.zeros(1, *shape))
    return counter.get_total_flops() // 2


@pytest.mark.parametrize("name,macs,params", [("cifar_resnet20", 40.55e6, 0.27e6), ("cifar_resnet56", 125.49e6, 0.85e6)])
def test_published_cifar_counts(name, macs, params):
    p = profile(create(name), (3, 32, 32))
    assert abs(p.macs - macs) / macs < 0.005
    assert abs(p.params - params) / params < 0.02  # published params are rounded to 2 digits


def test_resnet50_published_counts():
    p = profile(create("tv:resnet50", num_classes=1000), (3, 224, 224))
    assert abs(p.macs - 4.09e9) / 4.09e9 < 0.005
    assert abs(p.params - 25.56e6) / 25.56e6 < 0.005


@pytest.mark.parametrize("name,shape", [("cifar_resnet56", (3, 32, 32)), ("cifar_vgg16", (3, 32, 32)),
                                        ("tv:mobilenet_v2", (3, 96, 96)), ("tv:densenet121", (3, 64, 64)),
                                        ("tv:efficientnet_b0", (3, 64, 64))])
def test_agrees_with_flop_counter_mode(name, shape):
    model = create(name)
    assert profile(model, shape).macs == independent_macs(model, shape)


def test_factorised_and_functional_layers_are_counted():
    class Thin(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 8, 1))
            self.w = nn.Parameter(torch.randn(8, 8, 3, 3))

        def forward(self, x):
            return torch.nn.functional.conv2d(self.a(x), self.w, padding=1)

    p = profile(Thin(), (3, 8, 8))
    assert p.macs == 64 * (4 * 27 + 8 * 4 + 8 * 72)
    names = {r.name: r.macs for r in p.layers}
    assert names["a.0"] == 64 * 4 * 27 and names["(model)"] == 64 * 8 * 72


def test_layer_table_and_batch_independence():
    m = create("cifar_resnet20")
    p1 = profile(m, (3, 32, 32))
    p4 = profile(m, example_input=torch.zeros(4, 3, 32, 32))
    assert p1.macs == p4.macs
    conv1 = next(r for r in p1.layers if r.name == "conv1")
    assert conv1.in_shape == (1, 3, 32, 32) and conv1.out_shape == (1, 16, 32, 32) and conv1.params == 432
    assert sum(r.macs for r in p1.layers) == p1.macs
    assert "total" in p1.table()
