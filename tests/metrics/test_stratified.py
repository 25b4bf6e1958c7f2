"""Sensitivity at the operating point by lesion depth and conspicuity, and false positives per image."""

from __future__ import annotations

import numpy as np
import pytest

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics import EvaluatedImage
from caries_mim.metrics.stratified import conspicuity_bin, operating_point_report


def _image(image_id, gt, preds):
    gt = np.asarray(gt, dtype=np.float64).reshape(-1, 4)
    boxes = np.asarray([box for box, _ in preds], dtype=np.float64).reshape(-1, 4)
    return EvaluatedImage(
        image_id=image_id,
        gt_boxes=gt,
        gt_labels=np.zeros(len(gt), dtype=np.int64),
        pred_boxes=boxes,
        pred_labels=np.zeros(len(boxes), dtype=np.int64),
        pred_scores=np.asarray([score for _, score in preds], dtype=np.float64),
    )


def test_found_lesions_and_false_positives_are_counted_at_the_threshold():
    images = [
        # An enamel lesion found at 0.9, a deep one found only at 0.3, a false positive at 0.8.
        _image(
            1,
            [[0, 0, 10, 10], [50, 50, 70, 70]],
            [([0, 0, 10, 10], 0.9), ([50, 50, 70, 70], 0.3), ([90, 90, 99, 99], 0.8)],
        ),
        # An outer-dentin lesion nothing finds; a low-scoring false positive.
        _image(2, [[20, 20, 30, 30]], [([60, 0, 70, 5], 0.2)]),
        _image(3, [], [([5, 5, 9, 9], 0.7)]),
    ]
    strata = {
        "depth": [["enamel", "inner_dentin"], ["outer_dentin"], []],
        "conspicuity": [[conspicuity_bin(6.0), conspicuity_bin(25.0)], [None], []],
    }
    report = operating_point_report(images, strata, threshold=0.5)
    assert report.sensitivity == pytest.approx(1 / 3)
    assert report.false_positives_per_image == pytest.approx(2 / 3)  # 0.8 and 0.7 are shown, 0.2 is not
    depth = report.to_dict()["by_depth"]
    assert list(depth) == ["enamel", "outer_dentin", "inner_dentin"]
    assert depth["enamel"] == {"lesions": 1, "found": 1, "sensitivity": 1.0}
    assert depth["inner_dentin"]["sensitivity"] == 0.0
    assert report.to_dict()["by_conspicuity"] == {
        "5-8": {"lesions": 1, "found": 1, "sensitivity": 1.0},
        ">=20": {"lesions": 1, "found": 0, "sensitivity": 0.0},
    }
    lower = operating_point_report(images, strata, threshold=0.25)
    assert lower.sensitivity == pytest.approx(2 / 3)
    assert lower.strata["depth"]["inner_dentin"].sensitivity == 1.0


def test_conspicuity_bins():
    assert conspicuity_bin(3.0) == "0-5"
    assert conspicuity_bin(5.0) == "5-8"
    assert conspicuity_bin(19.99) == "12-20"
    assert conspicuity_bin(20.0) == ">=20"
    assert conspicuity_bin(None) is None
    assert conspicuity_bin(float("nan")) is None


def test_strata_must_match_the_ground_truth():
    images = [_image(1, [[0, 0, 10, 10]], [])]
    with pytest.raises(InvalidArgumentError, match="one value per ground-truth box"):
        operating_point_report(images, {"depth": [[]]}, threshold=0.5)
    assert operating_point_report(images, {}, threshold=0.5).sensitivity == 0.0
