"""Detectors and bad input (issue 38, items 2 and 5).

torchvision's detectors take a list of images and return, in eval mode, a list of dicts whose box counts depend on
the values (score threshold, NMS); in train mode they need targets. slimcnn traces and validates them in eval mode
on the list input: the layers that produce the outputs (class and box heads, and the proposal head whose outputs
leave the autograd graph to select boxes) keep their output channels, the post-processing stays out of the
dependency graph, a head shared across pyramid levels prunes as one layer, and the pruned net must equal the
original with the removed channels masked, box counts included. Train mode is checked here, with dummy targets.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from slimcnn import methods
from slimcnn.graph import channel_groups
from slimcnn.outputs import output_items
from slimcnn.profile import profile
from conftest import CIFAR, one_line_compress_error

detection = pytest.importorskip("torchvision.models.detection")

#: builder keywords: random weights, small images; where layers run on proposals or detections, counts capped low
#: enough to be reached whatever the weights, so that the MACs of a pruned net can be predicted (see the report)
CAPPED = dict(rpn_post_nms_top_n_test=100, box_detections_per_img=10, box_score_thresh=0.0)
DETECTORS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": dict(min_size=128, max_size=128),
    "retinanet_resnet50_fpn": dict(min_size=128, max_size=128),
    "fcos_resnet50_fpn": dict(min_size=128, max_size=128),
    "ssdlite320_mobilenet_v3_large": {},
    "fasterrcnn_resnet50_fpn": dict(min_size=128, max_size=128, **CAPPED),
    "maskrcnn_resnet50_fpn": dict(min_size=128, max_size=128, **CAPPED),
    "keypointrcnn_resnet50_fpn": dict(min_size=128, max_size=128, num_keypoints=5, **CAPPED),
}
SLOW = {"maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn"}
#: the last layer of each class and box head (and the proposal head's), whose outputs must stay whole
HEADS = {
    "fasterrcnn_mobilenet_v3_large_320_fpn": ["roi_heads.box_predictor.cls_score", "roi_heads.box_predictor.bbox_pred",
                                              "rpn.head.cls_logits", "rpn.head.bbox_pred"],
    "retinanet_resnet50_fpn": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg"],
    "fcos_resnet50_fpn": ["head.classification_head.cls_logits", "head.regression_head.bbox_reg",
                          "head.regression_head.bbox_ctrness"],
    "ssdlite320_mobilenet_v3_large": ["head.classification_head.module_list.0.1",
                                      "head.regression_head.module_list.0.1"],
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return getattr(detection, name)(weights=None, weights_backbone=None, num_classes=3, **DETECTORS[name]).eval()


def dummy_targets(name: str, n: int) -> list[dict[str, torch.Tensor]]:
    t = {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])}
    if name.startswith("mask"):
        t["masks"] = torch.zeros(1, 128, 128, dtype=torch.uint8)
    if name.startswith("keypoint"):
        t["keypoints"] = torch.tensor([[[20.0, 20.0, 1.0]] * 5])
    return [t] * n


def width(module: nn.Module) -> int:
    return getattr(module, "out_channels", None) or module.out_features


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in DETECTORS])
def test_detector_prunes_to_half_and_runs(name):
    model = build(name)
    x = [torch.rand(3, 128, 128)]
    base = profile(model, example_input=x)
    assert base.macs > 0 and base.input_shape == (3, 128, 128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eval mode only: a detector does not run in train mode without targets
        m = methods.create("l1", target_macs=0.5)
        small = m.finalize(m.prepare(model, x))
    assert abs(profile(small, example_input=x).macs / base.macs - 0.5) <= 0.005
    for head in HEADS.get(name, []):  # output layers keep their outputs
        assert width(small.get_submodule(head)) == width(model.get_submodule(head)), head
    with torch.no_grad():
        before, after = model(x), small(x)
    assert [(p, t.shape[1:]) for p, t in output_items(before)] == [(p, t.shape[1:]) for p, t in output_items(after)]
    small.train()  # training needs targets; BatchNorm on 1x1 maps (SSDlite's extras) needs two images
    losses = small(x + [x[0].flip(-1)], dummy_targets(name, 2))
    sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values())


class LevelHead(nn.Module):
    """One head applied to two feature levels (shared weights), as a detector's head across its pyramid."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 4, 1))

    def forward(self, x):
        f1 = self.a(x)
        f2 = self.b(f1)
        return [self.head(f1), self.head(f2)]


def test_head_shared_across_levels_prunes_as_one_layer():
    groups = {g.key: g for g in channel_groups(LevelHead(), torch.randn(1, 3, 16, 16))}
    assert groups["head.0"].prunable  # the head's inner channels
    assert groups["a"].prunable and {m.module for m in groups["a"].members} >= {"a", "b", "head.0"}
    assert not groups["head.2"].prunable and "output" in groups["head.2"].reason


class Detached(nn.Module):
    """A branch whose output leaves the autograd graph (detached to pick items, as a proposal head's)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.score, self.fc = nn.Conv2d(3, 32, 3, padding=1), nn.Conv2d(32, 2, 1), nn.Linear(32, 5)

    def forward(self, x):
        f = self.a(x)
        pick = self.score(f).detach().flatten(1).argmax(1) % f.shape[1]
        return self.fc(f.mean((2, 3))) + pick[:, None]


def test_detached_branch_is_traced_and_kept_whole():
    groups = {g.key: g for g in channel_groups(Detached(), torch.randn(1, 3, 8, 8))}
    assert {m.module for m in groups["a"].members} == {"a", "score", "fc"}  # score reads a: it must be edited
    assert not groups["score"].prunable
    m = methods.create("l1", target_macs=0.5)
    small = m.finalize(m.prepare(Detached(), torch.randn(1, 3, 8, 8)))
    assert small.score.in_channels == small.a.out_channels < 32 and small.score.out_channels == 2


class Broken(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 8, 3), nn.Linear(10, 4)

    def forward(self, x):
        return self.fc(self.a(x).flatten(1))


class NoTensor(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return {"channels": int(self.a(x).shape[1]), "note": "no tensor"}


def broken(num_classes: int = 10) -> nn.Module:
    return Broken()


def no_tensor(num_classes: int = 10) -> nn.Module:
    return NoTensor()


@pytest.mark.parametrize("model,words", [(Broken, "Broken does not run forward on the example input at fc (Linear)"),
                                         (NoTensor, "NoTensor's output holds no tensor")])
def test_bad_input_is_one_line(model, words):
    m = methods.create("l1", target_macs=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing said before the error
        with pytest.raises(ValueError) as e:
            m.finalize(m.prepare(model(), torch.randn(1, 3, 8, 8)))
    assert words in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ValueError, match=words.split(" at ")[0]):
        profile(model(), example_input=torch.randn(1, 3, 8, 8))


@pytest.mark.parametrize("builder,words", [("broken", "does not run forward on the example input"),
                                           ("no_tensor", "output holds no tensor")])
def test_bad_input_through_the_cli_builder_path(builder, words, capsys, tmp_path):
    out = tmp_path / "out"
    err = one_line_compress_error(capsys, ["compress", "--method", "l1", "--model", f"{__file__}:{builder}",
                                           "--data", str(CIFAR), "--train-limit", "64", "--test-limit", "50",
                                           "--epochs", "1", "--input", "3,32,32", "--latency-batch", "1",
                                           "--out", str(out)])
    assert words in err
    assert not out.exists()
