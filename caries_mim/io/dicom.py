"""DICOM Part 10 radiographs through the grayscale display pipeline (PS3.3 C.11, PS3.4 N.2).

Order, as the standard defines it: stored values -> Modality LUT (rescale) -> VOI LUT or window -> Presentation
LUT. We apply each step with pydicom's own functions and then map the result to [0, 1] with bright meaning
"more attenuating", inverting exactly once for MONOCHROME1 or an INVERSE presentation shape.
"""

from __future__ import annotations

import io
import warnings
import zlib
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

# Private, but the very reader dcmread uses for the meta group (see _deflated_body_offset); imported here so that
# a pydicom without it fails at import instead of silently switching the deflate-bomb check off.
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.pixels import apply_modality_lut, apply_voi_lut
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from caries_mim.errors import (
    CorruptHeaderError,
    CorruptPixelDataError,
    ImageTooLargeError,
    InvalidArgumentError,
    MissingDecoderError,
    MultiFrameError,
    NoPixelDataError,
    NotAnImageError,
    UnsupportedModalityError,
    UnsupportedPhotometricError,
    first_line,
)
from caries_mim.io import decoder_plugins, jpeg12
from caries_mim.io.decoder_failures import decoder_failures_as
from caries_mim.io.intensity import normalize_percentiles
from caries_mim.io.options import DEFAULT_MAX_PIXELS, ReadOptions
from caries_mim.io.radiograph import DicomReferences, Radiograph

jpeg12.register()
decoder_plugins.prefer_safe_decoders()

GRAYSCALE_PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2")

#: Probe values far outside any stored range: the window maps them to its output minimum and maximum.
_WINDOW_PROBE = np.array([-1e30, 1e30], dtype=np.float64)


def parse_dicom(data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, stop_before_pixels: bool = False) -> Dataset:
    """Parse a DICOM Part 10 file. Never ``force=True``: without the preamble a file is not trusted as DICOM.

    A deflated data set is inflated only up to what an image of ``max_pixels`` can need (see
    :func:`check_inflated_size`), so a deflate bomb is refused instead of filling memory.
    """
    check_inflated_size(data, max_pixels)
    with decoder_failures_as(CorruptHeaderError, "DICOM header cannot be parsed"):
        try:
            return pydicom.dcmread(io.BytesIO(data), force=False, stop_before_pixels=stop_before_pixels)
        except InvalidDicomError as exc:
            raise NotAnImageError(f"not a DICOM Part 10 file: {exc}") from exc


#: Bytes of header a deflated data set may hold beside its pixels (sequences, overlays, private tags).
_DEFLATED_HEADER_ALLOWANCE = 16 * 1024 * 1024
#: Bytes per pixel of the largest stored sample (BitsAllocated 32).
_MAX_BYTES_PER_PIXEL = 4


def check_inflated_size(data: bytes, max_pixels: int) -> None:
    """Refuse a Deflated Explicit VR Little Endian file whose data set inflates past what an image of
    ``max_pixels`` needs (``max_pixels`` x 4 bytes + 16 MiB of header).

    pydicom inflates the whole data set in memory before parsing it, and deflate reaches about 1000:1, so a
    64 MiB upload could otherwise ask for 64 GiB. Inflating here stops at the limit and keeps nothing.

    Raises:
        ImageTooLargeError: the data set inflates past the limit.
    """
    body = _deflated_body_offset(data)
    if body is None:
        return
    limit = max_pixels * _MAX_BYTES_PER_PIXEL + _DEFLATED_HEADER_ALLOWANCE
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    inflated = 0
    # 64 KiB of input and at most 1 MiB of output at a time: memory stays small whatever the ratio.
    for start in range(body, len(data), 1 << 16):
        pending = data[start : start + (1 << 16)]
        while pending and not inflater.eof:
            try:
                inflated += len(inflater.decompress(pending, 1 << 20))
            except zlib.error:
                return  # a broken stream: pydicom reports it as a corrupt header
            if inflated > limit:
                raise ImageTooLargeError(
                    f"the deflated data set inflates to more than {limit} bytes, more than an image of "
                    f"{max_pixels} pixels needs (a deflate bomb?)"
                )
            pending = inflater.unconsumed_tail


