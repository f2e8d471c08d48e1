"""RIG wrapper: T=1 is the backbone, gates in (0, 1), gradients reach every gate, honest MACs, export."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slimcnn.gating  # noqa: F401  (registers the wrappers)
from slimcnn.gating import RIG, Gate, iteration_loss
from slimcnn.models import create
from slimcnn.profile import profile


def _pair(**kw):
    """A plain ResNet-20 and a RIG wrapper around a copy of the same weights."""
    torch.manual_seed(0)
    base = create("cifar_resnet20")
    gated = create("cifar_resnet20", gating="rig", **kw)
    gated.backbone.load_state_dict(base.state_dict())
    return base.eval(), gated.eval()


def test_one_iteration_is_the_backbone_exactly():
    base, gated = _pair(iterations=1)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(gated(x), base(x))
    assert len(gated.gates) == 0


@pytest.mark.parametrize("kw", [dict(iterations=2), dict(iterations=3, share_gates=False, gate_type="both"),
                                dict(iterations=2, gate_type="channel", gate_source="top")])
def test_first_iteration_is_the_backbone_and_feedback_changes_the_output(kw):
    base, gated = _pair(**kw)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        outs = gated.forward_all(x)
        assert len(outs) == kw["iterations"]
        assert torch.equal(outs[0], base(x))
        assert torch.equal(outs[-1], gated(x))
        assert not torch.allclose(outs[-1], outs[0])


@pytest.mark.parametrize("gate_type,shape", [("spatial", (1, None)), ("channel", (None, 1)), ("both", (None, None))])
def test_gates_lie_in_open_unit_interval(gate_type, shape):
    _, gated = _pair(iterations=3, gate_type=gate_type, share_gates=False)
    seen = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: seen.append((mod, out)))
             for m in gated.modules() if isinstance(m, Gate)]
    gated.train()  # batch statistics keep an untrained net's activations at their trained scale
    with torch.no_grad():
        gated(torch.randn(8, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * 2  # iterations 2 and 3, stages 0 and 1
    for mod, g in seen:
        assert 0 < g.min() and g.max() < 1
        channels = 1 if shape[0] == 1 else mod.out_channels
        assert g.shape[1] == channels
        if shape[1] == 1:
            assert g.shape[2:] == (1, 1)


@pytest.mark.parametrize("kw", [dict(iterations=2), dict(iterations=3, share_gates=False, gate_type="both"),
                                dict(iterations=3, gate_type="channel", gate_source="top", loss_all_iterations=True)])
def test_gradients_reach_every_gate_parameter(kw):
    _, gated = _pair(**kw)
    gated.train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    out = gated(x)
    if kw.get("loss_all_iterations"):
        assert isinstance(out, list) and len(out) == kw["iterations"]
    iteration_loss(out, y, F.cross_entropy).backward()
    names = [n for n, _ in gated.named_parameters() if n.startswith("gates.")]
    assert len(names) == 2 * len(gated.gates) * len(gated.gate_stages)
    for n, p in gated.named_parameters():
        if n.startswith("gates."):
            assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_macs_count_every_iteration():
    base, gated = _pair(iterations=2)
    p_base, p_gated = profile(base, (3, 32, 32)), profile(gated, (3, 32, 32))
    stage_macs = sum(r.macs for r in p_base.layers if r.name.startswith("layer"))
    gate_macs = sum(r.macs for r in p_gated.layers if r.name.startswith("gates."))
    assert gate_macs > 0
    # the stem and head run once; the three stages run again behind the gates
    assert p_gated.macs == p_base.macs + stage_macs + gate_macs
    _, three = _pair(iterations=3, share_gates=False)
    assert profile(three, (3, 32, 32)).macs == p_base.macs + 2 * (stage_macs + gate_macs)


def test_stages_below_the_lowest_gate_run_once():
    base, gated = _pair(iterations=2, gate_stages=[1])
    p_base, p_gated = profile(base, (3, 32, 32)), profile(gated, (3, 32, 32))
    repeated = sum(r.macs for r in p_base.layers if r.name.startswith(("layer2", "layer3")))
    gate_macs = sum(r.macs for r in p_gated.layers if r.name.startswith("gates."))
    assert p_gated.macs == p_base.macs + repeated + gate_macs


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="gate_type"):
        create("cifar_resnet20", gating="rig", gate_type="pixel")
    with pytest.raises(ValueError, match=r"cannot gate stage\(s\) \[2\]"):
        create("cifar_resnet20", gating="rig", gate_stages="1,2")
    with pytest.raises(ValueError, match="iterations"):
        create("cifar_resnet20", gating="rig", iterations=0)
    with pytest.raises(TypeError, match="staged backbone"):
        RIG(create("cifar_vgg16"))


def test_wraps_the_segmentation_encoder():
    torch.manual_seed(0)
    base = create("seg_tiny", num_classes=11).eval()
    gated = RIG(create("seg_tiny", num_classes=11), iterations=2, gate_type="both").eval()
    gated.backbone.load_state_dict(base.state_dict())
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        outs = gated.forward_all(x)
    assert outs[-1].shape == (2, 11, 48, 64)
    assert torch.equal(outs[0], base(x))


@pytest.mark.parametrize("name,kw,shape", [
    ("cifar_resnet20", dict(gating="rig", iterations=2, gate_type="both"), (3, 32, 32)),
    ("seg_tiny", dict(gating="dig", variant="cascaded", iterations=2, share_gates=False, num_classes=11), (3, 48, 64)),
])
def test_save_load_and_onnx_export(tmp_path, name, kw, shape):
    import onnxruntime as ort

    import slimcnn.io

    torch.manual_seed(0)
    model = create(name, **kw).eval()
    with torch.no_grad():  # move the gates away from their initial values, so loading must restore them
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    x = torch.randn(2, *shape)
    slimcnn.io.save(model, tmp_path / "m")
    same = slimcnn.io.load(tmp_path / "m")
    assert type(same) is type(model)
    with torch.no_grad():
        ref = model(x)
        assert torch.equal(same(x), ref)
    path = slimcnn.io.export_onnx(model, tmp_path / "m.onnx", x)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, *shape)  # the batch axis is dynamic
    (y,) = sess.run(None, {"input": x3.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(y), model(x3), atol=1e-4)
