"""The router's Prometheus metrics, in a registry of its own (``mris pacs watch`` serves it on
``MRIS_PACS_METRICS_PORT``; the counters also feed the commands' summaries)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.studies = Counter(
            "mris_pacs_studies",
            "Studies routed, by outcome: synthesized, already_processed, nothing_to_do, failed.",
            ["outcome"],
            registry=self.registry,
        )
        self.instances = Counter(
            "mris_pacs_instances",
            "Instances looked at, by outcome: synthesized, already_processed, skipped.",
            ["outcome"],
            registry=self.registry,
        )
        self.skipped = Counter(
            "mris_pacs_skipped_instances",
            "Instances skipped, by reason (mris.pacs.router.SKIP_REASONS).",
            ["reason"],
            registry=self.registry,
        )
        self.study_seconds = Histogram(
            "mris_pacs_study_seconds",
            "Seconds to route one study (listing, fetching, synthesizing, storing).",
            buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300),
            registry=self.registry,
        )
        self.dead_letters = Counter(
            "mris_pacs_dead_letters",
            "Studies that failed and were written to the dead-letter file.",
            registry=self.registry,
        )
        self.pacs_unreachable = Counter(
            "mris_pacs_unreachable",
            "Times the PACS could not be reached (the watcher waits and tries again).",
            registry=self.registry,
        )
        self.feed_position = Gauge(
            "mris_pacs_feed_position",
            "Sequence number of the last change of Orthanc's feed the watcher has finished.",
            registry=self.registry,
        )

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        """Serve ``/metrics`` on ``host:port`` from a daemon thread."""
        from prometheus_client import start_http_server

        start_http_server(port, addr=host, registry=self.registry)
