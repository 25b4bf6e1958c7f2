"""Operating-point selection: the highest threshold reaching the target sensitivity, or a flagged fallback."""

from __future__ import annotations

import json

import pytest

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics import select_operating_point
from tests.metrics.factory import make_image

FOUND_SCORES = (0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5)


def _lesion(index: int) -> list[float]:
    return [30.0 * index, 0.0, 30.0 * index + 20.0, 20.0]


def _validation(found: int) -> list:
    """Ten lesions in five images; the first ``found`` are detected with FOUND_SCORES, and every image also has
    one false positive at 0.72 (five in all)."""
    images = []
    for image_index in range(5):
        truth, predictions = [], [([500.0, 500.0, 520.0, 520.0], 0, 0.72)]
        for lesion_index in (2 * image_index, 2 * image_index + 1):
            truth.append((_lesion(lesion_index), 0))
            if lesion_index < found:
                predictions.append((_lesion(lesion_index), 0, FOUND_SCORES[lesion_index]))
        images.append(make_image(f"v{image_index}", truth=truth, predictions=predictions))
    return images


def test_threshold_is_exactly_the_score_that_reaches_the_target() -> None:
    point = select_operating_point(_validation(found=10), target_sensitivity=0.9)
    # 9 of 10 lesions are needed; the 9th-highest finding score is 0.55. Any higher threshold finds only 8.
    assert point.threshold == 0.55
    assert point.target_reached is True
    assert point.sensitivity == pytest.approx(0.9)
    assert point.fps_per_image == pytest.approx(1.0)  # all five false positives score 0.72 >= 0.55
    assert (point.n_lesions, point.n_images) == (10, 5)


def test_target_fraction_is_not_inflated_by_rounding() -> None:
    # 0.7 * 10 is 7.000000000000001 in floating point; it must ask for 7 lesions (threshold 0.65), not 8.
    point = select_operating_point(_validation(found=10), target_sensitivity=0.7)
    assert point.threshold == 0.65
    assert point.sensitivity == pytest.approx(0.7)
    assert point.fps_per_image == pytest.approx(1.0)
    strict = select_operating_point(_validation(found=10), target_sensitivity=0.5)
    assert strict.threshold == 0.75
    assert strict.fps_per_image == 0.0


def test_unreachable_target_is_flagged_with_the_best_threshold() -> None:
    point = select_operating_point(_validation(found=6), target_sensitivity=0.9)
    assert point.target_reached is False
    # The highest threshold that still finds all 6 findable lesions.
    assert point.threshold == 0.7
    assert point.sensitivity == pytest.approx(0.6)
    assert json.loads(json.dumps(point.to_dict()))["target_reached"] is False


def test_nothing_found_is_flagged_with_threshold_one() -> None:
    point = select_operating_point(_validation(found=0))
    assert (point.threshold, point.sensitivity, point.target_reached) == (1.0, 0.0, False)


def test_loose_default_iou_finds_an_offset_box_a_strict_one_does_not() -> None:
    lesion = [0.0, 0.0, 20.0, 20.0]
    image = make_image("o", truth=[(lesion, 0)], predictions=[([10.0, 0.0, 30.0, 20.0], 0, 0.8)])  # IoU 1/3
    assert select_operating_point([image], target_sensitivity=1.0).target_reached is True
    assert select_operating_point([image], target_sensitivity=1.0, iou_threshold=0.5).target_reached is False


def test_no_lesion_in_validation_is_an_error() -> None:
    with pytest.raises(InvalidArgumentError, match="no ground-truth box"):
        select_operating_point([make_image("n", predictions=[([0.0, 0.0, 5.0, 5.0], 0, 0.5)])])
