"""Aligned widths (``round_to``, ``--round-to``): every method keeps multiples of N channels (or ranks) where a
group is at least N wide, the MACs search still lands within 1% where aligned steps allow it, and the report
counts the aligned layers. ``round_to=None`` / ``1`` change nothing."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from slimcnn import methods
from slimcnn.cli import main
from slimcnn.graph import TargetError, allocate_widths, channel_groups, prune_to_target
from slimcnn.graph.costs import cost_model
from slimcnn.graph.targeting import aligned_widths, check_round_to, snap_width
from slimcnn.models import create
from slimcnn.profile import profile
from slimcnn.report import alignment
from conftest import CIFAR, RESNET20


def test_allowed_widths_and_snapping():
    assert aligned_widths(64, 8) == [8, 16, 24, 32, 40, 48, 56, 64]
    assert aligned_widths(20, 8) == [8, 16, 20]              # the whole group is always allowed
    assert aligned_widths(6, 8) == [1, 2, 3, 4, 5, 6]        # narrower than N: the normal rule
    assert aligned_widths(32, 8, floor=12) == [16, 24, 32]   # a --min-keep floor rounds up
    assert [snap_width([8, 16, 24], w) for w in (1, 11, 12, 20, 99)] == [8, 8, 16, 24, 24]
    assert check_round_to(None) is None and check_round_to(1) is None and check_round_to(8) == 8
    for bad in (0, -8, 2.5, True):
        with pytest.raises(ValueError, match="positive integer"):
            check_round_to(bad)


@pytest.mark.parametrize("mode", ["uniform", "global"])
def test_no_rounding_is_unchanged(mode):
    torch.manual_seed(0)
    model, x = create("cifar_resnet20").eval(), torch.randn(1, 3, 32, 32)
    groups = channel_groups(model, x)
    scores = {g.key: torch.rand(g.size) for g in groups if g.prunable}
    plain = allocate_widths(model, x, 0.5, mode, scores, groups=groups)
    assert allocate_widths(model, x, 0.5, mode, scores, groups=groups, round_to=None) == plain
    assert allocate_widths(model, x, 0.5, mode, scores, groups=groups, round_to=1) == plain
    assert any(w % 8 for w in plain.values())  # else this test would not tell rounding from no rounding


def _method(name: str, **kw):
    return methods.create(name.split(":")[0], target_macs=0.5, round_to=8, **kw)


CASES = [("l1", {}), ("l1:global", {"mode": "global"}), ("dagger", {}), ("csgd", {"cluster": "even"}),
         ("trp", {"scheme": "channel"}), ("tp", {})]


@pytest.mark.parametrize("name,kw", CASES, ids=[c[0] for c in CASES])
def test_every_method_keeps_multiples_of_8_at_half_the_macs(name, kw):
    torch.manual_seed(0)
    model, x = create("cifar_resnet20").eval(), torch.randn(2, 3, 32, 32)
    base = profile(model, example_input=x[:1]).macs
    m = _method(name, **kw)
    small = m.finalize(m.prepare(model, x))
    macs = profile(small, example_input=x[:1]).macs
    assert abs(macs - 0.5 * base) <= 0.01 * 0.5 * base, macs / base  # reachable on ResNet-20 with steps of 8
    counted = alignment(small, 8)
    assert counted["unaligned"] == {"linear": 10}, counted  # only the 10-class head, which no method prunes
    assert counted["aligned_layers"] == counted["layers"] - 1
    if name == "trp":
        plans = m.report()["layers"]
        assert any(p["applied"] for p in plans)
        assert all(p["rank"] % 8 == 0 for p in plans if p["applied"])


@pytest.mark.parametrize("mode", ["uniform", "global"])
def test_resnet56_lands_within_one_percent(mode):
    torch.manual_seed(0)
    model, x = create("cifar_resnet56").eval(), torch.randn(1, 3, 32, 32)
    groups = channel_groups(model, x)
    scores = {g.key: torch.rand(g.size) for g in groups if g.prunable}
    small = prune_to_target(model, x, scores, 0.5, mode=mode, groups=groups, round_to=8)
    base = profile(model, example_input=x).macs
    assert abs(profile(small, example_input=x).macs - 0.5 * base) <= 0.005 * base
    assert alignment(small, 8)["unaligned"] == {"linear": 10}


def _two_convs() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10)).eval()


def test_unreachable_tolerance_gives_the_closest_and_a_too_low_target_one_error():
    torch.manual_seed(0)
    model, x = _two_convs(), torch.randn(1, 3, 16, 16)
    groups = channel_groups(model, x)
    cm = cost_model(model, x, groups)
    scores = {g.key: torch.rand(g.size) for g in groups if g.prunable}
    # each group may keep 8 or 16 channels: four combinations, none within 1% of 0.7
    options = sorted(cm.macs_at(dict(zip(scores, (a, b)))) / cm.total for a in (8, 16) for b in (8, 16))
    assert all(abs(r - 0.7) > 0.007 for r in options)
    widths = allocate_widths(model, x, 0.7, "uniform", groups=groups, round_to=8)
    got = cm.macs_at(widths) / cm.total
    assert set(widths.values()) <= {8, 16} and abs(got - 0.7) == min(abs(r - 0.7) for r in options)
    small = prune_to_target(model, x, scores, 0.7, mode="global", groups=groups, round_to=8)  # no error
    assert abs(profile(small, example_input=x).macs / cm.total - got) < 0.05
    with pytest.raises(TargetError, match="round-to 8"):
        allocate_widths(model, x, 0.1, "uniform", groups=groups, round_to=8)


def test_cli_round_to(tmp_path, capsys):
    assert main(["compress", "--method", "l1", "--model", "cifar_resnet20", "--data", "/nonexistent",
                 "--round-to", "0", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "positive integer" in err and not (tmp_path / "bad").exists()
    out = tmp_path / "l1"
    assert main(["compress", "--method", "l1", "--model", "cifar_resnet20", "--weights", str(RESNET20),
                 "--data", str(CIFAR), "--train-limit", "64", "--test-limit", "50", "--bn-recalib", "1",
                 "--no-latency", "--round-to", "8", "--out", str(out)]) == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["within_tol"] and rep["round_to"] == 8 and rep["config"]["round_to"] == 8
    assert rep["alignment"] == {"round_to": 8, "multiple": 8, "aligned_layers": 19, "layers": 20,
                                "unaligned": {"linear": 10}, "base_aligned_layers": 19}
    assert "Aligned widths (--round-to 8): 19 of 20" in (out / "report.md").read_text()


def test_modelopt_takes_round_to_as_its_channel_divisor():
    pytest.importorskip("modelopt")
    from slimcnn.methods.modelopt_peer import ModelOptPeer

    assert ModelOptPeer(round_to=8).divisor == 8 and ModelOptPeer(round_to=8, divisor=8).divisor == 8
    assert ModelOptPeer().divisor is None  # without it: the largest divisor that reaches the target, as before
    with pytest.raises(ValueError, match="two different channel divisors"):
        ModelOptPeer(round_to=8, divisor=16)
