import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import slimcnn
import slimcnn.cli
import slimcnn.commands.common
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


# --- a spec is data: loading never runs code the file names (issue 21) ---------------------------------------


def _with_spec(tmp_path, spec: dict, where: str = "metadata"):
    """A ResNet-20 save whose spec is replaced by ``spec``, stored in the safetensors metadata or, with
    ``where="model.json"``, only in the ``model.json`` beside weights that carry no spec."""
    from safetensors.torch import load_file, save_file

    save(create("cifar_resnet20"), tmp_path / "plain")
    folder = tmp_path / f"edited-{where}"
    folder.mkdir()
    state = load_file(tmp_path / "plain" / "model.safetensors")
    text = json.dumps(spec)
    if where == "metadata":
        save_file(state, folder / "model.safetensors", metadata={"slimcnn_spec": text})
    else:
        save_file(state, folder / "model.safetensors")
        (folder / "model.json").write_text(text)
    return folder


def _spec_naming(layer: dict) -> dict:
    spec = model_spec(create("cifar_resnet20"))
    spec["modules"] = {"layer1.0.conv1": layer}
    return spec


# Each would act if it were built: the CLI entry point writes the sentinel file given as its --torchscript output.
BAD_LAYERS = {
    "cli entry point": lambda s: {"type": "slimcnn.cli:main", "config": {"argv": ["export", s["model"],
                                                                                  "--torchscript", s["sentinel"]]}},
    "function": lambda s: {"type": "slimcnn.io:export_torchscript", "config": {"path": s["sentinel"]}},
    "non-module class": lambda s: {"type": "slimcnn.commands.common:UserError", "config": {}},
    "unregistered torch module": lambda s: {"type": "torch.nn.modules.conv:Conv3d",
                                            "config": {"in_channels": 16, "out_channels": 16, "kernel_size": 3}},
    "unregistered slimcnn module": lambda s: {"type": "slimcnn.gating.rig:Gate", "config": {}},
    "hidden in a Sequential": lambda s: {"type": "torch.nn:Sequential", "children": [
        ["0", {"type": "torch.nn:Identity", "config": {}}],
        ["1", {"type": "slimcnn.cli:main", "config": {"argv": ["export", s["model"], "--torchscript",
                                                               s["sentinel"]]}}]]},
}


@pytest.mark.parametrize("where", ["metadata", "model.json"])
@pytest.mark.parametrize("kind", list(BAD_LAYERS))
def test_load_refuses_a_spec_naming_anything_but_a_registered_layer(tmp_path, kind, where):
    save(create("cifar_resnet20"), tmp_path / "victim")
    sentinel = tmp_path / "sentinel.ts"
    layer = BAD_LAYERS[kind]({"model": str(tmp_path / "victim"), "sentinel": str(sentinel)})
    folder = _with_spec(tmp_path, _spec_naming(layer), where)
    bad_type = layer["type"] if layer["type"] != "torch.nn:Sequential" else layer["children"][1][1]["type"]
    with pytest.raises(SpecError, match="refusing to build .*" + bad_type.replace(".", r"\.")):
        load(folder)
    assert not sentinel.exists()


def test_the_sentinel_would_be_written_if_the_spec_were_obeyed(tmp_path):
    """The refusal above means something only if building that layer really acts; check the entry point does."""
    save(create("cifar_resnet20"), tmp_path / "victim")
    sentinel = tmp_path / "sentinel.ts"
    assert slimcnn.cli.main(["export", str(tmp_path / "victim"), "--torchscript", str(sentinel)]) == 0
    assert sentinel.exists()


def test_a_spec_in_model_json_alone_still_loads(tmp_path):
    m = surgered_resnet20()
    folder = _with_spec(tmp_path, model_spec(m), "model.json")
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(state, folder / "model.safetensors")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(load(folder)(x), m(x))


