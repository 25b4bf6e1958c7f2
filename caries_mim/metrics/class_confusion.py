"""Is a detector losing lesions, or their class? Class confusion of the lesions found, and AP50 with the classes
merged.

COCO's AP50 per class charges a lesion found with the wrong class twice: a miss in its own class and a false
positive in the other. When the classes are grades of one finding (caries, deep caries) a reader wants to know
which of the two a detector gets wrong, so this module reports:

* the *confusion* at the operating point: for each ground-truth lesion, the class of the highest-scoring finding
  (score >= threshold) that overlaps it at IoU >= ``iou_threshold``, or "missed" when none does;
* *AP50 with the classes merged* (lesion vs background): the same predictions and ground truth with every label
  set to one class, through the same COCO computation as :func:`~caries_mim.metrics.coco.coco_metrics`. A finding
  the detector reports under both classes then counts once as a hit and once as a duplicate (a false positive),
  as COCO counts any duplicate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from caries_mim.metrics.coco import coco_metrics
from caries_mim.metrics.inputs import EvaluatedImage, check_class_names, check_fraction, check_images, check_labels
from caries_mim.metrics.matching import box_iou

#: The column of the confusion for lesions no finding overlaps.
MISSED = "missed"


@dataclass(frozen=True)
class ClassConfusion:
    """Class confusion of the lesions found at an operating point, and AP50 with the classes merged.

    Attributes:
        class_names: the classes, in label order.
        counts: int64 (C, C + 1): row = true class, column = class of the best overlapping finding, the last
            column the lesions without one (:data:`MISSED`).
        threshold: the operating threshold the findings were taken at.
        iou_threshold: the overlap a finding needs with a lesion to count as finding it.
        merged_ap50: AP50 of the predictions with every class merged into one (lesion vs background), over all
            scores; None without any lesion.
    """

    class_names: tuple[str, ...]
    counts: np.ndarray
    threshold: float
    iou_threshold: float
    merged_ap50: float | None

    @property
    def found(self) -> int:
        """Lesions with an overlapping finding, whatever its class."""
        return int(self.counts[:, :-1].sum())

    @property
    def class_accuracy(self) -> float | None:
        """Of the lesions found, the fraction whose best finding has their own class; None when none was found."""
        found = self.found
        return None if found == 0 else float(np.trace(self.counts[:, :-1])) / found

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-serializable values: the matrix as {true class: {found class or "missed": count}}."""
        columns = (*self.class_names, MISSED)
        return {
            "threshold": self.threshold,
            "iou_threshold": self.iou_threshold,
            "merged_ap50": self.merged_ap50,
            "found": self.found,
            "class_accuracy": self.class_accuracy,
            "matrix": {
                name: {column: int(count) for column, count in zip(columns, row, strict=True)}
                for name, row in zip(self.class_names, self.counts, strict=True)
            },
        }


def class_confusion(
    images: Sequence[EvaluatedImage],
    class_names: Sequence[str],
    *,
    threshold: float,
    iou_threshold: float = 0.5,
) -> ClassConfusion:
    """The class confusion of the lesions found at ``threshold`` and AP50 with the classes merged.

    Args:
        images: predictions (all of them, whatever their score) and ground truth per image.
        class_names: the names the labels index.
        threshold: the operating threshold in [0, 1]: findings scoring below it are not looked at.
        iou_threshold: in (0, 1]; a finding overlapping a lesion at least this much found it.

    Raises:
        InvalidArgumentError: no images, bad class names, a label out of range, or a threshold out of range.
    """
    check_images(images)
    names = check_class_names(class_names)
    check_labels(images, names)
    threshold = check_fraction(threshold, "threshold", allow_zero=True, allow_one=True)
    iou_threshold = check_fraction(iou_threshold, "iou_threshold", allow_zero=False, allow_one=True)
    counts = np.zeros((len(names), len(names) + 1), dtype=np.int64)
    for image in images:
        kept = image.pred_scores >= threshold
        boxes, labels, scores = image.pred_boxes[kept], image.pred_labels[kept], image.pred_scores[kept]
        overlaps = box_iou(image.gt_boxes, boxes) >= iou_threshold  # (G, D)
        for lesion, label in enumerate(image.gt_labels):
            candidates = np.flatnonzero(overlaps[lesion])
            column = len(names) if candidates.size == 0 else labels[candidates[np.argmax(scores[candidates])]]
            counts[label, column] += 1
    merged = [
        dataclasses.replace(
            image, gt_labels=np.zeros_like(image.gt_labels), pred_labels=np.zeros_like(image.pred_labels)
        )
        for image in images
    ]
    return ClassConfusion(
        class_names=tuple(names),
        counts=counts,
        threshold=threshold,
        iou_threshold=iou_threshold,
        merged_ap50=coco_metrics(merged, ["lesion"]).ap50,
    )
