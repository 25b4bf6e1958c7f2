"""Augmentation presets keep boxes valid and aligned; the eval letterbox maps boxes back exactly."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest

from caries_mim.data import (
    FloatClahe,
    Letterbox,
    contrastive_view_transform,
    detection_eval_transform,
    detection_train_transform,
    mim_pretrain_transform,
)
from caries_mim.data.scale import ScaleRule, model_scale_factor
from caries_mim.data.transforms import ModelScale
from caries_mim.detection import DetectorConfig
from caries_mim.detection.preprocessing import model_geometry, prepare_image
from caries_mim.errors import InvalidArgumentError
from caries_mim.models import ViTConfig


def random_boxes(rng: np.random.Generator, height: int, width: int, count: int) -> np.ndarray:
    x0 = rng.uniform(0, width - 2, count)
    y0 = rng.uniform(0, height - 2, count)
    x1 = np.minimum(x0 + rng.uniform(1, width / 3, count), width)
    y1 = np.minimum(y0 + rng.uniform(1, height / 3, count), height)
    return np.stack([x0, y0, x1, y1], axis=1).astype(np.float32)


def assert_valid_boxes(boxes: np.ndarray, labels: np.ndarray, size: int, allowed_labels: set[int]) -> None:
    assert boxes.shape == (len(labels), 4)
    if len(boxes):
        assert np.all(boxes >= 0)
        assert np.all(boxes <= size)
        assert np.all(boxes[:, 2] > boxes[:, 0])
        assert np.all(boxes[:, 3] > boxes[:, 1])
    assert set(labels.tolist()) <= allowed_labels


@pytest.mark.parametrize("augmentation", ["standard", "sensor"])
def test_detection_train_transform_keeps_boxes_valid_over_many_draws(augmentation):
    size = 64
    transform = detection_train_transform(size=size, seed=123, augmentation=augmentation)
    rng = np.random.default_rng(0)
    kept = 0
    for _ in range(300):
        height, width = int(rng.integers(20, 160)), int(rng.integers(20, 160))
        image = rng.random((height, width), dtype=np.float32)
        count = int(rng.integers(0, 6))
        boxes = random_boxes(rng, height, width, count)
        labels = np.arange(count, dtype=np.int64)  # distinct, so misalignment or duplication would show
        out = transform(image=image, bboxes=boxes, labels=labels)
        image_out = out["image"]
        assert image_out.shape == (size, size)
        assert image_out.dtype == np.float32
        assert float(image_out.min()) >= 0.0
        assert float(image_out.max()) <= 1.0
        boxes_out = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        labels_out = np.asarray(out["labels"], dtype=np.int64)
        assert_valid_boxes(boxes_out, labels_out, size, set(labels.tolist()))
        assert len(set(labels_out.tolist())) == len(labels_out)
        kept += len(labels_out)
    assert kept > 300  # most boxes survive small affine moves


def test_mim_transform_output_shape_and_range():
    transform = mim_pretrain_transform(size=48, seed=7)
    rng = np.random.default_rng(1)
    for _ in range(50):
        image = rng.random((int(rng.integers(30, 200)), int(rng.integers(30, 200))), dtype=np.float32)
        out = transform(image=image)["image"]
        assert out.shape == (48, 48)
        assert out.dtype == np.float32
        assert float(out.min()) >= 0.0
        assert float(out.max()) <= 1.0


@pytest.mark.parametrize("spacing", [None, 0.06])
def test_contrastive_views_are_square_in_range_and_vary_more_than_mim_crops(spacing):
    """Two-view crops keep the shape and range, at the working spacing too, and their intensities vary more than
    the MIM preset's (the views must differ enough that matching them needs the anatomy)."""
    rng = np.random.default_rng(3)
    image = rng.random((200, 240), dtype=np.float32) * 0.5 + 0.25
    extra = {} if spacing is None else {"spacing_mm": (0.03, 0.03)}
    views = contrastive_view_transform(64, seed=5, spacing_mm=spacing)
    mim = mim_pretrain_transform(64, seed=5, spacing_mm=spacing)
    view_means, mim_means = [], []
    for _ in range(60):
        out = views(image=image, **extra)["image"]
        assert out.shape == (64, 64)
        assert out.dtype == np.float32
        assert 0.0 <= float(out.min()) <= float(out.max()) <= 1.0
        view_means.append(float(out.mean()))
        mim_means.append(float(mim(image=image, **extra)["image"].mean()))
    assert np.std(view_means) > 1.5 * np.std(mim_means)


