"""The DICOM grayscale pipeline: modality LUT, VOI LUT / window, MONOCHROME1 and presentation shape, spacing."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from caries_mim.io import ReadOptions, read_radiograph
from tests.dicom_factory import make_dataset, ramp, to_bytes


def read(ds: Dataset, **options) -> np.ndarray:
    return read_radiograph(to_bytes(ds), ReadOptions(**options)).pixels


def expected_linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window mapped to [0, 1], written out independently of pydicom."""
    c, w = center - 0.5, width - 1
    out = (values.astype(np.float64) - c) / w + 0.5
    out[values <= c - w / 2] = 0.0
    out[values > c + w / 2] = 1.0
    return np.clip(out, 0, 1)


def test_window_maps_to_unit_range_with_bright_enamel():
    stored = ramp()
    radiograph = read_radiograph(to_bytes(make_dataset(stored, window=(2048, 4096))))
    assert radiograph.pixels.dtype == np.float32
    assert radiograph.pixels.shape == stored.shape
    assert radiograph.intensity_normalization == "window"
    np.testing.assert_allclose(radiograph.pixels, expected_linear_window(stored, 2048, 4096), atol=1e-6)
    # Higher stored value = more attenuating = brighter in MONOCHROME2.
    assert radiograph.pixels[-1, -1] > radiograph.pixels[0, 0]


def test_narrow_window_clips_outside_values():
    stored = ramp()
    pixels = read(make_dataset(stored, window=(2000, 400)))
    np.testing.assert_allclose(pixels, expected_linear_window(stored, 2000, 400), atol=1e-6)
    assert pixels.min() == 0.0
    assert pixels.max() == 1.0


def test_monochrome1_is_inverted_exactly_once():
    stored = ramp()
    mono2 = read(make_dataset(stored, window=(2048, 4096)))
    # The same image as MONOCHROME1: stored values inverted, the window mirrored around the range centre.
    mono1_plain = read(make_dataset(4095 - stored, photometric="MONOCHROME1", window=(2048, 4096)))
    mono1_inverse_shape = read(
        make_dataset(4095 - stored, photometric="MONOCHROME1", window=(2048, 4096), presentation_lut_shape="INVERSE")
    )
    np.testing.assert_allclose(mono1_plain, mono2, atol=1e-3)
    # The DX IOD's INVERSE shape on MONOCHROME1 describes the same inversion, not a second one.
    np.testing.assert_allclose(mono1_inverse_shape, mono2, atol=1e-3)


def test_inverse_presentation_shape_on_monochrome2_inverts():
    stored = ramp()
    plain = read(make_dataset(stored, window=(2048, 4096), presentation_lut_shape="IDENTITY"))
    inverse = read(make_dataset(stored, window=(2048, 4096), presentation_lut_shape="INVERSE"))
    np.testing.assert_allclose(inverse, 1.0 - plain, atol=1e-6)


def test_rescale_is_applied_before_the_window():
    stored = ramp()
    # Window expressed in rescaled units (value * 2 - 1000): the same picture as the unscaled window.
    scaled = read(make_dataset(stored, rescale=(2.0, -1000.0), window=(2 * 2048 - 1000, 2 * 4096)))
    plain = read(make_dataset(stored, window=(2048, 4096)))
    np.testing.assert_allclose(scaled, plain, atol=1e-3)


def _voi_lut_item(lut: np.ndarray, first_mapped: int, bits: int) -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(lut), first_mapped, bits]
    item.LUTData = lut.astype("<u2").tobytes()  # 16-bit words, as writers (and pydicom) encode OW LUT data
    item.LUTExplanation = "test LUT"
    return item


def test_voi_lut_sequence_is_used_and_scaled_by_its_output_bits():
    stored = ramp()
    # A square-root LUT from 12-bit input to 8-bit output (more entries than 8 bits can index).
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 255).astype(np.uint16)
    ds = make_dataset(stored, window=(100, 50))  # a window too: the LUT must win when it is first
    ds.VOILUTSequence = Sequence([_voi_lut_item(lut, 0, 8)])
    radiograph = read_radiograph(to_bytes(ds))
    assert radiograph.intensity_normalization == "voi_lut"
    np.testing.assert_allclose(radiograph.pixels, lut[stored] / 255.0, atol=1e-6)


