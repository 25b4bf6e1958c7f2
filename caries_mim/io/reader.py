"""``read_radiograph``: one entry point for every file a user or a PACS can hand us."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO

from caries_mim.errors import NotAnImageError, UnreadableFileError, UnsupportedModalityError
from caries_mim.io import formats
from caries_mim.io.dicom import read_dicom
from caries_mim.io.images import read_pillow_image, read_simpleitk_image
from caries_mim.io.options import ReadOptions
from caries_mim.io.radiograph import Radiograph

RadiographSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO

#: Suffixes SimpleITK recognizes by name; other paths are read through a temp file with the right suffix.
_SIMPLEITK_PATH_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr", ".nii", ".nii.gz")


def read_source_bytes(source: RadiographSource) -> tuple[bytes, Path | None]:
    """The file's bytes, and its path when it came from one. Missing or unreadable files are a user error."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source), None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        try:
            return path.read_bytes(), path
        except FileNotFoundError as exc:
            raise UnreadableFileError(f"{path}: no such file") from exc
        except IsADirectoryError as exc:
            raise UnreadableFileError(f"{path}: is a directory, not a file") from exc
        except OSError as exc:
            raise UnreadableFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    if hasattr(source, "read"):
        try:
            data = source.read()
        except OSError as exc:
            raise UnreadableFileError(f"the stream cannot be read ({exc})") from exc
        if not isinstance(data, (bytes, bytearray)):
            raise UnreadableFileError("the stream is not binary (open the file with 'rb')")
        return bytes(data), None
    raise TypeError(f"read_radiograph expects a path, bytes or a binary file object, not {type(source).__name__}")


def read_radiograph(source: RadiographSource, options: ReadOptions | None = None) -> Radiograph:
    """Read one radiograph from a path, bytes or a binary file object.

    DICOM Part 10 (DX, IO, PX, CR by default), PNG, JPEG, TIFF (8/16 bit), MHA, NRRD and NIfTI (2D) are
    recognized from their content, not their name.

    Returns:
        A :class:`Radiograph` with float32 pixels of shape (H, W) in [0, 1], bright = more attenuating.
    Raises:
        caries_mim.errors.CariesMimError: a subclass with a stable ``code`` for every way a file can be
        unusable (not an image, corrupt header or pixel data, no pixel data, colour, multi-frame, modality,
        missing decoder, too large, unreadable file).
    """
    options = options or ReadOptions()
    data, path = read_source_bytes(source)
    if not data:
        raise NotAnImageError("the file is empty")

    kind = formats.sniff_format(data)
    if kind == formats.DICOM:
        return read_dicom(data, options)
    if kind is None:
        if formats.looks_like_headerless_dicom(data):
            raise NotAnImageError(
                "a raw DICOM data set without the Part 10 header (128-byte preamble and 'DICM'); "
                "re-save it as a DICOM Part 10 file"
            )
        raise NotAnImageError("not a DICOM Part 10 file or a supported image (PNG, JPEG, TIFF, MHA, NRRD, NIfTI)")

    if not options.allow_non_dicom:
        raise UnsupportedModalityError(f"{kind.upper()} files are not accepted here, only DICOM")
    if kind in formats.PILLOW_FORMATS:
        return read_pillow_image(data, kind, options)
    by_path = path if path is not None and path.name.lower().endswith(_SIMPLEITK_PATH_SUFFIXES) else None
    return read_simpleitk_image(data, by_path, kind, options)
