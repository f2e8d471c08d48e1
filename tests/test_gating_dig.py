"""DIG: variants read the sources they claim, gradients reach gates and propagators, MACs, segmentation shapes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import slimcnn.gating  # noqa: F401  (registers the wrappers)
from slimcnn.gating import DIG, RIG, VARIANTS, Gate
from slimcnn.models import create
from slimcnn.profile import profile

SIZE = (3, 48, 64)


def _seg(variant: str, **kw) -> tuple[torch.nn.Module, DIG]:
    torch.manual_seed(0)
    base = create("seg_tiny", num_classes=11)
    gated = create("seg_tiny", num_classes=11, gating="dig", variant=variant, **kw)
    gated.backbone.load_state_dict(base.state_dict())
    return base.eval(), gated.eval()


@pytest.mark.parametrize("variant", VARIANTS)
def test_first_iteration_is_the_backbone(variant):
    base, gated = _seg(variant, iterations=2)
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        outs = gated.forward_all(x)
        assert outs[0].shape == (2, 11, *SIZE[1:])
        assert torch.equal(outs[0], base(x))
        if variant == "none":
            assert len(outs) == 1 and torch.equal(gated(x), base(x))
        else:
            assert len(outs) == 2 and not torch.allclose(outs[1], outs[0])


def _source_dependencies(variant: str) -> dict[int, set[int]]:
    """For each gated stage, the stage outputs (of iteration t-1) its gate source depends on, found by autograd."""
    _, gated = _seg(variant, iterations=2)
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        h = gated.backbone.stem(x)
        feats = []
        for stage in gated.backbone.stages:
            h = stage(h)
            feats.append(h.clone().requires_grad_(True))
    deps = {}
    for s, src in gated._sources(feats, 1).items():
        grads = torch.autograd.grad(src.sum(), feats, allow_unused=True, retain_graph=True)
        deps[s] = {i for i, g in enumerate(grads) if g is not None and g.abs().sum() > 0}
    return deps


def test_variants_read_the_stages_they_claim():
    assert _source_dependencies("cascaded") == {0: {0, 1, 2, 3}, 1: {1, 2, 3}, 2: {2, 3}, 3: {3}}
    assert _source_dependencies("same_stage") == {0: {0}, 1: {1}, 2: {2}, 3: {3}}
    assert _source_dependencies("previous_stage") == {0: {1}, 1: {2}, 2: {3}}
    assert _source_dependencies("top_only") == {0: {3}, 1: {3}, 2: {3}, 3: {3}}


def test_cascade_is_the_propagator_formula():
    _, gated = _seg("cascaded", iterations=2, gate_type="both")
    feats = [torch.randn(1, c, 12 // 2 ** i + 1, 16 // 2 ** i) for i, c in enumerate(gated.out_channels)]
    f = gated.cascade(feats, 1)
    props = gated.propagators[0]
    assert torch.equal(f[3], feats[3])
    for s in (2, 1, 0):
        up = F.interpolate(f[s + 1], size=feats[s].shape[-2:], mode="bilinear", align_corners=False)
        expect = feats[s] * torch.sigmoid(props[str(s)].conv(up))  # conv(upsample(f)), the spec's order
        assert torch.allclose(f[s], expect, atol=1e-5)


@pytest.mark.parametrize("variant,kw", [("cascaded", dict(iterations=3, share_gates=False)),
                                        ("cascaded", dict(iterations=2, gate_type="channel", loss_all_iterations=True)),
                                        ("same_stage", dict(iterations=2, gate_type="both")),
                                        ("previous_stage", dict(iterations=2))])
def test_gradients_reach_every_gate_and_propagator(variant, kw):
    _, gated = _seg(variant, **kw)
    gated.train()
    x, y = torch.randn(4, *SIZE), torch.randint(0, 12, (4, *SIZE[1:]))
    out = gated(x)
    outs = out if isinstance(out, list) else [out]
    torch.stack([F.cross_entropy(o, y, ignore_index=11) for o in outs]).mean().backward()
    checked = 0
    for n, p in gated.named_parameters():
        if n.startswith(("gates.", "propagators.")):
            assert p.grad is not None and p.grad.abs().sum() > 0, n
            checked += 1
    n_sets = kw["iterations"] - 1 if kw.get("share_gates") is False else 1
    n_props = 3 if variant == "cascaded" else 0
    assert checked == 2 * n_sets * (len(gated.gate_stages) + n_props)


def test_gates_lie_in_open_unit_interval():
    _, gated = _seg("cascaded", iterations=3, gate_type="both")
    seen = []
    for m in gated.modules():
        if isinstance(m, Gate):
            m.register_forward_hook(lambda mod, inp, out: seen.append(out))
    gated.train()
    with torch.no_grad():
        gated(torch.randn(4, *SIZE))
    assert len(seen) == 2 * (4 + 3)
    assert all(0 < g.min() and g.max() < 1 for g in seen)


def test_macs_count_gates_propagators_and_repeated_stages():
    base, none = _seg("none", iterations=2)
    assert profile(none, SIZE).macs == profile(base, SIZE).macs
    p_base = profile(base, SIZE)
    stage_macs = sum(r.macs for r in p_base.layers if r.name.startswith("layers."))
    decoder_macs = sum(r.macs for r in p_base.layers if r.name.startswith("decoder."))
    assert stage_macs > 0 and decoder_macs > 0
    for variant in ("cascaded", "same_stage"):
        _, gated = _seg(variant, iterations=2)
        p = profile(gated, SIZE)
        extra = sum(r.macs for r in p.layers if r.name.startswith(("gates.", "propagators.")))
        assert p.macs == p_base.macs + stage_macs + extra  # stem and decoder run once
    assert profile(_seg("cascaded", iterations=2)[1], SIZE).macs > profile(_seg("same_stage", iterations=2)[1], SIZE).macs


@pytest.mark.parametrize("variant,source", [("previous_stage", "next"), ("top_only", "top")])
def test_rig_is_the_matching_dig_variant(variant, source):
    _, dig = _seg(variant, iterations=3, share_gates=False)
    rig = RIG(create("seg_tiny", num_classes=11), iterations=3, share_gates=False, gate_source=source).eval()
    rig.load_state_dict(dig.state_dict())  # strict: the same modules under the same names
    x = torch.randn(2, *SIZE)
    with torch.no_grad():
        assert torch.equal(rig(x), dig(x))


@pytest.mark.parametrize("stages,props", [([3], []), ([2, 3], ["2"]), ([1], ["1", "2"])])
def test_cascade_only_reaches_down_to_the_lowest_gated_stage(stages, props):
    _, gated = _seg("cascaded", iterations=2, gate_stages=stages)
    assert sorted(gated.propagators[0].keys()) == props if props else len(gated.propagators) == 0
    with torch.no_grad():
        assert gated(torch.randn(1, *SIZE)).shape == (1, 11, *SIZE[1:])


def test_dig_on_cifar_resnet():
    torch.manual_seed(0)
    m = create("cifar_resnet20", gating="dig", variant="cascaded", iterations=2).eval()
    with torch.no_grad():
        assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert m.gate_stages == [0, 1, 2]


def test_bad_variant_and_stage_are_clear_errors():
    with pytest.raises(ValueError, match="variant must be one of"):
        create("seg_tiny", gating="dig", variant="sideways")
    with pytest.raises(ValueError, match=r"cannot gate stage\(s\) \[3\]"):
        create("seg_tiny", gating="dig", variant="previous_stage", gate_stages=[2, 3])
    with pytest.raises(KeyError, match="unknown gating"):
        create("seg_tiny", gating="feedback")


def test_gated_model_can_be_pruned_and_saved(tmp_path):
    import slimcnn.io
    from slimcnn.graph import channel_groups, remove_channels

    _, gated = _seg("cascaded", iterations=2)
    x = torch.randn(1, *SIZE)
    groups = channel_groups(gated, x)
    for s in gated.gate_stages:  # the stream entering each gated stage is pinned by its gate
        (stream,) = [g for g in groups if f"backbone.layers.{s}.0.conv1" in {m.module for m in g.consumers}]
        assert not stream.prunable and "feedback gate" in stream.reason
    prunable = [g for g in groups if g.prunable]
    assert prunable  # the decoder's channels stay free
    small = remove_channels(gated, x, {g.key: list(range(g.size // 2)) for g in prunable})
    assert profile(small, SIZE).macs < profile(gated, SIZE).macs
    slimcnn.io.save(small, tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(slimcnn.io.load(tmp_path / "m")(x), small(x))
