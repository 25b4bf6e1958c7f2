"""Box drawing and grids for the pictures the pipelines write."""

from __future__ import annotations

import numpy as np
import pytest

from caries_mim.visualization import LABEL_COLOURS, draw_findings, tile, to_uint8


def test_to_uint8_rounds_and_clips():
    np.testing.assert_array_equal(to_uint8(np.array([[-0.5, 0.0, 0.5, 1.0, 2.0]])), [[0, 0, 128, 255, 255]])


def test_boxes_are_drawn_in_their_label_colour_on_the_edges_only():
    pixels = np.full((100, 200), 0.5, dtype=np.float32)
    image = np.asarray(draw_findings(pixels, np.array([[20, 30, 80, 70]]), ["deep_caries"], line_width=2))
    assert image.shape == (100, 200, 3)
    assert tuple(image[50, 20]) == LABEL_COLOURS["deep_caries"]  # left edge
    assert tuple(image[70, 50]) == LABEL_COLOURS["deep_caries"]  # bottom edge
    assert tuple(image[50, 50]) == (128, 128, 128)  # inside stays the radiograph
    assert tuple(image[5, 150]) == (128, 128, 128)


def test_mismatched_labels_are_refused():
    with pytest.raises(ValueError, match="2 boxes but 1 labels"):
        draw_findings(np.zeros((10, 10)), np.zeros((2, 4)), ["caries"])


def test_tile_keeps_aspect_and_fills_a_grid():
    from PIL import Image

    images = [Image.new("RGB", (200, 100), (255, 0, 0)) for _ in range(5)]
    sheet = tile(images, columns=2, cell_width=100)
    assert sheet.size == (200, 150)  # 3 rows of 50 px
    assert sheet.getpixel((150, 120)) == (0, 0, 0)  # the empty sixth cell
    assert sheet.getpixel((10, 110)) == (255, 0, 0)