def test_eval_transform_boxes_round_trip_to_original_pixels():
    rng = np.random.default_rng(11)
    for _ in range(60):
        height, width, size = int(rng.integers(8, 400)), int(rng.integers(8, 400)), int(rng.integers(16, 256))
        boxes = random_boxes(rng, height, width, 4)
        labels = np.array([3, 1, 2, 0], dtype=np.int64)
        image = np.zeros((height, width), np.float32)
        out = detection_eval_transform(size)(image=image, bboxes=boxes, labels=labels)
        model_boxes = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        geometry = Letterbox.for_image(height, width, size)

        assert out["image"].shape == (size, size)
        blank = detection_eval_transform(size)(image=image + 1.0, bboxes=np.zeros((0, 4)), labels=np.zeros(0))
        assert np.count_nonzero(blank["image"]) == np.prod(geometry.resized), (
            "the image must sit in the top-left corner at Letterbox.resized"
        )
        # Boxes the resize squeezed below one pixel are filtered out; the others keep their order and labels.
        kept = np.isin(labels, np.asarray(out["labels"]))
        np.testing.assert_array_equal(np.asarray(out["labels"]), labels[kept])
        np.testing.assert_allclose(model_boxes, geometry.to_model(boxes[kept]), atol=1e-3)
        np.testing.assert_allclose(geometry.to_original(model_boxes), boxes[kept], rtol=1e-5, atol=1e-3)


def test_letterbox_to_original_clips_predictions_in_the_padding():
    geometry = Letterbox.for_image(height=100, width=200, size=64)
    assert geometry.resized == (32, 64)
    assert geometry.to_original([[0, 0, 64, 64]]).tolist() == [[0, 0, 200, 100]]


def test_float_clahe_keeps_detail_below_one_8bit_step():
    # Columns differ by 1/4000: a 12-bit ramp that spans less than one 8-bit step around mid-gray.
    ramp = np.tile(0.5 + np.arange(16, dtype=np.float32) / 4000, (64, 4))
    ours = FloatClahe(clip_limit=(2.0, 2.0), p=1.0)(image=ramp)["image"]
    stock = A.CLAHE(clip_limit=(2.0, 2.0), p=1.0)(image=ramp)["image"]
    assert ours.dtype == np.float32
    assert ours.min() >= 0.0
    assert ours.max() <= 1.0
    assert len(np.unique(stock)) <= 2  # albumentations rounds to uint8: the ramp is gone
    assert len(np.unique(ours)) >= 16
    assert np.all(np.diff(ours[0, :16]) >= 0)  # order within the ramp survives


def test_float_clahe_equalizes_a_low_contrast_image():
    rng = np.random.default_rng(3)
    low_contrast = (0.45 + 0.1 * rng.random((64, 64))).astype(np.float32)
    out = FloatClahe(clip_limit=(4.0, 4.0), p=1.0)(image=low_contrast)["image"]
    assert np.ptp(out) > 2 * np.ptp(low_contrast)


def test_float_clahe_refuses_uint8():
    with pytest.raises(TypeError, match="float32"):
        FloatClahe(p=1.0)(image=np.zeros((16, 16), np.uint8))


