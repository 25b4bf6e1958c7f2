"""Anchor shapes from the boxes a detector will be trained on, at its working scale.

The detector's pyramid has three levels (strides p/2, p and 2p for patch size p), or four with p/4 first; MONAI's
anchor generator puts every base shape on the finest level and the same shapes times 2, 4 (and 8) on the next
ones. So the levels together cover a 4x (8x) range of sizes around each base shape. The rule here centres that
range on the training boxes on a log scale: the geometric middle of the levels' shapes sits at the geometric mean
of the 5th and 95th percentile of the box side, and the base shapes take the 20th, 50th and 80th percentile of the
aspect ratio.
"""

from __future__ import annotations

import numpy as np

from caries_mim.errors import InvalidDatasetError

#: Fewer boxes than this give percentiles that say little; the rule refuses rather than guessing.
MIN_BOXES = 8


def anchor_shapes_for_boxes(
    widths: np.ndarray, heights: np.ndarray, levels: int = 3
) -> tuple[tuple[float, float], ...]:
    """Three (width, height) base shapes of the finest pyramid level for boxes of these sizes.

    Args:
        widths, heights: (N,) box sizes in model pixels (after the working-scale resize), positive.
        levels: pyramid levels (the shapes double from one to the next).
    Returns:
        three (width, height) pairs, rounded to 0.1 px and at least 1 px: the same size, one per aspect-ratio
        percentile.
    Raises:
        InvalidDatasetError: fewer than ``MIN_BOXES`` boxes, or boxes without area.
    """
    widths = np.asarray(widths, dtype=np.float64).reshape(-1)
    heights = np.asarray(heights, dtype=np.float64).reshape(-1)
    if widths.size < MIN_BOXES:
        raise InvalidDatasetError(
            f"automatic anchor shapes need at least {MIN_BOXES} training boxes, got {widths.size}; "
            "set detector.anchor_shapes explicitly"
        )
    if widths.shape != heights.shape or (widths <= 0).any() or (heights <= 0).any():
        raise InvalidDatasetError("automatic anchor shapes need boxes with positive width and height")
    side = np.sqrt(widths * heights)
    middle = float(np.sqrt(np.percentile(side, 5) * np.percentile(side, 95)))
    # The levels' shapes run from base to base * 2^(levels - 1); their geometric middle is the middle size.
    base = middle / 2.0 ** ((levels - 1) / 2.0)
    log_aspect = np.log(widths / heights)
    shapes = []
    for percentile in (20, 50, 80):
        aspect = float(np.exp(np.percentile(log_aspect, percentile)))
        # At least a pixel each way: MONAI's box coder takes the log of box over anchor size.
        width, height = (max(round(float(value), 1), 1.0) for value in (base * np.sqrt(aspect), base / np.sqrt(aspect)))
        shapes.append((width, height))
    return tuple(shapes)
