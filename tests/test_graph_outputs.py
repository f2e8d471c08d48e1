"""Outputs of any structure and branches that run only in training (issue 38, items 1 and 3).

The trace, the output checks and the surgery validation read every tensor of a nested output, and cover train
mode as well as eval mode: a pruned net must run, and match its original, in both.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimcnn import methods
from slimcnn.graph import SurgeryError, channel_groups, reference_output, remove_channels, validate
from slimcnn.outputs import output_items
from slimcnn.profile import profile


def conv_bn(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and BatchNorm statistics, so that a channel mix-up shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


class MultiHead(nn.Module):
    """A detector-like net: ``(logits, {"box": ..., "cls": ...}, [stem head])``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = nn.Sequential(conv_bn(3, 16), conv_bn(16, 32)), conv_bn(32, 64, 2)
        self.box, self.cls, self.extra = nn.Conv2d(64, 4, 1), nn.Conv2d(64, 5, 1), nn.Conv2d(32, 2, 1)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor):
        s = self.stem(x)
        f = self.body(s)
        return self.fc(f.mean((2, 3))), {"box": self.box(f), "cls": self.cls(f)}, [self.extra(s)]


class AuxNet(nn.Module):
    """An auxiliary head on the stem that runs only in training, as GoogLeNet's; dropout before the classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body = conv_bn(3, 16), conv_bn(16, 32, 2)
        self.drop, self.fc = nn.Dropout(0.5), nn.Linear(32, 10)
        self.aux = nn.Sequential(nn.Conv2d(16, 8, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(8, 10))

    def forward(self, x: torch.Tensor):
        s = self.stem(x)
        out = self.fc(self.drop(self.body(s).mean((2, 3))))
        return (out, self.aux(s)) if self.training else out


def shapes(out) -> list[tuple[str, tuple[int, ...]]]:
    return [(p, tuple(t.shape)) for p, t in output_items(out)]


def run_both(model: nn.Module, x: torch.Tensor) -> dict[str, list]:
    """Output paths and shapes in each mode (the model is left in eval mode)."""
    found = {}
    for mode in ("train", "eval"):
        model.train(mode == "train")
        with torch.no_grad():
            found[mode] = shapes(model(torch.cat([x, x])))
    model.eval()
    return found


def l1_half(model: nn.Module, x: torch.Tensor) -> nn.Module:
    method = methods.create("l1", target_macs=0.5)
    return method.finalize(method.prepare(model, x))


def test_nested_output_is_pruned_and_checked_whole() -> None:
    torch.manual_seed(0)
    model, x = randomise(MultiHead()), torch.randn(1, 3, 16, 16)
    small = l1_half(model, x)
    assert run_both(small, x) == run_both(model, x)
    ratio = profile(small, example_input=x).macs / profile(model, example_input=x).macs
    assert abs(ratio - 0.5) <= 0.01 * 0.5
    # every head's channels are part of the output: none of them was pruned
    assert (small.box.out_channels, small.cls.out_channels, small.extra.out_channels) == (4, 5, 2)
    assert small.extra.in_channels == small.stem[1][0].out_channels < 32


def test_validation_compares_every_tensor_of_a_nested_output() -> None:
    model, x = randomise(MultiHead()), torch.randn(2, 3, 16, 16)
    ref = reference_output(model, x)
    assert list(ref.modes["eval"]) == ["[0]", "[1]['box']", "[1]['cls']", "[2][0]"]
    changed = copy.deepcopy(model)
    with torch.no_grad():
        changed.cls.bias[0] += 1.0  # the prediction ([0]) stays as it was
    with pytest.raises(SurgeryError, match=r"differ by 1 in eval mode, output \[1\]\['cls'\]"):
        validate(changed, x, ref, "a changed head", lossless_tol=1e-6)
    validate(copy.deepcopy(model), x, ref, "a copy", lossless_tol=0.0)


def test_a_missed_head_consumer_makes_surgery_raise() -> None:
    model, x = randomise(MultiHead()), torch.randn(2, 3, 16, 16)
    groups = copy.deepcopy(channel_groups(model, x))
    stem = next(g for g in groups if g.key == "stem.1.0")
    assert "extra" in {m.module for m in stem.consumers}
    stem.members = [m for m in stem.members if m.module != "extra"]  # as if the trace had missed that head
    with pytest.raises(SurgeryError, match=r"in eval mode at extra \(Conv2d\)"):
        remove_channels(model, x, {"stem.1.0": list(range(0, 32, 2))}, groups=groups)


def test_train_only_branch_is_traced_and_pruned() -> None:
    torch.manual_seed(0)
    model, x = randomise(AuxNet()), torch.randn(1, 3, 16, 16)
    stem = next(g for g in channel_groups(model, x) if g.key == "stem.0")
    assert "aux.0" in {m.module for m in stem.consumers}
    small = l1_half(model, x)
    assert small.aux[0].in_channels == small.stem[0].out_channels < 16
    assert run_both(small, x) == run_both(model, x)


class TwoWays(nn.Module):
    """Each mode has a head the other lacks: both graphs must be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.fc = conv_bn(3, 16), nn.Linear(16, 10)
        self.train_head, self.eval_head = nn.Conv2d(16, 4, 1), nn.Conv2d(16, 6, 1)

    def forward(self, x: torch.Tensor):
        s = self.stem(x)
        return self.fc(s.mean((2, 3))), (self.train_head(s) if self.training else self.eval_head(s))


