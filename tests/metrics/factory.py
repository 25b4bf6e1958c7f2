"""Small builders for hand-computed metric cases."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from caries_mim.metrics import EvaluatedImage

Box = Sequence[float]


def make_image(
    image_id: str,
    truth: Sequence[tuple[Box, int]] = (),
    predictions: Sequence[tuple[Box, int, float]] = (),
) -> EvaluatedImage:
    """An image from ``[(box, label)]`` ground truth and ``[(box, label, score)]`` predictions."""
    return EvaluatedImage(
        image_id=image_id,
        gt_boxes=np.array([box for box, _ in truth], dtype=np.float64).reshape(-1, 4),
        gt_labels=np.array([label for _, label in truth], dtype=np.int64),
        pred_boxes=np.array([box for box, _, _ in predictions], dtype=np.float64).reshape(-1, 4),
        pred_labels=np.array([label for _, label, _ in predictions], dtype=np.int64),
        pred_scores=np.array([score for _, _, score in predictions], dtype=np.float64),
    )


def shifted(box: Box, dx: float = 0.0, dy: float = 0.0) -> list[float]:
    """``box`` moved by (dx, dy) pixels."""
    x0, y0, x1, y1 = box
    return [x0 + dx, y0 + dy, x1 + dx, y1 + dy]


def perfect(images: Sequence[EvaluatedImage], score: float = 0.9) -> list[EvaluatedImage]:
    """The same images with every ground-truth box predicted exactly, with its own label."""
    return [
        EvaluatedImage(
            image.image_id,
            gt_boxes=image.gt_boxes,
            gt_labels=image.gt_labels,
            pred_boxes=image.gt_boxes,
            pred_labels=image.gt_labels,
            pred_scores=np.full(len(image.gt_boxes), score),
        )
        for image in images
    ]
