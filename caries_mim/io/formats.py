"""Recognize a file's format from its first bytes (never from its name: uploads and PACS exports lie)."""

from __future__ import annotations

import gzip
import io
import zlib

DICOM = "dicom"
PNG = "png"
JPEG = "jpeg"
TIFF = "tiff"
MHA = "mha"
NRRD = "nrrd"
NIFTI = "nifti"

#: Formats decoded by Pillow; the others except DICOM go through SimpleITK.
PILLOW_FORMATS = frozenset({PNG, JPEG, TIFF})
SIMPLEITK_FORMATS = frozenset({MHA, NRRD, NIFTI})

#: File suffixes SimpleITK needs to pick its reader when the data arrives as bytes.
SIMPLEITK_SUFFIX = {MHA: ".mha", NRRD: ".nrrd", NIFTI: ".nii"}

_NIFTI_MAGICS = (b"n+1\x00", b"ni1\x00")
_NIFTI2_MAGICS = (b"n+2\x00", b"ni2\x00")


def _looks_like_nifti(header: bytes) -> bool:
    return header[344:348] in _NIFTI_MAGICS or header[4:8] in _NIFTI2_MAGICS


def gunzip_head(data: bytes, size: int) -> bytes:
    try:
        return gzip.GzipFile(fileobj=io.BytesIO(data)).read(size)
    except (OSError, EOFError, zlib.error):
        return b""


def sniff_format(data: bytes) -> str | None:
    """Return one of the format names above, or None when the bytes are none of them."""
    if data[128:132] == b"DICM":
        return DICOM
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if data.startswith(b"\xff\xd8\xff"):
        return JPEG
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return TIFF
    if data.startswith(b"NRRD"):
        return NRRD
    if _looks_like_nifti(data):
        return NIFTI
    if data.startswith(b"\x1f\x8b") and _looks_like_nifti(gunzip_head(data, 544)):
        return NIFTI
    head = data[:4096]
    if b"ElementDataFile" in head and (b"NDims" in head or b"ObjectType" in head):
        return MHA
    return None


def looks_like_headerless_dicom(data: bytes) -> bool:
    """A raw DICOM data set without the Part 10 preamble: starts with a group 0x0002 or 0x0008 tag."""
    return data[:2] in (b"\x02\x00", b"\x08\x00") and data[2:4] != b"\x00\x00"