def test_voi_index_selects_the_second_window():
    stored = ramp()
    ds = make_dataset(stored, window=[(2048, 4096), (1000, 500)])
    first = read(ds)
    second = read(ds, voi_index=1)
    np.testing.assert_allclose(first, expected_linear_window(stored, 2048, 4096), atol=1e-6)
    np.testing.assert_allclose(second, expected_linear_window(stored, 1000, 500), atol=1e-6)


def test_for_processing_image_without_window_uses_robust_percentiles():
    rng = np.random.default_rng(0)
    stored = rng.integers(1000, 3000, size=(64, 64)).astype(np.uint16)
    stored[0, 0] = 4095  # a hot pixel must not set the white point
    radiograph = read_radiograph(to_bytes(make_dataset(stored, window=None)))
    assert radiograph.intensity_normalization == "percentile"
    lo, hi = np.percentile(stored, [0.5, 99.5])
    expected = np.clip((stored.astype(np.float64) - lo) / (hi - lo), 0, 1)
    np.testing.assert_allclose(radiograph.pixels, expected, atol=1e-6)
    assert radiograph.pixels[0, 0] == 1.0
    assert np.median(radiograph.pixels) == pytest.approx(0.5, abs=0.05)


def test_invalid_window_falls_back_to_percentiles():
    ds = make_dataset(ramp(), window=(2048, 0))  # width 0 is invalid for LINEAR
    radiograph = read_radiograph(to_bytes(ds))
    assert radiograph.intensity_normalization == "percentile"
    assert 0.0 <= radiograph.pixels.min() < radiograph.pixels.max() <= 1.0


def test_signed_pixels_with_window():
    stored = (ramp().astype(np.int32) - 2048).astype(np.int16)
    pixels = read(make_dataset(stored, window=(0, 4096)))
    np.testing.assert_allclose(pixels, expected_linear_window(stored, 0, 4096), atol=1e-6)


@pytest.mark.parametrize(
    ("pixel_spacing", "imager_spacing", "expected"),
    [
        ((0.05, 0.06), (0.035, 0.035), (0.05, 0.06)),  # calibrated spacing wins
        (None, (0.035, 0.04), (0.035, 0.04)),  # detector spacing otherwise
        (None, None, None),
    ],
)
def test_spacing_prefers_pixel_spacing(pixel_spacing, imager_spacing, expected):
    ds = make_dataset(ramp(), window=(2048, 4096), pixel_spacing=pixel_spacing, imager_pixel_spacing=imager_spacing)
    assert read_radiograph(to_bytes(ds)).spacing_mm == expected


def test_metadata_and_uids_are_kept_but_hashed_in_descriptions():
    ds = make_dataset(ramp(), window=(2048, 4096))
    radiograph = read_radiograph(to_bytes(ds))
    assert radiograph.modality == "IO"
    assert radiograph.bits_stored == 12
    assert radiograph.photometric_interpretation == "MONOCHROME2"
    assert radiograph.dicom.sop_instance_uid == ds.SOPInstanceUID
    described = radiograph.describe()
    assert ds.SOPInstanceUID not in str(described)
    assert "TEST^PATIENT" not in str(described)
    assert len(described["sop_instance_uid_hash"]) == 16
    assert radiograph.describe(reveal_uids=True)["sop_instance_uid"] == ds.SOPInstanceUID


def test_path_bytes_and_file_objects_read_the_same(tmp_path):
    data = to_bytes(make_dataset(ramp(), window=(2048, 4096)))
    path = tmp_path / "image.dcm"
    path.write_bytes(data)
    from_bytes = read_radiograph(data).pixels
    np.testing.assert_array_equal(read_radiograph(path).pixels, from_bytes)
    np.testing.assert_array_equal(read_radiograph(str(path)).pixels, from_bytes)
    with path.open("rb") as handle:
        np.testing.assert_array_equal(read_radiograph(handle).pixels, from_bytes)
