import copy

import pytest
import torch

import slimcnn
from slimcnn.methods.tp_peer import TorchPruningPeer, shortcut_as_conv
from slimcnn.models import PadShortcut
from conftest import RESNET20


@pytest.fixture(scope="module")
def resnet20():
    return slimcnn.load_checkpoint(slimcnn.create("cifar_resnet20"), RESNET20).eval()


def test_shortcut_conv_is_exact():
    sc = PadShortcut(16, 32, 2, src=[0, 5, 7], dst=[3, 31, 8])
    x = torch.randn(2, 16, 8, 8)
    assert torch.equal(shortcut_as_conv(sc)(x), sc(x))


def test_torch_pruning_alone_breaks_option_a(resnet20):
    """Why the peer needs the conv form: Torch-Pruning 1.6.1 prunes without error and returns a broken net."""
    import torch_pruning as tp

    m, x = copy.deepcopy(resnet20), torch.randn(2, 3, 32, 32)
    tp.pruner.BasePruner(m, x, importance=tp.importance.GroupMagnitudeImportance(p=2), pruning_ratio=0.3,
                         ignored_layers=[m.linear]).step()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        m(x)


@pytest.mark.parametrize("global_pruning", [False, True])
def test_peer_prunes_public_resnet20_to_target(resnet20, global_pruning):
    x = torch.randn(2, 3, 32, 32)
    peer = TorchPruningPeer(target_macs=0.5, global_pruning=global_pruning)
    work = peer.prepare(copy.deepcopy(resnet20), x)
    with torch.no_grad():
        assert torch.allclose(work(x), resnet20(x), atol=1e-5)  # conversion is lossless
    assert not any(isinstance(m, PadShortcut) for m in work.modules())
    small = peer.finalize(work)
    ratio = slimcnn.profile(small).macs / slimcnn.profile(resnet20).macs
    # uniform per-layer ratios move MACs in steps; mixing two ratios lands within the same 1% as our rows
    assert abs(ratio - 0.5) <= 0.005 and small(x).shape == (2, 10)
    rep = peer.report()["tp"]
    assert rep["shortcuts_converted"] == 2 and rep["within_tol"] and rep["frozen_shortcuts"] == 2


def test_peer_shortcuts_stay_frozen_through_a_fine_tune_step(resnet20):
    """Fairness: Torch-Pruning hands back every pruned weight as a new trainable Parameter; the shortcut
    embeddings must not become extra trainable weights the other rows do not have."""
    from slimcnn.engine import TrainConfig, train

    x = torch.randn(8, 3, 32, 32)
    peer = TorchPruningPeer(target_macs=0.5)
    small = peer.finalize(peer.prepare(copy.deepcopy(resnet20), x))
    shortcuts = {n: small.get_submodule(n).weight.detach().clone() for n in peer.shortcuts}
    assert len(shortcuts) == 2
    assert all(not small.get_submodule(n).weight.requires_grad for n in shortcuts)
    batch = [(x, torch.randint(0, 10, (8,)))]
    train(small, batch, TrainConfig(epochs=1, lr=0.1, weight_decay=5e-4, progress=False))
    for n, w in shortcuts.items():
        assert torch.equal(small.get_submodule(n).weight, w), n


def test_peer_fails_clearly_when_it_cannot_reach_the_target(resnet20):
    from slimcnn.graph import SurgeryError

    peer = TorchPruningPeer(target_macs=0.001)
    with pytest.raises(SurgeryError, match="cannot land within 1% of"):
        peer.finalize(peer.prepare(copy.deepcopy(resnet20), torch.randn(2, 3, 32, 32)))


def test_round_to_scan_lands_where_the_ratio_bisection_misses():
    # with round_to=8 Torch-Pruning's MACs are not monotone in its ratio; at 0.42 on ResNet-20 the bisection and its
    # split point alone stop at 0.436 of the base MACs (measured), the scan of ratios and split points reaches 0.419
    from slimcnn.profile import profile
    from slimcnn.report import alignment

    torch.manual_seed(0)
    model, x = slimcnn.create("cifar_resnet20").eval(), torch.randn(1, 3, 32, 32)
    peer = TorchPruningPeer(target_macs=0.42, round_to=8)
    small = peer.finalize(peer.prepare(copy.deepcopy(model), x))
    ratio = profile(small, example_input=x).macs / profile(model, example_input=x).macs
    assert abs(ratio - 0.42) <= 0.01 * 0.42, ratio
    assert peer.result["within_tol"] is True
    assert alignment(small, 8)["unaligned"] == {"linear": 10}
