"""Non-DICOM radiographs: PNG/JPEG/TIFF through Pillow, MHA/NRRD/NIfTI through SimpleITK.

These files carry no window, so 8-bit images map 0..255 to [0, 1] unchanged and deeper ones (16-bit PNG/TIFF,
float or 16-bit MHA) are normalized by robust percentiles, like DICOM FOR PROCESSING images.
"""

from __future__ import annotations

import io
import os
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from caries_mim.errors import (
    CorruptHeaderError,
    CorruptPixelDataError,
    ImageTooLargeError,
    MultiFrameError,
    UnsupportedPhotometricError,
)
from caries_mim.io.decoder_failures import decoder_failures_as
from caries_mim.io.formats import SIMPLEITK_SUFFIX, gunzip_head
from caries_mim.io.intensity import normalize_full_range, normalize_percentiles
from caries_mim.io.options import ReadOptions
from caries_mim.io.radiograph import Radiograph

#: Mean absolute difference between colour channels (of 255) below which an RGB file is a gray radiograph
#: saved as colour (common for exported PNGs and JPEGs: chroma subsampling leaves a little noise).
_GRAY_CHANNEL_TOLERANCE = 3.0


def _check_size(height: int, width: int, options: ReadOptions) -> None:
    if height * width > options.max_pixels:
        raise ImageTooLargeError(
            f"image is {height} x {width} = {height * width} pixels, over the limit of {options.max_pixels}"
        )


