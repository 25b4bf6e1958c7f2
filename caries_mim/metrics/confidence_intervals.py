"""Bootstrap confidence intervals for the metrics a report carries: AP50, FROC score, image-level figures.

Each metric is matched once per image and only re-aggregated per resample (matching is image-local, so this is
exact), and every interval uses the same seed, hence the same resampled image sets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from caries_mim.metrics.bootstrap import ConfidenceInterval, bootstrap_ci
from caries_mim.metrics.coco import ap50_from_matches, match_detections
from caries_mim.metrics.froc import DEFAULT_FP_RATES, check_fp_rates, froc_score_from_matches
from caries_mim.metrics.image_level import image_level_from_scores, image_scores
from caries_mim.metrics.inputs import EvaluatedImage, check_class_names, check_fraction, check_images
from caries_mim.metrics.matching import match_lesions


@dataclass(frozen=True)
class MetricConfidenceIntervals:
    """Percentile bootstrap intervals of the headline metrics, all from the same resamples.

    Attributes:
        ap50: COCO AP at IoU 0.50, mean over classes with ground truth.
        froc_score: mean lesion-level sensitivity at the FROC false-positive rates.
        sensitivity, specificity: image-level, at ``threshold``.
        auc: image-level ROC AUC.
        threshold: the score threshold of the image-level figures.
        seed: the seed of the resamples.
    """

    ap50: ConfidenceInterval
    froc_score: ConfidenceInterval
    sensitivity: ConfidenceInterval
    specificity: ConfidenceInterval
    auc: ConfidenceInterval
    threshold: float
    seed: int

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-serializable values: one dict per metric, plus threshold and seed."""
        return {
            "ap50": self.ap50.to_dict(),
            "froc_score": self.froc_score.to_dict(),
            "sensitivity": self.sensitivity.to_dict(),
            "specificity": self.specificity.to_dict(),
            "auc": self.auc.to_dict(),
            "threshold": self.threshold,
            "seed": self.seed,
        }


def metric_confidence_intervals(
    images: Sequence[EvaluatedImage],
    class_names: Sequence[str],
    *,
    threshold: float,
    fp_rates: Sequence[float] = DEFAULT_FP_RATES,
    froc_iou_threshold: float = 0.1,
    class_agnostic: bool = True,
    max_detections: int = 100,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MetricConfidenceIntervals:
    """Bootstrap 95% (by default) intervals of AP50, FROC score and image-level sensitivity, specificity, AUC.

    Args:
        images: the evaluation set.
        class_names: the names the labels index.
        threshold: score threshold in [0, 1] for image-level sensitivity and specificity (the operating point).
        fp_rates, froc_iou_threshold, class_agnostic: FROC settings, as in :func:`~caries_mim.metrics.froc.froc`.
        max_detections: AP50 setting, as in :func:`~caries_mim.metrics.coco.coco_metrics`.
        n_resamples, confidence, seed: as in :func:`~caries_mim.metrics.bootstrap.bootstrap_ci`.

    Returns:
        :class:`MetricConfidenceIntervals`; an interval whose point is undefined on these images (no positive
        image for sensitivity, say) has None for point and bounds.

    Raises:
        InvalidArgumentError: any invalid input or setting.
    """
    check_images(images)
    names = check_class_names(class_names)
    threshold = check_fraction(threshold, "threshold", allow_zero=True, allow_one=True)
    rates = check_fp_rates(fp_rates)
    settings = {"n_resamples": n_resamples, "confidence": confidence, "seed": seed}

    coco_matches = match_detections(images, names, max_detections=max_detections)
    lesion_matches = match_lesions(images, iou_threshold=froc_iou_threshold, class_agnostic=class_agnostic)
    scores = image_scores(images)
    return MetricConfidenceIntervals(
        ap50=bootstrap_ci(
            coco_matches, lambda sample: ap50_from_matches(sample, names, max_detections=max_detections), **settings
        ),
        froc_score=bootstrap_ci(
            lesion_matches, lambda sample: froc_score_from_matches(sample, fp_rates=rates), **settings
        ),
        sensitivity=bootstrap_ci(
            scores, lambda sample: image_level_from_scores(sample, threshold=threshold).sensitivity, **settings
        ),
        specificity=bootstrap_ci(
            scores, lambda sample: image_level_from_scores(sample, threshold=threshold).specificity, **settings
        ),
        auc=bootstrap_ci(scores, lambda sample: image_level_from_scores(sample, threshold=threshold).auc, **settings),
        threshold=threshold,
        seed=seed,
    )
