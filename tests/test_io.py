import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import slimcnn
from slimcnn.io import SpecError, export_onnx, export_torchscript, load, model_spec, save
from slimcnn.models import CheckpointError, PadShortcut, create, load_checkpoint
from conftest import RESNET20


def surgered_resnet20():
    """A ResNet-20 changed the ways surgery changes it: a factorised conv, a narrower block, a re-mapped shortcut."""
    m = load_checkpoint(create("cifar_resnet20"), RESNET20).eval()
    m.layer1[0].conv1 = nn.Sequential(nn.Conv2d(16, 5, 3, 1, 1, bias=False), nn.Conv2d(5, 16, 1))
    m.layer3[1].conv1, m.layer3[1].bn1 = nn.Conv2d(64, 40, 3, 1, 1, bias=False), nn.BatchNorm2d(40)
    m.layer3[1].conv2 = nn.Conv2d(40, 64, 3, 1, 1, bias=False)
    m.layer2[0].shortcut = PadShortcut(16, 32, 2, src=[0, 3, 7], dst=[9, 1, 30])
    return m.eval()


def test_spec_lists_only_changed_modules():
    spec = model_spec(surgered_resnet20())
    assert set(spec["modules"]) == {"layer1.0.conv1", "layer3.1.conv1", "layer3.1.bn1", "layer3.1.conv2",
                                    "layer2.0.shortcut"}
    assert model_spec(create("cifar_resnet56"))["modules"] == {}


@pytest.mark.parametrize("suffix", ["dir", "file.safetensors"])
def test_roundtrip_identical_outputs(tmp_path, suffix):
    m = surgered_resnet20()
    path = tmp_path / suffix
    save(m, path)
    back = load(path)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m(x), back(x))


def test_loads_in_a_fresh_process(tmp_path):
    m = surgered_resnet20()
    save(m, tmp_path / "m")
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    code = ("import torch, slimcnn; torch.set_num_threads(1); m = slimcnn.load(r'%s'); x = torch.load(r'%s');"
            "torch.save(m(x).detach(), r'%s')") % (tmp_path / "m", tmp_path / "x.pt", tmp_path / "y.pt")
    subprocess.run([sys.executable, "-c", code], check=True)
    with torch.no_grad():
        assert torch.equal(torch.load(tmp_path / "y.pt"), m(x))


def test_corrupt_and_mismatched_files(tmp_path):
    m = surgered_resnet20()
    save(m, tmp_path / "m")
    st = tmp_path / "m" / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read"):
        load(tmp_path / "m")
    with pytest.raises(CheckpointError, match="no saved model"):
        load(tmp_path / "elsewhere")
    # weights of one architecture with the spec of another
    save(create("cifar_resnet20"), tmp_path / "plain.safetensors")
    from safetensors.torch import load_file, save_file

    spec = json.dumps(model_spec(m))
    save_file(load_file(tmp_path / "plain.safetensors"), tmp_path / "mixed.safetensors", metadata={"slimcnn_spec": spec})
    with pytest.raises(CheckpointError, match="does not match its spec"):
        load(tmp_path / "mixed.safetensors")


def test_spec_refuses_foreign_modules_and_unknown_models():
    with pytest.raises(SpecError, match="not built by slimcnn.create"):
        model_spec(nn.Sequential(nn.Linear(2, 2)))
    from slimcnn.io import build_module

    with pytest.raises(SpecError, match="refusing"):
        build_module({"type": "os:system", "config": {}})


def test_onnx_and_torchscript_export(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    m = surgered_resnet20()
    x = torch.randn(4, 3, 32, 32)
    export_onnx(m, tmp_path / "m.onnx", x[:2])
    out = ort.InferenceSession(str(tmp_path / "m.onnx")).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        ref = m(x).numpy()
    assert np.abs(out - ref).max() <= 1e-4
    export_torchscript(m, tmp_path / "m.ts", x[:1])
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(tmp_path / "m.ts"))(x), m(x), atol=1e-5)


def test_public_api_save_load(tmp_path):
    m = slimcnn.create("cifar_vgg16")
    slimcnn.save(m, tmp_path / "v")
    assert isinstance(slimcnn.load(tmp_path / "v"), nn.Module)