def test_save_refuses_an_unregistered_layer_and_register_layer_checks_its_class():
    from slimcnn.io import register_layer

    class Custom(nn.Module):
        def get_config(self) -> dict:
            return {}

    m = create("cifar_resnet20")
    m.layer1[0].shortcut = Custom()
    with pytest.raises(SpecError, match="not a registered layer type"):
        model_spec(m)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer(slimcnn.cli.main)
    with pytest.raises(TypeError, match="nn.Module subclass"):
        register_layer(slimcnn.commands.common.UserError)
    with pytest.raises(TypeError, match="get_config"):
        register_layer(nn.Conv3d)


def test_import_path_names_need_trust_and_library_names_do_not():
    from slimcnn.io import import_path_builder

    for name in ("cifar_resnet56", "tv:resnet18", "tv:mobilenet_v2", "timm:resnet18", "seg_resnet18"):
        assert import_path_builder(name) is None
    for name in ("my_net.py:factory", "pkg.models:build", "./nets/a.py", r"C:\nets\a.py:f", "nets/a.py:make"):
        assert import_path_builder(name) == name


USER_FILE = '''
from pathlib import Path

import slimcnn
import slimcnn.cli


def factory(num_classes=10):
    Path(__file__).with_name("builder_ran").touch()
    return slimcnn.create("cifar_resnet20", num_classes=num_classes)
'''


@pytest.fixture
def user_builder(tmp_path, monkeypatch):
    """A saved model whose base is built by ``<tmp>/user_net.py:factory``.

    ``create`` does not resolve import paths yet, so the test stands in for it: the stand-in imports the file
    and calls the factory, which is what resolving a user's builder will do.
    """
    import importlib.util

    import slimcnn.models

    (tmp_path / "user_net.py").write_text(USER_FILE)
    builder = f"{tmp_path / 'user_net.py'}:factory"
    real_create = slimcnn.models.create

    def create_with_import_paths(name, num_classes=10, **kwargs):
        if name != builder:
            return real_create(name, num_classes=num_classes, **kwargs)
        file, _, fn = name.rpartition(":")
        mod_spec = importlib.util.spec_from_file_location("user_net", file)
        mod = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(mod)
        model = getattr(mod, fn)(num_classes=num_classes)
        model.slimcnn_spec = {"name": name, "num_classes": num_classes, "kwargs": kwargs}
        return model

    monkeypatch.setattr(slimcnn.models, "create", create_with_import_paths)
    m = surgered_resnet20()
    spec = model_spec(m)
    spec["recipe"]["name"] = builder
    from safetensors.torch import save_file

    folder = tmp_path / "saved"
    folder.mkdir()
    state = {k: v.contiguous() for k, v in m.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"slimcnn_spec": json.dumps(spec)})
    return folder, builder, tmp_path / "builder_ran", m


def test_an_import_path_builder_loads_only_with_trust(user_builder):
    folder, builder, ran, m = user_builder
    with pytest.raises(SpecError, match=f"built by '{builder}'.*trust_builder=True"):
        load(folder)
    assert not ran.exists()
    back = load(folder, trust_builder=True)
    assert ran.exists()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(back(x), m(x))


def test_cli_needs_trust_builder_for_an_import_path_builder(user_builder, tmp_path, capsys):
    folder, builder, ran, _ = user_builder
    out = tmp_path / "m.ts"
    assert slimcnn.cli.main(["export", str(folder), "--torchscript", str(out), "--input", "3,32,32"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and builder in err and "--trust-builder" in err
    assert not ran.exists() and not out.exists()
    assert slimcnn.cli.main(["export", str(folder), "--torchscript", str(out), "--input", "3,32,32",
                             "--trust-builder"]) == 0
    assert ran.exists() and out.exists()


def test_a_refused_layer_is_reported_before_an_untrusted_builder_runs(user_builder):
    folder, builder, ran, m = user_builder
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        spec = json.loads(f.metadata()["slimcnn_spec"])
    spec["modules"]["layer1.0.conv1"] = {"type": "slimcnn.cli:main", "config": {"argv": ["--help"]}}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, folder / "model.safetensors",
              metadata={"slimcnn_spec": json.dumps(spec)})
    with pytest.raises(SpecError, match="refusing to build 'slimcnn.cli:main'"):
        load(folder, trust_builder=True)
    assert not ran.exists()
