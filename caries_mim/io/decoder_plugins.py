"""Which of pydicom's pixel decoder plugins run, and in which order.

pydicom tries the available plugins of a transfer syntax in registration order, and GDCM comes first for every
JPEG-family syntax. GDCM is C++ that ends the whole process (``std::terminate``, SIGABRT) on some corrupt JPEG 2000
codestreams where OpenJPEG (pylibjpeg-openjpeg, Pillow) only raises: 2 of 20,000 fuzzed files here
(``python -m tests.fuzz --seed 100 --isolated``), and every other plugin failed cleanly on both. So:

- JPEG 2000 decodes without GDCM (pylibjpeg-openjpeg, then Pillow: both OpenJPEG, both complete);
- for the other syntaxes GDCM moves behind the other plugins: it still decodes what only it can (JPEG lossless
  process 14, 12-bit JPEG without imagecodecs), but a file another plugin reads never reaches it.

This changes pydicom's process-wide registry, as :mod:`caries_mim.io.jpeg12` does by adding a plugin.
"""

from __future__ import annotations

import contextlib

from pydicom import uid
from pydicom.pixels.decoders.base import get_decoder

GDCM = "gdcm"
GDCM_FRAME_DECODER = ("pydicom.pixels.decoders.gdcm", "_decode_frame")
#: Syntaxes whose other plugins decode everything GDCM would: GDCM is removed from them.
WITHOUT_GDCM = (uid.JPEG2000Lossless, uid.JPEG2000)
#: Syntaxes where GDCM stays, after every other plugin.
GDCM_LAST = (
    uid.JPEGBaseline8Bit,
    uid.JPEGExtended12Bit,
    uid.JPEGLossless,
    uid.JPEGLosslessSV1,
    uid.JPEGLSLossless,
    uid.JPEGLSNearLossless,
)


def prefer_safe_decoders() -> None:
    """Apply the order above (idempotent)."""
    for syntax in WITHOUT_GDCM:
        with contextlib.suppress(ValueError):  # pydicom's answer when it is not registered (any more)
            get_decoder(syntax).remove_plugin(GDCM)
    for syntax in GDCM_LAST:
        decoder = get_decoder(syntax)
        if GDCM in decoder.available_plugins:
            decoder.remove_plugin(GDCM)
            decoder.add_plugin(GDCM, GDCM_FRAME_DECODER)
