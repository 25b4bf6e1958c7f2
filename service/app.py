"""``create_app(settings)``: the FastAPI application, its lifespan (model loading, draining) and error handlers.

Routes stay thin (``service.routes``); everything they need is on ``app.state``: ``settings``, ``metrics`` and,
once the model is loaded, ``runtime``. API keys are checked by middleware (``service.middleware.ApiKeyGate``)
before a request's body is read.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartParser

from caries_mim import __version__
from caries_mim.errors import CariesMimError
from caries_mim.inference import Predictor
from caries_mim.io import read_radiograph
from caries_mim.io.isolation import ReadFunction
from caries_mim.io.options import ReadOptions
from caries_mim.package import load_package
from service.batching import InferenceWorker, ModelThread
from service.decoding import UploadDecoder
from service.errors import (
    ServiceError,
    describe_validation_errors,
    error_response,
    library_error_response,
    service_error_response,
)
from service.logs import LOGGER_NAME, configure_logging
from service.metrics import ServiceMetrics
from service.middleware import (
    PROTECTED_PREFIX,
    ApiKeyGate,
    BodySizeLimit,
    RequestContext,
    UploadGate,
)
from service.routes import router
from service.runtime import ModelIdentity, Runtime
from service.settings import ServiceSettings

log = logging.getLogger(LOGGER_NAME)

#: HTTP status -> error code for the errors Starlette and FastAPI raise themselves.
_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    408: "upload_timeout",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


def create_app(
    settings: ServiceSettings, predictor: Predictor | None = None, read_function: ReadFunction = read_radiograph
) -> FastAPI:
    """The service application.

    Args:
        settings: see :class:`ServiceSettings`; ``settings.model`` is loaded at start-up unless ``predictor`` is
            given (tests, embedding).
        read_function: what decodes an upload (in the decode workers): ``read_radiograph``, or a stand-in that
            misbehaves on purpose in tests.
    Raises:
        InvalidConfigError: the API key file cannot be read.
    """
    configure_logging(settings.log_level)
    _keep_uploads_in_memory(settings.max_upload_bytes)
    metrics = ServiceMetrics()
    api_keys = settings.accepted_keys()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if predictor is None and settings.model is None:
            raise RuntimeError("no model package: set --model or CARIES_MIM_MODEL")
        model_thread = ModelThread()  # loads and runs the model: one thread for all its work (see ModelThread)
        decoder = UploadDecoder(settings, read_options(settings), metrics, read_function)
        try:
            await decoder.start()
            loaded = predictor
            if loaded is None:
                log.info("loading model package", extra={"fields": {"device": settings.device or "auto"}})
                loaded = await model_thread.run(load_package, settings.model, settings.device)
            app.state.runtime = _runtime(loaded, settings, metrics, model_thread, decoder)
            app.state.runtime.worker.start()
        except BaseException:
            # Not joined: start-up may have been cancelled while the package is still loading on that thread.
            model_thread.shutdown(wait=False)
            decoder.close()
            raise
        log.info("ready", extra={"fields": {"model": app.state.runtime.identity.to_dict()}})
        watchdog = None
        if settings.workers > 1:
            watchdog = asyncio.create_task(watch_inference(app.state.runtime.worker, metrics))
        try:
            yield
        finally:
            if watchdog is not None:
                watchdog.cancel()
            log.info("draining", extra={"fields": {"queued": app.state.runtime.worker.depth}})
            await app.state.runtime.worker.drain()
            app.state.runtime = None
            decoder.close()
            metrics.process_exiting()

    app = FastAPI(
        title="caries-mim",
        version=__version__,
        summary="Caries detection on dental radiographs: DICOM in; JSON, DICOM SR or an overlay PNG out.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = None
    app.include_router(router)
    if api_keys:
        _document_bearer_keys(app)
    _add_error_handlers(app)
    # Each one added wraps the ones before: the request context sees every answer (401s and 413s included), the
    # key is checked before an upload takes a slot, and both before the size limit lets the body in.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_upload_bytes)
    app.add_middleware(
        UploadGate,
        max_concurrent=settings.max_concurrent_uploads,
        timeout_s=settings.upload_timeout_s,
        max_bytes=settings.max_upload_bytes,
        retry_after_s=settings.retry_after_s,
        metrics=metrics,
    )
    app.add_middleware(
        ApiKeyGate, keys=api_keys, max_bytes=settings.max_upload_bytes, timeout_s=settings.upload_timeout_s
    )
    app.add_middleware(RequestContext, metrics=metrics)
    return app


BEARER_SCHEME = "apiKey"


def _document_bearer_keys(app: FastAPI) -> None:
    """State in ``/openapi.json`` that every ``/v1/`` route needs ``Authorization: Bearer <key>`` (ApiKeyGate
    checks it), so that clients and their generators send it; probes and metrics stay open."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {}).setdefault("securitySchemes", {})[BEARER_SCHEME] = {
                "type": "http",
                "scheme": "bearer",
                "description": "one of the service's API keys (CARIES_MIM_API_KEYS, CARIES_MIM_API_KEYS_FILE)",
            }
            for path, operations in schema.get("paths", {}).items():
                if path.startswith(PROTECTED_PREFIX):
                    for operation in operations.values():
                        operation["security"] = [{BEARER_SCHEME: []}]
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


