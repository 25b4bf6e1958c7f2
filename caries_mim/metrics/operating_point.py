"""Choosing the score threshold a model package ships with, from validation predictions.

A second reader for caries is tuned for sensitivity: the threshold is the highest score at which lesion-level
sensitivity still reaches a target (0.90 by default), so that no more false positives are shown than the target
requires. Detections are kept when ``score >= threshold``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics.inputs import EvaluatedImage, check_fraction, check_images
from caries_mim.metrics.matching import match_lesions

#: Slack when turning a target fraction into a lesion count: 0.7 * 10 is 7.000000000000001 in floating point,
#: and must still ask for 7 lesions, not 8.
_COUNT_SLACK = 1e-9


@dataclass(frozen=True)
class OperatingPoint:
    """The chosen threshold and what it achieves on the data it was chosen on.

    Attributes:
        threshold: keep detections with score >= this; in [0, 1].
        target_sensitivity: the lesion-level sensitivity asked for, in (0, 1].
        target_reached: False when no threshold reaches the target; ``threshold`` then gives the highest
            sensitivity the predictions allow (with as few false positives as possible), and callers should say so.
        sensitivity: lesion-level sensitivity at ``threshold``, in [0, 1].
        fps_per_image: false-positive detections per image at ``threshold``.
        iou_threshold: the least IoU for a detection to find a lesion.
        class_agnostic: whether a detection could find a lesion of another class.
        n_lesions: ground-truth boxes in the validation set.
        n_images: images in the validation set.
    """

    threshold: float
    target_sensitivity: float
    target_reached: bool
    sensitivity: float
    fps_per_image: float
    iou_threshold: float
    class_agnostic: bool
    n_lesions: int
    n_images: int

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-serializable values (floats, ints, bools)."""
        return asdict(self)


def select_operating_point(
    images: Sequence[EvaluatedImage],
    *,
    target_sensitivity: float = 0.90,
    iou_threshold: float = 0.1,
    class_agnostic: bool = True,
) -> OperatingPoint:
    """The highest score threshold whose lesion-level sensitivity reaches ``target_sensitivity``.

    Lesions are found by the same greedy matching as FROC (:func:`~caries_mim.metrics.matching.match_lesions`),
    so a lesion is found at threshold t exactly when the detection that matched it scores >= t. With n lesions
    the target needs k = ceil(target * n) of them, and the threshold is the k-th highest score among the
    detections that found a lesion. When fewer than k lesions are found at any threshold, the threshold is the
    lowest of those scores (the highest threshold giving the maximum sensitivity) and ``target_reached`` is False;
    when no lesion is found at all, every threshold gives sensitivity 0 and the threshold is 1.0.

    Args:
        images: validation predictions and ground truth.
        target_sensitivity: the lesion-level sensitivity to reach, in (0, 1].
        iou_threshold: the least IoU, in (0, 1], for a detection to find a lesion.
        class_agnostic: when True (default) any detection can find any lesion, whatever the labels.

    Returns:
        :class:`OperatingPoint`.

    Raises:
        InvalidArgumentError: no images, no ground-truth box at all (sensitivity is undefined), or a target or IoU
            outside its range.
    """
    check_images(images)
    target = check_fraction(target_sensitivity, "target_sensitivity", allow_zero=False, allow_one=True)
    matches = match_lesions(images, iou_threshold=iou_threshold, class_agnostic=class_agnostic)
    n_lesions = sum(match.n_lesions for match in matches)
    if n_lesions == 0:
        raise InvalidArgumentError(
            "the validation images have no ground-truth box, so lesion-level sensitivity is undefined and no "
            "operating point can be chosen"
        )
    found_scores = np.sort(np.concatenate([match.tp_scores for match in matches]))[::-1]
    fp_scores = np.concatenate([match.fp_scores for match in matches])
    needed = max(1, math.ceil(target * n_lesions - _COUNT_SLACK))
    target_reached = len(found_scores) >= needed
    if target_reached:
        threshold = float(found_scores[needed - 1])
    elif len(found_scores):
        threshold = float(found_scores[-1])
    else:
        threshold = 1.0
    return OperatingPoint(
        threshold=threshold,
        target_sensitivity=target,
        target_reached=target_reached,
        sensitivity=int((found_scores >= threshold).sum()) / n_lesions,
        fps_per_image=int((fp_scores >= threshold).sum()) / len(matches),
        iou_threshold=float(iou_threshold),
        class_agnostic=class_agnostic,
        n_lesions=n_lesions,
        n_images=len(matches),
    )