def _gray_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (H, W) float32 in [0, 255]; refuses real colour images."""
    channels = rgb.astype(np.float32)
    spread = max(
        float(np.abs(channels[..., 0] - channels[..., 1]).mean()),
        float(np.abs(channels[..., 1] - channels[..., 2]).mean()),
    )
    if spread > _GRAY_CHANNEL_TOLERANCE:
        raise UnsupportedPhotometricError(
            f"colour image (channels differ by {spread:.1f} of 255 on average); radiographs are grayscale"
        )
    return channels.mean(axis=-1)


def read_pillow_image(data: bytes, source_format: str, options: ReadOptions) -> Radiograph:
    """PNG, JPEG or TIFF bytes -> :class:`Radiograph` (spacing unknown: these formats carry none we trust)."""
    try:
        with warnings.catch_warnings():
            # Our own size limit replaces Pillow's decompression-bomb warning.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise CorruptHeaderError(f"{source_format.upper()} header cannot be parsed: {exc}") from exc

    width, height = image.size
    _check_size(height, width, options)
    if getattr(image, "n_frames", 1) > 1:
        raise MultiFrameError(f"multi-page {source_format.upper()} ({image.n_frames} frames); one image expected")

    # Pillow raises OSError, SyntaxError, ValueError... for broken streams; its codecs are C code.
    with decoder_failures_as(CorruptPixelDataError, f"{source_format.upper()} pixel data cannot be decoded"):
        image = ImageOps.exif_transpose(image)
        image.load()

    mode = image.mode
    if mode in ("L", "LA", "1", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "LAB"):
        if mode in ("L", "LA", "1"):
            gray = np.asarray(image.convert("L"), dtype=np.float32)
        else:
            gray = _gray_from_rgb(np.asarray(image.convert("RGB")))
        pixels, normalization, bits = normalize_full_range(gray, 255.0), "full_range", 8
    elif mode.startswith("I;16") or mode in ("I", "F"):
        values = np.asarray(image)
        pixels, normalization = normalize_percentiles(values), "percentile"
        bits = 16 if mode.startswith("I;16") else 32
    else:
        raise UnsupportedPhotometricError(f"{source_format.upper()} pixel mode {mode} is not supported")

    return Radiograph(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        spacing_mm=None,
        source_format=source_format,
        bits_stored=bits,
        intensity_normalization=normalization,
    )


def _sitk_read(path: str, source_format: str, options: ReadOptions) -> Radiograph:
    # Imported here, where it is used: only MHA/NRRD/NIfTI files need SimpleITK, whose import costs ~0.12 s at every
    # start of the CLI and the service, and whose 50 MB wheel a DICOM-only build host can then do without.
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(path)
    try:
        reader.ReadImageInformation()
    except RuntimeError as exc:
        raise CorruptHeaderError(f"image header cannot be parsed: {_last_line(exc)}") from exc

    size = reader.GetSize()  # (x, y[, z]) in SimpleITK's order
    dimension = reader.GetDimension()
    if dimension not in (2, 3) or (dimension == 3 and size[2] != 1):
        raise MultiFrameError(f"image of size {tuple(size)} is not 2D; one 2D radiograph expected")
    if reader.GetNumberOfComponents() != 1:
        raise UnsupportedPhotometricError(
            f"image has {reader.GetNumberOfComponents()} components per pixel; radiographs are grayscale"
        )
    width, height = int(size[0]), int(size[1])
    _check_size(height, width, options)

    with decoder_failures_as(CorruptPixelDataError, "pixel data cannot be read"):
        try:
            image = reader.Execute()
        except RuntimeError as exc:
            raise CorruptPixelDataError(f"pixel data cannot be read: {_last_line(exc)}") from exc
    values = sitk.GetArrayFromImage(image).reshape(height, width)
    spacing_x, spacing_y = image.GetSpacing()[:2]

    if values.dtype == np.uint8:
        pixels, normalization = normalize_full_range(values, 255.0), "full_range"
    else:
        pixels, normalization = normalize_percentiles(values), "percentile"
    return Radiograph(
        pixels=np.ascontiguousarray(pixels, dtype=np.float32),
        # SimpleITK's default spacing is exactly 1.0 when the file says nothing; we cannot tell that apart
        # from a real 1 mm spacing, which no dental detector has, so treat it as unknown.
        spacing_mm=None if (spacing_x, spacing_y) == (1.0, 1.0) else (float(spacing_y), float(spacing_x)),
        source_format=source_format,
        bits_stored=int(values.dtype.itemsize * 8),
        intensity_normalization=normalization,
    )


def _last_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    # SimpleITK puts the useful sentence last, after file/line locations.
    return (lines[-1] if lines else type(exc).__name__)[:300]


#: Header fields with which an MHA or NRRD names the file that holds its pixels (compared in lower case).
_MHA_DATA_FILE = "elementdatafile"
_NRRD_DATA_FILES = ("data file", "datafile")


def check_self_contained(data: bytes, source_format: str) -> None:
    """Refuse bytes of an MHA, NRRD or two-file NIfTI whose header puts the pixels in another file.

    Such a header names a path (MetaImage ``ElementDataFile = /any/path``, NRRD ``data file: /any/path``) that
    SimpleITK opens and returns as pixels: from an upload, that reads the server's own files (keys, environment,
    other images) back to the sender. A file read by path, from a user's own folder, may still point next to
    itself; bytes must carry their pixels.

    Raises:
        CorruptHeaderError: the header names a separate data file.
    """
    text = data[:65536].decode("latin-1")
    if source_format == "mha":
        for line in text.splitlines():
            key, _, value = line.partition("=")
            if key.strip().lower() == _MHA_DATA_FILE:
                if value.strip().upper() != "LOCAL":
                    raise CorruptHeaderError(
                        f"the MHA header puts its pixels in another file (ElementDataFile = {value.strip()[:60]!r}); "
                        "only self-contained files (ElementDataFile = LOCAL) are read from uploaded bytes"
                    )
                return
    elif source_format == "nrrd":
        for line in re.split(r"\r?\n\r?\n", text, maxsplit=1)[0].splitlines():
            key, separator, value = line.partition(":")
            if separator and not value.startswith("=") and key.strip().lower() in _NRRD_DATA_FILES:
                raise CorruptHeaderError(
                    f"the NRRD header puts its pixels in another file ({key.strip()}: {value.strip()[:60]!r}); "
                    "only self-contained .nrrd files are read from uploaded bytes"
                )
    elif source_format == "nifti":
        header = gunzip_head(data, 544) if data.startswith(b"\x1f\x8b") else data
        if header[344:348] == b"ni1\x00" or header[4:8] == b"ni2\x00":
            raise CorruptHeaderError("a NIfTI whose pixels are in a separate .img file cannot be read from bytes")


def read_simpleitk_image(data: bytes | None, path: Path | None, source_format: str, options: ReadOptions) -> Radiograph:
    """MHA/NRRD/NIfTI from a path (so detached headers find their data file) or from bytes via a temp file (then
    only self-contained files: see :func:`check_self_contained`)."""
    if path is not None:
        return _sitk_read(str(path), source_format, options)
    check_self_contained(data or b"", source_format)
    suffix = SIMPLEITK_SUFFIX[source_format]
    if data is not None and data.startswith(b"\x1f\x8b"):
        suffix += ".gz"
    fd, tmp_name = tempfile.mkstemp(suffix=suffix)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data or b"")
        return _sitk_read(tmp_name, source_format, options)
    finally:
        os.unlink(tmp_name)