def test_patches_are_crop_size_with_valid_boxes_for_intra_oral_and_panoramic_sizes():
    size, crop = 128, 64
    transform = detection_train_transform(size, seed=5, crop_size=crop, positive_fraction=0.5)
    rng = np.random.default_rng(2)
    kept = 0
    # Long sides from below size to above size * max_downscale (512): letterboxed squares and tiled panoramics.
    for height, width in [(60, 90), (300, 400), (480, 640), (900, 700), (700, 1500), (1200, 2600)] * 15:
        image = rng.random((height, width), dtype=np.float32)
        count = int(rng.integers(0, 4))
        boxes = random_boxes(rng, height, width, count)
        labels = np.arange(count, dtype=np.int64)
        out = transform(image=image, bboxes=boxes, labels=labels)
        assert out["image"].shape == (crop, crop)
        assert out["image"].dtype == np.float32
        assert 0.0 <= float(out["image"].min()) <= float(out["image"].max()) <= 1.0
        boxes_out = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
        labels_out = np.asarray(out["labels"], dtype=np.int64)
        assert_valid_boxes(boxes_out, labels_out, crop, set(labels.tolist()))
        kept += len(labels_out)
    assert kept > 0


def test_positive_patches_hold_a_lesion_and_uniform_ones_mostly_do_not():
    """A 1000 x 800 image with one 40 px lesion becomes 250 x 200 model pixels (shrunk by max_downscale 4); a
    64 px patch drawn uniformly holds the 10 px lesion about one time in five, a positive patch always."""
    rng = np.random.default_rng(4)
    image = rng.random((1000, 800), dtype=np.float32)
    lesion = np.array([[400.0, 300.0, 440.0, 340.0]], np.float32)

    def lesions_found(positive_fraction: float) -> list[np.ndarray]:
        transform = detection_train_transform(128, seed=11, crop_size=64, positive_fraction=positive_fraction)
        found = []
        for _ in range(100):
            out = transform(image=image, bboxes=lesion, labels=np.array([1]))
            found.append(np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4))
        return found

    positive = lesions_found(1.0)
    assert sum(len(boxes) == 1 for boxes in positive) >= 95  # the affine may still push one out now and then
    for boxes in positive:
        if len(boxes):
            # Whole (up to the small affine): about 10 x 10 model pixels, not a sliver cut at the patch edge.
            width, height = boxes[0, 2] - boxes[0, 0], boxes[0, 3] - boxes[0, 1]
            assert 6.0 < width < 14.0
            assert 6.0 < height < 14.0
    assert sum(len(boxes) == 1 for boxes in lesions_found(0.0)) <= 50


def _labels_of_positive_patches(box_weights: np.ndarray | None, draws: int = 200) -> list[set[int]]:
    """The labels in each of ``draws`` positive 64 px patches of an image with two lesions far apart."""
    image = np.random.default_rng(6).random((1000, 800), dtype=np.float32)
    lesions = np.array([[80.0, 80.0, 120.0, 120.0], [600.0, 800.0, 640.0, 840.0]], np.float32)
    transform = detection_train_transform(128, seed=12, crop_size=64, positive_fraction=1.0)
    weights = {} if box_weights is None else {"box_weights": box_weights}
    return [
        set(transform(image=image, bboxes=lesions, labels=np.array([0, 1]), **weights)["labels"]) for _ in range(draws)
    ]


def test_a_positive_patch_holds_a_lesion_drawn_by_its_box_weight():
    # Weight 4 against 1: the second lesion is the one the patch is built around 4 times in 5.
    heavy = sum(1 in labels for labels in _labels_of_positive_patches(np.array([1.0, 4.0])))
    assert 140 <= heavy <= 180  # 160 expected; binomial sd 5.7
    # Equal weights, given or not, draw exactly what albumentations' uniform choice draws.
    uniform = _labels_of_positive_patches(None)
    assert _labels_of_positive_patches(np.array([2.0, 2.0])) == uniform
    assert 80 <= sum(1 in labels for labels in uniform) <= 120


def test_a_box_of_weight_zero_is_never_the_lesion_of_a_positive_patch():
    """Weight 0 marks an ignore region travelling with the lesions (DetectionDataset with ignore_regions)."""
    assert all(1 in labels for labels in _labels_of_positive_patches(np.array([0.0, 1.0]), draws=60))
    # With only such boxes the patch is the uniform one drawn without any box.
    image = np.random.default_rng(2).random((300, 400), dtype=np.float32)
    region = np.array([[10.0, 10.0, 30.0, 30.0]], np.float32)

    def patch(bboxes, weights):
        transform = detection_train_transform(128, seed=3, crop_size=64, positive_fraction=1.0)
        return transform(image=image, bboxes=bboxes, labels=np.full(len(bboxes), -1), box_weights=weights)["image"]

    np.testing.assert_array_equal(patch(region, np.zeros(1, np.float32)), patch(np.zeros((0, 4)), np.zeros(0)))


