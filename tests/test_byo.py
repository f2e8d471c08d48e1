"""Bring your own model and data (issue 14): any image folder, a user's own builder, timm, layer control.

Everything runs on a tiny image folder written into tmp_path (3 classes, mixed-size JPEG and PNG images of
40x36 and 24x24 px) and a user file defining a small network with a squeeze-excitation block, a depthwise conv
and a custom head, at a 32 px input, so each compression takes seconds.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import slimcnn
from slimcnn.cli import main
from slimcnn.data import DataError, classification_loaders, folder_loaders

USER_NET = '''
import torch
from torch import nn


class SE(nn.Module):
    """Squeeze-excitation: a channel gate computed from the pooled features."""

    def __init__(self, c, r=4):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(c, c // r, 1)
        self.act = nn.ReLU()
        self.expand = nn.Conv2d(c // r, c, 1)
        self.gate = nn.Sigmoid()

    def forward(self, x):
        return x * self.gate(self.expand(self.act(self.reduce(self.pool(x)))))


class Head(nn.Module):
    def __init__(self, c, n):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Linear(c, 24)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(24, n)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(torch.flatten(self.pool(x), 1))))


class TinyNet(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False),
                                nn.BatchNorm2d(16), nn.ReLU())
        self.pw = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.se = SE(32)
        self.conv = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = Head(32, num_classes)

    def forward(self, x):
        return self.head(self.conv(self.se(self.pw(self.dw(self.stem(x))))))


def build(num_classes=10):
    return TinyNet(num_classes)


def broken(num_classes=10):
    raise RuntimeError("this factory always fails")
'''

CLASSES = ("cat", "dog", "eel")
FAST = ["--input-size", "32", "--workers", "0", "--batch-size", "4", "--bn-recalib", "2", "--latency-batch", "1",
        "--latency-budget", "0.2"]


def write_images(root: Path, per_class: dict[str, int] | None = None, seed: int = 0) -> Path:
    """train/ (4 per class) and val/ (2 per class): JPEG 40x36 and PNG 24x24 alternating, one grayscale PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", 4), ("val", 2)):
        for ci, c in enumerate(CLASSES):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range((per_class or {}).get(f"{split}/{c}", n)):
                w, h = ((40, 36), (24, 24))[i % 2]
                a = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
                a[..., ci] = 255  # a class colour, so the labels mean something
                im = Image.fromarray(a)
                if i % 2:
                    (im.convert("L") if i == 3 else im).save(d / f"{i}.png")
                else:
                    im.save(d / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def byo(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("byo")
    (tmp / "user_net.py").write_text(USER_NET)
    return {"data": write_images(tmp / "data"), "net": tmp / "user_net.py", "tmp": tmp}


def compress_args(byo: dict[str, Path], method: str, out: Path, *extra: str, epochs: int = 0) -> list[str]:
    return ["compress", "--method", method, "--model", f"{byo['net']}:build", "--data", str(byo["data"]),
            "--epochs", str(epochs), "--out", str(out), *FAST, *extra]


# ------------------------------------------------------------------------------------------------ data


def test_image_folder_loader_reads_mixed_sizes_and_formats(byo):
    loaders = folder_loaders(byo["data"], batch_size=5, input_size=32, workers=0)
    assert loaders["train"].classes == list(CLASSES) and len(loaders["train"].dataset) == 12
    xs, ys = zip(*loaders["test"])  # val/ stands in for test/
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (6, 3, 32, 32) and y.tolist() == [0, 0, 1, 1, 2, 2]
    x2 = torch.cat([b for b, _ in loaders["test"]])
    assert torch.equal(x, x2)  # eval transforms are deterministic
    sub = folder_loaders(byo["data"], batch_size=4, train_limit=6, input_size=(32, 24), workers=0)["train"]
    labels = torch.cat([y for _, y in sub])
    assert torch.bincount(labels).tolist() == [2, 2, 2] and next(iter(sub))[0].shape[-2:] == (32, 24)


def test_train_split_is_sharded_by_a_distributed_sampler(byo):
    seen = []
    for rank in (0, 1):
        ld = folder_loaders(byo["data"], batch_size=2, input_size=16, rank=rank, world_size=2, workers=0,
                            splits=("train",))["train"]
        ld.set_epoch(3)
        seen.append([i for i in ld.sampler])
        assert len(ld) == 3
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 12


def test_cifar_layout_keeps_the_in_memory_path(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("a", "b"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (32, 32), (i * 90, 20, 200)).save(tmp_path / split / c / f"{i}.png")
    fast = classification_loaders(tmp_path, batch_size=4, splits=("test",))["test"]
    assert type(fast).__name__ == "Loader"
    resized = classification_loaders(tmp_path, batch_size=4, input_size=48, splits=("test",))["test"]
    assert type(resized).__name__ == "FolderLoader" and next(iter(resized))[0].shape == (4, 3, 48, 48)


def test_broken_images_stop_with_the_file_named_or_are_skipped_and_counted(byo, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(byo["data"], data)
    bad = data / "val" / "dog" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(DataError, match="broken.jpg.*--skip-bad-images"):
        list(folder_loaders(data, input_size=32, workers=0, splits=("test",))["test"])
    ld = folder_loaders(data, input_size=32, workers=1, skip_bad_images=True, splits=("test",))["test"]
    assert sum(len(y) for _, y in ld) == 6 and ld.skipped and "broken.jpg" in ld.skipped[0]


@pytest.mark.parametrize("case", ["no images", "empty class", "no val"])
def test_bad_folders_are_one_data_error(tmp_path, case):
    if case == "no images":
        (tmp_path / "train" / "cat").mkdir(parents=True)
        (tmp_path / "train" / "cat" / "notes.txt").write_text("x")
        match = "no images"
    elif case == "empty class":
        write_images(tmp_path, {"train/dog": 0})
        match = "class folder .*dog has no images"
    else:
        write_images(tmp_path)
        import shutil

        shutil.rmtree(tmp_path / "val")
        match = "no val/ or test/"
    with pytest.raises(DataError, match=match):
        folder_loaders(tmp_path, input_size=32)


# ------------------------------------------------------------------------------------------------ models


def test_a_users_builder_and_its_weights(byo, tmp_path):
    from safetensors.torch import save_file

    name = f"{byo['net']}:build"
    m = slimcnn.create(name, num_classes=3)
    assert m.head.fc2.out_features == 3 and m.slimcnn_spec["name"] == name  # an absolute path already
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in m.state_dict().items()}
    torch.save(state, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    from slimcnn.cli import build_parser
    from slimcnn.commands.common import build_model

    for f in ("w.pth", "w.safetensors"):
        args = build_parser().parse_args(["profile", "--model", name, "--num-classes", "3", "--weights",
                                          str(tmp_path / f)])
        got = build_model(args)
        assert torch.equal(got.head.fc1.weight, state["head.fc1.weight"]), f


def test_package_module_builder(byo, monkeypatch):
    monkeypatch.syspath_prepend(str(byo["net"].parent))
    m = slimcnn.create("user_net:build", num_classes=4)
    assert m.head.fc2.out_features == 4


# ------------------------------------------------------------------------------------------------ compress


METHODS = {"l1": 0, "dagger": 1, "csgd": 1}


@pytest.fixture(scope="module")
def compressed(byo) -> dict[str, Path]:
    """Each channel method on the user's network with the head excluded, plus TRP (head excluded too; its target
    at 0.9, the nearest this small net's one decomposable conv reaches) and L1 without exclusion."""
    outs = {}
    for method, epochs in METHODS.items():
        out = byo["tmp"] / f"out_{method}"
        assert main(compress_args(byo, method, out, "--exclude", "head", epochs=epochs)) == 0, method
        outs[method] = out
    outs["trp"] = byo["tmp"] / "out_trp"
    assert main(compress_args(byo, "trp", outs["trp"], "--exclude", "head", "--target-macs", "0.9", epochs=1)) == 0
    outs["l1_whole"] = byo["tmp"] / "out_l1_whole"
    assert main(compress_args(byo, "l1", outs["l1_whole"], "--min-keep", "conv=0.75")) == 0
    return outs


def test_compressed_users_model_loads_in_a_fresh_process_with_equal_outputs(compressed, tmp_path):
    from safetensors.torch import save_file

    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    expected = {}
    for name, out in compressed.items():
        report = json.loads((out / "report.json").read_text())
        assert report["within_tol"] is True, name
        with torch.no_grad():
            expected[name] = slimcnn.load(out, trust_builder=True)(x)
    save_file({"x": x, **expected}, tmp_path / "expected.safetensors")
    script = textwrap.dedent(f"""
        import torch, slimcnn
        from safetensors.torch import load_file
        ref = load_file({str(tmp_path / 'expected.safetensors')!r})
        for name, out in {json.dumps({k: str(v) for k, v in compressed.items()})}.items():
            with torch.no_grad():
                y = slimcnn.load(out, trust_builder=True)(ref["x"])
            assert torch.equal(y, ref[name]), name
        print("same")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip() == "same", done.stderr[-2000:]


def test_exclude_keeps_the_head_whole_and_is_reported(compressed, byo):
    base = slimcnn.create(f"{byo['net']}:build", num_classes=3)
    for method in ("l1", "dagger", "csgd", "trp"):
        m = slimcnn.load(compressed[method], trust_builder=True)
        for layer in ("head.fc1", "head.fc2"):
            assert m.get_submodule(layer).weight.shape == base.get_submodule(layer).weight.shape, (method, layer)
        control = json.loads((compressed[method] / "report.json").read_text())["layer_control"]
        assert control["exclude"] == ["head"] and control["excluded_unchanged"]
        assert "never pruned: head" in (compressed[method] / "report.md").read_text()
    whole = slimcnn.load(compressed["l1_whole"], trust_builder=True)
    assert whole.head.fc1.weight.shape[1] < 32  # without --exclude the head's input is pruned
    report = json.loads((compressed["l1_whole"] / "report.json").read_text())
    assert report["layer_control"]["floors"] == {"conv.0": 24} and whole.conv[0].out_channels >= 24


def test_onnx_export_of_a_users_compressed_model(compressed, tmp_path):
    pytest.importorskip("onnxruntime")
    out = tmp_path / "m.onnx"
    assert main(["export", str(compressed["l1"]), "--onnx", str(out), "--check", "--input", "3,32,32",
                 "--trust-builder"]) == 0
    assert out.is_file()


def test_no_latency_and_unsupported_layer_control(byo, tmp_path, capsys):
    out = tmp_path / "nolat"
    assert main(compress_args(byo, "l1", out, "--no-latency")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["latency_ms"] is None and "not timed" in (out / "report.md").read_text()
    capsys.readouterr()
    bad = tmp_path / "never"
    assert main(compress_args(byo, "trp", bad, "--min-keep", "conv=0.5", epochs=1)) == 2
    assert main(compress_args(byo, "l1", bad, "--exclude", "hed")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "does not support --min-keep" in err[0] and "'hed' matches no layer" in err[1]
    assert not bad.exists()


def test_latency_budget_shrinks_a_batch_too_large_to_time():
    from slimcnn.profile import budgeted_latency

    models = {"a": slimcnn.create("cifar_resnet20"), "b": slimcnn.create("cifar_resnet20")}
    t, batch, reps = budgeted_latency(models, (3, 32, 32), batch=4096, budget_s=0.3)
    assert 1 <= batch < 4096 and reps >= 1 and t["a"] > 0


# ------------------------------------------------------------------------------------------------ bad input


def _bad_cases(byo: dict[str, Path], tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "empty").mkdir()
    (tmp / "empty" / "train" / "cat").mkdir(parents=True)
    empty_class = write_images(tmp / "empty_class", {"train/eel": 0})
    torch.save({"nope.weight": torch.zeros(2)}, tmp / "wrong.pth")
    good = ["--model", f"{byo['net']}:build", "--data", str(byo["data"])]
    return {
        "no images": (["--model", f"{byo['net']}:build", "--data", str(tmp / "empty")], "no images"),
        "empty class": (["--model", f"{byo['net']}:build", "--data", str(empty_class)], "eel has no images"),
        "missing model file": (["--model", str(tmp / "nowhere.py") + ":build", "--data", str(byo["data"])],
                               "model file not found"),
        "missing factory": (["--model", f"{byo['net']}:nothing", "--data", str(byo["data"])], "no callable"),
        "factory raises": (["--model", f"{byo['net']}:broken", "--data", str(byo["data"])],
                           "raised RuntimeError: this factory always fails"),
        "weights that do not fit": ([*good, "--weights", str(tmp / "wrong.pth")], "does not fit the model"),
    }


def test_bad_input_is_one_line_exit_2_nothing_written(byo, tmp_path, capsys):
    for case, (args, message) in _bad_cases(byo, tmp_path).items():
        out = tmp_path / "out"
        code = main(["compress", "--method", "l1", "--out", str(out), *FAST, *args])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and message in err, (case, err)
        assert not out.exists(), case


def test_a_builder_that_cannot_be_imported_is_one_error_at_load(compressed, tmp_path):
    import shutil

    from slimcnn.models import ModelBuildError

    moved = tmp_path / "moved"
    shutil.copytree(compressed["l1"], moved)
    spec = json.loads((moved / "model.json").read_text())
    spec["recipe"]["name"] = str(tmp_path / "gone.py") + ":build"
    (moved / "model.json").write_text(json.dumps(spec))
    from safetensors.torch import load_file, save_file

    save_file(load_file(moved / "model.safetensors"), moved / "model.safetensors",
              metadata={"slimcnn_spec": json.dumps(spec)})
    with pytest.raises(ModelBuildError, match="model file not found: .*gone.py"):
        slimcnn.load(moved, trust_builder=True)


# ------------------------------------------------------------------------------------------------ timm


def test_timm_resnet18_compresses_to_half_the_macs(byo, tmp_path):
    if importlib.util.find_spec("timm") is None:
        pytest.skip('timm is not installed (the timm extra: pip install -e ".[timm]")')
    out = tmp_path / "timm"
    assert main(["compress", "--method", "l1", "--model", "timm:resnet18", "--data", str(byo["data"]), "--epochs",
                 "0", "--out", str(out), "--input-size", "64", "--workers", "0", "--batch-size", "6",
                 "--bn-recalib", "1", "--no-latency"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert abs(report["macs_ratio"] - 0.5) <= 0.005 and report["within_tol"]
    m = slimcnn.load(out)  # a timm base needs no trust: it is a library name
    x = torch.randn(2, 3, 64, 64)
    assert m(x).shape == (2, 3)


def test_timm_layers_surgery_resizes_save_and_load_without_pickle(tmp_path):
    """timm's BatchNormAct2d (a BatchNorm2d subclass slimcnn cannot construct) is recorded as a resize of the
    module the base model builds, so a pruned MobileNetV3 loads back with equal outputs."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip('timm is not installed (the timm extra: pip install -e ".[timm]")')
    from slimcnn.io import SpecError

    m = slimcnn.create("timm:mobilenetv3_small_050", num_classes=3).eval()
    x = torch.randn(2, 3, 64, 64)
    method = slimcnn.methods.create("l1", target_macs=0.5)
    compact = method.finalize(method.prepare(m, x)).eval()
    slimcnn.save(compact, tmp_path / "m")
    spec = json.loads((tmp_path / "m" / "model.json").read_text())
    resized = [k for k, v in spec["modules"].items() if "resize" in v]
    assert resized and spec["modules"][resized[0]]["resize"]["of"].endswith("BatchNormAct2d")
    with torch.no_grad():
        assert torch.equal(slimcnn.load(tmp_path / "m")(x), compact(x))
    spec["modules"][resized[0]]["resize"]["of"] = "torch.nn.modules.conv:Conv2d"
    from safetensors.torch import load_file, save_file

    save_file(load_file(tmp_path / "m" / "model.safetensors"), tmp_path / "m" / "model.safetensors",
              metadata={"slimcnn_spec": json.dumps(spec)})
    with pytest.raises(SpecError, match="resizes .* as a torch.nn.modules.conv:Conv2d"):
        slimcnn.load(tmp_path / "m")


def test_train_and_eval_on_an_image_folder(byo, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--data", str(byo["data"]), "--input-size", "32", "--workers", "0", "--batch-size", "4",
              "--no-progress"]
    assert main(["train", "--model", f"{byo['net']}:build", "--epochs", "1", "--out", str(out), *common]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", f"{byo['net']}:build", "--weights", str(out), "--trust-builder", *common]) == 0
    lines = capsys.readouterr().out
    assert "top1:" in lines and "images: 6" in lines
