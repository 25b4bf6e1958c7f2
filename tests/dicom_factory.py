"""Hand-made DICOM Part 10 files for tests: every attribute the reader looks at is set explicitly."""

from __future__ import annotations

import io

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DigitalIntraOralXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def make_dataset(
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    modality: str = "IO",
    bits_stored: int = 12,
    window: tuple[float, float] | list[tuple[float, float]] | None = None,
    rescale: tuple[float, float] | None = None,
    presentation_lut_shape: str | None = None,
    pixel_spacing: tuple[float, float] | None = None,
    imager_pixel_spacing: tuple[float, float] | None = (0.035, 0.035),
    sop_class_uid: str = DigitalIntraOralXRayImageStorageForPresentation,
) -> Dataset:
    """A single-frame grayscale radiograph data set around ``stored`` (uint16 or int16, shape (rows, columns))."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "TEST-0001"
    ds.Modality = modality
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 1 if stored.dtype.kind == "i" else 0
    if window is not None:
        windows = window if isinstance(window, list) else [window]
        ds.WindowCenter = [w[0] for w in windows] if len(windows) > 1 else windows[0][0]
        ds.WindowWidth = [w[1] for w in windows] if len(windows) > 1 else windows[0][1]
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.RescaleType = "US"
    if presentation_lut_shape is not None:
        ds.PresentationLUTShape = presentation_lut_shape
    if pixel_spacing is not None:
        ds.PixelSpacing = list(pixel_spacing)
    if imager_pixel_spacing is not None:
        ds.ImagerPixelSpacing = list(imager_pixel_spacing)
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    return ds


def to_bytes(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    """Encode (compressing when the transfer syntax asks for it) and serialize as a Part 10 file."""
    if transfer_syntax not in UNCOMPRESSED:
        ds.compress(transfer_syntax)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def ramp(rows: int = 48, columns: int = 64, bits_stored: int = 12) -> np.ndarray:
    """A deterministic uint16 image spanning the full stored range, brighter to the right and down."""
    top = 2**bits_stored - 1
    y, x = np.mgrid[0:rows, 0:columns]
    values = (x / (columns - 1) * 0.7 + y / (rows - 1) * 0.3) * top
    return np.round(values).astype(np.uint16)
