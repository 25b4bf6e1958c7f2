"""The shapes of the service's JSON answers, for ``/openapi.json``.

Client generators and API fuzzers read the schema, so it states exactly what the service sends: every key,
no others (``additionalProperties: false``), value ranges where they are known. The routes build their answers
as plain dicts (``service.rendering``); ``tests/fuzz/test_openapi.py`` holds the two together with schemathesis.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

#: What ``pixel_spacing_mm`` accepts: empty (not given), or one or two numbers in (0, 10) mm written with digits
#: and at most one decimal point, e.g. ``0.03`` or ``0.03,0.035`` (row, column). One regular expression serves
#: the schema and the check, so that what the schema allows is exactly what the service accepts. Decimals are
#: bounded (8 for 1-9.x, 15 below 1) so that no allowed string rounds to 0 or 10 as a float.
SPACING_NUMBER = r"(0*[1-9](\.[0-9]{0,8})?|0*\.[0-9]{0,7}[1-9][0-9]{0,7})"
SPACING_PATTERN = rf"^({SPACING_NUMBER}( *, *{SPACING_NUMBER})?)?$"


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(_Closed):
    code: str = Field(description="stable machine-readable code, e.g. corrupt_pixel_data (see docs/service.md)")
    message: str = Field(description="one sentence for a person: what is wrong and, where it helps, what to do")


class ErrorBody(_Closed):
    """Every error the service answers, whatever the status."""

    error: ErrorDetail


class ModelIdentity(_Closed):
    name: str
    version: str
    checksum: str = Field(description="SHA-256 of the model package's contents")


class ImageInfo(_Closed):
    rows: int = Field(ge=1)
    columns: int = Field(ge=1)
    spacing_mm: list[float] | None = Field(
        min_length=2, max_length=2, description="(row, column) pixel spacing in mm, or null when unknown"
    )
    sop_instance_uid: str | None = Field(description="the DICOM SOP Instance UID of the upload; null for images")
    source_format: str = Field(description="dicom, png, jpeg, tiff, mha, nrrd or nifti")


class Finding(_Closed):
    label: str = Field(description="caries or deep_caries")
    score: float = Field(ge=0.0, le=1.0)
    box: list[float] = Field(
        min_length=4, max_length=4, description="[x0, y0, x1, y1] in pixels of the uploaded image (pixel edges)"
    )
    box_mm: list[float] | None = Field(
        min_length=4, max_length=4, description="the box in mm (x by the column spacing, y by the row spacing)"
    )
    above_threshold: bool


class Timings(_Closed):
    read: float = Field(ge=0.0)
    queue: float = Field(ge=0.0)
    inference: float = Field(ge=0.0)
    render: float = Field(ge=0.0)
    total: float = Field(ge=0.0)


class Prediction(_Closed):
    """The JSON answer of ``POST /v1/predictions``."""

    model: ModelIdentity
    image: ImageInfo
    threshold: float = Field(ge=0.0, le=1.0, description="the model's operating threshold on the score")
    findings: list[Finding] = Field(description="by score, descending; below the threshold only if asked")
    timings_ms: Timings


class Health(_Closed):
    status: str = Field(description="ok")


class Readiness(_Closed):
    status: str = Field(description="ready")
    model: ModelIdentity
    queued: int = Field(ge=0, description="requests waiting for the model in this worker")
