"""Non-DICOM radiographs: PNG/JPEG/TIFF (8 and 16 bit) through Pillow, MHA/NRRD/NIfTI through SimpleITK."""

from __future__ import annotations

import io

import numpy as np
import pytest
import SimpleITK as sitk
from PIL import Image

from caries_mim.errors import CariesMimError
from caries_mim.io import read_radiograph


def gradient(dtype=np.uint8, top: int = 255) -> np.ndarray:
    y, x = np.mgrid[0:40, 0:60]
    return np.round((x / 59 * 0.8 + y / 39 * 0.2) * top).astype(dtype)


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def code_of(data) -> str:
    with pytest.raises(CariesMimError) as caught:
        read_radiograph(data)
    return caught.value.code


def test_png_8_bit_maps_0_255_exactly():
    image = gradient()
    radiograph = read_radiograph(encode(image, "PNG"))
    assert radiograph.source_format == "png"
    assert radiograph.intensity_normalization == "full_range"
    assert radiograph.spacing_mm is None
    assert radiograph.dicom is None
    np.testing.assert_allclose(radiograph.pixels, image / 255.0, atol=1e-7)


def test_png_16_bit_uses_robust_percentiles():
    image = gradient(np.uint16, 4095)
    radiograph = read_radiograph(encode(image, "PNG"))
    assert radiograph.intensity_normalization == "percentile"
    assert radiograph.bits_stored == 16
    lo, hi = np.percentile(image, [0.5, 99.5])
    np.testing.assert_allclose(radiograph.pixels, np.clip((image - lo) / (hi - lo), 0, 1), atol=1e-6)


def test_gray_saved_as_rgb_is_accepted_but_colour_is_refused():
    gray = gradient()
    rgb = np.stack([gray, gray, gray], axis=-1)
    np.testing.assert_allclose(read_radiograph(encode(rgb, "PNG")).pixels, gray / 255.0, atol=1e-6)
    colour = rgb.copy()
    colour[..., 0] = 255 - colour[..., 0]
    assert code_of(encode(colour, "PNG")) == "unsupported_photometric"


def test_jpeg_within_codec_tolerance():
    image = gradient()
    radiograph = read_radiograph(encode(image, "JPEG", quality=95))
    assert radiograph.source_format == "jpeg"
    assert np.abs(radiograph.pixels - image / 255.0).max() < 0.03


def test_tiff_16_bit_and_multipage():
    image = gradient(np.uint16, 65535)
    assert read_radiograph(encode(image, "TIFF")).source_format == "tiff"
    buffer = io.BytesIO()
    frames = [Image.fromarray(gradient()), Image.fromarray(gradient())]
    frames[0].save(buffer, format="TIFF", save_all=True, append_images=frames[1:])
    assert code_of(buffer.getvalue()) == "multi_frame"


def test_truncated_png_is_corrupt_pixel_data():
    data = encode(np.random.default_rng(0).integers(0, 255, (200, 200), dtype=np.uint8), "PNG")
    assert code_of(data[: len(data) // 2]) == "corrupt_pixel_data"


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".nii.gz", ".nii"])
def test_simpleitk_formats_keep_spacing_in_row_column_order(tmp_path, suffix):
    values = gradient(np.int16, 3000)
    image = sitk.GetImageFromArray(values)
    image.SetSpacing((0.04, 0.05))  # (x = column, y = row)
    path = tmp_path / f"radiograph{suffix}"
    sitk.WriteImage(image, str(path))
    for source in (path, path.read_bytes()):
        radiograph = read_radiograph(source)
        assert radiograph.pixels.shape == values.shape
        assert radiograph.spacing_mm == pytest.approx((0.05, 0.04))
        assert radiograph.intensity_normalization == "percentile"
        # Orientation preserved: brighter to the right, as written.
        assert radiograph.pixels[:, -5:].mean() > radiograph.pixels[:, :5].mean()


def test_mha_with_one_slice_is_2d_but_a_volume_is_refused(tmp_path):
    single = sitk.GetImageFromArray(gradient(np.uint8)[None])  # (1, H, W) -> a 3D image with one slice
    sitk.WriteImage(single, str(tmp_path / "single.mha"))
    assert read_radiograph(tmp_path / "single.mha").pixels.shape == (40, 60)
    volume = sitk.GetImageFromArray(np.zeros((3, 8, 8), np.uint8))
    sitk.WriteImage(volume, str(tmp_path / "volume.mha"))
    assert code_of(tmp_path / "volume.mha") == "multi_frame"


def test_format_is_sniffed_from_content_not_name(tmp_path):
    path = tmp_path / "looks_like.dcm"
    path.write_bytes(encode(gradient(), "PNG"))
    assert read_radiograph(path).source_format == "png"


SECRET = b"CARIES_MIM_API_KEYS=not-for-the-client\n" * 4

DETACHED_HEADERS = {
    "mha": b"ObjectType = Image\nNDims = 2\nDimSize = 40 1\nElementType = MET_UCHAR\nElementDataFile = {path}\n",
    "nrrd": b"NRRD0004\ntype: uint8\ndimension: 2\nsizes: 40 1\nencoding: raw\ndata file: {path}\n\n",
}


@pytest.mark.parametrize("kind", sorted(DETACHED_HEADERS))
def test_uploaded_bytes_cannot_make_the_reader_open_another_file(tmp_path, kind):
    """An MHA or NRRD header can name any file as its pixel data; from bytes (an upload) that would read the
    server's own files back to the sender. A file read by path may still point next to itself."""
    secret = tmp_path / "secret.raw"
    secret.write_bytes(SECRET)
    header = DETACHED_HEADERS[kind].replace(b"{path}", str(secret).encode())
    with pytest.raises(CariesMimError) as caught:
        read_radiograph(header)
    assert caught.value.code == "corrupt_header"
    assert "another file" in caught.value.message
    on_disk = tmp_path / f"image.{'mhd' if kind == 'mha' else 'nhdr'}"
    on_disk.write_bytes(DETACHED_HEADERS[kind].replace(b"{path}", b"secret.raw"))
    assert read_radiograph(on_disk).pixels.shape == (1, 40)


def test_a_self_contained_mha_still_reads_from_bytes(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(gradient(np.uint8)), str(tmp_path / "local.mha"))
    data = (tmp_path / "local.mha").read_bytes()
    assert b"ElementDataFile = LOCAL" in data
    assert read_radiograph(data).pixels.shape == (40, 60)
