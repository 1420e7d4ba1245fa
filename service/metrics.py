"""Prometheus metrics of one app instance (own registry, so tests can start several apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "mris_requests_total",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "mris_request_seconds",
            "HTTP request latency by route and status",
            ["route", "status"],
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "mris_batch_size",
            "Knee ROIs per encoder/search batch",
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "mris_queue_depth", "Knee ROIs waiting for the encoder", registry=self.registry
        )
        self.bundle = Gauge(
            "mris_bundle_info",
            "Served bundle (value 1) by index version and variant",
            ["index_version", "variant"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "mris_reloads_total", "Bundle reloads by outcome", ["outcome"], registry=self.registry
        )

    def set_bundle(self, index_version: str, variant: str) -> None:
        self.bundle.clear()
        self.bundle.labels(index_version=index_version, variant=variant).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
