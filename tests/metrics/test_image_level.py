"""Image-level sensitivity, specificity and ROC AUC, including the cases where they are undefined."""

from __future__ import annotations

import json

import numpy as np
import pytest

from caries_mim.metrics import image_level_metrics, roc_auc
from tests.metrics.factory import make_image

LESION = [10.0, 10.0, 20.0, 20.0]
ELSEWHERE = [60.0, 60.0, 70.0, 70.0]


def _scored(image_id: str, positive: bool, score: float | None):
    """An image whose highest detection score is ``score`` (None: no detection)."""
    truth = [(LESION, 0)] if positive else []
    predictions = [] if score is None else [(ELSEWHERE, 0, score), (ELSEWHERE, 0, score / 2)]
    return make_image(image_id, truth=truth, predictions=predictions)


def test_false_positive_on_a_negative_image_lowers_specificity() -> None:
    images = [
        _scored("p1", True, 0.9),
        _scored("p2", True, 0.7),
        _scored("n1", False, None),
        _scored("n2", False, 0.8),
    ]
    at_half = image_level_metrics(images, threshold=0.5)
    assert (at_half.sensitivity, at_half.specificity) == (1.0, 0.5)
    assert (at_half.true_positives, at_half.false_negatives, at_half.true_negatives, at_half.false_positives) == (
        2,
        0,
        1,
        1,
    )
    # Above the false positive's score, the negative image is clean again but p2 is missed.
    strict = image_level_metrics(images, threshold=0.85)
    assert (strict.sensitivity, strict.specificity) == (0.5, 1.0)


def test_score_equal_to_threshold_is_called_positive() -> None:
    metrics = image_level_metrics([_scored("p", True, 0.6), _scored("n", False, 0.6)], threshold=0.6)
    assert (metrics.sensitivity, metrics.specificity) == (1.0, 0.0)


def test_auc_on_a_ranking_with_a_tie() -> None:
    # Positives 0.9, 0.6, 0.4; negatives 0.6, 0.2. Pairs won: 0.9 beats both (2), 0.6 ties 0.6 (0.5) and beats
    # 0.2 (1), 0.4 loses to 0.6 (0) and beats 0.2 (1): 4.5 of 6 pairs.
    images = [
        _scored("p1", True, 0.9),
        _scored("p2", True, 0.6),
        _scored("p3", True, 0.4),
        _scored("n1", False, 0.6),
        _scored("n2", False, 0.2),
    ]
    assert image_level_metrics(images, threshold=0.5).auc == pytest.approx(0.75)


def test_roc_auc_extremes_and_score_free_ties() -> None:
    assert roc_auc(np.array([True, True, False]), np.array([0.9, 0.8, 0.1])) == 1.0
    assert roc_auc(np.array([True, False]), np.array([0.1, 0.9])) == 0.0
    assert roc_auc(np.array([True, False, True, False]), np.zeros(4)) == 0.5


def test_images_without_detections_score_zero() -> None:
    images = [_scored("p", True, None), _scored("n", False, None)]
    metrics = image_level_metrics(images, threshold=0.1)
    assert (metrics.sensitivity, metrics.specificity, metrics.auc) == (0.0, 1.0, 0.5)


def test_undefined_values_are_none_not_numbers() -> None:
    only_positive = image_level_metrics([_scored("p", True, 0.9)], threshold=0.5)
    assert only_positive.sensitivity == 1.0
    assert only_positive.specificity is None
    assert only_positive.auc is None
    only_negative = image_level_metrics([_scored("n", False, 0.9)], threshold=0.5)
    assert only_negative.sensitivity is None
    assert only_negative.specificity == 0.0
    assert only_negative.auc is None
    payload = only_negative.to_dict()
    assert json.loads(json.dumps(payload)) == payload
    assert payload["sensitivity"] is None
