"""Pure ASGI middleware: the API key check, the upload gate and the request-body size limit (all before the body is
read), and the request context (request id, one JSON log line and the Prometheus counters per request, and the
last-resort answer for anything unforeseen)."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from caries_mim.io.decoder_failures import PROGRAM_EXITS
from service.errors import ServiceError, error_response, service_error_response
from service.logs import LOGGER_NAME
from service.metrics import ServiceMetrics

log = logging.getLogger(LOGGER_NAME)
_T = TypeVar("_T")

#: A client's X-Request-ID is echoed only when it is this tame (it lands in logs).
_SAFE_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class RequestTooLarge(HTTPException):
    """Raised from ``receive`` once the body passes the limit; FastAPI re-raises HTTPExceptions from body parsing,
    so the app's handler answers 413 before the rest of the body is read."""

    def __init__(self, limit: int) -> None:
        # The rest of the body is never read: the connection closes after the answer (RFC 9110 15.5.14).
        super().__init__(413, f"the request body exceeds the limit of {limit} bytes", {"Connection": "close"})


#: Routes under this prefix need a key when keys are configured; probes, /metrics and the docs stay open.
PROTECTED_PREFIX = "/v1/"


def api_key_refusal(authorization: str, keys: frozenset[str]) -> ServiceError | None:
    """None when ``authorization`` (the header's value) is ``Bearer <one of keys>`` or no keys are configured,
    else the 401 to answer."""
    if not keys:
        return None
    scheme, _, token = authorization.partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token.strip():
        return ServiceError(401, "unauthorized", "an API key is required: Authorization: Bearer <key>", challenge)
    offered = token.strip().encode()
    # compare_digest on every key: the time taken does not tell how much of a key was right.
    if not any(hmac.compare_digest(offered, key.encode()) for key in keys):
        return ServiceError(401, "unauthorized", "the API key is not valid", challenge)
    return None


