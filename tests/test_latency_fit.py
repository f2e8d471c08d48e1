"""The MACs target at which a method's own compact net measures a latency goal (slimcnn/latency_fit.py).

No timing here: the latency of a net is a fixed function of its MACs (a stand-in *cost table*, as the issue asks
of unit tests), so the search is checked exactly; the real timing is the one every other latency figure uses.
"""
from __future__ import annotations

import pytest
import torch

from conftest import RESNET20
import slimcnn
from slimcnn import methods
from slimcnn.graph.latency import LatencyGoal
from slimcnn.latency_fit import fit_macs_to_latency, next_target
from slimcnn.profile import profile

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def trained() -> torch.nn.Module:
    return slimcnn.load_checkpoint(slimcnn.create("cifar_resnet20"), RESNET20).eval()


@pytest.fixture(scope="module")
def base():
    return trained()


def cost_table(base_macs: int):
    """Latency ratio of a net from its MACs: a fixed per-call part and a part that grows faster than the MACs
    (what a runtime with less efficient narrow kernels looks like)."""
    return lambda net: 0.2 + 0.8 * (profile(net, (3, 32, 32)).macs / base_macs) ** 0.8


def test_next_target_moves_towards_the_goal_and_stays_in_range():
    assert next_target([(0.5, 0.8)], 0.6) < 0.5 < next_target([(0.5, 0.4)], 0.6)
    # a secant that does not rise (noise) falls back to proportional scaling from the last probe, so the search
    # moves on instead of probing the same target again
    assert next_target([(0.436, 0.644), (0.406, 0.649)], 0.6) == pytest.approx(0.406 * 0.6 / 0.649)
    assert next_target([(0.03, 0.9)], 0.01) == 0.02 and next_target([(0.9, 0.1)], 0.9) == 0.995


@pytest.mark.parametrize("name", ["l1", "csgd"])
def test_the_fit_lands_the_method_own_net_on_the_goal(base, name):
    measure = cost_table(profile(base, (3, 32, 32)).macs)
    goal = LatencyGoal(0.6)
    make = lambda m: methods.create(name, target_macs=m, round_to=8)  # noqa: E731
    target, record = fit_macs_to_latency(make, base, X, goal, start=0.45, prepare_kwargs={}, measure=measure)
    assert record["within_tol"] and len(record["probes"]) <= 4
    assert record["chosen"]["macs_target"] == target
    # the first guess missed (0.45 of the MACs measures 0.2 + 0.8 * 0.45 ** 0.8 = 0.622): it was moved
    assert record["probes"][0]["macs_target"] == 0.45 and abs(record["probes"][0]["ratio"] - 0.6) > 0.018
    # the chosen target rebuilds a net that measures the goal: the probe is the structure the run trains
    from slimcnn.latency_fit import probe

    assert measure(probe(make, base, X, target, {})) == pytest.approx(0.6, rel=0.03)
    # the base is left as it was
    fresh = trained().state_dict()
    assert not base.training and all(torch.equal(v, fresh[k]) for k, v in base.state_dict().items())


def test_the_fit_stops_at_the_first_probe_within_tolerance(base):
    measure = cost_table(profile(base, (3, 32, 32)).macs)
    start = ((0.6 - 0.2) / 0.8) ** (1 / 0.8)  # where the table gives exactly 0.6
    _, record = fit_macs_to_latency(lambda m: methods.create("l1", target_macs=m), base, X, LatencyGoal(0.6),
                                    start=start, prepare_kwargs={}, measure=measure)
    assert len(record["probes"]) == 1


def test_a_goal_in_milliseconds_is_refused(base):
    with pytest.raises(ValueError, match="ratio"):
        fit_macs_to_latency(lambda m: methods.create("l1", target_macs=m), base, X, LatencyGoal(3.0, "ms"),
                            start=0.5, prepare_kwargs={})


def test_a_fit_that_misses_says_so_in_one_line(base, capsys):
    """A latency the net cannot reach within its probes: the nearest probe is kept and a warning names it."""
    _, record = fit_macs_to_latency(lambda m: methods.create("l1", target_macs=m), base, X, LatencyGoal(0.6),
                                    start=0.5, prepare_kwargs={}, probes=1, measure=lambda net: 0.9)
    assert not record["within_tol"] and record["chosen"]["ratio"] == 0.9
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "measured 0.900 of the base" in warnings[0]


def test_a_target_the_method_cannot_build_sends_the_search_back_up(base):
    """A net whose measured latency stays above the goal drives the target down until the method refuses it
    (L1 with aligned widths): the refusal is recorded and the search goes back up halfway."""
    macs = profile(base, (3, 32, 32)).macs

    def measure(net):  # a floor no pruning gets under: every target below it is a miss, the search keeps lowering
        return 0.5 + 0.5 * profile(net, (3, 32, 32)).macs / macs

    # widths in multiples of 8 leave ResNet-20 no net below about a tenth of its MACs
    target, record = fit_macs_to_latency(lambda m: methods.create("l1", target_macs=m, round_to=8), base, X,
                                         LatencyGoal(0.3), start=0.3, prepare_kwargs={}, probes=8, measure=measure)
    refused = [p for p in record["probes"] if "error" in p]
    assert refused and all("ratio" not in p for p in refused)
    built = [p["macs_target"] for p in record["probes"] if "ratio" in p]
    assert target in built and all(p["macs_target"] < min(built) for p in refused)
    assert not record["within_tol"]  # the goal is below what any net measures: said, not hidden


def test_a_goal_between_two_aligned_widths_is_fitted_at_the_finer_alignment(base):
    """Latency that jumps with the stem's width (a stand-in cost table): at alignment 8 the stem keeps 8 channels
    (0.325 of the base) or 16 (1.0), so no net comes within 10% of 0.6; at alignment 4 the 12-channel stem
    measures 0.606. The fit falls back to 4, keeps it, and records every probe with its alignment."""
    from slimcnn.latency_fit import fit_aligned, in_band

    measure = lambda net: 0.1 + 0.9 * (net.conv1.out_channels / 16) ** 2  # noqa: E731
    make = lambda a, m: methods.create("l1", target_macs=m, round_to=a)  # noqa: E731
    target, round_to, record = fit_aligned(make, base, X, LatencyGoal(0.6), 0.45, {}, measure=measure)
    assert round_to == 4 and record["round_to"] == 4 and record["alignments_tried"] == [8, 4]
    assert not any(in_band(p["ratio"], 0.6) for p in record["probes"] if p["round_to"] == 8)
    assert record["chosen"] == {**record["chosen"], "macs_target": target, "round_to": 4}
    assert in_band(record["chosen"]["ratio"], 0.6) and record["within_tol"]
    # where the coarse alignment lands, the finer one is never tried
    _, first, coarse = fit_aligned(make, base, X, LatencyGoal(0.325), 0.45, {}, measure=measure)
    assert first == 8 and coarse["alignments_tried"] == [8]
