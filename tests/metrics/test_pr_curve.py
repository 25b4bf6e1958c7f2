"""Precision-recall curves: same matching as COCO AP, pycocotools' AP from the curve, hand-checked shapes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics import coco_metrics, precision_recall_curve
from tests.metrics.factory import make_image, perfect, shifted
from tests.metrics.test_coco import CLASSES, _class_values, _fixture, _pycocotools, _random_fixture

A = [10.0, 10.0, 20.0, 20.0]
B = [50.0, 50.0, 70.0, 60.0]


@pytest.mark.parametrize("images", [_fixture(), _random_fixture(1), _random_fixture(2)], ids=["hand", "r1", "r2"])
def test_ap_equals_coco_metrics_and_pycocotools_per_class(images):
    curves = precision_recall_curve(images, CLASSES)
    ours = coco_metrics(images, CLASSES)
    reference = _pycocotools(images, len(CLASSES))
    assert set(curves) == set(CLASSES)
    for label, name in enumerate(CLASSES):
        assert curves[name].ap == pytest.approx(ours.per_class[name].ap50, abs=1e-9)
        assert curves[name].ap == pytest.approx(_class_values(reference, label)[1], abs=1e-12)
        assert curves[name].n_ground_truth == ours.per_class[name].n_ground_truth


def test_at_iou_0_75_it_equals_ap75():
    images = _random_fixture(1)
    curves = precision_recall_curve(images, CLASSES, iou_threshold=0.75)
    per_class = coco_metrics(images, CLASSES).per_class
    for name in CLASSES:
        assert curves[name].ap == pytest.approx(per_class[name].ap75, abs=1e-9)
        assert curves[name].iou_threshold == 0.75


def test_float64_ap_is_pycocotools_where_monai_float32_recall_is_not():
    # r0 hits MONAI's float32 recall quirk (see test_coco.py): the curve's AP follows pycocotools exactly.
    images = _random_fixture(0)
    curves = precision_recall_curve(images, CLASSES)
    reference = _pycocotools(images, len(CLASSES))
    ours = coco_metrics(images, CLASSES)
    differences = []
    for label, name in enumerate(CLASSES):
        assert curves[name].ap == pytest.approx(_class_values(reference, label)[1], abs=1e-12)
        differences.append(curves[name].ap - ours.per_class[name].ap50)
    # One recall point read from the next detection: at most 1/101 of a precision drop, in one class here.
    assert all(0.0 <= difference < 1 / 101 for difference in differences)
    assert sum(difference > 0 for difference in differences) == 1


def test_curve_arrays_after_each_detection():
    # Scores 0.9 hit, 0.8 false positive, 0.7 hit: precision 1, 1/2, 2/3 and recall 1/2, 1/2, 1.
    image = make_image(
        "p",
        truth=[(A, 0), (B, 0)],
        predictions=[(A, 0, 0.9), (shifted(B, dx=100.0), 0, 0.8), (shifted(B, dx=1.0), 0, 0.7)],
    )
    curve = precision_recall_curve([image], CLASSES)["caries"]
    np.testing.assert_allclose(curve.scores, [0.9, 0.8, 0.7])
    np.testing.assert_allclose(curve.recall, [0.5, 0.5, 1.0])
    np.testing.assert_allclose(curve.precision, [1.0, 0.5, 2.0 / 3.0])
    np.testing.assert_allclose(curve.interpolated_precision, [1.0, 2.0 / 3.0, 2.0 / 3.0])
    assert curve.ap == pytest.approx((51 * 1.0 + 50 * 2.0 / 3.0) / 101)


def test_perfect_predictions_and_no_predictions():
    truth = [make_image("a", truth=[(A, 0), (B, 1)]), make_image("b", truth=[(A, 0)]), make_image("neg")]
    curves = precision_recall_curve(perfect(truth), CLASSES)
    for curve in curves.values():
        assert curve.ap == pytest.approx(1.0, abs=1e-12)
        assert curve.recall[-1] == 1.0
    empty = precision_recall_curve(truth, CLASSES)["caries"]
    assert (empty.ap, empty.recall.size, empty.n_ground_truth) == (0.0, 0, 2)


def test_class_without_ground_truth_has_no_curve():
    image = make_image("p", truth=[(A, 0)], predictions=[(A, 0, 0.9), (B, 1, 0.8)])
    assert list(precision_recall_curve([image], CLASSES)) == ["caries"]


def test_iou_threshold_must_be_a_coco_one():
    with pytest.raises(InvalidArgumentError, match="COCO thresholds"):
        precision_recall_curve(_fixture(), CLASSES, iou_threshold=0.3)


def test_to_dict_is_plain_json():
    curve = precision_recall_curve(_fixture(), CLASSES)["caries"]
    payload = curve.to_dict()
    assert json.loads(json.dumps(payload)) == payload
    assert len(payload["recall"]) == len(payload["precision"]) == len(payload["scores"])