class ApiKeyGate:
    """401 for a request under ``/v1/`` (or the ``prefixes`` given) without a valid ``Authorization: Bearer`` key,
    decided from the headers: the upload of a client without a key is never parsed or held in memory.

    The refusal is answered by :func:`refuse_unread` (the body is never kept).
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: frozenset[str],
        max_bytes: int,
        timeout_s: float,
        prefixes: tuple[str, ...] = (PROTECTED_PREFIX,),
    ) -> None:
        self.app = app
        self.keys = keys
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith(self.prefixes):
            headers = dict(scope.get("headers") or [])
            refusal = api_key_refusal(headers.get(b"authorization", b"").decode("latin-1"), self.keys)
            if refusal is not None:
                await refuse_unread(scope, receive, send, refusal, self.max_bytes, self.timeout_s)
                return
        await self.app(scope, receive, send)


async def refuse_unread(
    scope: Scope, receive: Receive, send: Send, refusal: ServiceError, max_bytes: int, timeout_s: float
) -> None:
    """Answer ``refusal`` to a request whose body is not wanted, without keeping any of it.

    A client that sent ``Expect: 100-continue`` (curl does for bodies over 1 MB) gets the answer before it sends
    its body. Any other client is already sending it: the body is read and dropped first, because answering under a
    client still writing makes uvicorn close the connection, which most HTTP libraries report as a broken pipe
    instead of the answer. The dropping stops past ``max_bytes`` or ``timeout_s`` (a client trickling a body must
    not hold the connection for ever); the answer then says ``Connection: close``.
    """
    if dict(scope.get("headers") or []).get(b"expect", b"").lower() != b"100-continue":
        deadline = asyncio.get_running_loop().time() + timeout_s
        try:
            complete = await _before(deadline, _discard_body(receive, max_bytes))
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            complete = False
        if not complete:
            refusal.headers["Connection"] = "close"
    await service_error_response(refusal)(scope, receive, send)


async def _discard_body(receive: Receive, max_bytes: int) -> bool:
    """Read the request body to its end (or past ``max_bytes``, or the client's disconnect), keeping none of it.
    True when it ended within ``max_bytes``."""
    received = 0
    while received <= max_bytes:
        message = await receive()
        if message["type"] != "http.request":
            return False
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            return True
    return False


class UploadTimedOut(HTTPException):
    """Raised from ``receive`` when the body is still incomplete at the upload deadline; like
    :class:`RequestTooLarge`, it reaches the app's handler, which answers 408."""

    def __init__(self, timeout_s: float) -> None:
        # The rest of the body is never read: the connection closes after the answer (RFC 9110 15.5.9).
        super().__init__(408, f"the upload did not complete within {timeout_s:g} s", {"Connection": "close"})


#: Key in ``scope["state"]`` of the callable that gives an upload's slot back (once decoded).
RELEASE_UPLOAD_SLOT = "release_upload_slot"


class UploadGate:
    """Bounds the prediction uploads in progress (received, parsed and decoded) and how long a body may take.

    An upload past ``max_concurrent`` gets 503 ``busy`` with Retry-After at once; its body is dropped unread
    (:func:`refuse_unread`), so it costs no memory. A body still incomplete ``timeout_s`` after the request
    started gets 408 ``upload_timeout``: a slow or stalled client cannot hold a slot for ever. A route gives its
    slot back early through ``scope["state"][RELEASE_UPLOAD_SLOT]`` once the upload is decoded; the request's
    end gives it back otherwise. Everything runs on the event loop, so the count needs no lock.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_concurrent: int,
        timeout_s: float,
        max_bytes: int,
        retry_after_s: int,
        metrics: ServiceMetrics,
    ) -> None:
        self.app = app
        self.max_concurrent = max_concurrent
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.in_progress = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        if self.in_progress >= self.max_concurrent:
            self.metrics.uploads_refused.labels("busy").inc()
            refusal = ServiceError(
                503,
                "busy",
                f"{self.in_progress} uploads are already in progress; retry shortly",
                {"Retry-After": str(self.retry_after_s)},
            )
            await refuse_unread(scope, receive, send, refusal, self.max_bytes, self.timeout_s)
            return
        release = self._take_slot()
        scope.setdefault("state", {})[RELEASE_UPLOAD_SLOT] = release
        try:
            await self.app(scope, self._with_deadline(receive), send)
        finally:
            release()

    def _take_slot(self) -> Callable[[], None]:
        self.in_progress += 1
        self.metrics.uploads_in_progress.inc()
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_progress -= 1
                self.metrics.uploads_in_progress.dec()

        return release

    def _with_deadline(self, receive: Receive) -> Receive:
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        body_complete = False

        async def receive_before_deadline() -> Message:
            nonlocal body_complete
            if body_complete:  # afterwards the app only listens for the disconnect: no deadline for that
                return await receive()
            try:
                message = await _before(deadline, receive())
            except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
                self.metrics.uploads_refused.labels("timeout").inc()
                raise UploadTimedOut(self.timeout_s) from None
            body_complete = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        return receive_before_deadline


async def _before(deadline: float, awaitable: Awaitable[_T]) -> _T:
    """``await awaitable`` until ``deadline`` (event loop time), else TimeoutError.

    A 2 MB upload arrives in some 35 chunks: ``asyncio.timeout_at`` (Python 3.11+) arms one timer handle per chunk
    in the running task, where ``wait_for`` makes a task of every chunk's wait (about 1.5 ms per upload)."""
    if sys.version_info >= (3, 11):
        async with asyncio.timeout_at(deadline):
            return await awaitable
    return await asyncio.wait_for(awaitable, max(0.0, deadline - asyncio.get_running_loop().time()))


class BodySizeLimit:
    """413 for bodies over ``max_bytes``: at once when Content-Length says so, else as soon as the streamed
    chunks add up to more (chunked uploads declare no length)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = error_response(
                413, "payload_too_large", f"the request body exceeds the limit of {self.max_bytes} bytes"
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited_receive, send)


class RequestContext:
    """Gives each request an id (``scope["state"]["request_id"]``, echoed as X-Request-ID), then logs it and counts
    it by route template and status once answered.

    It is also the one place for the unforeseen: whatever escapes the application, ``BaseException`` included (a
    Rust panic is one), is logged once with its traceback and answered as 500 in the JSON error shape with the
    request id, unless an answer has already begun. (Starlette's error middleware sits outside every middleware
    added to the app, so errors reach this one first; and it catches only ``Exception``.) Cancellation and the
    program's own exits (KeyboardInterrupt, SystemExit) pass through."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        request_id = offered if _SAFE_REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500
        answered = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, answered
            if message["type"] == "http.response.start":
                status = message["status"]
                answered = True
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode("ascii"))]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except (asyncio.CancelledError, *PROGRAM_EXITS):
            raise
        except BaseException as error:
            log.error(
                "unhandled error",
                exc_info=(type(error), error, error.__traceback__),
                extra={"fields": {"request_id": request_id}},
            )
            if not answered:
                message = f"the service failed; quote request id {request_id}"
                await error_response(500, "internal_error", message)(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = scope.get("route")
            template = getattr(route, "path", "unmatched")
            self.metrics.requests.labels(template, scope["method"], str(status)).inc()
            self.metrics.latency.labels(template).observe(elapsed)
            log.info(
                "request",
                extra={
                    "fields": {
                        "request_id": request_id,
                        "method": scope["method"],
                        "route": template,
                        "status": status,
                        "duration_ms": round(1000.0 * elapsed, 2),
                    }
                },
            )
