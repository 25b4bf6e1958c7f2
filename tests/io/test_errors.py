"""Every user-facing error code, each from a crafted bad file."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import RLELossless

from caries_mim.errors import CariesMimError
from caries_mim.io import ReadOptions, read_radiograph
from tests.dicom_factory import make_dataset, ramp, to_bytes


def error_code(source, **options) -> str:
    with pytest.raises(CariesMimError) as caught:
        read_radiograph(source, ReadOptions(**options))
    assert caught.value.message, "every error carries a human message"
    return caught.value.code


def good_dicom() -> Dataset:
    return make_dataset(ramp(), window=(2048, 4096))


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello, this is a text file\n" * 20,
        bytes(range(256)) * 4,
        b"\x00" * 1024,
    ],
    ids=["empty", "text", "binary-noise", "zeros"],
)
def test_not_an_image(data):
    assert error_code(data) == "not_an_image"


def test_raw_dataset_without_part10_header_is_refused_with_advice():
    raw = to_bytes(good_dicom())[128 + 4 :]  # strip preamble and magic: meta group first
    ds_only = io.BytesIO()
    good = good_dicom()
    del good.file_meta
    good.save_as(ds_only, enforce_file_format=False, implicit_vr=True, little_endian=True)
    for data in (raw, ds_only.getvalue()):
        with pytest.raises(CariesMimError) as caught:
            read_radiograph(data)
        assert caught.value.code == "not_an_image"
    assert "Part 10" in caught.value.message


def test_truncated_pixel_data_is_corrupt():
    data = to_bytes(good_dicom())
    assert error_code(data[:-500]) == "corrupt_pixel_data"


def test_truncated_compressed_pixel_data_is_corrupt():
    data = to_bytes(good_dicom(), RLELossless)
    assert error_code(data[: len(data) - 200]) == "corrupt_pixel_data"


def test_garbage_after_the_preamble_is_a_corrupt_header():
    data = b"\x00" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"\x01" * 40
    assert error_code(data) == "corrupt_header"


def test_no_pixel_data():
    ds = good_dicom()
    del ds.PixelData
    assert error_code(to_bytes(ds)) == "no_pixel_data"


def test_color_is_unsupported():
    ds = good_dicom()
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    ds.Rows, ds.Columns = 8, 8
    ds.SamplesPerPixel = 3
    ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelData = rgb.tobytes()
    assert error_code(to_bytes(ds)) == "unsupported_photometric"


def test_palette_color_is_unsupported():
    ds = good_dicom()
    ds.PhotometricInterpretation = "PALETTE COLOR"
    assert error_code(to_bytes(ds)) == "unsupported_photometric"


def test_multi_frame_is_refused():
    ds = make_dataset(np.concatenate([ramp(), ramp()]), window=(2048, 4096))
    ds.Rows = 48
    ds.NumberOfFrames = 2
    assert error_code(to_bytes(ds)) == "multi_frame"


def test_modality_outside_the_allow_list():
    ds = make_dataset(ramp(), modality="CT", window=(2048, 4096))
    assert error_code(to_bytes(ds)) == "unsupported_modality"
    # ... and accepted when the allow-list says so.
    assert read_radiograph(to_bytes(ds), ReadOptions(allowed_modalities=frozenset({"CT"}))).modality == "CT"


def test_non_dicom_can_be_refused():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buffer, format="PNG")
    assert error_code(buffer.getvalue(), allow_non_dicom=False) == "unsupported_modality"


def test_unknown_transfer_syntax_is_a_missing_decoder():
    ds = good_dicom()
    data = to_bytes(ds, RLELossless)
    private_syntax = "1.2.3.4.5.6.7.8.9.10"  # same length as RLE's UID with its padding byte
    patched = data.replace(b"1.2.840.10008.1.2.5\x00", private_syntax.encode())
    assert patched != data
    with pytest.raises(CariesMimError) as caught:
        read_radiograph(patched)
    assert caught.value.code == "missing_decoder"
    assert private_syntax in caught.value.message


def test_unavailable_plugin_is_a_missing_decoder_naming_the_syntax(monkeypatch):
    from pydicom.pixels.decoders.base import get_decoder

    decoder = get_decoder(RLELossless)
    monkeypatch.setattr(type(decoder), "is_available", property(lambda self: False))
    with pytest.raises(CariesMimError) as caught:
        read_radiograph(to_bytes(good_dicom(), RLELossless))
    assert caught.value.code == "missing_decoder"
    assert "RLE Lossless" in caught.value.message


def test_too_large_is_refused_before_decoding():
    ds = good_dicom()
    # The header claims 60000 x 60000 but only a few bytes of pixel data exist: decoding would fail
    # differently, so this code proves the size check ran first.
    ds.Rows = ds.Columns = 60000
    ds.PixelData = b"\x00\x00" * 16
    assert error_code(to_bytes(ds)) == "image_too_large"


def test_too_large_png_is_refused_from_its_header():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((40, 40), np.uint8)).save(buffer, format="PNG")
    assert error_code(buffer.getvalue(), max_pixels=1000) == "image_too_large"


def test_missing_file_and_directory_are_unreadable(tmp_path):
    assert error_code(tmp_path / "nope.dcm") == "unreadable_file"
    assert error_code(tmp_path) == "unreadable_file"


def test_voi_index_out_of_range_is_an_argument_error():
    assert error_code(to_bytes(good_dicom()), voi_index=3) == "invalid_argument"
