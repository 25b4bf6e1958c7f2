"""Detection metrics for caries models, one concern per module.

* :class:`EvaluatedImage` - ground truth and predictions of one image (boxes [x0, y0, x1, y1] in original-image
  pixels), validated once; every metric takes a sequence of them.
* :func:`coco_metrics` - COCO AP (IoU 0.50:0.95), AP50, AP75, AR, overall and per class, through MONAI.
* :func:`precision_recall_curve` - per-class precision-recall curves at one IoU, from the COCO matching.
* :func:`froc` - lesion-level sensitivity at fixed false positives per image, the FROC score and curve.
* :func:`image_level_metrics` - per-image sensitivity and specificity at a threshold, ROC AUC.
* :func:`bootstrap_ci`, :func:`metric_confidence_intervals` - percentile bootstrap over images.
* :func:`select_operating_point` - the highest threshold reaching a target lesion-level sensitivity.

Results are frozen dataclasses with ``to_dict()`` for ``metrics.json``; undefined values (sensitivity without
lesions, specificity without negative images) are None, never a number.
"""

from caries_mim.metrics.bootstrap import ConfidenceInterval, bootstrap_ci
from caries_mim.metrics.coco import (
    COCO_IOU_THRESHOLDS,
    ClassDetectionMetrics,
    DetectionMetrics,
    ImageMatching,
    ap50_from_matches,
    coco_metrics,
    coco_metrics_from_matches,
    match_detections,
)
from caries_mim.metrics.confidence_intervals import MetricConfidenceIntervals, metric_confidence_intervals
from caries_mim.metrics.froc import DEFAULT_FP_RATES, FrocResult, froc, froc_from_matches, froc_score_from_matches
from caries_mim.metrics.image_level import (
    ImageLevelMetrics,
    ImageScore,
    image_level_from_scores,
    image_level_metrics,
    image_scores,
    roc_auc,
)
from caries_mim.metrics.inputs import EvaluatedImage
from caries_mim.metrics.matching import LesionMatches, box_iou, match_lesions
from caries_mim.metrics.operating_point import OperatingPoint, select_operating_point
from caries_mim.metrics.pr_curve import PrecisionRecallCurve, precision_recall_curve

__all__ = [
    "COCO_IOU_THRESHOLDS",
    "DEFAULT_FP_RATES",
    "ClassDetectionMetrics",
    "ConfidenceInterval",
    "DetectionMetrics",
    "EvaluatedImage",
    "FrocResult",
    "ImageLevelMetrics",
    "ImageMatching",
    "ImageScore",
    "LesionMatches",
    "MetricConfidenceIntervals",
    "OperatingPoint",
    "PrecisionRecallCurve",
    "ap50_from_matches",
    "bootstrap_ci",
    "box_iou",
    "coco_metrics",
    "coco_metrics_from_matches",
    "froc",
    "froc_from_matches",
    "froc_score_from_matches",
    "image_level_from_scores",
    "image_level_metrics",
    "image_scores",
    "match_detections",
    "match_lesions",
    "metric_confidence_intervals",
    "precision_recall_curve",
    "roc_auc",
    "select_operating_point",
]
