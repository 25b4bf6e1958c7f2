"""A pydicom decoder plugin for 12-bit JPEG Extended (process 4) through imagecodecs' libjpeg-turbo 3.

Why this exists: among pydicom's plugins only pylibjpeg-libjpeg decodes 12-bit lossy JPEG, and it is GPLv3;
pydicom's GDCM and Pillow plugins refuse 12-bit precision. imagecodecs (BSD-3-Clause) bundles libjpeg-turbo 3,
which decodes it, so older dental and CR archives stored as JPEG Extended still read. The module follows pydicom's
decoder-plugin protocol (``DECODER_DEPENDENCIES``, ``is_available``, a frame decoding function) and is added to
pydicom's decoder by :func:`register`.
"""

from __future__ import annotations

import contextlib

from pydicom import uid
from pydicom.pixels.decoders.base import DecodeRunner, get_decoder

PLUGIN_LABEL = "caries-mim-imagecodecs"

DECODER_DEPENDENCIES = {uid.JPEGExtended12Bit: ("imagecodecs>=2024.1",)}


def is_available(transfer_syntax: str) -> bool:
    if transfer_syntax != uid.JPEGExtended12Bit:
        return False
    try:
        import imagecodecs
    except ImportError:
        return False
    return bool(imagecodecs.JPEG8.available)


def decode_frame(src: bytes, runner: DecodeRunner) -> bytes:
    """One encoded JPEG frame -> raw little-endian samples in the runner's pixel container (8 or 16 bit)."""
    import imagecodecs

    if runner.samples_per_pixel != 1:
        raise NotImplementedError("the imagecodecs plugin decodes single-sample (grayscale) JPEG only")
    decoded = imagecodecs.jpeg8_decode(src)
    return decoded.astype(runner.pixel_dtype, copy=False).tobytes()


def register() -> None:
    """Add the plugin to pydicom's JPEG Extended decoder once (idempotent, import-time safe)."""
    # pydicom answers ValueError when the label is already registered.
    with contextlib.suppress(ValueError):
        get_decoder(uid.JPEGExtended12Bit).add_plugin(PLUGIN_LABEL, (__name__, "decode_frame"))
