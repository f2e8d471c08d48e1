"""SegMetrics: a hand-computed case, ignored pixels, absent classes, and agreement with scikit-learn."""
from __future__ import annotations

import math

import pytest
import torch
from sklearn.metrics import confusion_matrix, jaccard_score

from slimcnn.metrics import SegMetrics


def test_hand_computed_case():
    # 4 classes + ignore 4. Counted pixels (target -> prediction):
    #   0->0, 0->0, 0->1, 1->1, 1->1, 2->0, 2->2;  the target-4 pixels are ignored.
    #   class 0: TP 2, FP 1 (2->0), FN 1 (0->1): IoU 2/4
    #   class 1: TP 2, FP 1 (0->1), FN 0:        IoU 2/3
    #   class 2: TP 1, FP 0, FN 1 (2->0):        IoU 1/2
    #   class 3: absent from targets and predictions: undefined, left out of the mean
    #   (class 3 is predicted only on ignored pixels, which do not count)
    target = torch.tensor([[0, 0, 0], [1, 1, 2], [2, 4, 4]])
    pred = torch.tensor([[0, 0, 1], [1, 1, 0], [2, 3, 3]])
    m = SegMetrics(num_classes=4, ignore_index=4)
    m.update(pred, target)
    r = m.compute()
    assert r["pixels"] == 7
    assert r["iou"][:3] == pytest.approx([50.0, 200 / 3, 50.0])
    assert r["iou"][3] is None
    assert r["miou"] == pytest.approx((50 + 200 / 3 + 50) / 3)
    assert r["pixel_acc"] == pytest.approx(500 / 7)


def test_logits_and_batches_accumulate():
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 7, 9)
    target = torch.randint(0, 6, (6, 7, 9))  # 5 = ignore
    whole = SegMetrics(5, ignore_index=5)
    whole.update(logits, target)
    parts = SegMetrics(5, ignore_index=5)
    for i in range(0, 6, 2):
        parts.update(logits[i:i + 2], target[i:i + 2])
    assert torch.equal(whole.confusion, parts.confusion)
    assert whole.compute() == parts.compute()
    parts.reset()
    assert parts.confusion.sum() == 0 and math.isnan(parts.compute()["miou"])


def test_agrees_with_scikit_learn():
    torch.manual_seed(1)
    pred = torch.randint(0, 11, (3, 20, 30))
    target = torch.randint(0, 12, (3, 20, 30))
    m = SegMetrics()
    m.update(pred, target)
    keep = target.flatten() != 11
    y, p = target.flatten()[keep].numpy(), pred.flatten()[keep].numpy()
    assert torch.equal(m.confusion, torch.from_numpy(confusion_matrix(y, p, labels=list(range(11)))))
    ious = jaccard_score(y, p, labels=list(range(11)), average=None)
    assert m.compute()["iou"] == pytest.approx([100 * v for v in ious])
    assert m.compute()["miou"] == pytest.approx(100 * ious.mean())


def test_class_predicted_but_never_present_counts_as_zero():
    m = SegMetrics(num_classes=3, ignore_index=None)
    m.update(torch.tensor([0, 2, 2]), torch.tensor([0, 0, 0]))
    r = m.compute()
    assert r["iou"] == [pytest.approx(100 / 3), None, 0.0]
    assert r["miou"] == pytest.approx(50 / 3)


def test_bad_shapes_are_clear_errors():
    m = SegMetrics(num_classes=11)
    with pytest.raises(ValueError, match="logits have 5 classes"):
        m.update(torch.randn(1, 5, 4, 4), torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="does not match target"):
        m.update(torch.zeros(1, 4, 4, dtype=torch.long), torch.zeros(1, 4, 5, dtype=torch.long))
