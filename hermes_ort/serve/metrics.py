"""GET /metrics: Prometheus' text format, written by prometheus_client from what the scheduler
and the process report at scrape time (a collector, so nothing is counted twice)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hermes_ort.serve.served_model import ServedModel
from hermes_ort.streaming.memory import process_peak_rss_bytes

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class ServerMetrics:
    """Requests by endpoint and status (counted by the app), the rest read when scraped."""

    def __init__(self, served: ServedModel) -> None:
        self.served = served
        self.requests: Counter[tuple[str, int]] = Counter()  # (endpoint, status) -> count
        self.process = psutil.Process()
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def count(self, endpoint: str, status: int) -> None:
        self.requests[(endpoint, status)] += 1

    def text(self) -> bytes:
        return generate_latest(self.registry)

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "hermes_requests", "Requests answered", labels=["endpoint", "status"]
        )
        for (endpoint, status), n in sorted(self.requests.items()):
            requests.add_metric([endpoint, str(status)], n)
        yield requests
        yield GaugeMetricFamily(
            "hermes_resident_bytes",
            "The server's resident set",
            value=self.process.memory_info().rss,
        )
        yield GaugeMetricFamily(
            "hermes_peak_resident_bytes",
            "The server's highest resident set since it started (what the budget bounds)",
            value=process_peak_rss_bytes(),
        )
        plan = self.served.model.plan
        if plan.budget_bytes is not None:
            yield GaugeMetricFamily(
                "hermes_budget_bytes", "The memory budget", value=plan.budget_bytes
            )
        s = self.served.scheduler.stats() if self.served.scheduler else None
        if s is None:
            return
        for name, doc, value in (
            ("hermes_queue_length", "Requests waiting for a row", s.waiting),
            ("hermes_requests_in_flight", "Requests decoding", s.running),
            ("hermes_tokens_per_second", "Tokens generated per second, last 10 s", s.tokens_per_s),
            ("hermes_kv_cache_bytes", "The running batch's KV cache", s.kv_cache_bytes),
        ):
            yield GaugeMetricFamily(name, doc, value=value)
        if s.kv_pool_bytes is not None:
            yield GaugeMetricFamily(
                "hermes_kv_pool_bytes", "The KV cache pool", value=s.kv_pool_bytes
            )
        for name, doc, value in (
            ("hermes_generated_tokens", "Tokens generated", s.tokens_total),
            ("hermes_prompt_tokens", "Prompt tokens prefilled", s.prompt_tokens_total),
            (
                "hermes_passes",
                "Passes of the model (prefill chunks and decode steps)",
                s.passes_total,
            ),
            ("hermes_read_bytes", "Bytes read from storage by the passes", s.bytes_read_total),
        ):
            yield CounterMetricFamily(name, doc, value=value)
