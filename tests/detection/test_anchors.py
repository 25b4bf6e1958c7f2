"""Anchor shapes fitted to the training boxes at the working scale."""

from __future__ import annotations

import numpy as np
import pytest

from caries_mim.detection.anchors import MIN_BOXES, anchor_shapes_for_boxes
from caries_mim.errors import InvalidDatasetError


def test_square_boxes_of_one_size_give_square_anchors_whose_middle_level_fits_them():
    shapes = anchor_shapes_for_boxes(np.full(20, 24.0), np.full(20, 24.0))
    assert shapes == ((12.0, 12.0), (12.0, 12.0), (12.0, 12.0))  # times 2 on the middle level: 24 px


def test_the_three_levels_span_the_box_sizes_and_the_shapes_their_aspects():
    rng = np.random.default_rng(0)
    side = np.exp(rng.uniform(np.log(8), np.log(64), 400))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2.0), 400))
    widths, heights = side * np.sqrt(aspect), side / np.sqrt(aspect)
    shapes = anchor_shapes_for_boxes(widths, heights)
    sides = [np.sqrt(w * h) for w, h in shapes]
    assert max(sides) - min(sides) < 0.2  # one size, three aspects
    # Levels at x1, x2, x4 of the base: the geometric middle of 5th and 95th percentile is the x2 level.
    low, high = np.percentile(side, [5, 95])
    assert 2 * sides[0] == pytest.approx(np.sqrt(low * high), rel=0.02)
    aspects = [w / h for w, h in shapes]
    assert aspects[0] < 0.85 < 1.15 < aspects[2]


def test_too_few_or_degenerate_boxes_are_refused():
    with pytest.raises(InvalidDatasetError, match="at least"):
        anchor_shapes_for_boxes(np.ones(MIN_BOXES - 1), np.ones(MIN_BOXES - 1))
    with pytest.raises(InvalidDatasetError, match="positive"):
        anchor_shapes_for_boxes(np.zeros(MIN_BOXES), np.ones(MIN_BOXES))


def test_four_levels_centre_their_eightfold_range_on_the_boxes():
    # Levels at x1, x2, x4, x8 of the base: geometric middle x sqrt(8), so 24 px boxes give 24 / sqrt(8) = 8.5 px.
    shapes = anchor_shapes_for_boxes(np.full(20, 24.0), np.full(20, 24.0), levels=4)
    assert shapes == ((8.5, 8.5),) * 3
