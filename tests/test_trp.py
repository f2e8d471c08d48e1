"""TRP: exact decompositions, MACs formulas, energy truncation, nuclear sub-gradient, training on real CIFAR-10."""
from __future__ import annotations

import argparse
import copy
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimcnn.methods import create as create_method
from slimcnn.methods.csgd import relative_distances
from slimcnn.methods.trp import (SCHEMES, TRP, conv_macs, decompose_conv, decomposed_macs, full_rank,
                                 plan_decomposition, select_layers, truncate_, weight_matrices)
from slimcnn.models import create, load_checkpoint
from slimcnn.profile import profile

from conftest import CIFAR, RESNET20 as WEIGHTS

# (Conv2d kwargs, input H, W): plain, strided, padded, biased, grouped, depthwise, dilated, reflect-padded
CONVS = {
    "plain": (dict(in_channels=8, out_channels=12, kernel_size=3), (9, 9)),
    "padded": (dict(in_channels=8, out_channels=12, kernel_size=3, padding=1), (9, 10)),
    "strided_biased": (dict(in_channels=8, out_channels=16, kernel_size=3, stride=2, padding=1, bias=True), (11, 11)),
    "asymmetric": (dict(in_channels=6, out_channels=9, kernel_size=(3, 5), stride=(2, 1), padding=(1, 2),
                        dilation=(1, 2), bias=True), (12, 13)),
    "grouped": (dict(in_channels=8, out_channels=12, kernel_size=3, stride=2, padding=1, groups=4, bias=True), (10, 10)),
    "depthwise": (dict(in_channels=8, out_channels=8, kernel_size=3, padding=1, groups=8), (7, 7)),
    "reflect_same": (dict(in_channels=8, out_channels=12, kernel_size=3, padding="same", padding_mode="reflect",
                          bias=True), (8, 9)),
}


def make_conv(case: str, seed: int = 0) -> tuple[nn.Conv2d, torch.Tensor]:
    kw, (h, w) = CONVS[case]
    torch.manual_seed(seed)
    conv = nn.Conv2d(**kw)
    if conv.bias is not None:
        nn.init.uniform_(conv.bias, -1, 1)
    return conv, torch.randn(2, kw["in_channels"], h, w)


@pytest.mark.parametrize("case", list(CONVS))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_full_rank_reproduces_conv(scheme: str, case: str) -> None:
    conv, x = make_conv(case)
    thin = decompose_conv(conv, scheme)
    assert isinstance(thin, nn.Sequential) and [type(m) for m in thin] == [nn.Conv2d, nn.Conv2d]
    with torch.no_grad():
        diff = (thin(x) - conv(x)).abs().max().item()
    assert diff <= 1e-5, f"{scheme} on {case}: max abs diff {diff:.3g}"


