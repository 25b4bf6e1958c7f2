"""The three answers to a prediction: JSON, a DICOM Structured Report or a PNG overlay, chosen by Accept."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from caries_mim.dicom_out import caries_structured_report, structured_report_bytes
from caries_mim.inference import Findings
from caries_mim.io import Radiograph
from caries_mim.io.dicom import parse_dicom
from caries_mim.visualization import draw_findings
from service.errors import ServiceError
from service.runtime import ModelIdentity

JSON = "application/json"
DICOM = "application/dicom"
PNG = "image/png"
MEDIA_TYPES = (JSON, DICOM, PNG)


def negotiate(accept: str | None) -> str:
    """The media type to answer with: the client's most preferred of JSON, DICOM and PNG (JSON for none or ``*/*``).

    Raises:
        ServiceError: 406 when the Accept header allows none of them.
    """
    if not accept or not accept.strip():
        return JSON
    offers: list[tuple[float, int, str]] = []
    for position, part in enumerate(accept.split(",")):
        media, *parameters = (piece.strip() for piece in part.split(";"))
        quality = 1.0
        for parameter in parameters:
            name, _, value = parameter.partition("=")
            if name.strip().lower() == "q":
                try:
                    quality = float(value)
                except ValueError:
                    quality = 0.0
        media = media.lower()
        if quality <= 0:
            continue
        if media in MEDIA_TYPES:
            offers.append((quality, -position, media))
        elif media in ("*/*", "application/*"):
            offers.append((quality - 1e-3, -position, JSON))
        elif media == "image/*":
            offers.append((quality - 1e-3, -position, PNG))
    if not offers:
        raise ServiceError(
            406, "not_acceptable", f"cannot answer with {accept!r}; choose one of {', '.join(MEDIA_TYPES)}"
        )
    return max(offers)[2]


def findings_json(
    radiograph: Radiograph,
    findings: Findings,
    identity: ModelIdentity,
    timings_ms: dict[str, float],
    *,
    all_findings: bool,
) -> dict[str, Any]:
    body = findings.to_dict(include_below_threshold=all_findings)
    body["image"]["sop_instance_uid"] = radiograph.dicom.sop_instance_uid if radiograph.dicom else None
    body["image"]["source_format"] = radiograph.source_format
    return {
        "model": identity.to_dict(),
        "image": body["image"],
        "threshold": body["threshold"],
        "findings": body["findings"],
        "timings_ms": {key: round(value, 2) for key, value in timings_ms.items()},
    }


def overlay_png(radiograph: Radiograph, findings: Findings, *, all_findings: bool) -> bytes:
    chosen = findings.findings if all_findings else findings.above_threshold
    boxes = np.asarray([finding.box for finding in chosen], dtype=np.float32).reshape(-1, 4)
    picture = draw_findings(
        radiograph.pixels, boxes, [finding.label for finding in chosen], [finding.score for finding in chosen]
    )
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def structured_report(
    data: bytes, radiograph: Radiograph, findings: Findings, identity: ModelIdentity, *, all_findings: bool
) -> bytes:
    """A DICOM SR (TID 1500) that references the uploaded image.

    Raises:
        ServiceError: 422 when the upload is not DICOM (an SR must reference a DICOM source image).
    """
    if radiograph.source_format != "dicom":
        raise ServiceError(
            422,
            "dicom_input_required",
            f"a DICOM Structured Report must reference a DICOM image; the upload is {radiograph.source_format}. "
            "Ask for application/json or image/png instead",
        )
    report = caries_structured_report(
        # The decode worker has read this file already; only its header is needed (and parsed) here.
        parse_dicom(data, max_pixels=radiograph.height * radiograph.width, stop_before_pixels=True),
        findings,
        algorithm_name=identity.name,
        algorithm_version=identity.version,
        include_below_threshold=all_findings,
    )
    return structured_report_bytes(report)
