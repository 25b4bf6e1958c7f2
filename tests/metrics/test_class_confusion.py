"""Class confusion at the operating point and AP50 with the classes merged, on hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics.class_confusion import class_confusion
from tests.metrics.factory import make_image, shifted

NAMES = ("caries", "deep_caries")
A, B, C = [0, 0, 20, 20], [50, 50, 80, 80], [100, 0, 130, 40]


def _images():
    return [
        # A caries found as caries; a deep lesion found as caries (0.8) and as deep caries (0.6): its best is caries.
        make_image("one", [(A, 0), (B, 1)], [(A, 0, 0.9), (shifted(B, 2), 0, 0.8), (B, 1, 0.6)]),
        # A deep lesion found only under the threshold, and a false positive.
        make_image("two", [(C, 1)], [(C, 1, 0.2), (A, 0, 0.7)]),
        # A deep lesion found as deep caries, with a caries box that overlaps it too little (IoU 0.25).
        make_image("three", [(B, 1)], [(B, 1, 0.95), ([50, 50, 65, 65], 0, 0.99)]),
    ]


def test_each_lesion_takes_the_class_of_its_best_finding_above_the_threshold():
    confusion = class_confusion(_images(), NAMES, threshold=0.5)
    np.testing.assert_array_equal(confusion.counts, [[1, 0, 0], [1, 1, 1]])
    assert confusion.found == 3
    assert confusion.class_accuracy == pytest.approx(2 / 3)
    assert confusion.to_dict()["matrix"] == {
        "caries": {"caries": 1, "deep_caries": 0, "missed": 0},
        "deep_caries": {"caries": 1, "deep_caries": 1, "missed": 1},
    }
    # Under a threshold of 0.1 the low-scoring finding of image two counts.
    assert class_confusion(_images(), NAMES, threshold=0.1).counts[1].tolist() == [1, 2, 0]


def test_merged_ap50_is_the_one_class_coco_ap50_of_the_same_predictions():
    images = _images()
    merged = class_confusion(images, NAMES, threshold=0.5).merged_ap50
    # By hand, one class, by score: 0.99 FP (three: IoU 0.25), 0.95 TP, 0.9 TP, 0.8 TP (IoU 0.88 with B),
    # 0.7 FP, 0.6 FP (duplicate on B), 0.2 TP: 4 lesions. Interpolated precision is 3/4 up to recall 3/4 and 4/7
    # up to 1: AP50 = (76 * 0.75 + 25 * 4 / 7) / 101.
    assert merged == pytest.approx((76 * 0.75 + 25 * 4 / 7) / 101)


def test_without_findings_every_lesion_is_missed_and_accuracy_is_undefined():
    images = [make_image("one", [(A, 0), (B, 1)], [])]
    confusion = class_confusion(images, NAMES, threshold=0.5)
    np.testing.assert_array_equal(confusion.counts, [[0, 0, 1], [0, 0, 1]])
    assert confusion.class_accuracy is None
    assert confusion.merged_ap50 == 0.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"threshold": 1.5}, r"threshold must lie in \[0, 1\], got 1.5"),
        ({"threshold": 0.5, "iou_threshold": 0.0}, r"iou_threshold must lie in \(0, 1\], got 0.0"),
    ],
)
def test_bad_thresholds_are_named(kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        class_confusion(_images(), NAMES, **kwargs)
