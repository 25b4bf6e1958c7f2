"""The HTTP routes: predictions (JSON, DICOM SR, PNG), the model card, liveness, readiness and metrics."""

from __future__ import annotations

import logging
import re
import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from caries_mim.errors import InvalidArgumentError
from caries_mim.io.radiograph import hash_uid
from service.errors import ERROR_EXAMPLE, ServiceError
from service.logs import LOGGER_NAME
from service.middleware import RELEASE_UPLOAD_SLOT
from service.rendering import DICOM, JSON, PNG, findings_json, negotiate, overlay_png, structured_report
from service.runtime import Runtime
from service.schemas import SPACING_PATTERN, ErrorBody, Health, Prediction, Readiness

log = logging.getLogger(LOGGER_NAME)
router = APIRouter()

_ERROR = {"model": ErrorBody, "content": {JSON: {"example": ERROR_EXAMPLE}}}
_PREDICTION_EXAMPLE = {
    "model": {"name": "caries-mim caries detector", "version": "1.0.0", "checksum": "3f5c...e1"},
    "image": {
        "rows": 900,
        "columns": 1200,
        "spacing_mm": [0.03, 0.03],
        "sop_instance_uid": "1.2.826.0.1.3680043.8.498.1",
        "source_format": "dicom",
    },
    "threshold": 0.42,
    "findings": [
        {
            "label": "caries",
            "score": 0.87,
            "box": [412.0, 300.5, 447.0, 338.0],
            "box_mm": [12.36, 9.015, 13.41, 10.14],
            "above_threshold": True,
        }
    ],
    "timings_ms": {"read": 35.2, "queue": 1.1, "inference": 180.4, "render": 0.1, "total": 217.9},
}


def ready_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = request.app.state.runtime
    if runtime is None:
        raise ServiceError(503, "not_ready", "the model is not loaded yet", {"Retry-After": "5"})
    return runtime


Ready = Annotated[Runtime, Depends(ready_runtime)]


def parse_spacing(text: str | None) -> tuple[float, float] | None:
    """``"0.1"`` (square pixels) or ``"0.1,0.12"`` (row, column) in mm -> (row, column); None when empty or not
    given. Exactly what :data:`~service.schemas.SPACING_PATTERN` (the schema's pattern) allows is accepted.

    Raises:
        InvalidArgumentError: not one or two numbers in (0, 10) written as the pattern says.
    """
    if text is None or text == "":
        return None
    if not _SPACING.fullmatch(text):
        raise InvalidArgumentError(
            "pixel_spacing_mm must be one or two numbers above 0 and below 10 (mm), written with digits and a "
            f"decimal point ('0.03' or '0.03,0.035' for row,column), got {text[:40]!r}"
        )
    values = [float(part) for part in text.split(",")]  # in (0, 10): the pattern bounds the digits
    return (values[0], values[-1])


_SPACING = re.compile(SPACING_PATTERN)


