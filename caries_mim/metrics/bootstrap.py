"""Percentile bootstrap confidence intervals over images.

Images, not boxes, are resampled: lesions in one radiograph share the patient, the exposure and the detector's
view of them, so boxes are not independent and resampling them would give intervals that are too narrow.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TypeVar

import numpy as np

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics.inputs import check_fraction

Item = TypeVar("Item")


@dataclass(frozen=True)
class ConfidenceInterval:
    """A point estimate with its percentile bootstrap interval.

    Attributes:
        point: the statistic on the original images; None when it is undefined there (then so are the bounds).
        low, high: the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the resampled statistic; None
            when no resample defines it.
        confidence: the interval's nominal coverage, in (0, 1).
        n_resamples: resamples drawn (0 when ``point`` is undefined: then none are drawn).
        n_undefined: resamples on which the statistic was undefined (None or NaN, e.g. a resample without any
            negative image for specificity); they are left out of the quantiles, which therefore describe the
            resamples where the statistic exists. Report it when it is not 0.
    """

    point: float | None
    low: float | None
    high: float | None
    confidence: float
    n_resamples: int
    n_undefined: int

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-serializable values (floats, ints, None)."""
        return asdict(self)


def _defined(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def bootstrap_ci(
    items: Sequence[Item],
    statistic: Callable[[Sequence[Item]], float | None],
    *,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> ConfidenceInterval:
    """Bootstrap a statistic of per-image items: resample the items with replacement and recompute it.

    The resample indices come from ``numpy.random.default_rng(seed)``, all drawn at once, so the same seed and
    number of items give the same resamples: intervals of different statistics computed with one seed are paired
    (each resample is the same set of images for all of them).

    Args:
        items: one item per image (an :class:`~caries_mim.metrics.inputs.EvaluatedImage`, or a per-image matching
            computed once so resamples only re-aggregate).
        statistic: maps a list of items to a number, or to None / NaN when undefined for that list.
        n_resamples: number of resamples, >= 1.
        confidence: nominal coverage of the interval, in (0, 1).
        seed: seed of the numpy Generator drawing the resamples.

    Returns:
        :class:`ConfidenceInterval`.

    Raises:
        InvalidArgumentError: no items, ``n_resamples`` < 1, or ``confidence`` outside (0, 1).
    """
    if len(items) == 0:
        raise InvalidArgumentError("no images to bootstrap")
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, numbers.Integral) or n_resamples < 1:
        raise InvalidArgumentError(f"n_resamples must be a whole number >= 1, got {n_resamples!r}")
    confidence = check_fraction(confidence, "confidence", allow_zero=False, allow_one=False)
    point = statistic(items)
    if not _defined(point):
        return ConfidenceInterval(point=None, low=None, high=None, confidence=confidence, n_resamples=0, n_undefined=0)
    rng = np.random.default_rng(seed)
    resamples = rng.integers(0, len(items), size=(int(n_resamples), len(items)))
    values = [statistic([items[index] for index in row]) for row in resamples]
    defined = np.array([value for value in values if _defined(value)], dtype=np.float64)
    low = high = None
    if defined.size:
        alpha = 1.0 - confidence
        low, high = (float(bound) for bound in np.quantile(defined, [alpha / 2.0, 1.0 - alpha / 2.0]))
    return ConfidenceInterval(
        point=float(point),
        low=low,
        high=high,
        confidence=confidence,
        n_resamples=int(n_resamples),
        n_undefined=len(values) - int(defined.size),
    )
