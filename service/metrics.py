"""Prometheus metrics of one application instance (its own registry, so tests and several apps never collide).

With several uvicorn workers each process counts its own requests, and a scrape reaches one of them at random.
``caries-mim serve --workers N`` (N > 1) therefore runs prometheus-client's multiprocess mode: it points
``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory before the workers start, every worker's metrics live in files
there, and ``/metrics`` answers with their sum over all workers, whichever worker answers.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, multiprocess

#: prometheus-client's switch for multiprocess mode; it must be set before the worker processes import it.
MULTIPROCESS_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"

#: Seconds; from a fast GPU batch to a slow CPU panoramic.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def multiprocess_mode() -> bool:
    """Whether metrics go to the shared directory (several workers) rather than this process's memory."""
    return bool(os.environ.get(MULTIPROCESS_DIR_VARIABLE))


class ServiceMetrics:
    """Requests by route and status, latency, inference time, queue depth and batch sizes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "caries_mim_requests", "HTTP requests answered", ["route", "method", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "caries_mim_request_seconds",
            "HTTP request latency, receipt to response",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.inference_seconds = Histogram(
            "caries_mim_inference_seconds", "model time per batch", buckets=_LATENCY_BUCKETS, registry=self.registry
        )
        self.batch_size = Histogram(
            "caries_mim_batch_size",
            "requests per model batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        # Several workers: the requests waiting in all live workers together.
        self.queue_depth = Gauge(
            "caries_mim_queue_depth",
            "requests waiting for the model",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.rejected = Counter(
            "caries_mim_rejected", "requests refused because the queue was full", registry=self.registry
        )
        self.uploads_in_progress = Gauge(
            "caries_mim_uploads_in_progress",
            "prediction uploads being received, parsed or decoded",
            registry=self.registry,
            multiprocess_mode="livesum",
        )
        self.uploads_refused = Counter(
            "caries_mim_uploads_refused",
            "uploads refused at the door: busy (too many in progress) or timeout (body too slow)",
            ["reason"],
            registry=self.registry,
        )
        self.decoder_restarts = Counter(
            "caries_mim_decoder_restarts",
            "decode workers replaced: crash, timeout, memory, dead (died while idle), invalid_reply, interrupted",
            ["reason"],
            registry=self.registry,
        )

    def exposition(self) -> bytes:
        """The Prometheus text format: this application's metrics, or in multiprocess mode all workers' summed."""
        if not multiprocess_mode():
            return generate_latest(self.registry)
        _forget_dead_workers(Path(os.environ[MULTIPROCESS_DIR_VARIABLE]))
        everyone = CollectorRegistry()
        multiprocess.MultiProcessCollector(everyone)
        return generate_latest(everyone)

    def process_exiting(self) -> None:
        """Drop this process's live gauges from the shared directory (a worker shutting down); its counts stay."""
        if multiprocess_mode():
            multiprocess.mark_process_dead(os.getpid())


def _forget_dead_workers(directory: Path) -> None:
    """Drop the live gauges of workers that died without shutting down (killed, out of memory): their last queue
    depth would otherwise stay in the sum. Their counters stay, as totals should."""
    pids = set()
    for path in directory.glob("gauge_live*_*.db"):
        with contextlib.suppress(ValueError):
            pids.add(int(path.stem.rsplit("_", 1)[1]))
    for pid in pids:
        if not _alive(pid):
            multiprocess.mark_process_dead(pid, str(directory))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
