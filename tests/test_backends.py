"""The timing backends: eager and CUDA time the BN-folded net, which must compute what the net computes."""
import torch
from torch import nn

import slimcnn
from slimcnn.backends import fold_bn


def _with_running_stats(model: nn.Module) -> nn.Module:
    """Non-trivial BN statistics, as a trained net has (fresh ones fold to an identity and prove nothing)."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def test_fold_bn_removes_every_bn_and_keeps_the_outputs():
    model = _with_running_stats(slimcnn.create("cifar_resnet20"))
    folded = fold_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the caller's net is left as it was
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref, out = model(x), folded(x)
    assert torch.allclose(ref, out, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(self.conv(x))
        return y if y.sum() > 0 else -y  # data-dependent branch: torch.fx cannot trace it


def test_fold_bn_times_an_untraceable_net_unfolded():
    model = _Untraceable().train()
    assert fold_bn(model) is model and not model.training



def test_under_quiet_timing_a_timing_waits_for_the_other_processes(monkeypatch):
    """The busy figure is fed (a real one depends on the machine): the timing starts only once it drops below the
    limit, and the wait is recorded; outside quiet_timing nothing waits."""
    from slimcnn import backends

    seen = iter([1.5, 0.9, 0.1])
    monkeypatch.setattr(backends, "busy_cores_elsewhere", lambda window_s=0.3: next(seen))
    monkeypatch.setattr(backends.time, "sleep", lambda s: None)
    calls = []
    with backends.quiet_timing(max_busy_cores=0.3, timeout_s=60):
        backends.time_samples({"a": lambda: calls.append(1)}, repeats=2, warmup=0)
    assert len(calls) == 2 and backends.last_wait["quiet"] and backends.last_wait["busy_cores_elsewhere"] == 0.1
    backends.time_samples({"a": lambda: calls.append(1)}, repeats=1, warmup=0)  # no wait: the iterator is spent
    assert len(calls) == 3


def test_a_wait_that_times_out_says_so(monkeypatch):
    from slimcnn import backends

    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(backends, "busy_cores_elsewhere", lambda window_s=0.3: 2.0)
    monkeypatch.setattr(backends.time, "sleep", lambda s: None)
    monkeypatch.setattr(backends.time, "monotonic", lambda: float(next(clock)))
    seen = backends.wait_for_quiet(0.3, timeout_s=30)
    assert seen["quiet"] is False and seen["waited_s"] >= 30 and seen["busy_cores_elsewhere"] == 2.0


def test_the_whole_run_waits_at_most_its_total_budget(monkeypatch):
    """Once the block's waiting budget is spent, a timing measures the load once and goes on."""
    from slimcnn import backends

    clock = iter(float(t) for t in range(0, 10_000, 10))
    monkeypatch.setattr(backends, "busy_cores_elsewhere", lambda window_s=0.3: 2.0)
    monkeypatch.setattr(backends.time, "sleep", lambda s: None)
    monkeypatch.setattr(backends.time, "monotonic", lambda: next(clock))
    with backends.quiet_timing(max_busy_cores=0.3, timeout_s=100, total_s=150):
        backends.time_samples({"a": lambda: None}, repeats=1, warmup=0)
        first = dict(backends.last_wait)
        backends.time_samples({"a": lambda: None}, repeats=1, warmup=0)
        second = dict(backends.last_wait)
        backends.time_samples({"a": lambda: None}, repeats=1, warmup=0)
        third = dict(backends.last_wait)
    # the fake clock moves 10 s per reading: the third timing only measured the load (one reading apart)
    assert first["waited_s"] >= 100 and second["waited_s"] <= 60 and third["waited_s"] <= 10
    assert not (first["quiet"] or second["quiet"] or third["quiet"])
