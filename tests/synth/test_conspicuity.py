"""Lesion conspicuity: the measure on constructed signals, and what the generator labels with it."""

from __future__ import annotations

import numpy as np
import pytest

from caries_mim.synth import SynthConfig
from caries_mim.synth.conspicuity import _visibility, measure_visibility
from caries_mim.synth.dataset import image_rng
from caries_mim.synth.render import plan_scene, rasterize, render_radiograph


def _disc(shape=(64, 64), radius=8, value=50.0) -> np.ndarray:
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    return np.where((rows - 32) ** 2 + (cols - 40) ** 2 <= radius**2, value, 0.0).astype(np.float32)


def test_a_flat_lesion_in_known_noise_has_contrast_over_sigma():
    noise = np.random.default_rng(0).normal(0.0, 10.0, (64, 64)).astype(np.float32)
    visibility = _visibility(_disc(value=50.0), noise, floor=3.0)
    assert visibility.contrast == pytest.approx(50.0)
    assert visibility.noise == pytest.approx(10.0, rel=0.05)
    assert visibility.conspicuity == pytest.approx(5.0, rel=0.05)
    # Every pixel of the disc is above 3 sigma: the visible box is the disc's bounding box (pixel edges).
    assert visibility.visible_box == (32.0, 24.0, 49.0, 41.0)


def test_the_visible_extent_shrinks_to_what_stands_out_of_the_noise():
    _rows, cols = np.mgrid[:64, :64]
    ramp = np.clip(40.0 - np.abs(cols - 32) * 4.0, 0.0, None).astype(np.float32)  # 40 at the centre, 0 at +-10
    noise = np.random.default_rng(1).normal(0.0, 5.0, (64, 64)).astype(np.float32)
    sigma = float(noise.std())
    box = _visibility(ramp, noise, floor=4.0).visible_box
    # Columns where 40 - 4|c - 32| >= 4 sigma.
    half = int((40.0 - 4.0 * sigma) // 4.0)
    assert box[0] == 32 - half
    assert box[2] == 32 + half + 1
    wide = _visibility(ramp, noise, floor=1.0).visible_box
    assert wide[2] - wide[0] > box[2] - box[0]


def test_no_signal_is_not_visible():
    visibility = _visibility(np.zeros((16, 16), np.float32), np.ones((16, 16), np.float32), floor=5.0)
    assert visibility.conspicuity == 0.0
    assert visibility.visible_box is None


@pytest.fixture(scope="module")
def measured_scene():
    plan = plan_scene(image_rng(3, "labeled", 5), SynthConfig(lesion_free_fraction=0.0))
    scene = rasterize(plan)
    return scene, scene.acquire()


def test_noise_free_and_omitted_acquisitions_differ_only_where_they_should(measured_scene):
    scene, noisy = measured_scene
    clean = scene.acquire(noise=False)
    assert not np.array_equal(clean, noisy)
    # Same noise field for every subset of lesions: outside the lesions the images are identical.
    without = scene.acquire(omit_lesions=[r.spec_index for r in scene.lesions])
    # The display curve anchors on a percentile of the whole image, which the lesions move a hair: 1 stored value.
    changed = np.abs(without.astype(np.int32) - noisy.astype(np.int32)) > 1
    inside = np.zeros_like(changed)
    # Vendor sharpening (an unsharp mask up to 1.2 mm wide) spreads a lesion's contrast beyond its field.
    margin = int(3.6 / scene.plan.layout.spacing)
    for raster in scene.lesions:
        x0, y0, x1, y1 = (int(v) for v in raster.annotation.field_box)
        inside[max(y0 - margin, 0) : y1 + margin, max(x0 - margin, 0) : x1 + margin] = True
    assert changed[inside].mean() > 0.05
    assert changed[~inside].mean() < 0.005


def test_measured_lesions_are_darker_with_positive_conspicuity(measured_scene):
    scene, noisy = measured_scene
    measured = measure_visibility(scene, noisy, floor=5.0)
    assert len(measured) == len(scene.lesions) >= 1
    for _annotation, visibility in measured:
        assert visibility.contrast > 0
        assert visibility.noise > 0
        assert visibility.conspicuity == pytest.approx(visibility.contrast / visibility.noise)
        if visibility.visible_box is not None:
            x0, y0, x1, y1 = visibility.visible_box
            assert x1 > x0
            assert y1 > y0


def test_the_floor_decides_what_is_labelled_not_what_is_rendered():
    config = SynthConfig(lesion_free_fraction=0.0)
    everything = render_radiograph(
        image_rng(4, "labeled", 2), SynthConfig(lesion_free_fraction=0.0, visibility_floor=0.0)
    )
    nothing = render_radiograph(image_rng(4, "labeled", 2), SynthConfig(lesion_free_fraction=0.0, visibility_floor=1e6))
    default = render_radiograph(image_rng(4, "labeled", 2), config)
    unmeasured = render_radiograph(image_rng(4, "labeled", 2), config, label=False)
    assert np.array_equal(everything.pixels, nothing.pixels)
    assert np.array_equal(default.pixels, unmeasured.pixels)
    assert len(everything.lesions) == len(unmeasured.lesions) >= 1
    assert not everything.subthreshold_lesions
    assert not nothing.lesions
    assert len(nothing.subthreshold_lesions) == len(unmeasured.lesions)
    assert len(default.lesions) + len(default.subthreshold_lesions) == len(unmeasured.lesions)
    for lesion in default.lesions:
        assert lesion.conspicuity >= config.visibility_floor
        assert lesion.field_box is not None
    for lesion in default.subthreshold_lesions:
        assert lesion.conspicuity < config.visibility_floor
    assert all(lesion.conspicuity is None for lesion in unmeasured.lesions)


def test_a_noisier_sensor_labels_fewer_lesions():
    """Same drawn lesions, a tenth of the quanta: conspicuity falls and more lesions drop under the floor."""
    base = SynthConfig(lesion_free_fraction=0.0)
    noisy = SynthConfig(lesion_free_fraction=0.0, exposure_photons=(150.0, 800.0))
    scores = {"base": [], "noisy": []}
    for index in range(8):
        for name, config in (("base", base), ("noisy", noisy)):
            image = render_radiograph(image_rng(9, "labeled", index), config)
            scores[name].extend(lesion.conspicuity for lesion in image.lesions + image.subthreshold_lesions)
    assert len(scores["base"]) == len(scores["noisy"]) >= 8
    assert np.median(scores["noisy"]) < 0.6 * np.median(scores["base"])
