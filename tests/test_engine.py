"""The training engine on a tiny real CIFAR-10 subset: exact resume, method hooks, schedules, divergence, eval."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from slimcnn.data import Loader
from slimcnn.engine import TrainConfig, TrainingDiverged, checkpoint_path, evaluate, train
from slimcnn.engine.checkpoint import load_state
from slimcnn.engine.trainer import Schedule
from slimcnn.methods.base import Method
from slimcnn.models import create, load_checkpoint
from conftest import RESNET20 as R20, shuffled_loader


loader = shuffled_loader


def fresh_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create("cifar_resnet20")


class Shrink(Method):
    """A stateful method touching every hook: scales gradients by a factor that depends on its own counter."""

    name = "shrink"

    def __init__(self) -> None:
        self.calls = 0
        self.trace = torch.zeros(3)
        self.seen: list[tuple[str, int]] = []

    def before_forward(self, model, step):
        self.seen.append(("before_forward", step))

    def loss(self, model):
        return 1e-4 * model.linear.weight.square().sum()

    def after_backward(self, model, step):
        self.seen.append(("after_backward", step))
        for p in model.parameters():
            p.grad.mul_(1.0 / (1.0 + 0.1 * self.calls))

    def after_step(self, model, step):
        self.seen.append(("after_step", step))
        self.calls += 1
        self.trace += model.linear.bias.detach()[:3]

    def state_dict(self):
        return {"calls": self.calls, "trace": self.trace.clone()}

    def load_state_dict(self, state):
        self.calls, self.trace = state["calls"], state["trace"].clone()


CFG = dict(epochs=2, lr=0.05, warmup_epochs=0.5, progress=False)


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("stop_after", [3, 4])  # at the epoch boundary, and in the middle of epoch 2
def test_resume_is_bit_identical(tiny, tmp_path, stop_after):
    m0 = Shrink()
    straight = train(fresh_model(), loader(tiny), TrainConfig(**CFG, out_dir=tmp_path / "a"), method=m0)

    m1 = Shrink()
    cut = train(fresh_model(), loader(tiny), TrainConfig(**CFG, out_dir=tmp_path / "b", max_steps=stop_after),
                method=m1)
    assert cut.steps == stop_after and m1.calls == stop_after
    saved = load_state(checkpoint_path(tmp_path / "b"))
    assert (saved["epoch"], saved["step"]) == (1, stop_after)  # epochs completed, steps taken

    m2 = Shrink()  # a new process would start from scratch like this
    resumed = train(fresh_model(), loader(tiny), TrainConfig(**CFG, out_dir=tmp_path / "b"), method=m2, resume=True)
    assert resumed.steps == straight.steps == 6
    assert_same_weights(straight.model, resumed.model)
    assert m2.calls == 6 and torch.equal(m2.trace, m0.trace)
    # the per-epoch history, including the epoch that was split, matches too (timings aside)
    strip = [{k: v for k, v in r.items() if k != "img_per_s"} for r in straight.history]
    assert strip == [{k: v for k, v in r.items() if k != "img_per_s"} for r in resumed.history]


def test_hooks_get_global_steps_and_param_groups_apply(tiny):
    class FreezeStem(Shrink):
        def param_groups(self, model, lr, weight_decay):
            stem = [model.conv1.weight]
            rest = [p for n, p in model.named_parameters() if n != "conv1.weight"]
            return [{"params": stem, "lr": 0.0, "weight_decay": 0.0}, {"params": rest, "lr": lr,
                                                                      "weight_decay": weight_decay}]

    model = fresh_model()
    stem0, fc0 = model.conv1.weight.detach().clone(), model.linear.weight.detach().clone()
    m = FreezeStem()
    result = train(model, loader(tiny), TrainConfig(**CFG), method=m)
    expected = [(hook, s) for s in range(6) for hook in ("before_forward", "after_backward", "after_step")]
    assert m.seen == expected
    assert result.model is model  # hooks and result get the plain module
    assert torch.equal(model.conv1.weight, stem0)  # lr 0 group: untouched, no weight decay either
    assert not torch.equal(model.linear.weight, fc0)


def test_schedules():
    cos = Schedule("cosine", total_steps=100, warmup_steps=10)
    assert [cos(s) for s in (0, 4, 9)] == [0.1, 0.5, 1.0]
    assert cos(10) == 1.0 and cos(55) == pytest.approx(0.5) and cos(100) == pytest.approx(0.0)
    assert all(cos(s) >= cos(s + 1) for s in range(10, 100))
    step = Schedule("step", total_steps=100, milestones=[50, 75], gamma=0.1)
    assert (step(49), step(50), step(74), step(75)) == (1.0, pytest.approx(0.1), pytest.approx(0.1),
                                                        pytest.approx(0.01))
    assert Schedule("constant", 100)(99) == 1.0


def test_step_schedule_lr_in_history(tiny):
    result = train(fresh_model(), loader(tiny), TrainConfig(epochs=2, lr=0.1, schedule="step", milestones=(0.5,),
                                                            progress=False))
    # step schedule: full LR through epoch 1 (steps 0-2), x0.1 from step 3 on
    assert result.history[0]["lr"] == pytest.approx(0.1) and result.history[1]["lr"] == pytest.approx(0.01)
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["train_top1"] <= 100 for r in result.history)


class NaNAt(Method):
    name = "nan_at"

    def __init__(self, step: int) -> None:
        self.step, self.now = step, 0

    def before_forward(self, model, step):
        self.now = step

    def loss(self, model):
        return float("nan") if self.now == self.step else 0.0


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny, tmp_path):
    with pytest.raises(TrainingDiverged, match=r"epoch 2/2, step 4 .*the loss is nan.*last good checkpoint"):
        train(fresh_model(), loader(tiny), TrainConfig(**CFG, out_dir=tmp_path / "run"), method=NaNAt(4))
    saved = load_state(checkpoint_path(tmp_path / "run"))
    assert (saved["epoch"], saved["step"]) == (1, 3)
    ref = train(fresh_model(), loader(tiny), TrainConfig(**CFG, max_steps=3), method=NaNAt(4))
    for k, v in ref.model.state_dict().items():
        assert torch.equal(saved["model"][k], v), k


def test_nan_in_first_epoch_reports_no_checkpoint(tiny, tmp_path):
    with pytest.raises(TrainingDiverged, match="epoch 1/2, step 0 .*no checkpoint had been written"):
        train(fresh_model(), loader(tiny), TrainConfig(**CFG, out_dir=tmp_path), method=NaNAt(0))
    assert not checkpoint_path(tmp_path).exists()


def test_resume_refuses_other_settings(tiny, tmp_path):
    train(fresh_model(), loader(tiny), TrainConfig(**CFG, out_dir=tmp_path, max_steps=1))
    with pytest.raises(ValueError, match=r"cannot resume .*lr=0.05 \(this run: 0.1\)"):
        train(fresh_model(), loader(tiny), TrainConfig(**dict(CFG, lr=0.1), out_dir=tmp_path), resume=True)
    with pytest.raises(ValueError, match="resume=True needs cfg.out_dir"):
        train(fresh_model(), loader(tiny), TrainConfig(**CFG), resume=True)


@pytest.mark.parametrize("bad, msg", [(dict(schedule="linear"), "schedule must be one of"),
                                      (dict(epochs=0), "epochs must be"), (dict(task="detection"), "task must be"),
                                      (dict(warmup_epochs=5, epochs=2), "warmup_epochs"),
                                      (dict(max_steps=0), "max_steps")])
def test_config_errors(bad, msg):
    with pytest.raises(ValueError, match=msg):
        TrainConfig(**bad)


def test_evaluate_matches_a_direct_computation(tiny):
    model = load_checkpoint(create("cifar_resnet20"), R20)
    test = Loader(tiny, 40)  # 96 images: a short last batch
    metrics = evaluate(model, test, progress=False)
    assert model.training  # evaluate() restores the mode it found
    model.eval()
    with torch.no_grad():
        x = torch.cat([b[0] for b in test])
        logits = model(x)
    top5 = logits.topk(5, 1).indices.eq(tiny.labels.view(-1, 1)).any(1).float().mean() * 100
    assert metrics["n"] == 96
    assert metrics["top1"] == pytest.approx((logits.argmax(1) == tiny.labels).float().mean().item() * 100)
    assert metrics["top5"] == pytest.approx(top5.item())
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, tiny.labels).item(), rel=1e-5)
    assert metrics["top1"] > 60  # the public checkpoint scores ~81% on this data


def test_segmentation_task_ignores_void():
    pytest.importorskip("slimcnn.metrics")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 11, 1))
    x = torch.randn(4, 3, 12, 16)
    y = (x[:, 0] > 0).long() * 3  # a learnable map: class 3 where channel 0 is positive, else class 0
    y[:, :2] = 11  # void rows: no loss, no metric
    batches = [(x[:2], y[:2]), (x[2:], y[2:])]
    before = evaluate(model, batches, task="segmentation", progress=False)
    logits = model(x)
    assert before["loss"] == pytest.approx(F.cross_entropy(logits, y, ignore_index=11).item(), rel=1e-5)
    assert before["n"] == 4 and set(before) >= {"miou", "pixel_acc", "iou"}
    result = train(model, batches, TrainConfig(epochs=30, lr=0.1, task="segmentation", progress=False))
    after = evaluate(result.model, batches, task="segmentation", progress=False)
    assert after["loss"] < before["loss"] and after["pixel_acc"] > before["pixel_acc"]
    assert 0 <= result.history[-1]["train_pixel_acc"] <= 100


@pytest.mark.skipif(not torch.cuda.is_available(), reason="AMP runs only on CUDA")
def test_amp_on_cuda_trains_and_resumes(tiny, tmp_path):
    cfg = dict(CFG, device="cuda", amp=True)
    straight = train(fresh_model(), loader(tiny), TrainConfig(**cfg, out_dir=tmp_path / "a"))
    train(fresh_model(), loader(tiny), TrainConfig(**cfg, out_dir=tmp_path / "b", max_steps=3))
    resumed = train(fresh_model(), loader(tiny), TrainConfig(**cfg, out_dir=tmp_path / "b"), resume=True)
    assert load_state(checkpoint_path(tmp_path / "b"))["scaler"]["scale"] > 0
    assert all(math.isfinite(r["train_loss"]) for r in straight.history)
    assert_same_weights(straight.model, resumed.model)
