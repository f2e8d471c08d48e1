"""The contract every registered method keeps, checked the same way for each: prepare -> a few training steps with
the hooks -> finalize -> MACs within 1% of the target -> save/load gives the same outputs -> ONNX export whose
onnxruntime output matches.

Runs on the embedded ResNet-20 checkpoint and CIFAR-10 subset that ship in the package (slimcnn/assets), so it
needs nothing from ../shared: trained weights matter to Dagger's gates, TRP's ranks and the peers' scores.
A method registered later is picked up by the parametrisation; give it an entry in OPTIONS only if it needs
options to land in a few steps.
"""
from __future__ import annotations

import copy
import importlib.util

import pytest
import torch
import torch.nn.functional as F

import slimcnn
from slimcnn import methods
from slimcnn.data import Loader, balanced_subset
from slimcnn.data.embedded import DEMO_WEIGHTS, load_demo
from slimcnn.io import export_onnx

TARGET = 0.5
STEPS = 3
LR = 0.01
INPUT = (3, 32, 32)

#: options that let a method finish within STEPS steps on a tiny batch; each says why
OPTIONS: dict[str, dict] = {
    # the default scores every subnet on 1,000 images; 64 (the bench smoke budget's figure; at least ModelOpt's 50
    # BN-recalibration batches) keep the search short, and the MACs it lands on do not depend on the scores.
    # Divisor 4 is where the default search (32, 16, 8, 4, ...) lands 0.5 on ResNet-20 with 64 images (16's
    # smallest subnet is 0.527, 8 stops 3% short): given, it spares the statistics of the spaces tried first.
    "modelopt": {"score_images": 64, "divisor": 4},
}
#: optional dependency of a method: skipped, with the reason, when it is not installed
OPTIONAL = {"modelopt": ("modelopt", 'ModelOpt not installed (pip install -e ".[peers]")')}
#: the peers' searches take tens of seconds; the rest a few seconds each
SLOW = {"modelopt"}


def _param(name: str):
    marks = [pytest.mark.slow] if name in SLOW else []
    if name in OPTIONAL and importlib.util.find_spec(OPTIONAL[name][0]) is None:
        marks.append(pytest.mark.skip(reason=OPTIONAL[name][1]))
    return pytest.param(name, marks=marks, id=name)


@pytest.fixture(scope="module")
def base() -> torch.nn.Module:
    return slimcnn.load_checkpoint(slimcnn.create("cifar_resnet20"), DEMO_WEIGHTS).eval()


@pytest.fixture(scope="module")
def loader() -> Loader:
    train = load_demo("train")
    return Loader(train.subset(balanced_subset(train.labels, 64, seed=0)), 16, shuffle=True, augment=True, seed=0)


def prepare(method: methods.Method, model: torch.nn.Module, x: torch.Tensor, loader: Loader) -> torch.nn.Module:
    """``prepare`` with what the pipeline offers a method (the training length for schedules, the loader for
    the data-scored peers), each passed only to a method that declares it (``Method.prepare_inputs``)."""
    offered = {"total_steps": STEPS, "lr": LR, "schedule": "constant", "train_loader": loader}
    return method.prepare(model, x, **{k: v for k, v in offered.items() if k in type(method).prepare_inputs})


def train_steps(method: methods.Method, model: torch.nn.Module, loader: Loader) -> None:
    """The loop of the method interface (DESIGN.md), every hook in its place."""
    model.train()
    opt = torch.optim.SGD(method.param_groups(model, lr=LR, weight_decay=5e-4), lr=LR, momentum=0.9)
    batches = iter(loader)
    for step in range(STEPS):
        x, y = next(batches)
        method.before_forward(model, step)
        loss = F.cross_entropy(model(x), y) + method.loss(model)
        loss.backward()
        method.after_backward(model, step)
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_step(model, step)


@pytest.mark.parametrize("name", [_param(n) for n in methods.list_methods()])
def test_method_contract(name: str, base: torch.nn.Module, loader: Loader, tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(2, *INPUT, generator=torch.Generator().manual_seed(0))
    before = copy.deepcopy(base.state_dict())
    method = methods.create(name, target_macs=TARGET, **OPTIONS.get(name, {}))
    model = prepare(method, copy.deepcopy(base), x, loader)
    train_steps(method, model, loader)
    compact = method.finalize(model).eval()
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items()), "the caller's model changed"

    # physically smaller, to the target: the same counter as the reports
    ratio = slimcnn.profile(compact, INPUT).macs / slimcnn.profile(base, INPUT).macs
    assert abs(ratio - TARGET) <= 0.01 * TARGET, f"{name}: MACs ratio {ratio:.4f}, target {TARGET}"
    # no method traces left: no hooks, no patched forwards
    for mod_name, mod in compact.named_modules():
        assert not (mod._forward_hooks or mod._forward_pre_hooks or mod._backward_hooks), mod_name
        assert "forward" not in vars(mod), mod_name

    probe = torch.randn(4, *INPUT, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = compact(probe)
    assert out.shape == (4, 10) and torch.isfinite(out).all()

    slimcnn.save(compact, tmp_path / "m")
    loaded = slimcnn.load(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.equal(loaded(probe), out), f"{name}: outputs differ after save/load"

    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(compact, tmp_path / "m.onnx", x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    onnx_out = sess.run(None, {sess.get_inputs()[0].name: probe.numpy()})[0]
    assert onnx_out.shape == (4, 10)  # the batch axis is dynamic: exported at 2, run at 4
    assert torch.allclose(torch.from_numpy(onnx_out), out, rtol=1e-4, atol=1e-4), \
        f"{name}: onnxruntime differs by {(torch.from_numpy(onnx_out) - out).abs().max():.2e}"
