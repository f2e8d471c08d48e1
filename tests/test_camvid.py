"""CamVid from ../shared/data/camvid: decoding, cache, resizing, loaders, augmentation, errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import slimcnn.gating  # noqa: F401  (registers the wrappers)
from slimcnn.data import DataError, ImageSet
from slimcnn.data.camvid import VOID, SegLoader, camvid_loaders, load_camvid
from slimcnn.data.loader import IMAGENET_MEAN, IMAGENET_STD
from slimcnn.metrics import SegMetrics
from slimcnn.models import create

from conftest import CAMVID as ROOT


@pytest.mark.shared
def test_decodes_val_like_pillow(tmp_path, monkeypatch):
    monkeypatch.setenv("SLIMCNN_CACHE", str(tmp_path))
    data = load_camvid(ROOT, "val", progress=False)
    assert data.images.shape == (101, 180, 240, 3) and data.images.dtype == torch.uint8
    assert data.labels.shape == (101, 180, 240) and data.labels.dtype == torch.uint8
    assert int(data.labels.max()) == VOID
    stems = sorted(p.stem for p in (ROOT / "val" / "images").iterdir())
    for i in (0, 57):
        img = np.asarray(Image.open(ROOT / "val" / "images" / f"{stems[i]}.jpg").convert("RGB"))
        lab = np.asarray(Image.open(ROOT / "val" / "labels" / f"{stems[i]}.png"))
        assert np.array_equal(data.images[i].numpy(), img)
        assert np.array_equal(data.labels[i].numpy(), lab)
    cached = sorted(p.name for p in (tmp_path / "camvid").iterdir())
    assert len(cached) == 2 and all(n.endswith(".npy") for n in cached)
    again = load_camvid(ROOT, "val", progress=False)  # from the cache this time
    assert torch.equal(again.images, data.images) and torch.equal(again.labels, data.labels)


@pytest.mark.shared
def test_resize_uses_nearest_for_labels():
    full = load_camvid(ROOT, "val", progress=False)
    half = load_camvid(ROOT, "val", size=(90, 120), progress=False)
    assert half.images.shape == (101, 90, 120, 3) and half.labels.shape == (101, 90, 120)
    assert torch.equal(half.labels, full.labels[:, ::2, ::2])
    # antialiased bilinear is what Pillow's BILINEAR resize does
    for i in (0, 99):
        ref = np.asarray(Image.fromarray(full.images[i].numpy()).resize((120, 90), Image.BILINEAR))
        assert np.abs(half.images[i].numpy().astype(int) - ref).max() <= 1


@pytest.mark.shared
def test_loaders_yield_normalised_images_and_int64_labels():
    loaders = camvid_loaders(ROOT, batch_size=2, size=(90, 120), train_limit=4, test_limit=3, splits=("train", "val"))
    assert len(loaders["train"]) == 2 and len(loaders["val"]) == 2
    x, y = next(iter(loaders["train"]))
    assert x.shape == (2, 3, 90, 120) and x.dtype == torch.float32
    assert y.shape == (2, 90, 120) and y.dtype == torch.int64 and 0 <= y.min() and y.max() <= VOID
    x, y = next(iter(loaders["val"]))  # no augmentation: exactly the normalised frames
    raw = loaders["val"].data
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255
    assert torch.allclose(x, (raw.images[:2].permute(0, 3, 1, 2).float() - mean) / std)
    assert torch.equal(y, raw.labels[:2].long())


@pytest.mark.shared
def test_flip_moves_image_and_label_together():
    data = load_camvid(ROOT, "val", size=(45, 60), progress=False).subset(range(16))
    plain = SegLoader(data, batch_size=16)
    aug = SegLoader(data, batch_size=16, shuffle=False, augment=True, seed=3)
    (x0, y0), (x1, y1) = next(iter(plain)), next(iter(aug))
    flipped = [not torch.equal(y1[i], y0[i]) for i in range(16)]
    assert 0 < sum(flipped) < 16
    for i, f in enumerate(flipped):
        assert torch.equal(x1[i], x0[i].flip(2) if f else x0[i])
        assert torch.equal(y1[i], y0[i].flip(1) if f else y0[i])


@pytest.mark.shared
def test_scale_augmentation_keeps_labels_aligned():
    # synthetic frames whose colour encodes the label in 16x16 blocks: after zoom and crop the colour under a
    # labelled pixel must still match its label, except on block borders that bilinear resampling blurs
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 11, (8, 4, 6), generator=g).repeat_interleave(16, 1).repeat_interleave(16, 2)
    images = (labels * 20).to(torch.uint8)[..., None].repeat(1, 1, 1, 3)
    data = ImageSet(images, labels.to(torch.uint8), [])
    loader = SegLoader(data, batch_size=8, augment=True, scale=(0.6, 1.6), mean=(0, 0, 0), std=(1 / 255,) * 3)
    x, y = next(iter(loader))
    assert x.shape == (8, 3, 64, 96) and y.shape == (8, 64, 96)
    assert 0 <= y.min() and y.max() <= VOID
    assert (y == VOID).any()  # some frames were zoomed out: their borders are void

    def agreement(lab: torch.Tensor) -> float:
        return float(((x[:, 0] - lab * 20).abs() < 1)[lab != VOID].float().mean())

    assert agreement(y) > 0.85
    assert agreement(y.flip(2)) < 0.3  # the check can tell a misaligned label apart


@pytest.mark.shared
def test_gated_segmentation_model_on_a_camvid_batch():
    x, y = next(iter(camvid_loaders(ROOT, batch_size=2, size=(64, 80), test_limit=2, splits=("val",))["val"]))
    torch.manual_seed(0)
    model = create("seg_tiny", num_classes=11, gating="dig", variant="cascaded", iterations=2).eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (2, 11, 64, 80)
    m = SegMetrics()
    m.update(out, y)
    r = m.compute()
    assert r["pixels"] == int((y != VOID).sum()) and 0 <= r["miou"] <= 100


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_camvid(tmp_path / "nowhere", "train")
    with pytest.raises(DataError, match="has no val/ folder"):
        load_camvid(tmp_path, "val")
    (tmp_path / "train" / "images").mkdir(parents=True)
    with pytest.raises(DataError, match="labels is missing"):
        load_camvid(tmp_path, "train")
    with pytest.raises(DataError, match="split must be one of"):
        load_camvid(tmp_path, "dev")
