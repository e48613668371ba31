"""/metrics through prometheus_client: one registry per app (tests build several apps in one process).

The HTTP layer's own counts (requests by endpoint and status, latency) are prometheus_client metrics updated as
requests end; the engine's (stats.EngineStats, queue, batch, adapters) are read at scrape time by a collector,
so the engine itself needs no metrics library.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder

from .engine import Engine
from .stats import LOAD_SECONDS_BUCKETS

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServerMetrics:
    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry()
        self.requests = Counter("prefixtune_requests", "Requests by endpoint and HTTP status.", ["endpoint", "status"],
                                registry=self.registry)
        self.latency = Histogram("prefixtune_request_latency_seconds", "Latency of successful generation requests.",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(engine))

    def record(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(endpoint=endpoint, status=str(status)).inc()
        if seconds is not None and status < 400:
            self.latency.observe(seconds)

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) in the format the scraper asks for (Prometheus text, or OpenMetrics)."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type


def _histogram(name: str, help_: str, bounds, counts: list[int], total: float) -> HistogramMetricFamily:
    """counts: per bucket (not cumulative), the last one past every bound (+Inf)."""
    cumulative, running = [], 0
    for bound, c in zip([*map(str, bounds), "+Inf"], counts):
        running += c
        cumulative.append((bound, running))
    return HistogramMetricFamily(name, help_, buckets=cumulative, sum_value=total)


class EngineCollector:
    """The engine's counters and gauges, read when /metrics is scraped."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def collect(self):
        engine, reg = self.engine, self.engine.registry
        s = engine.stats
        for name, help_, value in (
            ("prefixtune_prompt_tokens", "Prompt tokens prefilled.", s.prompt_tokens),
            ("prefixtune_generation_tokens", "Tokens generated.", s.completion_tokens),
            ("prefixtune_decode_steps", "Batched decode forward passes.", s.decode_steps),
            ("prefixtune_adapter_hits", "Requests whose adapter was resident.", s.adapter_hits),
            ("prefixtune_adapter_misses", "Adapter loads on demand.", s.adapter_misses),
            ("prefixtune_adapter_evictions", "Adapters evicted to stay within the budget.", s.adapter_evictions),
            ("prefixtune_adapter_load_failures", "Adapter loads that failed.", s.adapter_load_failures),
        ):
            yield CounterMetricFamily(name, help_, value=value)
        for name, help_, value in (
            ("prefixtune_queue_depth", "Requests waiting for a batch slot.", engine.queue_depth),
            ("prefixtune_batch_size", "Rows in the running batch now.", engine.running),
            ("prefixtune_adapters_known", "Adapters the server can serve (indexed).", len(engine.adapter_names())),
            ("prefixtune_adapters_loaded", "Adapters resident in memory.", len(reg.resident_names())),
            ("prefixtune_adapter_bytes", "Bytes the resident adapters hold.", reg.resident_bytes()),
        ):
            yield GaugeMetricFamily(name, help_, value=value)
        yield _histogram("prefixtune_adapter_load_seconds", "Time to load an adapter on demand.", LOAD_SECONDS_BUCKETS,
                         list(s.adapter_load_counts), s.adapter_load_seconds)
        sizes = dict(s.batch_sizes)
        per_bucket = [sum(c for n, c in sizes.items() if lo < n <= hi)
                      for lo, hi in zip((0, *BATCH_BUCKETS), (*BATCH_BUCKETS, float("inf")))]
        yield _histogram("prefixtune_step_batch_size", "Rows per decode step.", BATCH_BUCKETS, per_bucket,
                         sum(n * c for n, c in sizes.items()))
