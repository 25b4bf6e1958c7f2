"""Turning an upload into a :class:`~caries_mim.io.Radiograph`: in isolated worker processes by default.

Uploads come from anywhere, so their pixel data is decoded by :class:`~caries_mim.io.isolation.IsolatedReader`: a
decoder that crashes, hangs or blows its memory limit costs that request a 422 or 504 and a replaced worker; every
other request goes on, and the decode runs outside this process's GIL. ``decode_workers = 0`` decodes in a thread
of the server process instead (trusted input only).

At most ``decode_workers`` requests wait inside the pool; the others wait here, on the event loop, so a burst of
uploads never fills the thread pool that rendering and file reads also need.
"""

from __future__ import annotations

import asyncio
import logging

from fastapi.concurrency import run_in_threadpool

from caries_mim.errors import DecoderUnavailableError
from caries_mim.io import Radiograph, ReadOptions, read_radiograph
from caries_mim.io.isolation import DEFAULT_WAIT_S, IsolatedReader, ReadFunction
from service.logs import LOGGER_NAME
from service.metrics import ServiceMetrics
from service.settings import ServiceSettings

log = logging.getLogger(LOGGER_NAME)


class UploadDecoder:
    """Decodes uploads for the routes; :meth:`start` and :meth:`close` belong to the application's lifespan."""

    def __init__(
        self,
        settings: ServiceSettings,
        options: ReadOptions,
        metrics: ServiceMetrics,
        read_function: ReadFunction = read_radiograph,
    ) -> None:
        self.settings = settings
        self.options = options
        self.metrics = metrics
        self.read_function = read_function
        self.reader: IsolatedReader | None = None
        self._slots: asyncio.Semaphore | None = None

    async def start(self) -> None:
        """Start the worker processes (a fraction of a second each).

        Raises:
            DecoderUnavailableError: they cannot start (the message says why).
        """
        workers = self.settings.decode_workers
        if workers == 0:
            return
        self.reader = await asyncio.to_thread(
            IsolatedReader,
            workers,
            timeout_s=self.settings.decode_timeout_s,
            memory_mb=self.settings.decode_memory_mb,
            read_function=self.read_function,
            on_replaced=self._replaced,
        )
        self._slots = asyncio.Semaphore(workers)

    async def read(self, data: bytes) -> Radiograph:
        """The upload's radiograph.

        Raises:
            CariesMimError: the file cannot be used (see ``read_radiograph``), the decoder crashed on it
                (``corrupt_pixel_data``), overran its time (``decode_timeout``) or memory (``image_too_large``),
                or no decoder came free in time (``decoder_unavailable``).
        """
        if self.reader is None or self._slots is None:
            return await run_in_threadpool(self.read_function, data, self.options)
        # One wait for a worker, DEFAULT_WAIT_S in all: first for a slot here, then (while a crashed worker's
        # successor starts) in the pool.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DEFAULT_WAIT_S
        try:
            await asyncio.wait_for(self._slots.acquire(), DEFAULT_WAIT_S)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            raise DecoderUnavailableError(
                f"all {self.reader.size} decode workers stayed busy for {DEFAULT_WAIT_S:g} s; retry shortly"
            ) from None
        try:
            remaining = max(0.0, deadline - loop.time())
            return await run_in_threadpool(self.reader.read, data, self.options, wait_s=remaining)
        finally:
            self._slots.release()

    def problem(self) -> str | None:
        """Why uploads cannot be decoded now (no worker runs and none can start), or None."""
        reader = self.reader
        if reader is None or reader.alive or reader.start_problem is None:
            return None
        return f"no decode worker is running: {reader.start_problem}"

    def close(self) -> None:
        if self.reader is not None:
            self.reader.close()

    def _replaced(self, reason: str) -> None:
        self.metrics.decoder_restarts.labels(reason).inc()
        log.warning("decode worker replaced", extra={"fields": {"reason": reason}})
