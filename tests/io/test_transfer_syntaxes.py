"""Every compressed transfer syntax pydicom supports decodes with the installed (permissive) plugins.

Files are encoded here, independently of the reader: by pydicom's encoders where it has one (RLE, JPEG 2000,
JPEG-LS, deflate), otherwise by imagecodecs/Pillow and encapsulated by hand (HTJ2K, JPEG baseline, extended and
lossless). The stored pixels must come back exactly for lossless syntaxes and within the codec's error otherwise.
"""

from __future__ import annotations

import io

import imagecodecs
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from caries_mim.io import read_radiograph
from tests.dicom_factory import make_dataset, to_bytes


def textured(rows: int = 96, columns: int = 128, bits: int = 12) -> np.ndarray:
    """Smooth anatomy-like structure plus noise: exercises prediction and entropy coding."""
    rng = np.random.default_rng(7)
    y, x = np.mgrid[0:rows, 0:columns]
    base = 0.5 + 0.3 * np.sin(x / 9.0) * np.cos(y / 13.0)
    values = (base + rng.normal(0, 0.02, base.shape)) * (2**bits - 1)
    return np.clip(np.round(values), 0, 2**bits - 1).astype(np.uint16)


def decoded_stored_values(data: bytes) -> np.ndarray:
    return pydicom.dcmread(io.BytesIO(data)).pixel_array


@pytest.mark.parametrize(
    ("syntax", "tolerance"),
    [
        (ExplicitVRLittleEndian, 0),
        (ImplicitVRLittleEndian, 0),
        (DeflatedExplicitVRLittleEndian, 0),
        (RLELossless, 0),
        (JPEG2000Lossless, 0),
        (JPEGLSLossless, 0),
        (JPEGLSNearLossless, 2),
        (JPEG2000, None),  # lossy: judged by RMSE below
    ],
    ids=lambda v: getattr(v, "name", str(v)),
)
def test_pydicom_encodable_syntaxes_round_trip(syntax, tolerance):
    stored = textured()
    ds = make_dataset(stored, window=(2048, 4096))
    if syntax == JPEGLSNearLossless:
        ds.compress(syntax, jls_error=2)
        data = _save(ds)
    elif syntax == JPEG2000:
        ds.compress(syntax, j2k_cr=[5])
        data = _save(ds)
    elif syntax == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = syntax
        data = _save(ds)
    else:
        data = to_bytes(ds, syntax)
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    _check(data, stored, tolerance)


def _save(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _check(data: bytes, stored: np.ndarray, tolerance: int | None) -> None:
    """Exact (tolerance 0), bounded (max abs error) or, for lossy JPEG 2000 (None), RMSE under 1% of range."""
    error = decoded_stored_values(data).astype(np.int32) - stored
    radiograph = read_radiograph(data)
    reference = read_radiograph(to_bytes(make_dataset(stored, window=(2048, 4096))))
    if tolerance is None:
        assert np.sqrt(np.mean(error.astype(np.float64) ** 2)) <= 0.01 * 4095
        assert np.sqrt(np.mean((radiograph.pixels - reference.pixels) ** 2)) <= 0.01
        return
    assert np.abs(error).max() <= tolerance
    np.testing.assert_allclose(radiograph.pixels, reference.pixels, atol=tolerance / 4095 + 1e-6)


def _encapsulated(stored: np.ndarray, frame: bytes, syntax: str, bits_stored: int) -> bytes:
    ds = make_dataset(stored, window=(2**bits_stored / 2, 2**bits_stored), bits_stored=bits_stored)
    if bits_stored == 8:
        ds.BitsAllocated = 8
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    return _save(ds)


def test_htj2k_lossless():
    stored = textured()
    frame = imagecodecs.htj2k_encode(stored, level=0)  # level 0: reversible
    _check(_encapsulated(stored, frame, HTJ2KLossless, 12), stored, 0)


@pytest.mark.parametrize("syntax", [JPEGLosslessSV1, JPEGLossless], ids=lambda v: v.name)
def test_jpeg_lossless_process_14(syntax):
    stored = textured()
    frame = imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1, bitspersample=12)
    _check(_encapsulated(stored, frame, syntax, 12), stored, 0)


def test_jpeg_extended_12_bit():
    stored = textured()
    frame = imagecodecs.jpeg8_encode(stored, level=95, bitspersample=12)
    _check(_encapsulated(stored, frame, JPEGExtended12Bit, 12), stored, 40)


def test_jpeg_baseline_8_bit():
    stored = textured(bits=8).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format="JPEG", quality=95)
    data = _encapsulated(stored, buffer.getvalue(), JPEGBaseline8Bit, 8)
    assert np.abs(decoded_stored_values(data).astype(np.int32) - stored).max() <= 8
    assert read_radiograph(data).pixels.shape == stored.shape


def test_big_endian_from_pydicom_test_files():
    from pydicom.data import get_testdata_file

    from caries_mim.io import ReadOptions

    path = get_testdata_file("MR_small_bigendian.dcm")
    little = get_testdata_file("MR_small.dcm")
    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == ExplicitVRBigEndian
    options = ReadOptions(allowed_modalities=frozenset({"MR"}))
    np.testing.assert_array_equal(read_radiograph(path, options).pixels, read_radiograph(little, options).pixels)


def test_12_bit_jpeg_extended_matches_pydicom_reference_values():
    """pydicom's own reference for JPGExtended.dcm: arr[420, 140] == 244 and arr[230, 120] == 95."""
    from pydicom.data import get_testdata_file

    arr = pydicom.dcmread(get_testdata_file("JPGExtended.dcm")).pixel_array
    assert arr[420, 140] == 244
    assert arr[230, 120] == 95
