"""Predictor: boxes in original pixels, millimetre boxes from the spacing, the operating threshold, JSON output."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from caries_mim.detection import CariesDetector
from caries_mim.errors import InvalidArgumentError
from caries_mim.inference import Finding, Findings, Predictor
from caries_mim.io import Radiograph
from caries_mim.package import ModelPackage
from tests.detection.tiny import tiny_config

ODD_SHAPE = (53, 91)


@pytest.fixture(scope="module")
def package() -> ModelPackage:
    torch.manual_seed(1)
    return ModelPackage.from_detector(CariesDetector(tiny_config()), threshold=0.5, version="0.1.0")


@pytest.fixture(scope="module")
def predictor(package) -> Predictor:
    return Predictor(package, device="cpu")


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(3).random(ODD_SHAPE, dtype=np.float32)


def test_boxes_lie_inside_the_original_odd_size_image(predictor, pixels):
    found = predictor.predict(pixels)
    assert len(found) > 0
    assert found.image_shape == ODD_SHAPE
    boxes = np.array([f.box for f in found.findings])
    height, width = ODD_SHAPE
    assert (boxes[:, :2] >= 0).all()
    assert (boxes[:, 2:] <= [width, height]).all()
    assert (boxes[:, 2:] > boxes[:, :2]).all()
    scores = [f.score for f in found.findings]
    assert scores == sorted(scores, reverse=True)
    assert {f.label for f in found.findings} == {"caries"}


def test_predictor_is_in_eval_mode_and_deterministic(predictor, pixels):
    assert not predictor.detector.training
    first, second = predictor.predict(pixels), predictor.predict(pixels)
    assert first == second


def test_millimetre_boxes_use_column_spacing_for_x_and_row_spacing_for_y(predictor, pixels):
    radiograph = Radiograph(pixels=pixels, spacing_mm=(0.1, 0.2), source_format="png")
    found = predictor.predict(radiograph)
    assert found.spacing_mm == (0.1, 0.2)
    for finding in found.findings:
        x0, y0, x1, y1 = finding.box
        assert finding.box_mm == pytest.approx((x0 * 0.2, y0 * 0.1, x1 * 0.2, y1 * 0.1))


def test_no_millimetre_boxes_without_spacing(predictor, pixels):
    found = predictor.predict(Radiograph(pixels=pixels, spacing_mm=None, source_format="png"))
    assert len(found) > 0
    assert all(finding.box_mm is None for finding in found.findings)
    assert found.to_dict()["image"]["spacing_mm"] is None


def test_operating_threshold_counts_a_score_equal_to_it(package, pixels):
    scores = [f.score for f in Predictor(package, device="cpu").predict(pixels).findings]
    assert len(set(scores)) >= 2
    cut = scores[len(scores) // 2]
    at_cut = ModelPackage(config=package.config, state_dict=package.state_dict, threshold=cut)
    found = Predictor(at_cut, device="cpu").predict(pixels)
    kept = found.above_threshold
    assert [f.score for f in kept] == [s for s in scores if s >= cut]
    assert any(f.score == cut for f in kept)
    assert all(f.above_threshold == (f.score >= cut) for f in found.findings)


def test_findings_to_dict_is_plain_json(predictor, pixels):
    found = predictor.predict(pixels, spacing_mm=(0.05, 0.05))
    as_dict = found.to_dict()
    assert json.loads(json.dumps(as_dict)) == as_dict
    assert as_dict["image"] == {"rows": 53, "columns": 91, "spacing_mm": [0.05, 0.05]}
    assert as_dict["threshold"] == 0.5
    assert as_dict["package_version"] == "0.1.0"
    assert len(as_dict["findings"]) == len(found)
    first = as_dict["findings"][0]
    assert set(first) == {"label", "score", "box", "box_mm", "above_threshold"}
    filtered = found.to_dict(include_below_threshold=False)
    assert all(item["score"] >= 0.5 for item in filtered["findings"])
    assert len(filtered["findings"]) == len(found.above_threshold)


def test_findings_filter_by_hand():
    box = (1.0, 2.0, 3.0, 4.0)
    findings = Findings(
        findings=(
            Finding("caries", 0.7, box, None, True),
            Finding("caries", 0.4, box, None, False),
        ),
        threshold=0.5,
        image_shape=(10, 10),
        spacing_mm=None,
        package_version="x",
    )
    assert [f.score for f in findings.above_threshold] == [0.7]


def test_predict_file_reads_a_png(predictor, tmp_path):
    cv2 = pytest.importorskip("cv2")
    image = (np.random.default_rng(5).random(ODD_SHAPE) * 255).astype(np.uint8)
    path = tmp_path / "radiograph.png"
    cv2.imwrite(str(path), image)
    found = predictor.predict_file(path)
    assert found.image_shape == ODD_SHAPE
    assert found.spacing_mm is None


@pytest.mark.parametrize(
    "bad",
    [np.zeros((4, 4, 3), np.float32), np.full((8, 8), 2.0, np.float32), np.zeros((8, 8), np.uint8), [[0.1]]],
    ids=["colour", "out-of-range", "integer", "list"],
)
def test_bad_pixels_are_refused(predictor, bad):
    with pytest.raises(InvalidArgumentError):
        predictor.predict(bad)


def test_bad_spacing_and_device_are_refused(predictor, pixels, package):
    with pytest.raises(InvalidArgumentError, match="spacing_mm"):
        predictor.predict(pixels, spacing_mm=(0.0, 0.1))
    with pytest.raises(InvalidArgumentError, match="device"):
        Predictor(package, device="tpu")


def test_predict_batch_equals_one_by_one_for_mixed_sizes(predictor, pixels):
    rng = np.random.default_rng(5)
    config = predictor.package.config
    # Two images that fit the model square share a forward pass; one larger than image_size * max_downscale
    # goes through the sliding window alone.
    large_side = int(config.image_size * config.max_downscale) + 40
    images = [pixels, rng.random((70, 40), dtype=np.float32), rng.random((large_side, 60), dtype=np.float32)]
    spacings = [(0.1, 0.2), None, (0.05, 0.05)]
    batched = predictor.predict_batch(images, spacing_mm=spacings)
    assert len(batched) == 3
    for image, spacing, together in zip(images, spacings, batched, strict=True):
        alone = predictor.predict(image, spacing_mm=spacing)
        assert together.image_shape == alone.image_shape
        assert together.spacing_mm == alone.spacing_mm
        assert [f.label for f in together.findings] == [f.label for f in alone.findings]
        np.testing.assert_allclose([f.score for f in together.findings], [f.score for f in alone.findings], atol=1e-5)
        np.testing.assert_allclose([f.box for f in together.findings], [f.box for f in alone.findings], atol=1e-3)


def test_predict_batch_refuses_mismatched_spacings_and_bad_images(predictor, pixels):
    with pytest.raises(InvalidArgumentError, match="2 images but 1 spacings"):
        predictor.predict_batch([pixels, pixels], spacing_mm=[None])
    with pytest.raises(InvalidArgumentError):
        predictor.predict_batch([pixels, np.full((4, 4), 2.0, dtype=np.float32)])