def _deflated_body_offset(data: bytes) -> int | None:
    """Where the deflated data set starts, when the file meta group names the deflated transfer syntax.

    The meta group is read by pydicom's own reader, the one ``dcmread`` uses: a walker of our own would read some
    meta groups differently (other VRs, implicit-VR meta, undefined lengths) and could be led to let a bomb
    through. ``dcmread`` then inflates everything from this
    offset, so nothing else is read here.
    """
    stream = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            read_preamble(stream, False)
            meta = _read_file_meta_info(stream)
            transfer_syntax = meta.get("TransferSyntaxUID")
    except Exception:  # a broken meta group: dcmread refuses the file itself, as a corrupt header
        return None
    return stream.tell() if transfer_syntax == DeflatedExplicitVRLittleEndian else None


def _get(ds: Dataset, keyword: str, default: Any = None) -> Any:
    """Element value, treating a malformed value like a missing one only where that is safe (optional tags)."""
    try:
        value = ds.get(keyword, default)
    except Exception:
        return default
    return default if value in (None, "") else value


def _required_int(ds: Dataset, keyword: str) -> int:
    try:
        value = ds[keyword].value
        return int(value)
    except KeyError as exc:
        raise CorruptHeaderError(f"required attribute {keyword} is missing") from exc
    except Exception as exc:
        raise CorruptHeaderError(f"attribute {keyword} is malformed: {first_line(exc)}") from exc


def _optional_int(ds: Dataset, keyword: str, default: int | None) -> int | None:
    """An integer attribute, ``default`` when absent; a value that is no integer is a corrupt header."""
    value = _get(ds, keyword, default)
    try:
        return None if value is None else int(value)
    except (TypeError, ValueError) as exc:
        raise CorruptHeaderError(f"attribute {keyword} is malformed: {str(value)[:40]!r}") from exc


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm: calibrated PixelSpacing first, else ImagerPixelSpacing (at the detector)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _get(ds, keyword)
        try:
            row, col = (float(v) for v in value)
        except (TypeError, ValueError):
            continue
        if row > 0 and col > 0 and np.isfinite(row) and np.isfinite(col):
            return (row, col)
    return None


def _transfer_syntax(ds: Dataset) -> UID | None:
    file_meta = getattr(ds, "file_meta", None)
    ts = _get(file_meta, "TransferSyntaxUID") if file_meta is not None else None
    return UID(str(ts)) if ts else None


#: The Pixel Data tag (7FE0,0010) as it appears in little-endian encodings.
_PIXEL_DATA_TAG_BYTES = b"\xe0\x7f\x10\x00"


def check_dicom(ds: Dataset, options: ReadOptions, data: bytes = b"") -> None:
    """Every check that needs only the header, so that nothing is decoded for a file we would refuse.

    ``data`` (the file's bytes) lets a truncated Pixel Data element be told apart from a file that never had one:
    pydicom drops an element cut off by the end of the file with only a warning.
    """
    ts = _transfer_syntax(ds)
    if ts is None or not ts.is_valid:
        raise CorruptHeaderError("the file meta information has no valid TransferSyntaxUID")

    if "PixelData" not in ds:
        if _PIXEL_DATA_TAG_BYTES in data:
            raise CorruptPixelDataError("the Pixel Data element is truncated (the file ends inside it)")
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise NoPixelDataError("float pixel data (parametric maps) is not a radiograph")
        sop_class = _get(ds, "SOPClassUID")
        kind = f" ({UID(str(sop_class)).name})" if sop_class else ""
        raise NoPixelDataError(f"the DICOM object{kind} has no pixel data")

    frames = _get(ds, "NumberOfFrames", 1)
    try:
        frames = int(frames)
    except (TypeError, ValueError):
        frames = 1
    if frames > 1:
        raise MultiFrameError(f"multi-frame image ({frames} frames); only single-frame radiographs are read")

    samples = _optional_int(ds, "SamplesPerPixel", 1)
    photometric = str(_get(ds, "PhotometricInterpretation", "")).strip().upper()
    if photometric not in GRAYSCALE_PHOTOMETRICS or samples != 1:
        shown = photometric or "missing"
        raise UnsupportedPhotometricError(
            f"photometric interpretation {shown} with {samples} sample(s) per pixel; "
            "only grayscale MONOCHROME1/MONOCHROME2 radiographs are read"
        )

    modality = str(_get(ds, "Modality", "")).strip().upper()
    if modality not in options.allowed_modalities:
        allowed = ", ".join(sorted(options.allowed_modalities))
        raise UnsupportedModalityError(f"modality {modality or 'missing'} is not accepted (allowed: {allowed})")

    rows, columns = _required_int(ds, "Rows"), _required_int(ds, "Columns")
    if rows <= 0 or columns <= 0:
        raise CorruptHeaderError(f"image size {rows} x {columns} is not valid")
    if rows * columns > options.max_pixels:
        raise ImageTooLargeError(
            f"image is {rows} x {columns} = {rows * columns} pixels, over the limit of {options.max_pixels}"
        )

    if not ts.is_transfer_syntax:
        raise MissingDecoderError(f"unknown transfer syntax {ts}; no pixel decoder exists for it")
    if ts.is_compressed:
        try:
            decoder = get_decoder(ts)
        except NotImplementedError as exc:
            raise MissingDecoderError(f"no pixel decoder exists for transfer syntax {ts.name} ({ts})") from exc
        if not decoder.is_available:
            raise MissingDecoderError(
                f"no installed plugin decodes transfer syntax {ts.name} ({ts}); "
                "install the plugins listed in caries-mim's dependencies"
            )