def test_branches_of_either_mode_are_traced() -> None:
    model, x = randomise(TwoWays()), torch.randn(2, 3, 8, 8)
    stem = next(g for g in channel_groups(model, x) if g.key == "stem.0")
    assert {"train_head", "eval_head", "fc"} <= {m.module for m in stem.consumers}
    small = remove_channels(model, x, {"stem.0": [1, 4, 9]})
    assert (small.train_head.in_channels, small.eval_head.in_channels) == (3, 3)


def test_surgery_checks_train_mode() -> None:
    model, x = randomise(AuxNet()), torch.randn(2, 3, 16, 16)
    groups = copy.deepcopy(channel_groups(model, x))
    stem = next(g for g in groups if g.key == "stem.0")
    stem.members = [m for m in stem.members if m.module != "aux.0"]  # the eval-only trace of before
    with pytest.raises(SurgeryError, match=r"in train mode at aux\.0 \(Conv2d\)"):
        remove_channels(model, x, {"stem.0": [0, 3, 5, 9]}, groups=groups)


def test_trace_and_checks_leave_the_model_and_the_random_stream_alone() -> None:
    model, x = randomise(AuxNet()), torch.randn(2, 3, 16, 16)
    model.train()
    model.body[1].eval()  # a mixed state (a frozen norm) must come back as it was
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    rng = torch.get_rng_state()
    remove_channels(model, x, {"stem.0": [0, 3, 5, 9]})
    assert [m.training for m in model.modules()] == flags
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)


class FunctionalDropout(nn.Module):
    """A train-mode forward that draws random numbers over a pruned tensor: compared by shape only."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.body, self.fc = conv_bn(3, 16), conv_bn(16, 32, 2), nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = F.dropout(self.stem(x), 0.5, self.training)
        return self.fc(self.body(s).mean((2, 3)))


def test_random_train_forward_is_compared_by_shape() -> None:
    model, x = randomise(FunctionalDropout()), torch.randn(2, 3, 16, 16)
    small = remove_channels(model, x, {"stem.0": [0, 3, 5, 9]})
    assert small.body[0].in_channels == 4


class EvalOnly(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem, self.fc = conv_bn(3, 8), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("this net only runs in eval mode")
        return self.fc(self.stem(x).mean((2, 3)))


def test_a_model_that_cannot_train_is_traced_and_checked_in_eval_mode_with_a_warning() -> None:
    model, x = randomise(EvalOnly()), torch.randn(2, 3, 8, 8)
    with pytest.warns(UserWarning, match="does not run in train mode"):
        groups = channel_groups(model, x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = remove_channels(model, x, {"stem.0": [1, 2]}, groups=groups)
    assert small.fc.in_features == 2


@pytest.mark.slow
@pytest.mark.parametrize("name,size", [("googlenet", 96), ("inception_v3", 299)])
def test_torchvision_aux_heads_survive_pruning(name: str, size: int) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    with warnings.catch_warnings():  # torchvision warns about init_weights and small inputs
        warnings.simplefilter("ignore")
        model = getattr(torchvision.models, name)(aux_logits=True, init_weights=False, num_classes=10).eval()
        x = torch.randn(1, 3, size, size)  # a batch of one: train mode runs at two (see slimcnn.graph.modes)
        small = l1_half(model, x)
        assert run_both(small, x) == run_both(model, x)
    assert profile(small, example_input=x).macs <= 0.51 * profile(model, example_input=x).macs
