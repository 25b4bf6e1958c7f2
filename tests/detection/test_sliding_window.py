"""BatchSlidingWindow against MONAI's SlidingWindowInferer (mode "constant"), which it replaces."""

from __future__ import annotations

import pytest
import torch
from monai.apps.detection.utils.predict_utils import predict_with_inferer
from monai.inferers import SlidingWindowInferer
from torch import nn

from caries_mim.detection import CariesDetector
from caries_mim.detection.sliding_window import BatchSlidingWindow
from tests.detection.tiny import tiny_config


@pytest.mark.parametrize(
    ("images", "height", "width", "windows", "overlap", "dtype"),
    [
        (3, 64, 64, 4, 0.5, torch.float32),  # exactly one window
        (3, 64, 160, 3, 0.5, torch.float32),  # a row of windows, the last one shifted to the edge; chunks split images
        (3, 128, 96, 64, 0.25, torch.float32),  # every window of the batch in one call
        (3, 100, 75, 1, 0.25, torch.float32),  # sides that are no multiple of any stride: MONAI's truncated corners
        (1, 64, 192, 2, 0.0, torch.float32),  # one image, windows side by side
        (2, 96, 96, 4, 0.5, torch.bfloat16),  # maps accumulated in the inputs' dtype, as MONAI does
    ],
)
def test_detector_maps_equal_monai_stitching_bit_for_bit(images, height, width, windows, overlap, dtype):
    torch.manual_seed(0)
    detector = CariesDetector(tiny_config()).eval().to(dtype)  # only its network is used; any overlap goes
    network = detector.network
    keys = [network.cls_key, network.box_reg_key]
    images = torch.rand(images, 1, height, width).to(dtype)
    ours = BatchSlidingWindow(64, windows, overlap)
    theirs = SlidingWindowInferer((64, 64), sw_batch_size=windows, overlap=overlap, mode="constant")
    with torch.no_grad():
        stitched = predict_with_inferer(images, network, keys, ours)
        expected = predict_with_inferer(images, network, keys, theirs)
        again = predict_with_inferer(images, network, keys, ours)  # the cached window counts
    for key in keys:
        assert len(stitched[key]) == len(expected[key]) == 3
        for level, (map_, reference, repeat) in enumerate(zip(stitched[key], expected[key], again[key], strict=True)):
            assert map_.shape == reference.shape, (key, level)
            assert map_.dtype == reference.dtype == dtype, (key, level)
            assert torch.equal(map_, reference), (key, level)
            assert torch.equal(repeat, reference), (key, level)


def test_a_network_returning_one_tensor_gets_one_tensor():
    network = nn.Conv2d(1, 2, kernel_size=3, padding=1)
    images = torch.rand(2, 1, 80, 130)
    with torch.no_grad():
        stitched = BatchSlidingWindow(48, 5, 0.25)(images, network)
        expected = SlidingWindowInferer((48, 48), sw_batch_size=5, overlap=0.25, mode="constant")(images, network)
    assert isinstance(stitched, torch.Tensor)
    assert torch.equal(stitched, expected)


def test_detections_equal_monai_inferer_detections():
    torch.manual_seed(1)
    detector = CariesDetector(tiny_config(detections_per_image=30)).eval()
    images = torch.rand(2, 1, 96, 160)
    ours = detector.predict(images)
    detector.retinanet.set_sliding_window_inferer(roi_size=(64, 64), sw_batch_size=4, overlap=0.5, mode="constant")
    expected = detector.predict(images)
    assert sum(len(found["scores"]) for found in ours) > 10
    for found, reference in zip(ours, expected, strict=True):
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(found[key], reference[key]), key


@pytest.mark.parametrize(("shape", "message"), [((1, 1, 63, 100), "at least one 64 px window"), ((1, 64, 64), "B, C")])
def test_unusable_inputs_are_named(shape, message):
    with pytest.raises(ValueError, match=message):
        BatchSlidingWindow(64, 4, 0.25)(torch.zeros(shape), nn.Identity())


@pytest.mark.parametrize(("arguments", "message"), [((64, 0, 0.25), "sw_batch_size >= 1"), ((64, 4, 1.0), "overlap")])
def test_unusable_settings_are_named(arguments, message):
    with pytest.raises(ValueError, match=message):
        BatchSlidingWindow(*arguments)