def decode_pixels(ds: Dataset) -> np.ndarray:
    """Stored values as an (H, W) array; truncated or undecodable data becomes CorruptPixelDataError (whatever
    the decoder raised, Rust panics included: see :mod:`caries_mim.io.decoder_failures`)."""
    with decoder_failures_as(CorruptPixelDataError, "pixel data cannot be decoded"):
        arr = ds.pixel_array
    if arr.ndim != 2:
        raise CorruptPixelDataError(f"decoded pixel data has shape {arr.shape}, expected (rows, columns)")
    return arr


def _voi_to_unit_range(values: np.ndarray, ds: Dataset, index: int) -> tuple[np.ndarray, str] | None:
    """Apply the VOI LUT or window number ``index`` and map its output range to [0, 1].

    Returns None when the file has no usable VOI transform (FOR PROCESSING images, broken windows).
    """
    voi_luts = _get(ds, "VOILUTSequence")
    if voi_luts:
        if index >= len(voi_luts):
            raise InvalidArgumentError(f"VOI index {index} requested but the file has {len(voi_luts)} VOI LUT(s)")
        try:
            lut_item = voi_luts[index]
            entries, first_mapped, lut_bits = (int(v) for v in lut_item.LUTDescriptor)
            if lut_bits == 8:
                # pydicom 3.0 clips input values into a buffer of the LUT's output dtype (uint8 here), so inputs
                # above 255 wrap around. Declaring 16-bit entries changes only that buffer: the 8-bit values
                # are read the same way (pydicom reads OW LUT data as 16-bit words either way).
                lut_item.LUTDescriptor = [entries, first_mapped, 16]
            out = apply_voi_lut(values, ds, index=index, prefer_lut=True)
        except Exception:
            return None
        # PS3.3 C.11.2.1.1: the LUT's output range is 0 .. 2^bits - 1, whatever values it happens to use.
        top = max(float(2**lut_bits - 1), float(np.max(out)))
        return np.clip(out.astype(np.float64) / top, 0.0, 1.0), "voi_lut"

    if "WindowCenter" in ds and "WindowWidth" in ds:
        try:
            windows = ds["WindowCenter"].VM
        except Exception:  # a value pydicom cannot convert (wrong VR or length): no usable window
            return None
        if index >= windows:
            raise InvalidArgumentError(f"VOI index {index} requested but the file has {windows} window(s)")
        try:
            out = apply_voi_lut(values, ds, index=index, prefer_lut=False)
            # The window's output range depends on bits stored, signedness and rescale (pydicom computes it);
            # windowing the two probe values reads that range back instead of re-deriving it here.
            y_lo, y_hi = apply_voi_lut(_WINDOW_PROBE.copy(), ds, index=index, prefer_lut=False)
        except Exception:
            return None
        if y_hi == y_lo:
            return None
        return np.clip((out - y_lo) / (y_hi - y_lo), 0.0, 1.0), "window"
    return None


