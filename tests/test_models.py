import copy

import pytest
import torch

from slimcnn.models import CheckpointError, PadShortcut, create, list_models, load_checkpoint
from conftest import RESNET20, RESNET56


def test_list_models_has_the_zoo():
    names = list_models()
    for n in ["cifar_resnet20", "cifar_resnet32", "cifar_resnet44", "cifar_resnet56", "cifar_resnet110", "cifar_vgg16"]:
        assert n in names


@pytest.mark.parametrize("name", ["cifar_resnet20", "cifar_resnet110", "cifar_vgg16"])
def test_forward_shapes(name):
    m = create(name, num_classes=7)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 7)


def test_shortcut_b_has_projection():
    m = create("cifar_resnet20", shortcut="B")
    assert isinstance(m.layer2[0].shortcut[0], torch.nn.Conv2d)
    with pytest.raises(ValueError, match="shortcut"):
        create("cifar_resnet20", shortcut="C")


def test_tv_models_and_unknown_names():
    m = create("tv:resnet18", num_classes=5)
    assert m(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    with pytest.raises(KeyError, match="unknown model"):
        create("resnet_nope")
    with pytest.raises(KeyError, match="unknown torchvision"):
        create("tv:not_a_model")


def test_pad_shortcut_is_module_and_matches_reference_pad():
    sc = PadShortcut(16, 32, 2)
    x = torch.randn(2, 16, 8, 8)
    ref = torch.nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
    assert torch.equal(sc(x), ref)
    copy.deepcopy(sc)
    # a general channel map places the kept inputs (values 1..3, so a placed channel is told from a zero fill)
    sc2 = PadShortcut(3, 5, 2, src=[0, 2], dst=[4, 1])
    y = sc2(torch.arange(1.0, 4.0).view(1, 3, 1, 1).expand(1, 3, 2, 2).contiguous())
    assert y[0, :, 0, 0].tolist() == [0, 3, 0, 0, 1]


def test_pad_shortcut_exports_as_one_strided_conv_with_the_same_outputs():
    """ONNX Runtime runs the shortcut as one 1x1 conv faster than slices and a gather (a pruned ResNet-56 went from
    0.73 to 0.68 of the base's latency at batch 1); the exported net must still compute what the module does."""
    import io
    import warnings

    import onnx
    import onnxruntime as ort

    for sc in (PadShortcut(6, 8, 2, src=[0, 3, 5], dst=[7, 0, 2]), PadShortcut(4, 8, 2)):
        x = torch.randn(2, sc.in_channels, 6, 6)
        buf = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(sc.eval(), (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
        ops = [n.op_type for n in onnx.load_from_string(buf.getvalue()).graph.node]
        assert ops.count("Conv") == 1 and not {"Gather", "Pad", "Slice", "ScatterElements"} & set(ops)
        out = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]
        assert torch.equal(torch.from_numpy(out), sc(x))


@pytest.mark.shared
def test_public_checkpoints_load_and_deepcopy():
    m = load_checkpoint(create("cifar_resnet56"), RESNET56)
    assert m.linear.weight.abs().sum() > 0
    torch.jit.trace(copy.deepcopy(m).eval(), torch.randn(1, 3, 32, 32))


def test_mismatched_checkpoint_names_keys():
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(create("cifar_resnet56"), RESNET20)


def test_corrupt_and_missing_checkpoint(tmp_path):
    bad = tmp_path / "bad.th"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_checkpoint(create("cifar_resnet20"), bad)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(create("cifar_resnet20"), tmp_path / "nope.th")
