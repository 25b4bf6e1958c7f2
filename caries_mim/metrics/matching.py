"""Box overlap and the greedy lesion matching that FROC and operating-point selection share.

COCO AP has its own matching (MONAI's ``matching_batch``, see :mod:`caries_mim.metrics.coco`); this module is the
lesion-level one: each detection, in descending score order, claims the still unmatched ground-truth box it
overlaps most, if that overlap reaches the IoU threshold. Detections that only overlap already claimed boxes are
false positives, so duplicate boxes on one lesion (weak NMS) count against the model.

Greedy matching in score order has a property both users rely on: the matches among the detections scoring
>= t are exactly the full matching restricted to them (a detection's match never depends on lower-scoring
ones). One matching per image therefore answers "which lesions are found at threshold t" for every t: a lesion is
found iff the score of the detection that matched it is >= t.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from caries_mim.metrics.inputs import EvaluatedImage, check_fraction


def box_iou(boxes_a: np.ndarray, boxes_b: np.ndarray) -> np.ndarray:
    """Pairwise intersection over union of [x0, y0, x1, y1] boxes, in float64.

    MONAI's ``box_iou`` computes in float32 (``COMPUTE_DTYPE``), which moves an IoU sitting exactly on a COCO
    threshold to the other side: two 17x17 pixel boxes 3 pixels apart have IoU 238/340 = 0.7, which float32
    rounds to 0.69999999, losing the match at IoU 0.70 that pycocotools (double precision) makes. For integer
    pixel coordinates this float64 IoU equals pycocotools' bit for bit.

    Args:
        boxes_a: (N, 4) float.
        boxes_b: (M, 4) float.

    Returns:
        (N, M) float64 in [0, 1]; 0 where both boxes have zero area.
    """
    a = np.asarray(boxes_a, dtype=np.float64)[:, None, :]  # (N, 1, 4)
    b = np.asarray(boxes_b, dtype=np.float64)[None, :, :]  # (1, M, 4)
    width = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0.0, None)
    height = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0.0, None)
    intersection = width * height  # (N, M)
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    union = area_a + area_b - intersection
    return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


@dataclass(frozen=True, eq=False)
class LesionMatches:
    """The lesion-level matching of one image, all a threshold sweep needs.

    Attributes:
        image_id: the image's id.
        tp_scores: float64 (K,), scores of the detections that matched a lesion, one per matched lesion.
        fp_scores: float64 (F,), scores of the detections that matched nothing.
        n_lesions: number of ground-truth boxes (K <= n_lesions).
        lesion_scores: float64 (n_lesions,), per ground-truth box (input order) the score of the detection that
            found it, NaN for a lesion nothing found: a lesion is found at threshold t iff its score >= t.
    """

    image_id: int | str
    tp_scores: np.ndarray
    fp_scores: np.ndarray
    n_lesions: int
    lesion_scores: np.ndarray


def match_lesions(
    images: Sequence[EvaluatedImage], *, iou_threshold: float = 0.1, class_agnostic: bool = True
) -> list[LesionMatches]:
    """Greedily match each image's detections to its ground-truth boxes, highest score first.

    Args:
        images: the evaluation set.
        iou_threshold: the least IoU, in (0, 1], for a detection to match a ground-truth box.
        class_agnostic: when False, a detection matches only ground-truth boxes of its own label.

    Returns:
        One :class:`LesionMatches` per image, in input order.

    Raises:
        InvalidArgumentError: ``iou_threshold`` outside (0, 1].
    """
    iou_threshold = check_fraction(iou_threshold, "iou_threshold", allow_zero=False, allow_one=True)
    return [_match_image(image, iou_threshold, class_agnostic) for image in images]


def _match_image(image: EvaluatedImage, iou_threshold: float, class_agnostic: bool) -> LesionMatches:
    # Stable sort: equal scores keep input order, as in MONAI's and pycocotools' matching.
    order = np.argsort(-image.pred_scores, kind="mergesort")
    scores = image.pred_scores[order]
    ious = box_iou(image.pred_boxes[order], image.gt_boxes)  # (D, G)
    if not class_agnostic:
        ious[image.pred_labels[order][:, None] != image.gt_labels[None, :]] = -1.0
    claimed = np.zeros(len(image.gt_boxes), dtype=bool)
    lesion_scores = np.full(len(image.gt_boxes), np.nan)
    is_tp = np.zeros(len(scores), dtype=bool)
    for detection in range(len(scores)):
        available = np.where(claimed, -1.0, ious[detection])
        if available.size == 0:
            break
        best = int(np.argmax(available))
        if available[best] >= iou_threshold:
            claimed[best] = True
            lesion_scores[best] = scores[detection]
            is_tp[detection] = True
    return LesionMatches(
        image_id=image.image_id,
        tp_scores=scores[is_tp],
        fp_scores=scores[~is_tp],
        n_lesions=len(image.gt_boxes),
        lesion_scores=lesion_scores,
    )
