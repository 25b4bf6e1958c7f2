"""Radiographs of any size: the scale rule, identity with the training letterbox, boxes back in original pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from caries_mim.data.transforms import Letterbox, detection_eval_transform
from caries_mim.detection import CariesDetector, detect, model_geometry, model_scale, prepare_image
from caries_mim.errors import InvalidArgumentError
from tests.detection.tiny import tiny_config


@pytest.mark.parametrize(("height", "width"), [(1200, 1600), (1600, 1200), (300, 200), (2048, 1000)])
def test_intra_oral_images_get_the_training_letterbox_geometry(height, width):
    config = tiny_config(image_size=512, roi_size=512, max_downscale=4.0)
    geometry = model_geometry(height, width, config)
    assert max(geometry.resized) == 512
    assert geometry == Letterbox.for_image(height, width, 512)


def test_panoramic_images_are_shrunk_by_at_most_max_downscale():
    config = tiny_config(image_size=512, roi_size=512, max_downscale=4.0)
    assert model_geometry(1500, 3000, config).resized == (375, 750)
    # Continuous at the boundary: both rules give the same scale at a long side of 2048.
    assert model_scale(1000, 2048, config) == pytest.approx(0.25)
    assert model_scale(1000, 2049, config) == pytest.approx(0.25)


@pytest.mark.parametrize(("height", "width"), [(150, 97), (40, 100)])
def test_prepared_pixels_equal_the_training_letterbox(height, width):
    """Same pixels and the same square, so the encoder's position embedding covers them as in training."""
    pixels = np.random.default_rng(0).random((height, width), dtype=np.float32)
    image, geometry = prepare_image(pixels, tiny_config(image_size=128, roi_size=128))
    assert image.shape == (1, 1, 128, 128)
    assert image.dtype == torch.float32
    letterboxed = detection_eval_transform(128)(image=pixels, bboxes=np.zeros((0, 4)), labels=np.zeros(0))["image"]
    np.testing.assert_allclose(image[0, 0].numpy(), letterboxed.squeeze(), atol=1e-6)
    assert geometry == Letterbox.for_image(height, width, 128)


def test_images_larger_than_the_square_are_not_padded_to_it():
    image, geometry = prepare_image(np.zeros((100, 300), dtype=np.float32), tiny_config(max_downscale=2.0))
    assert image.shape == (1, 1, 50, 150)
    assert geometry.resized == (50, 150)


def test_prepare_refuses_a_colour_image():
    with pytest.raises(InvalidArgumentError, match=r"\(H, W\)"):
        prepare_image(np.zeros((10, 10, 3), dtype=np.float32), tiny_config())


def test_detect_maps_boxes_back_to_the_original_pixels(monkeypatch):
    """A box covering the resized image maps to the whole original image, one in its middle to the middle, and one
    in the padding is dropped."""
    detector = CariesDetector(tiny_config(image_size=128, roi_size=128)).eval()
    seen = []

    def predict(images):
        seen.append(tuple(images.shape))
        height, width = 128, 83  # the image inside the padded square
        boxes = torch.tensor(
            [[0.0, 0.0, width, height], [width / 4, height / 4, width / 2, height / 2], [100.0, 0.0, 120.0, 10.0]]
        )
        return [{"boxes": boxes, "scores": torch.tensor([0.9, 0.5, 0.4]), "labels": torch.tensor([0, 0, 0])}]

    monkeypatch.setattr(detector, "predict", predict)
    found = detect(detector, np.zeros((150, 97), dtype=np.float32))
    assert seen == [(1, 1, 128, 128)]
    np.testing.assert_allclose(found.boxes[0], [0, 0, 97, 150], atol=1e-4)
    np.testing.assert_allclose(found.boxes[1], [97 / 4, 150 / 4, 97 / 2, 150 / 2], atol=1e-4)
    assert len(found.boxes) == len(found.scores) == 2  # the third lies in the padding right of the image
    assert found.boxes.dtype == np.float32
    assert found.labels.dtype == np.int64


def test_detect_on_an_odd_sized_image_returns_boxes_inside_it():
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config()).eval()
    found = detect(detector, np.random.default_rng(0).random((150, 97), dtype=np.float32))
    # Of the 20 detections in the padded 64 x 64 square, those wholly in its padding are dropped.
    assert 0 < len(found.boxes) < 20
    assert found.scores.shape == found.labels.shape == (len(found.boxes),)
    assert (found.boxes >= 0).all()
    assert (found.boxes[:, [0, 2]] <= 97).all()
    assert (found.boxes[:, [1, 3]] <= 150).all()
    assert (found.boxes[:, 2] > found.boxes[:, 0]).all()
    assert (found.boxes[:, 3] > found.boxes[:, 1]).all()


def test_detect_on_a_panoramic_sized_image_uses_the_window_at_a_bounded_scale():
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config(max_downscale=2.0)).eval()
    windows = []
    detector.network.register_forward_pre_hook(lambda module, args: windows.append(tuple(args[0].shape[-2:])))
    found = detect(detector, np.random.default_rng(0).random((100, 300), dtype=np.float32))
    # 300 > 64 * 2: shrunk by 2 to 50 x 150 (not squeezed to 21 x 64), then 64 px windows.
    assert set(windows) == {(64, 64)}
    assert (found.boxes >= 0).all()
    assert (found.boxes[:, [0, 2]] <= 300).all()
    assert (found.boxes[:, [1, 3]] <= 100).all()
    assert found.boxes[:, 2].max() > 150  # detections in the right half of the original


def test_physical_rule_resamples_by_spacing_and_maps_boxes_back():
    config = tiny_config(image_size=64, roi_size=64, spacing_mm=0.06)
    pixels = np.random.default_rng(1).random((600, 900), dtype=np.float32)
    image, geometry = prepare_image(pixels, config, (0.03, 0.03))
    assert geometry.resized == (300, 450)
    assert image.shape == (1, 1, 300, 450)  # larger than a window: not padded, the sliding window tiles it
    np.testing.assert_allclose(geometry.to_original([[10, 20, 30, 40]]), [[20, 40, 60, 80]])
    small, geometry = prepare_image(pixels[:100, :90], config, (0.03, 0.03))
    assert geometry.resized == (50, 45)
    assert small.shape == (1, 1, 64, 64)  # padded to one window
    # The same image with twice the spacing is twice as large at the working spacing.
    assert model_geometry(600, 900, config, (0.06, 0.06)).resized == (600, 900)


def test_physical_detection_takes_each_image_s_spacing():
    torch.manual_seed(0)
    config = tiny_config(image_size=64, roi_size=64, spacing_mm=0.06, score_threshold=0.0)
    detector = CariesDetector(config).eval()
    pixels = np.random.default_rng(2).random((200, 260), dtype=np.float32)
    for spacing in ((0.03, 0.03), (0.06, 0.06), None):
        found = detect(detector, pixels, spacing)
        assert len(found.boxes) > 0
        assert (found.boxes[:, 2] <= 260).all()
        assert (found.boxes[:, 3] <= 200).all()
