"""COCO detection metrics (AP at IoU 0.50:0.95, AP50, AP75, AR) through MONAI's detection metric machinery.

MONAI's ``matching_batch`` matches detections to ground truth per image and class exactly as pycocotools'
``COCOeval.evaluateImg`` does, and ``COCOMetric`` accumulates 101-point interpolated precision as
``COCOeval.accumulate`` does, so the numbers agree with pycocotools (tests/metrics/test_coco.py checks it). Three
things are arranged here so that they do:

* IoU is computed in float64 (:func:`~caries_mim.metrics.matching.box_iou`); MONAI's own ``box_iou`` works in
  float32 and can flip a match that sits exactly on a threshold.
* ``COCOMetric`` averages its overall AP over *all* classes, with -1 standing in for a class without ground
  truth, and logs a warning through the root logger for each such class; pycocotools leaves those classes out.
  Only the classes with ground truth are passed to MONAI (labels remapped), so the overall numbers are the mean
  over those classes, as in pycocotools, and a class without ground truth reports None.
* Only the "all" area range and one ``max_detections`` are evaluated (pycocotools also reports small / medium /
  large areas and AR at 1 and 10 detections); AR is recall averaged over IoU 0.50:0.95 at ``max_detections``,
  pycocotools' AR@100 for the default.

One known difference remains, inside MONAI: ``COCOMetric`` accumulates true-positive counts in float32, so recall
``tp / n_gt`` carries float32 rounding. AR then differs from pycocotools by ~1e-8. And when a recall value is
exactly one of the 101 recall points (9 of 10 lesions = 0.90) but rounds *below* it in float32, MONAI reads that
point's precision from the next detection instead: the interpolated precision at that one point can drop, which
moves AP by at most 1/101 of that drop per affected point, class and IoU (AP50 lower by 7e-4 on one of the
seeded random test sets; pinned in ``test_monai_float32_recall_reads_the_next_detection``).

Matching is image-local, so it is split from accumulation: :func:`match_detections` runs once and a bootstrap
resamples its per-image results (:func:`coco_metrics_from_matches`, :func:`ap50_from_matches`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from monai.apps.detection.metrics.coco import COCOMetric
from monai.apps.detection.metrics.matching import matching_batch

from caries_mim.errors import InvalidArgumentError
from caries_mim.metrics.inputs import EvaluatedImage, check_class_names, check_images, check_labels
from caries_mim.metrics.matching import box_iou

#: MONAI's per-image matching: class index -> {"dtMatches" (T, D), "gtMatches" (T, G), "dtScores" (D,),
#: "gtIgnore" (G,), "dtIgnore" (T, D)}, T = len(COCO_IOU_THRESHOLDS), D and G counted within the class.
ImageMatching = dict[int, dict[str, np.ndarray]]

#: (start, stop, step) of the COCO IoU range, in MONAI's ``iou_range`` form.
_COCO_IOU_RANGE = (0.5, 0.95, 0.05)
_RANGE_KEY = "IoU_0.50_0.95_0.05"


@dataclass(frozen=True)
class ClassDetectionMetrics:
    """COCO metrics of one class; every value in [0, 1], or None when the class has no ground-truth box.

    Attributes:
        ap: AP averaged over IoU 0.50:0.95 (step 0.05).
        ap50: AP at IoU 0.50.
        ap75: AP at IoU 0.75.
        ar: recall at ``max_detections`` per image, averaged over IoU 0.50:0.95.
        n_ground_truth: ground-truth boxes of this class.
    """

    ap: float | None
    ap50: float | None
    ap75: float | None
    ar: float | None
    n_ground_truth: int

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-serializable values (floats, ints, None)."""
        return asdict(self)


