"""Distillation and weight EMA in the engine, on a tiny real CIFAR-10 subset (3 steps per epoch)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from slimcnn.distill import Distiller, kd_loss
from slimcnn.engine import TrainConfig, checkpoint_path, train
from slimcnn.engine.checkpoint import load_state
from slimcnn.models import create, load_checkpoint
from conftest import RESNET20, shuffled_loader

CFG = dict(epochs=2, lr=0.05, progress=False)


loader = shuffled_loader


def fresh_model() -> nn.Module:
    torch.manual_seed(0)
    return create("cifar_resnet20")


def teacher() -> nn.Module:
    return load_checkpoint(create("cifar_resnet20"), RESNET20)


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# --- kd_loss ------------------------------------------------------------------------------------------------

def test_kd_loss_zero_for_equal_logits_positive_otherwise():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    assert kd_loss(s, s.clone(), 4.0).item() == 0.0
    assert kd_loss(s, t, 4.0).item() > 0
    # the definition: T^2 * KL(p_t || p_s), averaged over images
    p_t = F.softmax(t / 2.0, 1)
    by_hand = (p_t * (p_t.log() - F.log_softmax(s / 2.0, 1))).sum(1).mean() * 4.0
    assert kd_loss(s, t, 2.0).item() == pytest.approx(by_hand.item(), rel=1e-5)
    # gradients flow to the student only
    s.requires_grad_(True)
    t.requires_grad_(True)
    kd_loss(s, t).backward()
    assert s.grad is not None and t.grad is None


def test_kd_loss_pixelwise_for_segmentation():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 6, 7, generator=g), torch.randn(2, 5, 6, 7, generator=g)
    assert kd_loss(s, s.clone()).item() == 0.0
    # KL per pixel, mean over the 2*6*7 pixels: the same as classification over flattened pixels
    flat = lambda z: z.permute(0, 2, 3, 1).reshape(-1, 5)  # noqa: E731
    assert kd_loss(s, t).item() == pytest.approx(kd_loss(flat(s), flat(t)).item(), rel=1e-6)
    # maps of different sizes are brought to the larger one, whichever side it is on
    small = torch.randn(2, 5, 3, 4, generator=g)
    up = F.interpolate(small, size=(6, 7), mode="bilinear", align_corners=False)
    assert kd_loss(small, t).item() == pytest.approx(kd_loss(up, t).item(), rel=1e-6)
    assert kd_loss(t, small).item() == pytest.approx(kd_loss(t, up).item(), rel=1e-6)
    with pytest.raises(ValueError, match="do not match"):
        kd_loss(s, torch.randn(2, 4, 6, 7))
    with pytest.raises(ValueError, match="temperature"):
        kd_loss(s, t, 0.0)


def test_distiller_rejects_bad_settings():
    with pytest.raises(ValueError, match="alpha"):
        Distiller(nn.Linear(2, 2), alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        Distiller(nn.Linear(2, 2), temperature=-1)


# --- the engine with a teacher --------------------------------------------------------------------------------

def test_teacher_gets_no_gradient_and_stays_in_eval_mode(tiny):
    t = teacher()
    t.train()  # the Distiller must put it in eval mode itself
    before = copy.deepcopy(t.state_dict())
    distiller = Distiller(t, alpha=0.7, temperature=4.0)
    calls = []
    t.register_forward_hook(lambda m, i, o: calls.append(m.training))
    student = fresh_model()
    start = copy.deepcopy(student.state_dict())
    train(student, loader(tiny), TrainConfig(**CFG, max_steps=3), distiller=distiller)
    assert calls == [False] * 3  # run once per step, always in eval mode
    assert not t.training and all(not m.training for m in t.modules())
    assert all(p.grad is None and not p.requires_grad for p in t.parameters())
    for k, v in t.state_dict().items():  # weights and BatchNorm running statistics untouched
        assert torch.equal(v, before[k]), k
    assert any(not torch.equal(v, start[k]) for k, v in student.state_dict().items())


def test_alpha_zero_is_plain_training_bit_for_bit(tiny):
    plain = train(fresh_model(), loader(tiny), TrainConfig(**CFG, max_steps=3)).model
    t = teacher()
    calls = []
    t.register_forward_hook(lambda *a: calls.append(1))
    kd0 = train(fresh_model(), loader(tiny), TrainConfig(**CFG, max_steps=3), distiller=Distiller(t, alpha=0.0)).model
    assert calls == []  # the teacher is not even run
    assert_same_state(plain, kd0)


class TwoOutputs(nn.Module):
    """An iterative model in miniature: a list of logits, the last one the prediction."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.heads = nn.ModuleList([nn.Linear(8, 10), nn.Linear(8, 10)])

    def forward(self, x):
        f = self.body(x)
        return [h(f) for h in self.heads]


