"""Prometheus metrics: HTTP traffic of this process, and job-store gauges read from the database at scrape
time (jobs by status, queue depth, stage durations), so they are right however many workers run elsewhere."""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from workers.jobs import JobStore
from workers.models import JOB_STATUSES


class StoreCollector(Collector):
    """Reads the job store at most every ``ttl`` seconds, however often Prometheus scrapes."""

    def __init__(self, store: JobStore, ttl: float = 2.0):
        self.store = store
        self.ttl = ttl
        self._cached: tuple[float, dict[str, int], dict[str, tuple[int, float]]] | None = None

    def _read(self) -> tuple[dict[str, int], dict[str, tuple[int, float]]]:
        now = time.monotonic()
        if self._cached is None or now - self._cached[0] > self.ttl:
            self._cached = (now, self.store.counts_by_status(), self.store.stage_timings())
        return self._cached[1], self._cached[2]

    def collect(self) -> Iterator:
        try:
            counts, stages = self._read()
        except Exception:  # the database is down: /healthz reports it; scrape what this process knows
            return
        jobs = GaugeMetricFamily("distill_jobs", "Jobs in the store by status", labels=["status"])
        for status in JOB_STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        yield GaugeMetricFamily("distill_queue_depth", "Jobs waiting for a worker", value=counts.get("queued", 0))
        summary = SummaryMetricFamily("distill_job_stage_seconds",
                                      "Stage durations of recent succeeded jobs", labels=["stage"])
        for stage, (count, total) in sorted(stages.items()):
            summary.add_metric([stage], count_value=count, sum_value=total)
        yield summary


class ApiMetrics:
    def __init__(self, store: JobStore):
        self.registry = CollectorRegistry()
        self.requests = Counter("distill_http_requests", "HTTP requests", ["method", "route", "status"],
                                registry=self.registry)
        self.latency = Histogram("distill_http_request_seconds", "HTTP request latency", ["method", "route"],
                                 registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
        self.submitted = Counter("distill_jobs_submitted", "Jobs accepted by POST /jobs", ["method"],
                                 registry=self.registry)
        self.registry.register(StoreCollector(store))
