"""Inference off the event loop: one worker thread runs the model on micro-batches of queued requests.

Requests wait in a bounded queue. The worker takes the first and every other one already waiting, optionally waits
up to ``max_wait_s`` for more to join (never past ``max_batch_size``), and runs them through
``Predictor.predict_batch`` together: on a GPU a batch of 8 costs little more than one image. With no wait (the
service's default) a batch is what queued while the previous batch ran, so it grows with the load and a lone
request is never delayed; on a CPU, where a batch costs its images one after another, that is all batching can
offer. A full queue is refused at once (503 with Retry-After) instead of letting latency
grow without bound; a request whose result has not come within its timeout gets 504, and if it had not started
yet the worker skips it. ``drain()`` stops taking requests and finishes every queued one (SIGTERM).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from caries_mim.errors import CariesMimError
from caries_mim.inference import Findings, Predictor
from caries_mim.io import Radiograph
from service.errors import ServiceError
from service.metrics import ServiceMetrics

log = logging.getLogger("caries_mim.service")


@dataclass(eq=False)
class _Job:
    radiograph: Radiograph
    spacing_mm: tuple[float, float] | None
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None


@dataclass(frozen=True)
class InferenceResult:
    """A request's findings and where its time went (milliseconds)."""

    findings: Findings
    queue_ms: float
    inference_ms: float
    batch_size: int


class InferenceWorker:
    """Micro-batching inference in a dedicated thread.

    Args:
        predictor: the loaded model.
        max_batch_size: most requests per forward pass (>= 1).
        max_wait_s: how long the first request of a batch waits for company (0: never waits).
        queue_size: most requests waiting; one more is refused with 503.
        retry_after_s: the Retry-After value of that 503.
        metrics: where queue depth, batch sizes and inference times are recorded.
    """

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_batch_size: int,
        max_wait_s: float,
        queue_size: int,
        retry_after_s: int,
        metrics: ServiceMetrics,
    ) -> None:
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=queue_size)
        self._accepting = True
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="caries-mim-inference", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being computed)."""
        return self._queue.qsize()

    async def predict(
        self, radiograph: Radiograph, spacing_mm: tuple[float, float] | None, timeout_s: float
    ) -> InferenceResult:
        """Queue one radiograph and wait for its findings.

        Raises:
            ServiceError: 503 when the queue is full or the service is shutting down, 504 after ``timeout_s``.
            CariesMimError: the predictor refused the image (e.g. a bad spacing).
        """
        if not self._accepting:
            raise ServiceError(503, "shutting_down", "the service is shutting down", self._retry_after())
        loop = asyncio.get_running_loop()
        job = _Job(radiograph, spacing_mm, loop, loop.create_future())
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            self.metrics.rejected.inc()
            raise ServiceError(
                503, "busy", f"{self._queue.maxsize} requests are already waiting; retry shortly", self._retry_after()
            ) from None
        self.metrics.queue_depth.set(self.depth)
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout_s)
        except TimeoutError:
            job.future.cancel()
            raise ServiceError(504, "timeout", f"no result within {timeout_s:g} s; the model is overloaded") from None

    async def drain(self) -> None:
        """Refuse new requests, finish the queued ones, stop the thread."""
        self._accepting = False
        self._stopping.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}

    def _run(self) -> None:
        while True:
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._stopping.is_set():
                    return
                continue
            batch = [first, *self._more(first)]
            self.metrics.queue_depth.set(self.depth)
            live = [job for job in batch if not job.future.cancelled()]
            if live:
                self._run_batch(live)

    def _more(self, first: _Job) -> list[_Job]:
        """Jobs that arrive within ``max_wait_s`` of the first one, up to the batch size."""
        more: list[_Job] = []
        deadline = time.perf_counter() + self.max_wait_s
        while len(more) + 1 < self.max_batch_size:
            remaining = deadline - time.perf_counter()
            try:
                more.append(self._queue.get_nowait() if remaining <= 0 else self._queue.get(timeout=remaining))
            except queue.Empty:
                break
        return more

    def _run_batch(self, jobs: Sequence[_Job]) -> None:
        started = time.perf_counter()
        for job in jobs:
            job.started_at = started
        try:
            results: list[Findings | BaseException] = list(
                self.predictor.predict_batch(
                    [job.radiograph for job in jobs], spacing_mm=[job.spacing_mm for job in jobs]
                )
            )
        except CariesMimError:
            # One unusable image refuses the whole batch; predict each alone so only that one gets the error.
            results = [self._predict_alone(job) for job in jobs]
        except Exception as exc:  # the model itself failed: every waiting request must hear about it
            log.exception("inference failed for a batch of %d", len(jobs))
            results = [exc] * len(jobs)
        elapsed = time.perf_counter() - started
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.inference_seconds.observe(elapsed)
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                job.loop.call_soon_threadsafe(_set_exception, job.future, result)
            else:
                outcome = InferenceResult(
                    findings=result,
                    queue_ms=1000.0 * (started - job.queued_at),
                    inference_ms=1000.0 * elapsed,
                    batch_size=len(jobs),
                )
                job.loop.call_soon_threadsafe(_set_result, job.future, outcome)

    def _predict_alone(self, job: _Job) -> Findings | BaseException:
        try:
            return self.predictor.predict(job.radiograph, spacing_mm=job.spacing_mm)
        except Exception as exc:  # handed to the waiting request, which maps it to its HTTP answer
            return exc


def _set_result(future: asyncio.Future, value: InferenceResult) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
