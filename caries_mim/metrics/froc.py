"""FROC: lesion-level sensitivity at fixed numbers of false positives per image.

Regulatory reader studies of caries CAD report lesion-level sensitivity, and FROC reads it at fixed false-positive
rates per image (REFERENCES.md, "How the field measures"); the mean over those rates is the FROC score, as in
CAMELYON16.

The curve comes from MONAI (``compute_froc_curve_data``, ``compute_froc_score``), which was written for
CAMELYON16's point detections and has two conventions this module adapts to:

* ``compute_froc_curve_data`` sweeps the threshold over every distinct probability *except the smallest*, because
  in CAMELYON16 the smallest is always the 0.0 that stands for a missed lesion. Box scores can be anything in
  [0, 1] and a perfect detector misses nothing, so missed lesions enter as -1.0 and one extra -1.0 is appended to
  the false-positive probabilities: the skipped smallest value is then always that sentinel, never a real score,
  and no threshold >= 0 counts it.
* ``compute_froc_score`` interpolates sensitivity linearly between operating points (``np.interp``); where several
  operating points share one false-positive rate (true positives between two false positives), it reads the
  highest of their sensitivities; for a rate beyond the curve's largest false-positive rate it holds the last
  (highest) sensitivity: a detector that never makes 4 false positives per image gets its maximum sensitivity at 4.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from monai.metrics.froc import compute_froc_curve_data, compute_froc_score

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics.inputs import EvaluatedImage, check_images
from caries_mim.metrics.matching import LesionMatches, match_lesions

#: The false-positive rates (per image) the FROC score averages over by default.
DEFAULT_FP_RATES: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)

#: Below every valid score in [0, 1]: marks a missed lesion and the sweep's skipped smallest value.
_BELOW_ANY_SCORE = -1.0


@dataclass(frozen=True, eq=False)
class FrocResult:
    """Lesion-level sensitivity at fixed false positives per image, and the curve behind it.

    Attributes:
        fp_rates: the false-positive rates per image asked for, in the order given.
        sensitivities: sensitivity in [0, 1] at each rate, or None when there is no lesion to find.
        score: mean of ``sensitivities`` (the FROC score), or None when there is no lesion.
        curve_fps_per_image: float64 (P,), false positives per image at each operating point, from the lowest
            threshold (most detections) to the highest, ending with the no-detection point (0 false positives).
            Empty when there is no lesion.
        curve_sensitivity: float64 (P,), the sensitivity at the same operating points.
        iou_threshold: the least IoU for a detection to count as finding a lesion.
        class_agnostic: whether a detection could match a lesion of another class.
        n_lesions: ground-truth boxes in the evaluation set.
        n_images: images in the evaluation set.
    """

    fp_rates: tuple[float, ...]
    sensitivities: tuple[float, ...] | None
    score: float | None
    curve_fps_per_image: np.ndarray
    curve_sensitivity: np.ndarray
    iou_threshold: float
    class_agnostic: bool
    n_lesions: int
    n_images: int

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-serializable values (lists, floats, None)."""
        return {
            "fp_rates": list(self.fp_rates),
            "sensitivities": None if self.sensitivities is None else list(self.sensitivities),
            "score": self.score,
            "curve": {
                "fps_per_image": self.curve_fps_per_image.tolist(),
                "sensitivity": self.curve_sensitivity.tolist(),
            },
            "iou_threshold": self.iou_threshold,
            "class_agnostic": self.class_agnostic,
            "n_lesions": self.n_lesions,
            "n_images": self.n_images,
        }


def check_fp_rates(fp_rates: Sequence[float]) -> tuple[float, ...]:
    """Return the rates as a tuple of floats after checking there is at least one and each is finite and > 0.

    Raises:
        InvalidArgumentError: no rate, or a rate that is not a finite positive number.
    """
    rates = tuple(fp_rates)
    if not rates:
        raise InvalidArgumentError("fp_rates is empty: give at least one false-positive rate per image")
    for rate in rates:
        if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not math.isfinite(rate) or rate <= 0:
            raise InvalidArgumentError(f"fp_rates must be finite numbers > 0, got {rate!r}")
    return tuple(float(rate) for rate in rates)


def froc(
    images: Sequence[EvaluatedImage],
    *,
    fp_rates: Sequence[float] = DEFAULT_FP_RATES,
    iou_threshold: float = 0.1,
    class_agnostic: bool = True,
) -> FrocResult:
    """Lesion-level FROC of a detector over an evaluation set.

    A detection is a true positive when, taken in descending score order, it overlaps a not yet matched
    ground-truth box with IoU >= ``iou_threshold`` (:func:`~caries_mim.metrics.matching.match_lesions`); all other
    detections, duplicates on an already found lesion included, are false positives. Images without ground truth
    count in the per-image rate and contribute only false positives.

    REFERENCES.md states what FROC reports (sensitivity at fixed false positives per image) but fixes no overlap
    criterion, so the IoU is configurable. The default 0.1 is deliberately loose because FROC asks whether a lesion
    was pointed at, not how tightly its box fits (COCO AP at IoU 0.50:0.95 measures that): CAMELYON16, where
    MONAI's FROC comes from, counts a detection as a hit when its point lies anywhere inside the lesion. Small
    caries boxes whose extent varies between annotators would otherwise turn box-fit noise into missed lesions.

    Args:
        images: the evaluation set.
        fp_rates: false positives per image at which to read sensitivity; each finite and > 0.
        iou_threshold: the least IoU, in (0, 1], for a detection to find a lesion.
        class_agnostic: when True (default) any detection can find any lesion, whatever the labels.

    Returns:
        :class:`FrocResult`; sensitivities and score are None when the set has no ground-truth box.

    Raises:
        InvalidArgumentError: no images, bad ``fp_rates`` or ``iou_threshold``.
    """
    check_images(images)
    rates = check_fp_rates(fp_rates)
    matches = match_lesions(images, iou_threshold=iou_threshold, class_agnostic=class_agnostic)
    return froc_from_matches(matches, fp_rates=rates, iou_threshold=iou_threshold, class_agnostic=class_agnostic)


