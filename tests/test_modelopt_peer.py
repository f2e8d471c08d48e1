"""The ModelOpt FastNAS peer on the public ResNet-20 and a tiny real CIFAR-10 subset."""
import copy
import importlib.util
import sys

import pytest
import torch

import slimcnn
from slimcnn.data import Loader, balanced_subset, load_cifar10
from slimcnn.graph.validate import SurgeryError
from slimcnn.methods.modelopt_peer import ModelOptMissing, ModelOptPeer, _modelopt
from conftest import RESNET20

needs_modelopt = pytest.mark.skipif(importlib.util.find_spec("modelopt") is None,
                                    reason='ModelOpt not installed (pip install -e ".[peers]")')


@pytest.fixture(scope="module")
def resnet20():
    return slimcnn.load_checkpoint(slimcnn.create("cifar_resnet20"), RESNET20).eval()


@pytest.fixture(scope="module")
def train_loader(cifar_root):
    train = load_cifar10(cifar_root, "train", progress=False)
    return Loader(train.subset(balanced_subset(train.labels, 100, 0)), 50, shuffle=True, augment=True)


@needs_modelopt
@pytest.mark.slow
def test_fastnas_lands_on_target_keeps_shortcuts_frozen_and_round_trips(resnet20, train_loader, tmp_path):
    # divisor 16 keeps the search space small (7 searchable widths) so the search takes seconds; 0.7 is within its
    # reach on ResNet-20 (its smallest subnet is 0.527 of the base)
    x = torch.randn(2, 3, 32, 32)
    peer = ModelOptPeer(target_macs=0.7, divisor=16, score_images=100)
    work = peer.prepare(copy.deepcopy(resnet20), x, train_loader=train_loader)
    small = peer.finalize(work)
    ratio = slimcnn.profile(small).macs / slimcnn.profile(resnet20).macs
    assert abs(ratio - 0.7) <= 0.01 * 0.7
    rep = peer.report()["modelopt"]
    assert rep["score_images"] == 100 and rep["divisor"] == 16 and rep["within_tol"] and rep["search_s"] > 0
    assert rep["shortcuts_converted"] == 2

    frozen = {n: p.detach().clone() for n, p in small.named_parameters() if not p.requires_grad}
    assert sorted(frozen) == ["layer2.0.shortcut.weight", "layer3.0.shortcut.weight"]
    small.train()
    opt = torch.optim.SGD(small.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    xb, yb = next(iter(train_loader))
    torch.nn.functional.cross_entropy(small(xb), yb).backward()
    opt.step()
    for n, p in small.named_parameters():
        if n in frozen:
            assert not p.requires_grad and torch.equal(p, frozen[n])

    small.eval()
    slimcnn.save(small, tmp_path / "m")
    again = slimcnn.load(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(again(x), small(x))


@needs_modelopt
def test_unreachable_target_names_the_smallest_subnet(resnet20, train_loader):
    peer = ModelOptPeer(target_macs=0.5, divisor=16, score_images=50)
    work = peer.prepare(copy.deepcopy(resnet20), torch.randn(2, 3, 32, 32), train_loader=train_loader)
    with pytest.raises(SurgeryError, match=r"out of FastNAS's reach with channel divisor 16: its smallest subnet "
                                           r"has 21\.\d\dM MACs \(0\.5\d\d\)"):
        peer.finalize(work)


def test_needs_data_and_says_so(resnet20):
    if importlib.util.find_spec("modelopt") is None:
        pytest.skip("ModelOpt not installed")
    peer = ModelOptPeer(score_images=50)
    work = peer.prepare(copy.deepcopy(resnet20), torch.randn(2, 3, 32, 32))
    with pytest.raises(ValueError, match="train_loader"):
        peer.finalize(work)


def test_without_modelopt_one_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "modelopt" else real(name, *a))
    with pytest.raises(ModelOptMissing, match=r'pip install -e "\.\[peers\]"'):
        slimcnn.methods.create("modelopt")
    for name in ("modelopt", "modelopt.torch.nas", "modelopt.torch.prune"):  # imports fail, as when not installed
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ModelOptMissing, match=r'pip install -e "\.\[peers\]"'):
        _modelopt()
