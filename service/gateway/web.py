"""The gateway's HTTP side: DICOMweb (:mod:`service.gateway.dicomweb`), the queue's status and a health probe.

``create_gateway_app(store, ...)`` serves, beside the Storage SCP, in the same process (``caries-mim gateway run
--http-port``):

- ``/dicomweb/...``: STOW-RS, QIDO-RS and WADO-RS;
- ``GET /v1/gateway/status``: the jobs per state, the oldest queued job's wait and the deliveries per state (what
  ``caries-mim gateway status`` prints);
- ``GET /healthz``: 200 while the process serves.

API keys work as for the REST API (``Authorization: Bearer <key>``, checked from the headers before a body is read:
:class:`service.middleware.ApiKeyGate`); they guard ``/dicomweb/`` and ``/v1/``, the probe stays open. Errors have
the REST API's JSON shape (``{"error": {"code", "message"}}``) with the HTTP statuses PS3.18 gives them.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from caries_mim import __version__
from service.errors import ServiceError, describe_validation_errors, error_response, service_error_response
from service.gateway.dicomweb import PREFIX, dicomweb_router
from service.gateway.intake import instance_tag
from service.gateway.store import GatewayStore, StoreError
from service.middleware import PROTECTED_PREFIX, ApiKeyGate

log = logging.getLogger(__name__)

#: Seconds a request refused for its key may take to send the body that is thrown away (ApiKeyGate).
_REFUSAL_TIMEOUT_S = 30.0


def queue_status(store: GatewayStore) -> dict:
    """The gateway's queue as JSON: ``jobs`` per state, ``oldest_queued_s``, ``deliveries`` per state."""
    summary = store.summary()
    return {"jobs": summary.counts, "oldest_queued_s": summary.oldest_queued_s, "deliveries": store.delivery_counts()}


def create_gateway_app(
    store: GatewayStore,
    *,
    api_keys: frozenset[str] = frozenset(),
    stable_after_s: float = 0.0,
    public_url: str | None = None,
    max_request_bytes: int = 1 << 30,
) -> FastAPI:
    """The gateway's HTTP application on ``store``.

    Args:
        api_keys: accepted bearer keys; empty: no authentication (loopback only, checked by the caller).
        stable_after_s: the study-stability wait given to instances stored by STOW-RS.
        public_url: the gateway's address as clients reach it, for retrieve URLs (None: from each request).
        max_request_bytes: the most a refused request's body is read before its connection is closed.
    """
    app = FastAPI(
        title="caries-mim gateway",
        version=__version__,
        summary="DICOMweb (STOW-RS, QIDO-RS, WADO-RS) and the job queue of the caries-mim DICOM gateway.",
    )
    app.include_router(dicomweb_router(store, stable_after_s=stable_after_s, public_url=public_url))

    @app.get("/v1/gateway/status", summary="the job queue and the deliveries")
    async def status() -> dict:
        return await run_in_threadpool(queue_status, store)

    @app.get("/healthz", summary="liveness probe")
    async def health() -> dict:
        return {"status": "ok"}

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError):
        return service_error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        return error_response(400, "bad_request", describe_validation_errors(error.errors()) or "invalid request")

    @app.exception_handler(StoreError)
    async def store_unavailable(request: Request, error: StoreError):
        # The database, not the request: say when to come back (a PostgreSQL restart, a full disk being freed).
        log.error("the store failed on a %s request: %s", request.method, error)
        return error_response(
            503, "store_unavailable", "the gateway's store is unavailable; retry later", {"Retry-After": "10"}
        )

    app.add_middleware(
        ApiKeyGate,
        keys=api_keys,
        max_bytes=max_request_bytes,
        timeout_s=_REFUSAL_TIMEOUT_S,
        prefixes=(PREFIX + "/", PROTECTED_PREFIX),
    )
    app.add_middleware(LastResort)
    return app


class LastResort:
    """The answer to anything unforeseen: one log line (the exception's type and a hash of the path, whose UIDs
    stay out of the log; no traceback, since pydicom's messages can quote header values) and a 500 in the API's
    JSON shape if the answer has not started, else the connection is closed. Without it Starlette answers and
    uvicorn logs the traceback as well."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as error:
            path = instance_tag(scope.get("path", ""))
            log.error("unexpected %s on a %s request (path %s)", type(error).__name__, scope.get("method"), path)
            if not started:
                answer = error_response(500, "internal_error", "the gateway failed on this request; see its log")
                await answer(scope, receive, send)
