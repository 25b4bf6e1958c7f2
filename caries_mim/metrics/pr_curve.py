"""Per-class precision-recall curves at one IoU threshold, from the same matching as COCO AP.

The curve is built from :func:`~caries_mim.metrics.coco.match_detections` (MONAI's pycocotools-equivalent
matching), so a point on it is exactly what COCO AP integrates. Its ``ap`` is pycocotools' 101-point interpolated
AP computed in float64, as ``COCOeval.accumulate`` does; :func:`~caries_mim.metrics.coco.coco_metrics` reads AP
from MONAI, whose float32 recall can differ from it by a few 1e-4 in rare ties on a recall point (see the
:mod:`caries_mim.metrics.coco` docstring). On anything else the two agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics.coco import COCO_IOU_THRESHOLDS, match_detections
from caries_mim.metrics.inputs import EvaluatedImage, check_class_names

#: pycocotools' recall points: 0.00, 0.01, ..., 1.00.
RECALL_POINTS = np.linspace(0.0, 1.0, 101)


@dataclass(frozen=True, eq=False)
class PrecisionRecallCurve:
    """Precision and recall of one class after each detection, in descending score order over all images.

    Attributes:
        recall: float64 (D,), non-decreasing, in [0, 1]; D counts the class's detections (at most
            ``max_detections`` per image) that are not ignored.
        precision: float64 (D,), true positives / detections so far, in [0, 1] (not interpolated).
        scores: float64 (D,), the detection scores, descending.
        ap: 101-point interpolated AP in [0, 1], as pycocotools computes it.
        n_ground_truth: ground-truth boxes of the class (> 0: classes without any have no curve).
        iou_threshold: the least IoU for a detection to match a ground-truth box.
    """

    recall: np.ndarray
    precision: np.ndarray
    scores: np.ndarray
    ap: float
    n_ground_truth: int
    iou_threshold: float

    @property
    def interpolated_precision(self) -> np.ndarray:
        """float64 (D,): the highest precision at this recall or any higher one (the envelope AP integrates)."""
        return np.maximum.accumulate(self.precision[::-1])[::-1]

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-serializable values (lists, floats, ints)."""
        return {
            "recall": self.recall.tolist(),
            "precision": self.precision.tolist(),
            "scores": self.scores.tolist(),
            "ap": self.ap,
            "n_ground_truth": self.n_ground_truth,
            "iou_threshold": self.iou_threshold,
        }


def precision_recall_curve(
    images: Sequence[EvaluatedImage],
    class_names: Sequence[str],
    *,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
) -> dict[str, PrecisionRecallCurve]:
    """The precision-recall curve of each class that has ground truth.

    Args:
        images: the evaluation set.
        class_names: the names the labels index.
        iou_threshold: one of the COCO thresholds (:data:`~caries_mim.metrics.coco.COCO_IOU_THRESHOLDS`,
            0.50, 0.55, ..., 0.95), the ones the shared matching is made at.
        max_detections: per image and class, only the highest-scoring ``max_detections`` detections count.

    Returns:
        Class name -> :class:`PrecisionRecallCurve`, in ``class_names`` order; classes without a ground-truth box
        are left out (recall is undefined for them).

    Raises:
        InvalidArgumentError: no images, bad class names, a label out of range, ``max_detections`` < 1, or an IoU
            threshold that is not a COCO one.
    """
    row = _threshold_row(iou_threshold)
    names = check_class_names(class_names)
    matchings = match_detections(images, names, max_detections=max_detections)
    curves = {}
    for label, name in enumerate(names):
        results = [matching[label] for matching in matchings if label in matching]
        n_ground_truth = sum(int(np.count_nonzero(result["gtIgnore"] == 0)) for result in results)
        if n_ground_truth == 0:
            continue
        curves[name] = _curve(results, row, n_ground_truth, COCO_IOU_THRESHOLDS[row])
    return curves


def _threshold_row(iou_threshold: float) -> int:
    for row, threshold in enumerate(COCO_IOU_THRESHOLDS):
        if np.isclose(threshold, iou_threshold, rtol=0.0, atol=1e-9):
            return row
    listed = ", ".join(f"{threshold:.2f}" for threshold in COCO_IOU_THRESHOLDS)
    raise InvalidArgumentError(f"iou_threshold must be one of the COCO thresholds ({listed}), got {iou_threshold!r}")


def _curve(results: list[dict[str, np.ndarray]], row: int, n_ground_truth: int, iou: float) -> PrecisionRecallCurve:
    scores = np.concatenate([result["dtScores"] for result in results]).astype(np.float64)
    # Stable sort, as pycocotools' and MONAI's accumulate do: equal scores keep image order.
    order = np.argsort(-scores, kind="mergesort")
    matched = np.concatenate([result["dtMatches"][row] for result in results])[order].astype(bool)
    ignored = np.concatenate([result["dtIgnore"][row] for result in results])[order].astype(bool)
    kept = ~ignored
    true_positives = np.cumsum(matched[kept]).astype(np.float64)
    false_positives = np.cumsum(~matched[kept]).astype(np.float64)
    recall = true_positives / n_ground_truth
    # pycocotools adds the float spacing of 1 so that an empty prefix never divides by zero.
    precision = true_positives / (true_positives + false_positives + np.spacing(1))
    return PrecisionRecallCurve(
        recall=recall,
        precision=precision,
        scores=scores[order][kept],
        ap=_interpolated_ap(recall, precision),
        n_ground_truth=n_ground_truth,
        iou_threshold=float(iou),
    )


def _interpolated_ap(recall: np.ndarray, precision: np.ndarray) -> float:
    """pycocotools' AP: the precision envelope read at each of the 101 recall points (0 past the last recall)."""
    if recall.size == 0:
        return 0.0
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    at_points = np.searchsorted(recall, RECALL_POINTS, side="left")
    reached = at_points < len(envelope)
    sampled = np.zeros_like(RECALL_POINTS)
    sampled[reached] = envelope[at_points[reached]]
    return float(sampled.mean())
