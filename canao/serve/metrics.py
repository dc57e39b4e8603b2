"""What `GET /metrics` reports, in Prometheus' text format (prometheus-client, one registry per app):

    canao_requests_total{route, status}            requests answered, by route and HTTP status
    canao_request_seconds{route}                   request latency (to the last byte, streams included)
    canao_queue_depth{kind, model}                 calls running or waiting per model, at scrape time
    canao_model_calls_total{kind, model, outcome}  served / rejected (busy) / cancelled (client left)
    canao_generated_tokens_total{model}            tokens generated
    canao_decode_tokens_per_second{model}          each generation's decode rate
    canao_batch_size{model}                        QA requests answered together (dynamic batching)
    canao_decode_steps_total{model}                batched decode steps of a generator with slots
    canao_decode_step_tokens_total{model}          sequences those steps advanced (/ steps: the mean batch)
"""

from __future__ import annotations

import time
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
RATE_BUCKETS = (1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 300)


class _Workers:
    """Queue depths and call counts read from the model workers when Prometheus scrapes."""

    def __init__(self, workers: Iterable):
        self.workers = list(workers)

    def collect(self):
        depth = GaugeMetricFamily("canao_queue_depth", "calls running or waiting per model", labels=["kind", "model"])
        calls = CounterMetricFamily("canao_model_calls", "model calls by outcome", labels=["kind", "model", "outcome"])
        steps = CounterMetricFamily("canao_decode_steps", "batched decode steps (generators with slots)", labels=["model"])
        stepped = CounterMetricFamily("canao_decode_step_tokens", "sequences advanced by those steps", labels=["model"])
        for w in self.workers:
            depth.add_metric([w.kind, w.id], w.load)
            for outcome, n in (("served", w.served), ("rejected", w.rejected), ("cancelled", w.cancelled)):
                calls.add_metric([w.kind, w.id, outcome], n)
            batcher = getattr(getattr(w.model, "model", None), "batcher", None)  # Generator -> SlotLM
            if batcher is not None:
                steps.add_metric([w.id], batcher.steps)
                stepped.add_metric([w.id], batcher.batched_tokens)
        yield depth
        yield calls
        yield steps
        yield stepped


class ServerMetrics:
    def __init__(self, workers: Iterable):
        self.registry = CollectorRegistry()
        self.requests = Counter("canao_requests", "requests answered", ["route", "status"], registry=self.registry)
        self.latency = Histogram("canao_request_seconds", "request latency, to the last byte", ["route"],
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("canao_generated_tokens", "tokens generated", ["model"], registry=self.registry)
        self.rate = Histogram("canao_decode_tokens_per_second", "decode rate of each generation", ["model"],
                              buckets=RATE_BUCKETS, registry=self.registry)
        self.batch = Histogram("canao_batch_size", "QA requests answered together", ["model"],
                               buckets=(1, 2, 4, 8, 16, 32), registry=self.registry)
        self.registry.register(_Workers(workers))

    def generation(self, model: str, result: dict) -> None:
        self.tokens.labels(model).inc(int(result.get("generated_tokens") or 0))
        if result.get("tokens_per_s"):
            self.rate.labels(model).observe(float(result["tokens_per_s"]))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetrics:
    """Pure ASGI middleware: count and time the API's requests (the route's path; static files and the
    page are left out), with the status the client got, to the end of a streamed body."""

    PREFIXES = ("/api/", "/v1/")

    def __init__(self, app, metrics: ServerMetrics, routes: Iterable[str]):
        self.app, self.metrics, self.routes = app, metrics, set(routes)

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "")
        if scope["type"] != "http" or not path.startswith(self.PREFIXES):
            return await self.app(scope, receive, send)
        route = path if path in self.routes else "other"  # unknown paths share one label: no label explosion
        status, t0 = [500], time.perf_counter()

        async def observe(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observe)
        finally:
            self.metrics.requests.labels(route, str(status[0])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - t0)