@router.post(
    "/v1/predictions",
    summary="Find caries on one radiograph",
    description=(
        "Upload one radiograph as multipart/form-data field `file`: a DICOM Part 10 file (single-frame grayscale "
        "DX/IO/PX/CR), or a PNG/JPEG/TIFF with an optional `pixel_spacing_mm`. The Accept header chooses the "
        "answer: `application/json` (default), `application/dicom` (a TID 1500 Structured Report referencing the "
        "image; DICOM uploads only) or `image/png` (the radiograph with the findings drawn on it). Findings below "
        "the model's operating threshold are left out unless `all_findings=true`."
    ),
    response_class=JSONResponse,
    responses={
        200: {
            "model": Prediction,
            "content": {
                JSON: {"example": _PREDICTION_EXAMPLE},
                DICOM: {"schema": {"type": "string", "format": "binary"}},
                PNG: {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "Findings, as JSON, a DICOM SR or a PNG overlay",
        },
        400: {**_ERROR, "description": "a multipart body that cannot be parsed"},
        401: {**_ERROR, "description": "missing or wrong API key"},
        406: {**_ERROR, "description": "the Accept header allows none of JSON, DICOM, PNG"},
        408: {**_ERROR, "description": "the upload did not complete within the upload time limit"},
        413: {**_ERROR, "description": "the upload is larger than the limit"},
        415: {**_ERROR, "description": "not a DICOM file or an image (an empty file included), or not a form"},
        422: {
            **_ERROR,
            "description": "an image we cannot use (corrupt, colour, multi-frame, too large, no DICOM for an SR, "
            "...) or a form field that breaks the schema",
        },
        500: {**_ERROR, "description": "the service failed: quote the request id in the message"},
        503: {
            **_ERROR,
            "description": "not ready, too many uploads or requests waiting, or no decoder free (see Retry-After)",
        },
        504: {**_ERROR, "description": "no result within the request timeout, or a decode past its time limit"},
    },
)
async def create_prediction(
    request: Request,
    runtime: Ready,
    file: Annotated[
        UploadFile,
        File(
            description="the radiograph, not empty: DICOM Part 10 (single-frame grayscale DX/IO/PX/CR), PNG, JPEG "
            "or TIFF",
            json_schema_extra={"format": "binary", "minLength": 1},
        ),
    ],
    pixel_spacing_mm: Annotated[
        str,
        Form(
            description="pixel spacing in mm for images without their own: '0.03', or 'row,column' as "
            "'0.03,0.035'; each above 0 and below 10; empty when unknown. Ignored when the image states its "
            "spacing (DICOM).",
            # Stated in the schema and checked by parse_spacing (a 422 invalid_argument that says what to send).
            json_schema_extra={"pattern": SPACING_PATTERN},
        ),
    ] = "",
    all_findings: Annotated[bool, Query(description="also return findings below the operating threshold")] = False,
) -> Response:
    started = time.perf_counter()
    media_type = negotiate(request.headers.get("accept"))
    spacing = parse_spacing(pixel_spacing_mm)
    data = await file.read()
    radiograph = await runtime.decoder.read(data)
    # Decoded: the upload no longer counts against the concurrent-upload limit; the inference queue bounds it now.
    request.scope["state"][RELEASE_UPLOAD_SLOT]()
    read_done = time.perf_counter()
    settings = request.app.state.settings
    result = await runtime.worker.predict(
        radiograph, spacing if radiograph.spacing_mm is None else None, settings.request_timeout_s
    )
    findings = result.findings
    render_started = time.perf_counter()
    if media_type == DICOM:
        body: Any = await run_in_threadpool(
            structured_report, data, radiograph, findings, runtime.identity, all_findings=all_findings
        )
    elif media_type == PNG:
        body = await run_in_threadpool(overlay_png, radiograph, findings, all_findings=all_findings)
    else:
        body = None
    finished = time.perf_counter()
    timings = {
        "read": 1000.0 * (read_done - started),
        "queue": result.queue_ms,
        "inference": result.inference_ms,
        "render": 1000.0 * (finished - render_started),
        "total": 1000.0 * (finished - started),
    }
    log.info(
        "prediction",
        extra={
            "fields": {
                "request_id": request.scope.get("state", {}).get("request_id"),
                "sop_instance_uid_hash": hash_uid(radiograph.dicom.sop_instance_uid if radiograph.dicom else None),
                "source_format": radiograph.source_format,
                "findings": len(findings.above_threshold),
                "batch_size": result.batch_size,
                "answer": media_type,
                "timings_ms": {key: round(value, 1) for key, value in timings.items()},
            }
        },
    )
    if media_type == JSON:
        return JSONResponse(findings_json(radiograph, findings, runtime.identity, timings, all_findings=all_findings))
    return Response(body, media_type=media_type)


@router.get(
    "/v1/model",
    summary="The model card: classes, threshold, version, provenance, intended use",
    responses={
        401: {**_ERROR, "description": "missing or wrong API key"},
        503: {**_ERROR, "description": "the model is not loaded yet"},
    },
)
async def model_card(runtime: Ready) -> dict[str, Any]:
    return runtime.model_card()


def _check_inference_alive(runtime: Runtime | None) -> None:
    if runtime is None:
        return
    problem = runtime.worker.problem() or runtime.decoder.problem()
    if problem is not None:
        raise ServiceError(503, "unhealthy", problem)


@router.get(
    "/healthz",
    summary="Liveness: the process answers and its model is not hung",
    description="200 while the process runs; 503 `unhealthy` when the inference thread has stopped or one model "
    "batch has run past the stall limit (`CARIES_MIM_STALL_TIMEOUT_S`): restart it.",
    response_model=Health,
    responses={503: {**_ERROR, "description": "the inference thread stopped or hangs, or no decoder can start"}},
)
async def healthz(request: Request) -> dict[str, str]:
    _check_inference_alive(request.app.state.runtime)
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: the model is loaded and requests are accepted",
    response_model=Readiness,
    responses={503: {**_ERROR, "description": "not ready yet, or the model hangs"}},
)
async def readyz(runtime: Ready) -> dict[str, Any]:
    _check_inference_alive(runtime)
    return {"status": "ready", "model": runtime.identity.to_dict(), "queued": runtime.worker.depth}


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text"}},
)
async def metrics(request: Request) -> Response:
    return Response(request.app.state.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
