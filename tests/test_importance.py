import pytest
import torch
from torch import nn

import slimcnn
from slimcnn.graph import channel_groups
from slimcnn.importance import SCORERS, group_l2_scores, group_rows, l1_scores, score

FAMILIES = [("cifar_resnet20", 32), ("cifar_vgg16", 32), ("tv:resnet18", 64), ("tv:mobilenet_v2", 64),
            ("tv:densenet121", 64), ("tv:efficientnet_b0", 64)]


def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 2))


def test_group_rows_cover_producers_consumers_and_norms():
    model, x = _tiny(), torch.randn(2, 3, 8, 8)
    g = next(g for g in channel_groups(model, x) if g.key == "0")
    kinds = {(name, kind) for name, kind, rows in group_rows(model, g)}
    assert kinds == {("0", "out_weight"), ("1", "bn_weight"), ("1", "bn_bias"), ("3", "in_weight")}
    assert all(rows.shape[0] == 4 for _, _, rows in group_rows(model, g))


def test_group_l2_by_hand():
    model, x = _tiny(), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-1, 1)
    g = next(g for g in channel_groups(model, x) if g.key == "0")
    parts = [model[0].weight.flatten(1).pow(2).sum(1), model[1].weight.pow(2), model[1].bias.pow(2),
             model[3].weight[:, :, 0, 0].t().pow(2).sum(1)]
    assert torch.allclose(group_l2_scores(model, g), torch.stack(parts).mean(0).detach())
    # the paper's L1 reads the producer only: mean |w| per filter
    assert torch.allclose(l1_scores(model, g), model[0].weight.abs().flatten(1).mean(1).detach())


def test_group_l2_sees_consumers():
    model, x = _tiny(), torch.randn(2, 3, 8, 8)
    g = next(g for g in channel_groups(model, x) if g.key == "0")
    before = group_l2_scores(model, g)
    with torch.no_grad():
        model[3].weight[:, 2] *= 10  # channel 2 is read ten times harder by the next layer
    after = group_l2_scores(model, g)
    assert after[2] > before[2] and torch.allclose(after[[0, 1, 3]], before[[0, 1, 3]])


@pytest.mark.parametrize("name,size", FAMILIES)
@pytest.mark.parametrize("scorer", sorted(SCORERS))
def test_every_scorer_on_every_family(name, size, scorer):
    model = slimcnn.create(name, num_classes=10)
    x = torch.randn(1, 3, size, size)
    groups = [g for g in channel_groups(model, x) if g.prunable]
    assert groups
    for g in groups:
        s = score(scorer, model, g)
        assert s.shape == (g.size,) and torch.isfinite(s).all() and (s >= 0).all()


def test_unknown_scorer():
    with pytest.raises(ValueError, match="unknown scorer 'nope'; choose one of group_l2, l1"):
        score("nope", _tiny(), None)
