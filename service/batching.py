"""Inference off the event loop: one thread owns the model (it loads it, then runs it on micro-batches of queued
requests).

Requests wait in a bounded queue. The worker takes the first and every other one already waiting, optionally waits
up to ``max_wait_s`` for more to join (never past ``max_batch_size``), and runs them through
``Predictor.predict_batch`` together: on a GPU a batch of 8 costs little more than one image. With no wait (the
service's default) a batch is what queued while the previous batch ran, so it grows with the load and a lone
request is never delayed; on a CPU, where a batch costs its images one after another, that is all batching can
offer. A full queue is refused at once (503 with Retry-After) instead of letting latency
grow without bound; a request whose result has not come within its timeout gets 504, and if it had not started
yet the worker skips it. ``drain()`` stops taking requests and finishes every queued one (SIGTERM).

Every piece of the model's work runs on one OS thread, :class:`ModelThread`; see there why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TypeVar

from caries_mim.errors import CariesMimError
from caries_mim.inference import Findings, Predictor
from caries_mim.io import Radiograph
from service.errors import ServiceError
from service.metrics import ServiceMetrics

log = logging.getLogger("caries_mim.service")

_T = TypeVar("_T")


class ModelThread:
    """The one OS thread that does all of the model's work in the service: loading it, then every batch.

    Why one: PyTorch's CPU kernels run on OpenMP (libgomp), which gives each thread that enters a parallel region a
    team of worker threads of its own. With a second team (say, the model loaded on a start-up thread and run on the
    inference thread) the process manages more OpenMP threads than the machine has cores, and libgomp then lets idle
    workers spin only briefly before they sleep: each of the thousands of parallel regions in a forward pass starts by
    waking one. Loading on one thread and predicting on another made every CPU prediction 4-8% slower (2 cores).

    A daemon thread rather than a ``ThreadPoolExecutor``: the executor joins its threads at interpreter exit, which
    would hang a process whose worker loop was never drained.
    """

    def __init__(self, name: str = "caries-mim-inference") -> None:
        self._calls: queue.SimpleQueue[tuple[Future, Callable[..., object], tuple[object, ...]] | None] = (
            queue.SimpleQueue()
        )
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def submit(self, function: Callable[..., _T], *args: object) -> Future[_T]:
        """Queue ``function(*args)`` for the thread; its result or exception arrives in the future."""
        future: Future[_T] = Future()
        self._calls.put((future, function, args))
        return future

    async def run(self, function: Callable[..., _T], *args: object) -> _T:
        """``function(*args)`` on the model thread, awaited (e.g. loading the package)."""
        return await asyncio.wrap_future(self.submit(function, *args))

    def shutdown(self, *, wait: bool = True) -> None:
        """Finish the calls already queued, then end the thread (``wait``: and wait for that)."""
        self._calls.put(None)
        if wait:
            self._thread.join()

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            future, function, args = call
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as exc:  # handed to whoever awaits the future
                future.set_exception(exc)


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
        thread: the thread the model was loaded on (a new one if None); the worker runs there and shuts it down
            when drained.
        stall_timeout_s: a batch running longer than this is reported by :meth:`problem` (the model hangs).
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
        thread: ModelThread | None = None,
        stall_timeout_s: float = 300.0,
    ) -> None:
        self.predictor = predictor
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self._queue: queue.Queue[_Job] = queue.Queue(maxsize=queue_size)
        self._accepting = True
        self._stopping = threading.Event()
        self._thread = thread or ModelThread()
        self._running: Future[None] | None = None
        self.stall_timeout_s = stall_timeout_s
        self._batch_started: float | None = None  # time.monotonic() of the batch being computed, None when idle

    def start(self) -> None:
        self._running = self._thread.submit(self._run)
        self._running.add_done_callback(self._loop_ended)

    def _loop_ended(self, running: Future[None]) -> None:
        """The inference loop returned (drained) or died: in the second case, log why and answer everyone waiting."""
        error = None if running.cancelled() else running.exception()
        if error is None:
            return
        log.error("the inference loop ended", exc_info=(type(error), error, error.__traceback__))
        while not self._queue.empty():
            with contextlib.suppress(queue.Empty):
                _answer(self._queue.get_nowait(), _set_exception, _thread_stopped())

    def _loop_ended_early(self) -> bool:
        """The inference loop is over though nobody asked it to stop (it died)."""
        return self._running is not None and self._running.done() and not self._stopping.is_set()

    def problem(self) -> str | None:
        """Why this worker can no longer answer (its loop ended, or a batch hangs), or None while it can."""
        if self._loop_ended_early():
            return "the inference thread has stopped"
        started = self._batch_started
        if started is not None:
            running_s = time.monotonic() - started
            if running_s > self.stall_timeout_s:
                return f"a model batch has been running for {running_s:.1f} s (stall limit {self.stall_timeout_s:g} s)"
        return None

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the batch being computed)."""
        return self._queue.qsize()

    async def predict(
        self, radiograph: Radiograph, spacing_mm: tuple[float, float] | None, timeout_s: float
    ) -> InferenceResult:
        """Queue one radiograph and wait for its findings.

        Raises:
            ServiceError: 503 when the queue is full, the service is shutting down or its inference thread has
                stopped; 504 after ``timeout_s``.
            CariesMimError: the predictor refused the image (e.g. a bad spacing).
        """
        if not self._accepting:
            raise ServiceError(503, "shutting_down", "the service is shutting down", self._retry_after())
        if self._loop_ended_early():
            raise _thread_stopped()
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
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            job.future.cancel()
            raise ServiceError(
                504, "timeout", f"no result within {timeout_s:g} s; the model is overloaded", self._retry_after()
            ) from None

    async def drain(self) -> None:
        """Refuse new requests, finish the queued ones, stop the thread.

        A batch past the stall limit is not waited for: the process is being stopped because its model hangs, and
        the model thread (a daemon) is left behind rather than blocking the exit.
        """
        self._accepting = False
        self._stopping.set()
        if self._running is not None:
            # A loop that ended on an error was logged when it ended; draining goes on either way.
            running = asyncio.wrap_future(self._running)
            while not running.done():
                await asyncio.wait([running], timeout=1.0)
                problem = self.problem()
                if problem is not None and not running.done():
                    log.error("not waiting for the model to finish", extra={"fields": {"problem": problem}})
                    return
        await asyncio.to_thread(self._thread.shutdown)

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
            batch = [first]
            try:
                batch.extend(self._more(first))
                self.metrics.queue_depth.set(self.depth)
                live = [job for job in batch if not job.future.cancelled()]
                if live:
                    self._run_batch(live)
            except Exception as exc:  # a fault of the worker itself: its requests hear of it, the next batch runs
                log.exception("the inference worker failed on a batch of %d", len(batch))
                for job in batch:
                    _answer(job, _set_exception, exc)
            except BaseException:  # the loop ends (see _loop_ended): the batch it held hears of it too
                for job in batch:
                    _answer(job, _set_exception, _thread_stopped())
                raise

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
        self._batch_started = time.monotonic()
        try:
            results = self._compute(jobs)
        finally:
            # Cleared before anyone is answered: a probe that follows an answer must not see the batch running.
            self._batch_started = None
        elapsed = time.perf_counter() - started
        self.metrics.batch_size.observe(len(jobs))
        self.metrics.inference_seconds.observe(elapsed)
        for job, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                _answer(job, _set_exception, result)
            else:
                outcome = InferenceResult(
                    findings=result,
                    queue_ms=1000.0 * (started - job.queued_at),
                    inference_ms=1000.0 * elapsed,
                    batch_size=len(jobs),
                )
                _answer(job, _set_result, outcome)

    def _compute(self, jobs: Sequence[_Job]) -> list[Findings | BaseException]:
        """Each job's findings, or the error that job must get."""
        try:
            return list(
                self.predictor.predict_batch(
                    [job.radiograph for job in jobs], spacing_mm=[job.spacing_mm for job in jobs]
                )
            )
        except CariesMimError:
            # One unusable image refuses the whole batch; predict each alone so only that one gets the error.
            return [self._predict_alone(job) for job in jobs]
        except Exception as exc:  # the model itself failed: every waiting request must hear about it
            log.exception("inference failed for a batch of %d", len(jobs))
            return [exc] * len(jobs)

    def _predict_alone(self, job: _Job) -> Findings | BaseException:
        try:
            return self.predictor.predict(job.radiograph, spacing_mm=job.spacing_mm)
        except Exception as exc:  # handed to the waiting request, which maps it to its HTTP answer
            return exc


def _thread_stopped() -> ServiceError:
    return ServiceError(503, "unhealthy", "the inference thread has stopped; the service needs a restart")


def _answer(job: _Job, setter: Callable[..., None], value: object) -> None:
    """Hand a result or an error to the event loop the request waits on (nothing to do if that loop has closed)."""
    with contextlib.suppress(RuntimeError):
        job.loop.call_soon_threadsafe(setter, job.future, value)


def _set_result(future: asyncio.Future, value: InferenceResult) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