def test_every_output_of_an_iterative_model_is_distilled(tiny):
    torch.manual_seed(0)
    student = TwoOutputs()
    t = teacher()
    first_head = student.heads[0].weight.detach().clone()
    result = train(student, loader(tiny), TrainConfig(**CFG, max_steps=2), distiller=Distiller(t, alpha=1.0))
    # alpha 1: only the KD term drives training, and it reaches the first (non-final) output too
    assert not torch.equal(student.heads[0].weight, first_head)
    assert result.history[-1]["train_loss"] > 0


def test_resume_refuses_another_distillation(tiny, tmp_path):
    train(fresh_model(), loader(tiny), TrainConfig(**CFG, out_dir=tmp_path, max_steps=1),
          distiller=Distiller(teacher(), alpha=0.5))
    assert load_state(checkpoint_path(tmp_path))["distill"] == {"alpha": 0.5, "temperature": 4.0}
    with pytest.raises(ValueError, match="distillation"):
        train(fresh_model(), loader(tiny), TrainConfig(**CFG, out_dir=tmp_path), resume=True)


# --- weight EMA -----------------------------------------------------------------------------------------------

def test_ema_decay_zero_is_the_last_weights(tiny):
    plain = train(fresh_model(), loader(tiny), TrainConfig(**CFG, max_steps=3)).model
    ema0 = train(fresh_model(), loader(tiny), TrainConfig(**CFG, max_steps=3, ema=0.0)).model
    assert_same_state(plain, ema0)


def test_ema_resume_is_bit_identical(tiny, tmp_path):
    straight = train(fresh_model(), loader(tiny), TrainConfig(**CFG, ema=0.5, out_dir=tmp_path / "a")).model
    plain = train(fresh_model(), loader(tiny), TrainConfig(**CFG)).model
    assert not torch.equal(straight.linear.weight, plain.linear.weight)  # the EMA is what came back
    train(fresh_model(), loader(tiny), TrainConfig(**CFG, ema=0.5, out_dir=tmp_path / "b", max_steps=4))
    saved = load_state(checkpoint_path(tmp_path / "b"))
    assert int(saved["ema"]["n_averaged"]) == 4
    resumed = train(fresh_model(), loader(tiny), TrainConfig(**CFG, ema=0.5, out_dir=tmp_path / "b"),
                    resume=True).model
    assert_same_state(straight, resumed)
    with pytest.raises(ValueError, match="ema"):  # another decay is another run
        train(fresh_model(), loader(tiny), TrainConfig(**CFG, ema=0.9, out_dir=tmp_path / "b"), resume=True)


def test_ema_decay_must_be_below_one():
    with pytest.raises(ValueError, match="ema decay"):
        TrainConfig(ema=1.0)


def test_memo_runs_the_teacher_once_per_distinct_batch():
    """compress(memo=) shares teacher logits between the demo's rows: the same batch reuses them, bit for bit; a
    different batch (even one value changed) never gets another batch's targets."""
    teacher = create("cifar_resnet20")
    calls = []
    teacher.register_forward_hook(lambda m, i, o: calls.append(1))
    memo: dict = {}
    d1, d2 = Distiller(teacher, memo=memo), Distiller(teacher, memo=memo)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    first = d1.teacher_logits(x)
    assert torch.equal(d2.teacher_logits(x.clone()), first) and len(calls) == 1
    y = x.clone()
    y[0, 0, 0, 0] += 1e-3
    assert not torch.equal(d2.teacher_logits(y), first) and len(calls) == 2
    assert torch.equal(Distiller(teacher).teacher_logits(x), first) and len(calls) == 3  # no memo: always runs
