"""FROC and the greedy lesion matching behind it, on hand-computed cases."""

from __future__ import annotations

import json

import numpy as np
import pytest

from caries_mim.metrics import box_iou, froc, froc_from_matches, froc_score_from_matches, match_lesions
from tests.metrics.factory import make_image, perfect, shifted

L1, L2 = [0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]
L3, L4 = [0.0, 0.0, 10.0, 10.0], [30.0, 30.0, 40.0, 40.0]
FAR = [100.0, 100.0, 110.0, 110.0]


def _two_images() -> list:
    """4 lesions in 2 images; detections by score: 0.9 TP(L1), 0.8 FP, 0.7 TP(L3), 0.6 FP, 0.5 FP (duplicate on
    L1), 0.4 FP, 0.3 TP(L2 at IoU 1/7). L4 is missed.

    Operating points (FP per image, sensitivity), threshold from high to low:
    (0, .25) (.5, .25) (.5, .5) (1, .5) (1.5, .5) (2, .5) (2, .75).
    """
    return [
        make_image(
            "a",
            truth=[(L1, 0), (L2, 0)],
            predictions=[(L1, 0, 0.9), (FAR, 0, 0.8), (shifted(L1, dx=1.0), 0, 0.5), (shifted(L2, dx=7.5), 0, 0.3)],
        ),
        make_image(
            "b", truth=[(L3, 0), (L4, 0)], predictions=[(L3, 0, 0.7), (FAR, 0, 0.6), (shifted(FAR, 20), 0, 0.4)]
        ),
    ]


def test_hand_computed_sensitivities() -> None:
    assert box_iou(np.array([L2]), np.array([shifted(L2, dx=7.5)]))[0, 0] == pytest.approx(1 / 7)
    result = froc(_two_images())
    # At 0.5 and at 2 FP/image two points share the rate; the better one counts. Beyond 2 FP/image the
    # curve holds its last sensitivity.
    assert result.sensitivities == pytest.approx((0.5, 0.5, 0.75, 0.75))
    assert result.score == pytest.approx(0.625)
    assert (result.n_lesions, result.n_images) == (4, 2)