def froc_from_matches(
    matches: Sequence[LesionMatches],
    *,
    fp_rates: Sequence[float] = DEFAULT_FP_RATES,
    iou_threshold: float = 0.1,
    class_agnostic: bool = True,
) -> FrocResult:
    """FROC from per-image matchings already made; lets a bootstrap match once and resample the matchings.

    Args:
        matches: one :class:`LesionMatches` per image (an image resampled twice appears twice).
        fp_rates: as in :func:`froc`.
        iou_threshold, class_agnostic: the settings ``matches`` were made with, recorded in the result.

    Returns:
        :class:`FrocResult`, as :func:`froc`.

    Raises:
        InvalidArgumentError: no matchings, or bad ``fp_rates``.
    """
    if len(matches) == 0:
        raise InvalidArgumentError("no images to evaluate")
    rates = check_fp_rates(fp_rates)
    n_lesions = sum(match.n_lesions for match in matches)
    common = {
        "fp_rates": rates,
        "iou_threshold": float(iou_threshold),
        "class_agnostic": class_agnostic,
        "n_lesions": n_lesions,
        "n_images": len(matches),
    }
    if n_lesions == 0:
        # Sensitivity is 0/0 here; report it as undefined rather than letting MONAI divide by zero.
        empty = np.zeros((0,), dtype=np.float64)
        return FrocResult(sensitivities=None, score=None, curve_fps_per_image=empty, curve_sensitivity=empty, **common)

    fps_per_image, sensitivity = _curve(matches, n_lesions)
    sensitivities = _read_sensitivities(fps_per_image, sensitivity, rates)
    return FrocResult(
        sensitivities=sensitivities,
        score=float(np.mean(sensitivities)),
        curve_fps_per_image=np.asarray(fps_per_image, dtype=np.float64),
        curve_sensitivity=np.asarray(sensitivity, dtype=np.float64),
        **common,
    )


def froc_score_from_matches(
    matches: Sequence[LesionMatches], *, fp_rates: Sequence[float] = DEFAULT_FP_RATES
) -> float | None:
    """The FROC score alone, equal to ``froc_from_matches(...).score`` but cheap enough for bootstrap resamples.

    MONAI's ``compute_froc_curve_data`` costs (distinct scores) x (detections). Only the operating points up to
    the first one beyond the largest rate bear on the score (``np.interp`` reads the two points around each rate),
    so detections scoring below that point's threshold are dropped first. With many low-scoring false positives,
    as a detector run at a low score threshold gives, that leaves a few per image.

    Returns:
        The FROC score in [0, 1], or None when there is no lesion.

    Raises:
        InvalidArgumentError: no matchings, or bad ``fp_rates``.
    """
    if len(matches) == 0:
        raise InvalidArgumentError("no images to evaluate")
    rates = check_fp_rates(fp_rates)
    n_lesions = sum(match.n_lesions for match in matches)
    if n_lesions == 0:
        return None
    fp_scores = np.sort(np.concatenate([match.fp_scores for match in matches]))[::-1]
    # The first operating point past the largest rate admits floor(rate * images) + 1 false positives; one more
    # keeps float rounding of the product from ever cutting a point that np.interp reads (keeping more is exact).
    beyond = math.floor(max(rates) * len(matches)) + 2
    lowest_needed = fp_scores[beyond - 1] if len(fp_scores) >= beyond else -math.inf
    kept = [
        LesionMatches(
            image_id=match.image_id,
            tp_scores=match.tp_scores[match.tp_scores >= lowest_needed],
            fp_scores=match.fp_scores[match.fp_scores >= lowest_needed],
            n_lesions=match.n_lesions,
            lesion_scores=match.lesion_scores,
        )
        for match in matches
    ]
    fps_per_image, sensitivity = _curve(kept, n_lesions)
    return float(np.mean(_read_sensitivities(fps_per_image, sensitivity, rates)))


def _curve(matches: Sequence[LesionMatches], n_lesions: int) -> tuple[np.ndarray, np.ndarray]:
    """MONAI's FROC curve (FP per image, sensitivity), from the lowest threshold to the highest plus (0, 0)."""
    n_missed = n_lesions - sum(len(match.tp_scores) for match in matches)
    tp_probs = np.concatenate([*(match.tp_scores for match in matches), np.full(n_missed, _BELOW_ANY_SCORE)])
    fp_probs = np.concatenate([*(match.fp_scores for match in matches), [_BELOW_ANY_SCORE]])
    return compute_froc_curve_data(fp_probs=fp_probs, tp_probs=tp_probs, num_targets=n_lesions, num_images=len(matches))


def _read_sensitivities(
    fps_per_image: np.ndarray, sensitivity: np.ndarray, rates: tuple[float, ...]
) -> tuple[float, ...]:
    return tuple(float(compute_froc_score(fps_per_image, sensitivity, (rate,))) for rate in rates)
