"""Schemathesis hooks for ``tests/fuzz/test_openapi.py`` (loaded through ``SCHEMATHESIS_HOOKS``).

The upload field is ``format: binary``: a schema can say that a part is a file, not that it must be a radiograph.
Left to itself, schemathesis fills it with arbitrary bytes, which the service rightly refuses (415), and its
positive-data check then reports "a schema-valid request was rejected". The format strategy below draws real
radiographs instead (small synthetic DICOM files in every transfer syntax the generator writes, and a PNG), so
that positive cases are positive; arbitrary and hostile files are the fuzz corpus's job (``tests/fuzz/corpus.py``).
"""

from __future__ import annotations

import io

import numpy as np
import schemathesis
from hypothesis import strategies as st
from PIL import Image

from tests.fuzz.corpus import seed_files


def _png() -> bytes:
    ramp = np.tile(np.linspace(0, 255, 128, dtype=np.uint8), (96, 1))
    buffer = io.BytesIO()
    Image.fromarray(ramp, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


RADIOGRAPHS = [*seed_files().values(), _png()]

schemathesis.openapi.format("binary", st.sampled_from(RADIOGRAPHS))


@schemathesis.hook
def filter_body(ctx, body) -> bool:
    """Drop bodies with an empty list in a form field. A multipart form sends an empty list as no part at all, so on
    the wire the request is the one that leaves the optional field out, which is valid; schemathesis still counts
    it as a type violation the service should have refused (ST201 "Schema-violating request accepted", e.g.
    ``pixel_spacing_mm`` "was string, became array"). Such a case tests schemathesis's serializer, not the service."""
    return not (isinstance(body, dict) and any(value == [] for value in body.values()))
