"""Rendering: determinism, value ranges, lesion contrast and label statistics."""

from __future__ import annotations

import numpy as np
import pytest

from caries_mim.synth import SynthConfig, render_indexed
from caries_mim.synth.dataset import image_rng
from caries_mim.synth.render import plan_scene, render_plan


@pytest.fixture(scope="module")
def batch():
    config = SynthConfig()
    return [render_indexed(11, "labeled", i, config) for i in range(36)]


def test_same_seed_same_image_and_boxes():
    config = SynthConfig()
    a = render_indexed(5, "labeled", 3, config)
    b = render_indexed(5, "labeled", 3, config)
    assert np.array_equal(a.pixels, b.pixels)
    assert np.array_equal(a.boxes, b.boxes)
    assert a.labels == b.labels
    c = render_indexed(5, "labeled", 4, config)
    assert a.pixels.shape != c.pixels.shape or not np.array_equal(a.pixels, c.pixels)


def test_pixels_are_12_bit_and_boxes_inside(batch):
    for image in batch:
        assert image.pixels.dtype == np.uint16
        assert image.pixels.max() <= 4095
        assert image.pixels.std() > 200, "an image without contrast"
        h, w = image.pixels.shape
        assert min(h, w) >= 600
        assert max(h, w) <= 1400
        assert 0.02 <= image.spacing_mm[0] <= 0.04
        boxes = image.boxes
        assert boxes.shape == (len(image.labels), 4)
        assert np.all(boxes[:, :2] >= 0)
        assert np.all(boxes[:, 2:] <= [w, h])
        assert np.all(boxes[:, 2:] > boxes[:, :2])


def test_lesion_free_fraction_and_both_labels(batch):
    free = sum(1 for image in batch if not image.lesions) / len(batch)
    assert 0.15 <= free <= 0.55
    labels = {label for image in batch for label in image.labels}
    assert labels == {"caries", "deep_caries"}
    assert {image.view for image in batch} == {"bitewing", "periapical"}
    for image in batch:
        for lesion in image.lesions:
            assert lesion.surface in ("mesial", "distal", "occlusal")
            assert (lesion.label == "deep_caries") == (lesion.depth == "inner_dentin")
            assert lesion.tooth % 10 in range(4, 9)
            assert lesion.tooth // 10 in range(1, 5)


def test_lesions_are_darker_than_the_same_image_without_them():
    """Render each plan with and without its lesions (same noise): every box must be measurably darker."""
    config = SynthConfig(lesion_free_fraction=0.0)
    checked = 0
    for index in range(6):
        plan = plan_scene(image_rng(21, "labeled", index), config)
        with_lesions = render_plan(plan).pixels.astype(np.float64)
        without = render_plan(plan, omit_lesions=range(len(plan.lesions))).pixels.astype(np.float64)
        for lesion in render_plan(plan).lesions:
            x0, y0, x1, y1 = (round(c) for c in lesion.box)
            drop = without[y0:y1, x0:x1] - with_lesions[y0:y1, x0:x1]
            assert drop.mean() > 0, f"lesion {lesion} is not darker"
            # The strongest part of the lesion stands clearly out of the quantum noise.
            assert np.percentile(drop, 90) > 40
            checked += 1
    assert checked >= 6