#: Seconds between a worker's checks of its own inference thread, and its exit status when that thread is lost.
WATCHDOG_PERIOD_S = 5.0
WATCHDOG_EXIT_STATUS = 70


async def watch_inference(
    worker: InferenceWorker, metrics: ServiceMetrics, *, period_s: float = WATCHDOG_PERIOD_S, exit_process=os._exit
) -> None:
    """With several workers, a worker whose model hangs past the stall limit, or whose inference loop died, exits
    so that uvicorn's supervisor starts a fresh one (gunicorn treats a worker past its timeout the same way). One
    worker's ``/healthz`` cannot speak for the others, and a probe reaches one of them at random. ``os._exit``: a
    hung model thread cannot be stopped, and a graceful shutdown would wait for it."""
    while True:
        await asyncio.sleep(period_s)
        problem = worker.problem()
        if problem is not None:
            log.critical("worker exiting to be replaced", extra={"fields": {"problem": problem}})
            metrics.process_exiting()
            exit_process(WATCHDOG_EXIT_STATUS)
            return


#: Uploads up to this size stay in memory while the form is parsed; larger ones (panoramics, multi-MB
#: uncompressed files) go to a temporary file as Starlette does past its default of 1 MB.
UPLOAD_MEMORY_BYTES = 16 * 1024 * 1024


def _keep_uploads_in_memory(max_upload_bytes: int) -> None:
    """Let Starlette hold an intra-oral upload in memory instead of rolling it to a temporary file at 1 MB: a
    bitewing DICOM is 2-5 MB and the handler reads the whole upload into memory anyway, so the file only added
    disk writes and a thread hop per 64 KB chunk. Only clients with a key get this far (ApiKeyGate answers the
    others from the headers). ``spool_max_size`` is Starlette's documented class-level knob; one application
    runs per process."""
    MultiPartParser.spool_max_size = min(max(max_upload_bytes, 1024 * 1024), UPLOAD_MEMORY_BYTES)


#: Sliding windows per forward pass on a GPU unless the settings say otherwise.
GPU_WINDOW_BATCH_SIZE = 64


def read_options(settings: ServiceSettings) -> ReadOptions:
    """What uploads may be: the settings' modalities, formats and pixel limit."""
    return ReadOptions(
        allowed_modalities=frozenset(settings.modalities),
        allow_non_dicom=settings.allow_non_dicom,
        max_pixels=settings.max_pixels,
    )


def _runtime(
    predictor: Predictor,
    settings: ServiceSettings,
    metrics: ServiceMetrics,
    model_thread: ModelThread,
    decoder: UploadDecoder,
) -> Runtime:
    windows = settings.window_batch_size
    if windows is None and predictor.device.type == "cuda":
        windows = GPU_WINDOW_BATCH_SIZE
    if windows is not None:
        predictor.detector.set_window_batch_size(windows)
    worker = InferenceWorker(
        predictor,
        max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_batch_wait_ms / 1000.0,
        queue_size=settings.queue_size,
        retry_after_s=settings.retry_after_s,
        metrics=metrics,
        thread=model_thread,
        stall_timeout_s=settings.stall_timeout_s,
    )
    identity = ModelIdentity(
        name=settings.model_name,
        version=predictor.package.version,
        checksum=predictor.package.checksum,
    )
    return Runtime(predictor=predictor, worker=worker, identity=identity, decoder=decoder)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(CariesMimError)
    async def library_error(request: Request, error: CariesMimError):
        return library_error_response(error, request.app.state.settings.retry_after_s)

    @app.exception_handler(ServiceError)
    async def service_error(request: Request, error: ServiceError):
        return service_error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        code = _HTTP_CODES.get(error.status_code, "http_error")
        return error_response(error.status_code, code, str(error.detail), getattr(error, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, error: RequestValidationError):
        content_type = request.headers.get("content-type", "")
        if request.url.path.endswith("/predictions") and not content_type.startswith("multipart/form-data"):
            return error_response(
                415,
                "unsupported_media_type",
                f"send the radiograph as multipart/form-data in a field named 'file', not {content_type or 'no body'}",
            )
        problems = describe_validation_errors(error.errors())
        return error_response(422, "invalid_request", problems or "the request is invalid")

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception):
        # Starlette's error middleware runs outside RequestContext, which answers everything the app raises: this
        # handler sees only a failure of the middleware stack itself, and keeps that answer in the JSON shape.
        request_id = request.scope.get("state", {}).get("request_id")
        log.error(
            "unhandled error",
            exc_info=(type(error), error, error.__traceback__),
            extra={"fields": {"request_id": request_id}},
        )
        return error_response(500, "internal_error", f"the service failed; quote request id {request_id}")