@dataclass(frozen=True)
class DetectionMetrics:
    """COCO metrics over all classes and per class.

    The overall values are the mean over classes that have ground truth (pycocotools' convention); None when no
    class has any.

    Attributes:
        ap, ap50, ap75, ar: as in :class:`ClassDetectionMetrics`, averaged over classes.
        per_class: class name -> :class:`ClassDetectionMetrics`, for every class name given, in that order.
        max_detections: detections per image and class kept (highest scores first).
        n_images: images evaluated.
    """

    ap: float | None
    ap50: float | None
    ap75: float | None
    ar: float | None
    per_class: dict[str, ClassDetectionMetrics]
    max_detections: int
    n_images: int

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-serializable values (floats, ints, None, nested dicts)."""
        return {
            "ap": self.ap,
            "ap50": self.ap50,
            "ap75": self.ap75,
            "ar": self.ar,
            "per_class": {name: metrics.to_dict() for name, metrics in self.per_class.items()},
            "max_detections": self.max_detections,
            "n_images": self.n_images,
        }


def _check_max_detections(max_detections: int) -> int:
    if isinstance(max_detections, bool) or not isinstance(max_detections, (int, np.integer)) or max_detections < 1:
        raise InvalidArgumentError(f"max_detections must be a whole number >= 1, got {max_detections!r}")
    return int(max_detections)


def _monai_metric(n_classes: int, max_detections: int, *, ap50_only: bool = False) -> COCOMetric:
    # Placeholder class names keep MONAI's result keys predictable whatever the real names contain.
    if ap50_only:
        return COCOMetric(
            classes=[str(index) for index in range(n_classes)],
            iou_list=(0.5,),
            iou_range=(0.5, 0.5, 0.05),
            max_detection=(max_detections,),
            verbose=False,
        )
    return COCOMetric(
        classes=[str(index) for index in range(n_classes)],
        iou_list=(0.5, 0.75),
        iou_range=_COCO_IOU_RANGE,
        max_detection=(max_detections,),
        verbose=False,
    )


#: The IoU thresholds :func:`match_detections` matches at, as MONAI orders them (0.50, 0.55, ..., 0.95).
COCO_IOU_THRESHOLDS: tuple[float, ...] = tuple(float(t) for t in _monai_metric(1, 100).iou_thresholds)
_AP50_ROW = COCO_IOU_THRESHOLDS.index(0.5)


def match_detections(
    images: Sequence[EvaluatedImage], class_names: Sequence[str], *, max_detections: int = 100
) -> list[ImageMatching]:
    """Match each image's detections to its ground truth, per class, at every IoU in :data:`COCO_IOU_THRESHOLDS`.

    Args:
        images: the evaluation set.
        class_names: the names the labels index.
        max_detections: per image and class, only the highest-scoring ``max_detections`` detections count.

    Returns:
        One :data:`ImageMatching` per image, in input order.

    Raises:
        InvalidArgumentError: no images, bad class names, a label out of range, or ``max_detections`` < 1.
    """
    check_images(images)
    names = check_class_names(class_names)
    check_labels(images, names)
    max_detections = _check_max_detections(max_detections)
    return matching_batch(
        iou_fn=box_iou,
        iou_thresholds=COCO_IOU_THRESHOLDS,
        pred_boxes=[image.pred_boxes for image in images],
        pred_classes=[image.pred_labels for image in images],
        pred_scores=[image.pred_scores for image in images],
        gt_boxes=[image.gt_boxes for image in images],
        gt_classes=[image.gt_labels for image in images],
        max_detections=max_detections,
    )


def _ground_truth_counts(matchings: Sequence[ImageMatching], n_classes: int) -> list[int]:
    counts = [0] * n_classes
    for matching in matchings:
        for label, result in matching.items():
            counts[int(label)] += len(result["gtIgnore"])
    return counts


def _only_classes(matchings: Sequence[ImageMatching], kept: Sequence[int]) -> list[ImageMatching]:
    return [{new: matching[old] for new, old in enumerate(kept) if old in matching} for matching in matchings]


def coco_metrics_from_matches(
    matchings: Sequence[ImageMatching], class_names: Sequence[str], *, max_detections: int = 100
) -> DetectionMetrics:
    """Accumulate COCO metrics from :func:`match_detections` results (possibly resampled).

    Args:
        matchings: per-image results of :func:`match_detections`.
        class_names: the names given to :func:`match_detections`.
        max_detections: the value given to :func:`match_detections`.

    Returns:
        :class:`DetectionMetrics`.

    Raises:
        InvalidArgumentError: no matchings, bad class names or ``max_detections``.
    """
    if len(matchings) == 0:
        raise InvalidArgumentError("no images to evaluate")
    names = check_class_names(class_names)
    max_detections = _check_max_detections(max_detections)
    counts = _ground_truth_counts(matchings, len(names))
    kept = [label for label, count in enumerate(counts) if count > 0]
    values: dict[str, float] = {}
    if kept:
        values, _ = _monai_metric(len(kept), max_detections)(_only_classes(matchings, kept))

    def read(prefix: str, n_ground_truth: int) -> ClassDetectionMetrics:
        return ClassDetectionMetrics(
            ap=values[f"{prefix}mAP_{_RANGE_KEY}_MaxDet_{max_detections}"],
            ap50=values[f"{prefix}AP_IoU_0.50_MaxDet_{max_detections}"],
            ap75=values[f"{prefix}AP_IoU_0.75_MaxDet_{max_detections}"],
            ar=values[f"{prefix}mAR_{_RANGE_KEY}_MaxDet_{max_detections}"],
            n_ground_truth=n_ground_truth,
        )

    absent = ClassDetectionMetrics(ap=None, ap50=None, ap75=None, ar=None, n_ground_truth=0)
    per_class = dict.fromkeys(names, absent)
    for new, old in enumerate(kept):
        per_class[names[old]] = read(f"{new}_", counts[old])
    overall = read("", sum(counts)) if kept else absent
    return DetectionMetrics(
        ap=overall.ap,
        ap50=overall.ap50,
        ap75=overall.ap75,
        ar=overall.ar,
        per_class=per_class,
        max_detections=max_detections,
        n_images=len(matchings),
    )


def ap50_from_matches(
    matchings: Sequence[ImageMatching], class_names: Sequence[str], *, max_detections: int = 100
) -> float | None:
    """AP at IoU 0.50 (mean over classes with ground truth) from :func:`match_detections` results.

    Accumulates only the IoU 0.50 row of the matchings, a tenth of :func:`coco_metrics_from_matches`' work, for
    the many resamples of a bootstrap.

    Args:
        matchings: per-image results of :func:`match_detections`.
        class_names: the names given to :func:`match_detections`.
        max_detections: the value given to :func:`match_detections`.

    Returns:
        AP50 in [0, 1], or None when no class has a ground-truth box.

    Raises:
        InvalidArgumentError: no matchings.
    """
    if len(matchings) == 0:
        raise InvalidArgumentError("no images to evaluate")
    counts = _ground_truth_counts(matchings, len(class_names))
    kept = [label for label, count in enumerate(counts) if count > 0]
    if not kept:
        return None
    row = [_AP50_ROW]
    ap50_rows = [
        {
            label: {**result, **{key: result[key][row] for key in ("dtMatches", "gtMatches", "dtIgnore")}}
            for label, result in matching.items()
        }
        for matching in _only_classes(matchings, kept)
    ]
    values, _ = _monai_metric(len(kept), max_detections, ap50_only=True)(ap50_rows)
    return values[f"AP_IoU_0.50_MaxDet_{max_detections}"]


def coco_metrics(
    images: Sequence[EvaluatedImage], class_names: Sequence[str], *, max_detections: int = 100
) -> DetectionMetrics:
    """COCO AP (IoU 0.50:0.95), AP50, AP75 and AR at ``max_detections``, overall and per class.

    Args:
        images: the evaluation set; images without ground truth contribute their detections as false positives.
        class_names: the names the labels index (label i is ``class_names[i]``).
        max_detections: per image and class, only the highest-scoring ``max_detections`` detections count.

    Returns:
        :class:`DetectionMetrics`.

    Raises:
        InvalidArgumentError: no images, bad class names, a label out of range, or ``max_detections`` < 1.
    """
    return coco_metrics_from_matches(
        match_detections(images, class_names, max_detections=max_detections), class_names, max_detections=max_detections
    )
