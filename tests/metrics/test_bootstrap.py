"""Bootstrap confidence intervals: generic behaviour and the report's metric intervals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics import (
    bootstrap_ci,
    coco_metrics,
    froc,
    image_level_metrics,
    metric_confidence_intervals,
)
from tests.metrics.factory import make_image, shifted

VALUES = [0.1, 0.4, 0.35, 0.8, 0.6, 0.55, 0.2, 0.9, 0.45, 0.3]


def _mean(sample: list[float]) -> float:
    return float(np.mean(sample))


def test_interval_contains_the_point_and_is_deterministic_with_a_seed() -> None:
    first = bootstrap_ci(VALUES, _mean, n_resamples=200, seed=7)
    again = bootstrap_ci(VALUES, _mean, n_resamples=200, seed=7)
    other = bootstrap_ci(VALUES, _mean, n_resamples=200, seed=8)
    assert first.point == pytest.approx(np.mean(VALUES))
    assert first.low < first.point < first.high
    assert first == again
    assert (other.low, other.high) != (first.low, first.high)
    assert (first.n_resamples, first.n_undefined, first.confidence) == (200, 0, 0.95)


def test_same_seed_draws_the_same_resamples_for_every_statistic() -> None:
    seen: dict[str, list[list[float]]] = {"mean": [], "max": []}

    def recording(name: str, reduce):
        def statistic(sample: list[float]) -> float:
            seen[name].append(list(sample))
            return float(reduce(sample))

        return statistic

    bootstrap_ci(VALUES, recording("mean", np.mean), n_resamples=20, seed=3)
    bootstrap_ci(VALUES, recording("max", np.max), n_resamples=20, seed=3)
    assert seen["mean"] == seen["max"]
    assert seen["mean"][0] == VALUES  # the point estimate sees the original items
    assert len(seen["mean"]) == 21


def test_wider_confidence_gives_a_wider_interval() -> None:
    narrow = bootstrap_ci(VALUES, _mean, n_resamples=200, confidence=0.5)
    wide = bootstrap_ci(VALUES, _mean, n_resamples=200, confidence=0.95)
    assert wide.low < narrow.low < narrow.high < wide.high


def test_undefined_resamples_are_counted_and_left_out() -> None:
    # Defined only when the resample contains the single negative item (about 1 - (9/10)^10 = 65% of them).
    items = [True] * 9 + [False]

    def negatives_share(sample: list[bool]) -> float | None:
        negatives = sum(1 for item in sample if not item)
        return negatives / len(sample) if negatives else None

    interval = bootstrap_ci(items, negatives_share, n_resamples=300, seed=1)
    assert interval.point == pytest.approx(0.1)
    assert 0 < interval.n_undefined < 300
    assert interval.low >= 0.1 - 1e-12  # the defined resamples all contain the negative item at least once


def test_undefined_point_gives_none_without_resampling() -> None:
    interval = bootstrap_ci([1.0, 2.0], lambda sample: float("nan"), n_resamples=50)
    assert (interval.point, interval.low, interval.high, interval.n_resamples) == (None, None, None, 0)
    assert json.loads(json.dumps(interval.to_dict()))["point"] is None


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [({"n_resamples": 0}, "n_resamples"), ({"confidence": 1.0}, "confidence"), ({"confidence": 0.0}, "confidence")],
)
def test_bad_settings_are_refused(kwargs: dict[str, float], problem: str) -> None:
    with pytest.raises(InvalidArgumentError, match=problem):
        bootstrap_ci(VALUES, _mean, **kwargs)
    with pytest.raises(InvalidArgumentError, match="no images"):
        bootstrap_ci([], _mean)


def _evaluation_set() -> list:
    rng = np.random.default_rng(3)
    images = []
    for index in range(16):
        truth, predictions = [], []
        if index % 2 == 0:
            box = [40.0 * index, 10.0, 40.0 * index + 25.0, 30.0]
            truth.append((box, index % 4 // 2))
            if index % 8 != 0:
                predictions.append(
                    (shifted(box, dx=float(rng.uniform(0, 6))), index % 4 // 2, float(rng.uniform(0.4, 1)))
                )
        if index % 3 == 0:
            predictions.append(([700.0, 700.0, 720.0, 720.0], 0, float(rng.uniform(0.1, 0.7))))
        images.append(make_image(f"e{index}", truth=truth, predictions=predictions))
    return images


def test_metric_intervals_contain_their_points_are_reproducible_and_serialize() -> None:
    images = _evaluation_set()
    classes = ("caries", "deep_caries")
    intervals = metric_confidence_intervals(images, classes, threshold=0.5, n_resamples=60, seed=11)
    image_level = image_level_metrics(images, threshold=0.5)
    expected_points = {
        "ap50": coco_metrics(images, classes).ap50,
        "froc_score": froc(images).score,
        "sensitivity": image_level.sensitivity,
        "specificity": image_level.specificity,
        "auc": image_level.auc,
    }
    for name, point in expected_points.items():
        interval = getattr(intervals, name)
        assert interval.point == pytest.approx(point, abs=1e-12), name
        assert interval.low <= interval.point <= interval.high, name
        assert interval.n_resamples == 60, name
    assert intervals == metric_confidence_intervals(images, classes, threshold=0.5, n_resamples=60, seed=11)
    payload = intervals.to_dict()
    assert json.loads(json.dumps(payload)) == payload
