"""Prometheus metrics of one app: requests, latency, model queue and tokens generated.

Each app has its own registry, so several apps in one process (tests) never clash on metric names.
"""

from __future__ import annotations

import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsMiddleware"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """The counters, gauges and histograms the server exports at /metrics."""

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "bsharedrag_requests", "HTTP requests by route, method and status.", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "bsharedrag_request_seconds",
            "Request latency until the last byte (the whole stream for SSE).",
            ["route", "method"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_progress = Gauge("bsharedrag_requests_in_progress", "HTTP requests being served.", registry=r)
        self.tokens = Counter("bsharedrag_generated_tokens", "Answer tokens generated.", ["endpoint"], registry=r)
        self.embedded = Counter("bsharedrag_embedded_texts", "Texts embedded, by kind.", ["kind"], registry=r)
        self.queue_depth = Gauge("bsharedrag_queue_depth", "Model jobs queued or streaming.", registry=r)
        self.kv_reserved = Gauge(
            "bsharedrag_kv_reserved_bytes", "KV cache reserved by the answers being generated.", registry=r
        )
        self.queue_wait = Histogram(
            "bsharedrag_queue_wait_seconds", "Time a model job waited before it started.", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "bsharedrag_search_batch_size", "Searches embedded together in one forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )
        self.documents = Gauge("bsharedrag_documents", "Documents in the index.", registry=r)
        self.updates = Counter("bsharedrag_document_updates", "Documents upserted or deleted.", ["op"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request and times it until its last body byte, labelled by route template."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500}  # stays 500 if the app fails before it starts a response

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            self.metrics.in_progress.dec()
            route, method = _route(scope), scope["method"]
            self.metrics.requests.labels(route, method, str(status["code"])).inc()
            self.metrics.latency.labels(route, method).observe(time.perf_counter() - started)


def _route(scope) -> str:
    """The route's path template (`/v1/documents/{doc_id}`), never the raw path: bounded label values."""
    route = scope.get("route")
    return getattr(route, "path", None) or "unmatched"