def test_without_any_box_a_positive_patch_falls_back_to_a_uniform_one():
    transform = detection_train_transform(128, seed=3, crop_size=64, positive_fraction=1.0)
    out = transform(image=np.ones((300, 400), np.float32), bboxes=np.zeros((0, 4)), labels=np.zeros(0))
    assert out["image"].shape == (64, 64)
    assert len(out["bboxes"]) == 0


def _brighter_half_of_the_box(vertical_flip: float) -> list[str]:
    """Which half of the lesion's box is brighter in each of 60 patches: the lesion is bright on top, dim below."""
    image = np.zeros((400, 400), np.float32)
    image[100:120, 200:240], image[120:140, 200:240] = 1.0, 0.4
    lesion = np.array([[200.0, 100.0, 240.0, 140.0]], np.float32)
    transform = detection_train_transform(128, seed=5, crop_size=64, positive_fraction=1.0, vertical_flip=vertical_flip)
    halves = []
    for _ in range(60):
        out = transform(image=image, bboxes=lesion, labels=np.array([1]))
        if len(out["bboxes"]):
            x0, y0, x1, y1 = np.rint(np.asarray(out["bboxes"][0])).astype(int)
            middle = (y0 + y1) // 2
            top, bottom = out["image"][y0:middle, x0:x1].mean(), out["image"][middle:y1, x0:x1].mean()
            halves.append("top" if top > bottom else "bottom")
    return halves


def test_a_vertical_flip_turns_patches_upside_down_with_their_boxes():
    assert _brighter_half_of_the_box(0.0).count("top") >= 55
    assert _brighter_half_of_the_box(1.0).count("bottom") >= 55
    mixed = _brighter_half_of_the_box(0.5)
    assert 15 <= mixed.count("bottom") <= 45


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"vertical_flip": 1.5}, "vertical_flip must be in"),
        ({"crop_size": 256}, "crop_size must be in"),
        ({"crop_size": 0}, "crop_size must be in"),
        ({"positive_fraction": 1.5}, "positive_fraction"),
        ({"augmentation": "heavy"}, "augmentation must be one of standard, sensor"),
    ],
)
def test_bad_patch_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        detection_train_transform(128, **kwargs)


def test_model_scale_factor_is_the_inference_rule():
    assert model_scale_factor(300, 400, 128, 4.0) == pytest.approx(128 / 400)  # long side to 128
    assert model_scale_factor(40, 50, 128, 4.0) == pytest.approx(128 / 50)  # small images are enlarged
    assert model_scale_factor(1200, 2600, 128, 4.0) == pytest.approx(1 / 4)  # never shrunk by more than 4
    assert model_scale_factor(512, 100, 128, 4.0) == pytest.approx(1 / 4)  # continuous at the switch


@pytest.mark.parametrize(
    ("height", "width"),
    [(300, 400), (50, 70), (128, 128), (900, 700), (700, 1500), (1200, 2600)],
    ids=["bitewing", "enlarged", "exact", "periapical-portrait", "panoramic", "large-panoramic"],
)
def test_the_training_resize_is_prepare_image_s_geometry_and_pixels(height, width):
    """ModelScale (the first step of detection_train_transform) gives exactly the pixels inference computes, for
    intra-oral sizes (long side to image_size, then the square letterbox) and for panoramic ones (long side above
    image_size * max_downscale: shrunk by max_downscale only, no squeeze)."""
    config = DetectorConfig(encoder=ViTConfig(embed_dim=32, depth=1, num_heads=2), image_size=128, max_downscale=4.0)
    image = np.random.default_rng(height + width).random((height, width), dtype=np.float32)
    resized = ModelScale(ScaleRule(128, 4.0))(image=image)["image"]
    geometry = model_geometry(height, width, config)
    assert resized.shape == geometry.resized
    prepared, _ = prepare_image(image, config)
    prepared = prepared[0, 0].numpy()
    np.testing.assert_array_equal(resized, prepared[: resized.shape[0], : resized.shape[1]])
    if max(height, width) > 128 * 4:
        assert max(resized.shape) > 128
        assert prepared.shape == resized.shape
    else:
        assert max(resized.shape) == 128
        assert prepared.shape == (128, 128)
        assert not prepared[resized.shape[0] :].any()
        assert not prepared[:, resized.shape[1] :].any()


