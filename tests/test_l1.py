import pytest
import torch

import slimcnn
from slimcnn.graph import channel_groups
from slimcnn.importance import l1_scores
from slimcnn.methods.l1 import L1Pruning
from conftest import RESNET20


def test_keeps_the_largest_filters():
    model = slimcnn.create("cifar_vgg16")
    x = torch.randn(2, 3, 32, 32)
    conv = model.features[0]
    with torch.no_grad():  # make filter norms of the first conv distinct and known: filter i has norm ~ i
        conv.weight.copy_(torch.arange(1, 65, dtype=torch.float).view(64, 1, 1, 1).expand_as(conv.weight) / 64)
    m = L1Pruning(target_macs=0.5, scorer="l1")
    m.prepare(model, x)
    group = next(g for g in channel_groups(model, x) if any(mm.module == "features.0" for mm in g.members))
    scores = l1_scores(model, group)
    assert torch.all(scores[1:] > scores[:-1])
    small = m.finalize(model)
    kept = small.features[0].out_channels
    # the survivors are the last (largest) filters, in order
    assert torch.allclose(small.features[0].weight, conv.weight[64 - kept:])


@pytest.mark.parametrize("mode", ["uniform", "global"])
@pytest.mark.parametrize("scorer", ["group_l2", "l1"])
def test_hits_target_on_public_resnet20(mode, scorer):
    model = slimcnn.load_checkpoint(slimcnn.create("cifar_resnet20"), RESNET20)
    x = torch.randn(2, 3, 32, 32)
    m = slimcnn.methods.create("l1", target_macs=0.5, mode=mode, scorer=scorer)
    small = m.finalize(m.prepare(model, x))
    ratio = slimcnn.profile(small).macs / slimcnn.profile(model).macs
    assert abs(ratio - 0.5) <= 0.005
    assert small(x).shape == (2, 10)


def test_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        L1Pruning(mode="random")


def test_bad_scorer():
    with pytest.raises(ValueError, match="unknown scorer 'l3'"):
        L1Pruning(scorer="l3")