@pytest.mark.parametrize("case", ["padded", "strided_biased", "asymmetric", "grouped"])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_macs_formulas_match_profile(scheme: str, case: str) -> None:
    conv, x = make_conv(case)
    hw = tuple(x.shape[-2:])
    assert conv_macs(conv, hw) == profile(conv, example_input=x[:1]).macs
    for rank in {1, max(1, full_rank(conv, scheme) // 2), full_rank(conv, scheme)}:
        thin = decompose_conv(conv, scheme, rank)
        assert decomposed_macs(conv, scheme, rank, hw) == profile(thin, example_input=x[:1]).macs


def _energy_rank(s: list[float], energy: float) -> int:
    """The rule written out plainly: the smallest k whose leading squared singular values hold ``energy``."""
    total = sum(v * v for v in s)
    acc = 0.0
    for k, v in enumerate(s, start=1):
        acc += v * v
        if acc / total >= energy:
            return k
    return len(s)


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("energy", [0.5, 0.9])
def test_truncation_keeps_energy_rank(scheme: str, energy: float) -> None:
    conv, _ = make_conv("grouped", seed=1)
    before = weight_matrices(conv.weight.detach().double(), scheme, conv.groups)
    s_before = torch.linalg.svdvals(before)
    expected = [_energy_rank(s.tolist(), energy) for s in s_before]
    out = truncate_({"c": conv}, scheme, energy)["c"]
    assert bool(out.ok) and out.ranks.tolist() == expected
    s_after = torch.linalg.svdvals(weight_matrices(conv.weight.detach().double(), scheme, conv.groups))
    for k, s0, s1 in zip(expected, s_before, s_after):
        # rank exactly k, and the kept singular values unchanged (best rank-k approximation)
        assert int((s1 > 1e-5 * s1[0]).sum()) == k
        assert torch.allclose(s1[:k], s0[:k], rtol=1e-4)


def _hand_built_model(scheme: str, nuclear: float) -> tuple[nn.Module, TRP]:
    """Stem conv (skipped), then a 1->1 channel 2x2 conv with kernel [[2, 0], [0, 1]]."""
    model = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
        model[1].weight.copy_(torch.tensor([[[[2.0, 0.0], [0.0, 1.0]]]]))
    method = TRP(scheme=scheme, energy=0.75, nuclear=nuclear)
    method.prepare(model, torch.zeros(1, 1, 3, 3))
    assert method.layers == ["1"]
    return model, method


@pytest.mark.parametrize("scheme,truncated,subgrad", [
    # spatial: the matrix is the kernel itself, singular values 2 and 1; energy 4/5 >= 0.75 keeps one pair
    ("spatial", [[2.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 0.0]]),
    # channel: the matrix is the row [2, 0, 0, 1], rank 1 already: U V^T = row / |row|
    ("channel", [[2.0, 0.0], [0.0, 1.0]], [[2 / 5 ** 0.5, 0.0], [0.0, 1 / 5 ** 0.5]]),
])
def test_nuclear_subgradient_hand_built(scheme: str, truncated: list, subgrad: list) -> None:
    torch.manual_seed(0)
    x = torch.randn(4, 1, 3, 3)
    grads = {}
    for lam in (0.0, 0.1):
        model, method = _hand_built_model(scheme, lam)
        method.before_forward(model, 0)
        assert torch.allclose(model[1].weight[0, 0], torch.tensor(truncated), atol=1e-6)
        model(x).mean().backward()
        method.after_backward(model, 0)
        grads[lam] = model[1].weight.grad.clone()
    added = (grads[0.1] - grads[0.0])[0, 0]
    assert added.shape == (2, 2)
    assert torch.allclose(added, 0.1 * torch.tensor(subgrad), atol=1e-6)


def test_period_and_svd_failure() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 6, 3), nn.Conv2d(6, 6, 3))
    method = TRP(scheme="channel", energy=0.5, period=3)
    method.prepare(model, torch.zeros(1, 3, 9, 9))
    assert method.layers == ["1", "2"]
    with torch.no_grad():
        model[2].weight[0, 0, 0, 0] = float("nan")
    w1 = model[1].weight.detach().clone()
    for step in range(5):
        method.before_forward(model, step)
        if step == 0:  # the healthy layer is truncated, the broken one skipped and left as it was
            assert not torch.equal(model[1].weight, w1)
            assert torch.isnan(model[2].weight[0, 0, 0, 0])
    assert method.truncations == 2 and method.svd_failures == 2  # steps 0 and 3
    state = method.state_dict()
    again = TRP(scheme="channel")
    again.load_state_dict(state)
    assert again.truncations == 2 and again.svd_failures == 2 and again.layers == ["1", "2"]


def test_truncation_is_deterministic() -> None:
    """What keeps DDP ranks identical: identical weights give bit-identical truncations and sub-gradients."""
    a = create("cifar_resnet20")
    b = copy.deepcopy(a)
    names = select_layers(a)
    for scheme in SCHEMES:
        ra = truncate_({n: a.get_submodule(n) for n in names}, scheme, 0.9)
        rb = truncate_({n: b.get_submodule(n) for n in names}, scheme, 0.9)
        for n in names:
            assert torch.equal(a.get_submodule(n).weight, b.get_submodule(n).weight)
            assert torch.equal(ra[n].subgradient, rb[n].subgradient)