@pytest.mark.parametrize(
    ("height", "width", "spacing"),
    [(900, 1200, (0.03, 0.03)), (700, 1000, (0.04, 0.04)), (300, 200, (0.1, 0.1)), (1000, 1300, None)],
    ids=["fine-sensor", "coarse-sensor", "enlarged", "no-spacing"],
)
def test_the_physical_training_resize_is_prepare_image_s(height, width, spacing):
    """With a working spacing, training and inference resample the same image to the same pixels; an image smaller
    than a window is padded to it, a larger one is not padded."""
    config = DetectorConfig(
        encoder=ViTConfig(embed_dim=32, depth=1, num_heads=2), image_size=128, spacing_mm=0.06, assumed_long_side_mm=39
    )
    image = np.random.default_rng(height).random((height, width), dtype=np.float32)
    resized = ModelScale(config.scale_rule)(image=image, spacing_mm=spacing)["image"]
    source = spacing[0] if spacing else 39 / max(height, width)
    assert resized.shape == (round(height * source / 0.06), round(width * source / 0.06))
    prepared = prepare_image(image, config, spacing)[0][0, 0].numpy()
    np.testing.assert_array_equal(resized, prepared[: resized.shape[0], : resized.shape[1]])
    assert prepared.shape == (max(resized.shape[0], 128), max(resized.shape[1], 128))


def test_the_physical_training_transform_crops_lesions_at_the_working_spacing():
    """A 2 mm lesion on a 0.03 mm image is 33 px in the crop at 0.06 mm, whichever crop holds it."""
    rule = ScaleRule(64, 4.0, spacing_mm=0.06)
    transform = detection_train_transform(64, seed=4, crop_size=64, positive_fraction=1.0, rule=rule)
    image = np.random.default_rng(0).random((600, 800), dtype=np.float32)
    box = np.array([[300.0, 200.0, 366.0, 266.0]], dtype=np.float32)  # 2 mm x 2 mm at 0.03 mm
    sides = []
    for _ in range(20):
        out = transform(image=image, bboxes=box, labels=np.array([0]), spacing_mm=(0.03, 0.03))
        assert out["image"].shape == (64, 64)
        for x0, y0, x1, y1 in np.asarray(out["bboxes"]).reshape(-1, 4):
            sides.append(np.sqrt((x1 - x0) * (y1 - y0)))
    # The affine scale jitter (0.9-1.1) and crops at the border spread the size around 33 px.
    assert len(sides) >= 10
    assert 26 <= np.median(sides) <= 37


def test_scale_rule_fallbacks_and_limits():
    rule = ScaleRule(256, 4.0, spacing_mm=0.05, assumed_long_side_mm=35.0)
    assert rule.factor(700, 1000, (0.025, 0.025)) == pytest.approx(0.5)
    assert rule.factor(700, 1000, (0.02, 0.03)) == pytest.approx(0.5)  # the mean of row and column spacing
    # No spacing, or one that is unusable: the long side is taken as 35 mm.
    assert rule.factor(700, 1000) == pytest.approx(35.0 / 1000 / 0.05)
    assert rule.factor(700, 1000, (0.0, 0.03)) == pytest.approx(35.0 / 1000 / 0.05)
    assert rule.factor(700, 1000, (float("nan"), 0.03)) == pytest.approx(35.0 / 1000 / 0.05)
    # A file that claims absurd pixels is not obeyed beyond 16x either way.
    assert rule.factor(700, 1000, (1e-5, 1e-5)) == pytest.approx(1 / 16)
    assert rule.factor(700, 1000, (10.0, 10.0)) == pytest.approx(16.0)
    assert rule.resized(700, 1000, (0.025, 0.025)) == (350, 500)
    with pytest.raises(InvalidArgumentError, match="empty"):
        rule.factor(0, 10)


