"""Prometheus metrics of one application instance (its own registry, so tests and several apps never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Seconds; from a fast GPU batch to a slow CPU panoramic.
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


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
        self.queue_depth = Gauge("caries_mim_queue_depth", "requests waiting for the model", registry=self.registry)
        self.rejected = Counter(
            "caries_mim_rejected", "requests refused because the queue was full", registry=self.registry
        )
