"""One error shape for every failure, ``{"error": {"code": ..., "message": ...}}``, and the one place where the
library's typed errors become HTTP statuses.

A client's mistake is always a 4xx that names the problem; a 5xx means the service itself failed (or is busy,
503, or timed out, 504), and its message never carries a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi.responses import JSONResponse

from caries_mim.errors import CariesMimError

#: Library error code -> HTTP status. Anything a client can send that we cannot use is 415 (not an image at all)
#: or 422 (an image we cannot read or do not accept, with the reason in the message).
STATUS_BY_CODE: dict[str, int] = {
    "not_an_image": 415,
    "unreadable_file": 422,
    "corrupt_header": 422,
    "corrupt_pixel_data": 422,
    "no_pixel_data": 422,
    "unsupported_photometric": 422,
    "multi_frame": 422,
    "unsupported_modality": 422,
    "missing_decoder": 422,
    "image_too_large": 422,
    "invalid_argument": 422,
    # The isolated decoder: a decode past its time limit, or no decode worker free in time. Both retryable.
    "decode_timeout": 504,
    "decoder_unavailable": 503,
    # Server-side: a bad package or config is the operator's problem, not the client's.
    "invalid_dataset": 500,
    "invalid_config": 500,
    "invalid_checkpoint": 500,
}


class ServiceError(Exception):
    """An error the service raises itself, with its HTTP status and optional extra headers."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def describe_validation_errors(errors: Sequence[Mapping[str, Any]]) -> str:
    """pydantic's (and FastAPI's) error list as one line: ``"loc.path: message; ..."``."""
    return "; ".join(
        f"{'.'.join(str(part) for part in item.get('loc', ()))}: {item.get('msg', 'invalid')}" for item in errors
    )


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def library_error_response(error: CariesMimError, retry_after_s: int = 1) -> JSONResponse:
    """The library's typed error as its HTTP answer; a retryable one (503, 504) says when to retry."""
    status = STATUS_BY_CODE.get(error.code, 422)
    headers = {"Retry-After": str(retry_after_s)} if status in (503, 504) else None
    return error_response(status, error.code, error.message, headers)


def service_error_response(error: ServiceError) -> JSONResponse:
    return error_response(error.status, error.code, error.message, error.headers)


#: The error schema as OpenAPI documents it for the routes' error responses.
ERROR_EXAMPLE = {"error": {"code": "corrupt_pixel_data", "message": "pixel data cannot be decoded: ..."}}