@pytest.mark.parametrize("scheme", ["channel", "spatial"])  # nd factorises each filter alone: exact either way
def test_float64_truncation_keeps_equal_filters_equal(scheme: str) -> None:
    """What C-SGD beside TRP needs for a lossless merge: filters made equal stay equal through a truncation to
    within C-SGD's 1e-5 bar. The rank-k projection acts on each filter alone, but its rounding error is relative to
    the whole matrix: for a cluster of small filters it was 2.6e-3 (channel) / 2.9e-3 (spatial) in float32 and
    4e-12 / 4.5e-9 in float64, on ResNet-20's trained weights."""
    model = load_checkpoint(create("cifar_resnet20"), WEIGHTS)
    names = select_layers(model)
    for n in names:  # filters 0-3 made one small cluster, as C-SGD's training makes them
        w = model.get_submodule(n).weight.data
        w[:4] = 1e-3 * w[:4].mean(0, keepdim=True)
    ranks = {n: max(1, full_rank(model.get_submodule(n), scheme) // 3) for n in names}
    truncate_({n: model.get_submodule(n) for n in names}, scheme, 0.9, ranks=ranks, svd_dtype=torch.float64)
    one_cluster = torch.zeros(4, dtype=torch.long)
    for n in names:  # C-SGD's own measure of how far a cluster's rows are from meeting
        assert relative_distances(model.get_submodule(n).weight[:4], one_cluster).max() <= 1e-5, n
    assert TRP(svd_dtype="float64").svd_dtype == torch.float64 and TRP().svd_dtype == torch.float32
    with pytest.raises(ValueError, match="svd_dtype"):
        TRP(svd_dtype="half")


def _train_steps(model: nn.Module, method: TRP, batches, lr: float = 0.01) -> int:
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    model.train()
    step = 0
    for x, y in batches:
        method.before_forward(model, step)
        F.cross_entropy(model(x), y).backward()
        method.after_backward(model, step)
        opt.step()
        opt.zero_grad()
        step += 1
    return step


def _finalize_truncated(model: nn.Module, method: TRP, step: int, x: torch.Tensor) -> tuple[nn.Module, torch.Tensor]:
    """Truncate once more (no optimiser step after it), so the decomposition at those ranks is lossless."""
    method.before_forward(model, step)
    model.eval()
    with torch.no_grad():
        ref = model(x)
    return method.finalize(model), ref


@pytest.fixture(scope="module")
def cifar_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    from slimcnn.data import cifar10_loaders

    loader = cifar10_loaders(CIFAR, batch_size=32, train_limit=64, splits=("train",))
    return list(loader["train"])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_resnet20_trp_training_then_finalize(scheme: str, cifar_batches) -> None:
    model = create("cifar_resnet20")
    load_checkpoint(model, WEIGHTS)
    x = cifar_batches[0][0]
    method = create_method("trp", scheme=scheme, energy=0.6, rank_threshold=1e-4)
    model = method.prepare(model, x)
    steps = _train_steps(model, method, cifar_batches)
    assert method.truncations == steps
    thin, ref = _finalize_truncated(model, method, steps, x)
    with torch.no_grad():
        out = thin(x)
    assert (out - ref).abs().max().item() < 1e-3  # ranks >= the training ranks: the truncated model, exactly
    assert all(isinstance(m, (nn.Conv2d, nn.Sequential)) for n, m in thin.named_modules() if n in method.layers)
    rep = method.report()
    base, small = profile(model).macs, profile(thin).macs
    assert (rep["macs_before"], rep["macs_after"]) == (base, small) and small < base
    layers = {r["name"]: r for r in rep["layers"]}
    assert set(layers) == set(method.layers)
    assert base - small == sum(r["macs_before"] - r["macs_after"] for r in layers.values())
    for name, r in layers.items():
        assert r["scheme"] == scheme and r["rank"] >= method.training_ranks()[name]
        assert profile(thin).layers and r["macs_after"] <= r["macs_before"]
        if r["applied"]:
            assert isinstance(thin.get_submodule(name), nn.Sequential)
    assert not any(p is q for p in model.parameters() for q in thin.parameters())


class IrregularNet(nn.Module):
    """Odd widths, a grouped conv, biases: nothing TRP does may assume the zoo's original widths."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 10, 3, padding=1)
        self.a = nn.Conv2d(10, 14, 3, padding=1, bias=True)
        self.b = nn.Conv2d(14, 22, 3, stride=2, padding=1, groups=2)
        self.c = nn.Conv2d(22, 13, 3, padding=1, bias=True)
        self.head = nn.Linear(13, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.stem, self.a, self.b, self.c):
            x = F.relu(conv(x))
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_irregular_model_trains_and_decomposes(scheme: str) -> None:
    torch.manual_seed(0)
    model = IrregularNet()
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 5, (8,))
    method = TRP(scheme=scheme, energy=0.5, nuclear=1e-3, rank_threshold=1e-4)
    method.prepare(model, x)
    assert method.layers == ["a", "b", "c"]
    steps = _train_steps(model, method, [(x, y)] * 3)
    thin, ref = _finalize_truncated(model, method, steps, x)
    with torch.no_grad():
        assert (thin(x) - ref).abs().max().item() < 1e-4
    rep = method.report()
    assert rep["macs_after"] == profile(thin, (3, 12, 12)).macs < profile(model, (3, 12, 12)).macs


@pytest.mark.parametrize("mode", ["energy", "uniform"])
def test_target_macs_lands_near_target(mode: str) -> None:
    torch.manual_seed(0)
    model = create("cifar_resnet20")
    x = torch.randn(1, 3, 32, 32)
    base = profile(model).macs
    method = TRP(target_macs=0.5, scheme="spatial", target_mode=mode)
    method.prepare(model, x)
    thin = method.finalize(model)
    macs = profile(thin).macs
    assert method.report()["macs_after"] == macs
    assert 0.48 * base <= macs <= 0.5 * base
    with pytest.raises(ValueError, match="least reachable"):
        plan_decomposition(model, x, "spatial", "target_macs", 0.01)


def test_decomposition_applied_only_where_macs_drop() -> None:
    torch.manual_seed(0)
    model = create("cifar_resnet20")
    # threshold 0: full rank everywhere, which never lowers MACs for these layers: nothing is replaced
    plans = plan_decomposition(model, torch.randn(1, 3, 32, 32), "channel", "threshold", 0.0)
    assert plans and all(not p.applied and p.macs_after == p.macs_before for p in plans)
    method = TRP(rank_threshold=0.0)
    method.prepare(model, torch.randn(1, 3, 32, 32))
    thin = method.finalize(model)
    assert not any(isinstance(m, nn.Sequential) and len(m) == 2 and isinstance(m[0], nn.Conv2d)
                   for m in thin.modules())


def test_layer_selection_and_errors() -> None:
    model = create("cifar_resnet20", shortcut="B")
    default = select_layers(model)
    assert "conv1" not in default and not any("shortcut" in n for n in default) and len(default) == 18
    assert select_layers(model, "layer3.*,!layer3.0.*") == [n for n in default if n.startswith("layer3.")
                                                           and not n.startswith("layer3.0.")]
    assert "layer2.0.shortcut.0" in select_layers(model, ["layer2.0.shortcut.*"])
    with pytest.raises(ValueError, match="match no Conv2d"):
        select_layers(model, "nothing.*")
    with pytest.raises(ValueError, match="unknown TRP scheme"):
        TRP(scheme="tucker")
    with pytest.raises(ValueError, match="rank must be between 1 and"):
        decompose_conv(nn.Conv2d(4, 4, 3), "channel", rank=5)
    with pytest.raises(ValueError, match="energy"):
        TRP(energy=1.5)


def test_cli_args_match_constructor() -> None:
    keywords = set(inspect.signature(TRP.__init__).parameters)
    parser = argparse.ArgumentParser()
    for flag, kwargs in TRP.cli_args:
        action = parser.add_argument(flag, **kwargs)
        assert action.dest in keywords and action.default is None
    args = parser.parse_args(["--scheme", "nd", "--energy", "0.8", "--period", "5", "--nuclear", "1e-4",
                              "--decompose-energy", "0.85", "--layers", "layer2.*"])
    method = TRP(**{k: v for k, v in vars(args).items() if v is not None})
    assert (method.scheme, method.period, method.rank_rule) == ("nd", 5, "energy")
    # `slimcnn compress` always passes a target: an explicit rank option wins over it, the target over the default
    assert TRP().rank_rule == "threshold" and TRP().rank_threshold == 0.05
    assert TRP(target_macs=0.5).rank_rule == "target_macs"
    assert TRP(target_macs=0.5, rank_threshold=0.05).rank_rule == "threshold"
    with pytest.raises(ValueError, match="needs target_macs"):
        TRP(rank_rule="target_macs")


def _decomposed_resnet20() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = create("cifar_resnet20")
    x = torch.randn(2, 3, 32, 32)
    method = TRP(scheme="spatial", energy=0.5, rank_threshold=1e-4)
    method.prepare(model, x)
    method.before_forward(model, 0)
    return method.finalize(model).eval(), x


def test_decomposed_model_save_load(tmp_path: Path) -> None:
    from slimcnn import io

    thin, x = _decomposed_resnet20()
    io.save(thin, tmp_path / "thin")
    loaded = io.load(tmp_path / "thin").eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), thin(x))
    assert profile(loaded).macs == profile(thin).macs


def test_decomposed_model_onnx_export(tmp_path: Path) -> None:
    import onnxruntime as ort

    from slimcnn import io

    thin, x = _decomposed_resnet20()
    path = tmp_path / "thin.onnx"
    io.export_onnx(thin, path, x[:1])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: x[:1].numpy()}
    with torch.no_grad():
        expected = thin(x[:1]).numpy()
    assert abs(session.run(None, feed)[0] - expected).max() < 1e-4


@pytest.mark.parametrize("scheme", ["spatial", "channel"])
def test_target_on_trained_weights_holds_ranks_and_lands_within_one_percent(scheme: str, cifar_batches) -> None:
    """Trained weights (where the energy cut used to ratchet ranks down every step): with a target the ranks are
    planned at prepare, training truncates to them and never below, and the factorised net is within 1%."""
    model = load_checkpoint(create("cifar_resnet20"), WEIGHTS)
    x = cifar_batches[0][0]
    base = profile(model).macs
    method = create_method("trp", target_macs=0.5, scheme=scheme)
    model = method.prepare(model, x)
    planned = dict(method._fixed)
    assert planned
    steps = _train_steps(model, method, cifar_batches * 3)
    assert method.truncations == steps == 6
    assert all(method.training_ranks()[n] == r for n, r in planned.items())  # never below the plan
    thin, ref = _finalize_truncated(model, method, steps, x)
    with torch.no_grad():
        assert (thin(x) - ref).abs().max().item() < 1e-3  # the truncated net, factorised exactly
    assert abs(profile(thin).macs / base - 0.5) <= 0.005
    assert {r["name"]: r["rank"] for r in method.report()["layers"] if r["applied"]} == planned


def test_target_resume_keeps_the_planned_ranks() -> None:
    torch.manual_seed(0)
    model, x = create("cifar_resnet20"), torch.randn(1, 3, 32, 32)
    a = TRP(target_macs=0.5, scheme="spatial")
    a.prepare(model, x)
    state = a.state_dict()
    b = TRP(target_macs=0.5, scheme="spatial")
    b.prepare(create("cifar_resnet20"), x)  # other weights: another plan
    b.load_state_dict(state)
    assert b._fixed == a._fixed and [p.rank for p in b._plans] == [p.rank for p in a._plans]