def test_curve_is_returned_for_plotting() -> None:
    result = froc(_two_images())
    # From the lowest threshold to the highest, then MONAI's no-detection point.
    np.testing.assert_allclose(result.curve_fps_per_image, [2.0, 2.0, 1.5, 1.0, 0.5, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(result.curve_sensitivity, [0.75, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25, 0.0])
    payload = result.to_dict()
    assert json.loads(json.dumps(payload)) == payload
    assert payload["curve"]["sensitivity"][0] == 0.75


def test_between_operating_points_sensitivity_is_interpolated_linearly() -> None:
    # A true and a false positive tied at 0.8 join in one step: the curve goes from (0, .5) straight to (1, 1).
    image = make_image("t", truth=[(L1, 0), (L2, 0)], predictions=[(L1, 0, 0.9), (L2, 0, 0.8), (FAR, 0, 0.8)])
    assert froc([image], fp_rates=(0.5, 0.25, 1.0)).sensitivities == pytest.approx((0.75, 0.625, 1.0))


def test_strict_iou_turns_the_loose_hit_into_a_false_positive() -> None:
    result = froc(_two_images(), iou_threshold=0.5)
    # L2's detection (IoU 1/7) is now a false positive: at most 2 of 4 lesions are found.
    assert result.sensitivities == pytest.approx((0.5, 0.5, 0.5, 0.5))


def test_perfect_predictions_give_sensitivity_one_at_every_rate() -> None:
    images = [*perfect(_two_images()), make_image("negative")]
    result = froc(images)
    assert result.sensitivities == (1.0, 1.0, 1.0, 1.0)
    assert result.score == 1.0


def test_perfect_predictions_with_score_zero_are_still_found() -> None:
    # A score of 0.0 is a valid score, not MONAI's "missed lesion" marker.
    result = froc(perfect(_two_images(), score=0.0))
    assert result.sensitivities == (1.0, 1.0, 1.0, 1.0)


def test_no_predictions_give_sensitivity_zero() -> None:
    images = [make_image("a", truth=[(L1, 0), (L2, 1)]), make_image("negative")]
    result = froc(images)
    assert result.sensitivities == (0.0, 0.0, 0.0, 0.0)
    assert result.score == 0.0


def test_false_positives_on_negative_images_count_per_image() -> None:
    # One lesion, found at 0.9; the negative image's two detections score higher, so the lesion is found only
    # once 2 false positives over 2 images (1 per image) are accepted.
    found = make_image("p", truth=[(L1, 0)], predictions=[(L1, 0, 0.9)])
    negative = make_image("n", predictions=[(FAR, 0, 0.95), (shifted(FAR, 30), 0, 0.97)])
    assert froc([found, negative], fp_rates=(0.5, 1.0)).sensitivities == (0.0, 1.0)
    assert froc([found], fp_rates=(0.5, 1.0)).sensitivities == (1.0, 1.0)


def test_no_lesion_at_all_gives_none() -> None:
    result = froc([make_image("n", predictions=[(FAR, 0, 0.5)])])
    assert result.sensitivities is None
    assert result.score is None
    assert result.curve_fps_per_image.size == 0
    assert result.to_dict()["score"] is None


def test_class_aware_matching_needs_the_same_label() -> None:
    image = make_image("a", truth=[(L1, 0)], predictions=[(L1, 1, 0.9)])
    assert froc([image]).score == 1.0
    assert froc([image], class_agnostic=False).score == 0.0


def test_greedy_matching_takes_highest_scores_first_and_best_overlap() -> None:
    # Two lesions side by side; the top detection overlaps both, L_right more.
    left, right = [0.0, 0.0, 10.0, 10.0], [8.0, 0.0, 18.0, 10.0]
    image = make_image(
        "g",
        truth=[(left, 0), (right, 0)],
        predictions=[(shifted(right, dx=-1.0), 0, 0.9), (right, 0, 0.8), (left, 0, 0.7)],
    )
    (matches,) = match_lesions([image])
    # 0.9 claims `right`; 0.8 overlaps `right` (claimed) and `left` at IoU 2/18 >= 0.1, so it claims `left`;
    # 0.7 finds nothing left and is a false positive.
    assert matches.tp_scores.tolist() == [0.9, 0.8]
    assert matches.fp_scores.tolist() == [0.7]
    assert matches.n_lesions == 2


def test_two_stage_api_matches_one_shot() -> None:
    images = _two_images()
    assert froc_from_matches(match_lesions(images)).score == froc(images).score


def _many_false_positives(seed: int) -> list:
    rng = np.random.default_rng(seed)
    images = []
    for index in range(12):
        truth, predictions = [], []
        for lesion in range(int(rng.integers(0, 3))):
            box = [40.0 * lesion, 0.0, 40.0 * lesion + 20.0, 20.0]
            truth.append((box, 0))
            if rng.random() < 0.85:
                predictions.append((shifted(box, dx=float(rng.uniform(-4, 4))), 0, float(rng.uniform(0.0, 1.0))))
        for _ in range(int(rng.integers(0, 15))):
            x0 = float(rng.uniform(200, 900))
            predictions.append(([x0, 300.0, x0 + 20.0, 320.0], 0, float(rng.choice([0.25, 0.5, rng.uniform(0, 1)]))))
        images.append(make_image(f"m{index}", truth=truth, predictions=predictions))
    return images


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("fp_rates", [(0.5, 1.0, 2.0, 4.0), (0.25,), (1 / 3, 0.1)])
def test_fast_score_equals_the_full_curve_score(seed: int, fp_rates: tuple[float, ...]) -> None:
    images = _many_false_positives(seed)
    matches = match_lesions(images)
    full = froc_from_matches(matches, fp_rates=fp_rates).score
    assert froc_score_from_matches(matches, fp_rates=fp_rates) == pytest.approx(full, abs=1e-12)