#: Integer images whose stored values span at most this many levels go through a lookup table (16-bit: 65536).
_MAX_TABLE_LEVELS = 1 << 16


def _display_values(stored: np.ndarray, ds: Dataset, voi_index: int, invert: bool) -> tuple[np.ndarray, str]:
    """Stored values -> float32 [0, 1] through modality LUT, VOI and inversion. Returns (pixels, normalization).

    pydicom's LUT functions cost several float64 passes over every pixel. Stored values are integers in a small
    range, so they are applied once to each level that occurs (a table of at most 65536 entries) and the image is
    mapped with one lookup: the same functions and results, several times faster on a bitewing.
    """
    offset = int(stored.min()) if stored.size else 0
    levels = int(stored.max()) - offset + 1 if stored.size else 1
    index: np.ndarray | None = None  # position of each pixel in the table, when a table is used
    domain = stored
    if stored.dtype.kind in "iu" and levels <= _MAX_TABLE_LEVELS:
        domain = np.arange(offset, offset + levels).astype(stored.dtype)
        index = stored if offset == 0 and stored.dtype.kind == "u" else stored.astype(np.int64) - offset
    try:
        values = apply_modality_lut(domain, ds)
    except Exception as exc:
        raise CorruptHeaderError(f"modality LUT / rescale cannot be applied: {first_line(exc)}") from exc

    voi = _voi_to_unit_range(values, ds, voi_index)
    if voi is None:
        # Percentiles need the image's own histogram, so the table is expanded first.
        unit = normalize_percentiles(values if index is None else values[index])
        normalization, index = "percentile", None
    else:
        unit, normalization = voi
    unit = unit.astype(np.float32)
    if invert:
        unit = np.float32(1.0) - unit
    return (unit if index is None else np.take(unit, index)), normalization


def dicom_to_radiograph(ds: Dataset, options: ReadOptions, data: bytes = b"") -> Radiograph:
    """Run the header checks, decode, and apply the display pipeline. ``ds`` must come from :func:`parse_dicom`."""
    check_dicom(ds, options, data)
    stored = decode_pixels(ds)
    photometric = str(ds.PhotometricInterpretation).strip().upper()
    presentation_shape = str(_get(ds, "PresentationLUTShape", "")).strip().upper()
    # MONOCHROME1 shows low values bright. An INVERSE presentation shape on MONOCHROME1 (which the DX IOD
    # requires) describes that same inversion; it must not be applied a second time.
    invert = photometric == "MONOCHROME1" or presentation_shape == "INVERSE"
    unit, normalization = _display_values(stored, ds, options.voi_index, invert)

    ts = _transfer_syntax(ds)
    return Radiograph(
        pixels=np.ascontiguousarray(unit, dtype=np.float32),
        spacing_mm=_spacing(ds),
        source_format="dicom",
        modality=str(_get(ds, "Modality", "")).strip().upper() or None,
        photometric_interpretation=photometric,
        bits_stored=_optional_int(ds, "BitsStored", None),
        transfer_syntax_uid=str(ts) if ts else None,
        intensity_normalization=normalization,
        dicom=DicomReferences(
            sop_instance_uid=_uid_or_none(ds, "SOPInstanceUID"),
            sop_class_uid=_uid_or_none(ds, "SOPClassUID"),
            study_instance_uid=_uid_or_none(ds, "StudyInstanceUID"),
            series_instance_uid=_uid_or_none(ds, "SeriesInstanceUID"),
        ),
    )


def _uid_or_none(ds: Dataset, keyword: str) -> str | None:
    value = _get(ds, keyword)
    return str(value) if value else None


def read_dicom(data: bytes, options: ReadOptions) -> Radiograph:
    """Bytes of a DICOM Part 10 file -> :class:`Radiograph`.

    pydicom converts element values when they are first used, so a malformed value (a VR that does not fit, a
    length that is no multiple of the value size) raises wherever the header is read, with whatever pydicom
    raises. The checks above handle the cases fuzzing has found one by one; the guard here makes the rest a
    corrupt header as well, never an untyped error.
    """
    ds = parse_dicom(data, max_pixels=options.max_pixels)
    with decoder_failures_as(CorruptHeaderError, "the DICOM header cannot be interpreted"):
        return dicom_to_radiograph(ds, options, data)