def test_structure_crops_are_drawn_where_the_edges_are():
    """A flat image with one bright block: crops centre on the block's border, uniform crops do not."""
    from caries_mim.data.transforms import StructureCrop

    image = np.zeros((512, 512), dtype=np.float32)
    image[300:400, 320:420] = 1.0
    crop = StructureCrop(64, 64, p=1.0)
    crop.set_random_seed(3)
    centres = []
    for _ in range(50):
        x0, y0, x1, y1 = crop.get_params_dependent_on_data({"shape": image.shape}, {"image": image})["crop_coords"]
        assert (x1 - x0, y1 - y0) == (64, 64)
        centres.append(((x0 + x1) / 2, (y0 + y1) / 2))
    centres = np.asarray(centres)
    near = (np.abs(centres[:, 0] - 370) <= 70) & (np.abs(centres[:, 1] - 350) <= 70)
    assert near.all()
    # A flat image has no edges: the crop falls back to a uniform one, still inside the image.
    flat = crop.get_params_dependent_on_data({"shape": (100, 90)}, {"image": np.ones((100, 90), np.float32)})
    x0, y0, x1, y1 = flat["crop_coords"]
    assert 0 <= x0 <= x1 <= 90
    assert 0 <= y0 <= y1 <= 100


def test_mim_crops_at_a_working_spacing_show_anatomy_at_the_detector_s_scale():
    """A 3 mm bright square on a 0.03 mm image spans 50 px (+-15% jitter) in 128 px crops at 0.06 mm."""
    from caries_mim.data.transforms import mim_pretrain_transform

    image = np.zeros((400, 400), dtype=np.float32)
    image[150:250, 150:250] = 1.0
    transform = mim_pretrain_transform(128, seed=2, spacing_mm=0.06)
    widths = []
    for _ in range(20):
        crop = transform(image=image, spacing_mm=(0.03, 0.03))["image"]
        assert crop.shape == (128, 128)
        columns = np.nonzero((crop > 0.5).any(axis=0))[0]
        if len(columns) and columns[0] > 0 and columns[-1] < 127:  # the whole square is in the crop
            widths.append(columns[-1] - columns[0] + 1)
    assert widths
    assert all(40 <= width <= 60 for width in widths)


def test_the_sensor_preset_varies_scale_sharpness_and_noise_more_than_the_standard_one():
    """Over many draws of one crop, the sensor preset spreads a lesion's box size, the image's fine detail (blur,
    coarser grids, edge enhancement) and its noise wider than the standard preset does."""
    rng = np.random.default_rng(0)
    image = np.full((256, 256), 0.5, dtype=np.float32)
    image[96:160, 96:160] = 0.8  # a bright square: its box tracks the scale, its edge the sharpness
    box = np.array([[96.0, 96.0, 160.0, 160.0]], dtype=np.float32)
    spreads = {}
    for augmentation in ("standard", "sensor"):
        transform = detection_train_transform(
            256, crop_size=256, positive_fraction=1.0, seed=5, augmentation=augmentation
        )
        widths, edges = [], []
        for _ in range(200):
            out = transform(image=image + rng.normal(0, 0.001, image.shape).astype(np.float32), bboxes=box, labels=[0])
            if len(out["bboxes"]) == 1:
                x0, _, x1, _ = out["bboxes"][0]
                widths.append(x1 - x0)
            gradient = np.abs(np.diff(out["image"], axis=1))
            edges.append(float(np.percentile(gradient, 99.9)))
        spreads[augmentation] = (np.std(widths), np.std(edges))
    assert spreads["sensor"][0] > 1.5 * spreads["standard"][0]
    assert spreads["sensor"][1] > 1.2 * spreads["standard"][1]
