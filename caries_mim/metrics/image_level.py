"""Image-level metrics: does the image show caries, and does the detector say so?

An image is positive when it has at least one ground-truth box; its score is the highest detection score (0.0
without detections), and it is called positive when that score is >= the threshold (the same ">=" convention as
the operating point chosen by :mod:`caries_mim.metrics.operating_point`).

Undefined values are None, never a made-up number: sensitivity without positive images, specificity without
negative images, and ROC AUC without both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics.inputs import EvaluatedImage, check_fraction, check_images


@dataclass(frozen=True)
class ImageScore:
    """One image reduced to what image-level metrics need.

    Attributes:
        positive: the image has at least one ground-truth box.
        score: the highest detection score in [0, 1], 0.0 when there is no detection.
    """

    positive: bool
    score: float


@dataclass(frozen=True)
class ImageLevelMetrics:
    """Image-level confusion counts at a threshold, and the threshold-free ROC AUC.

    Attributes:
        threshold: an image is called positive when its score is >= this, in [0, 1].
        n_positive, n_negative: images with and without ground-truth boxes.
        true_positives, false_negatives, true_negatives, false_positives: image counts at ``threshold``.
        sensitivity: true_positives / n_positive in [0, 1]; None when there is no positive image.
        specificity: true_negatives / n_negative in [0, 1]; None when there is no negative image.
        auc: ROC AUC of the image scores in [0, 1] (ties count half); None unless both kinds of image exist.
    """

    threshold: float
    n_positive: int
    n_negative: int
    true_positives: int
    false_negatives: int
    true_negatives: int
    false_positives: int
    sensitivity: float | None
    specificity: float | None
    auc: float | None

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-serializable values (ints, floats, None)."""
        return asdict(self)


def image_scores(images: Sequence[EvaluatedImage]) -> list[ImageScore]:
    """Reduce each image to (has ground truth, highest detection score), in input order."""
    return [ImageScore(positive=image.is_positive, score=image.max_score) for image in images]


def image_level_metrics(images: Sequence[EvaluatedImage], *, threshold: float) -> ImageLevelMetrics:
    """Image-level sensitivity and specificity at ``threshold``, and ROC AUC over image scores.

    Args:
        images: the evaluation set.
        threshold: score in [0, 1] at or above which an image is called positive.

    Returns:
        :class:`ImageLevelMetrics`, with None for whatever the set cannot define.

    Raises:
        InvalidArgumentError: no images, or ``threshold`` outside [0, 1].
    """
    check_images(images)
    return image_level_from_scores(image_scores(images), threshold=threshold)


def image_level_from_scores(scores: Sequence[ImageScore], *, threshold: float) -> ImageLevelMetrics:
    """:func:`image_level_metrics` from images already reduced by :func:`image_scores` (for bootstrapping).

    Raises:
        InvalidArgumentError: no scores, or ``threshold`` outside [0, 1].
    """
    if len(scores) == 0:
        raise InvalidArgumentError("no images to evaluate")
    threshold = check_fraction(threshold, "threshold", allow_zero=True, allow_one=True)
    positive = np.fromiter((item.positive for item in scores), dtype=bool, count=len(scores))
    score = np.fromiter((item.score for item in scores), dtype=np.float64, count=len(scores))
    called = score >= threshold
    n_positive = int(positive.sum())
    n_negative = len(scores) - n_positive
    true_positives = int((called & positive).sum())
    true_negatives = int((~called & ~positive).sum())
    return ImageLevelMetrics(
        threshold=threshold,
        n_positive=n_positive,
        n_negative=n_negative,
        true_positives=true_positives,
        false_negatives=n_positive - true_positives,
        true_negatives=true_negatives,
        false_positives=n_negative - true_negatives,
        sensitivity=true_positives / n_positive if n_positive else None,
        specificity=true_negatives / n_negative if n_negative else None,
        auc=roc_auc(positive, score),
    )


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """Area under the ROC curve by the Mann-Whitney U statistic, ties between classes counting half.

    AUC is the probability that a random positive outscores a random negative. Written out here because the
    project has no scikit-learn (and would not add it for one formula): with average ranks over tied scores,
    U = (sum of positive ranks) - P(P+1)/2 and AUC = U / (P N), which gives exactly 1/2 credit to each tied
    positive-negative pair.

    Args:
        positive: bool (n,), the true class of each image.
        scores: float (n,), the image scores (any real values; only their order matters).

    Returns:
        AUC in [0, 1], or None when there are no positives or no negatives (the area is undefined).
    """
    positive = np.asarray(positive, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    n_positive = int(positive.sum())
    n_negative = len(positive) - n_positive
    if n_positive == 0 or n_negative == 0:
        return None
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    # 1-based rank of each tie group's last member, minus half the group's extra members: the mean rank.
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
    ranks = mean_rank[group]
    u_statistic = ranks[positive].sum() - n_positive * (n_positive + 1) / 2.0
    return float(u_statistic / (n_positive * n_negative))
