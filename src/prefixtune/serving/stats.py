"""EngineStats: the one set of counters an engine keeps (its registry writes the adapter ones); /metrics reads it.

Plain numbers, no metrics library: engines also run offline (`generate --backend`) without the serve extra, and
serving/metrics.py turns these into Prometheus metrics at scrape time. Written by the worker thread and, for adapter
loads, under the registry's lock; readers take a consistent-enough snapshot (each field is one int or float).
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

LOAD_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass
class EngineStats:
    prompt_tokens: int = 0  # prefilled
    completion_tokens: int = 0  # generated (every sampled token, EOS included)
    decode_steps: int = 0  # model forward passes of the worker
    batch_sizes: Counter = field(default_factory=Counter)  # rows in one step -> how many steps had that many
    prefix_loads: int = 0  # vLLM: prefix key/values written into its KV cache (again after a preemption)
    prefix_tokens_loaded: int = 0
    adapter_hits: int = 0  # requests whose adapter was resident
    adapter_misses: int = 0  # loads on demand
    adapter_evictions: int = 0
    adapter_load_failures: int = 0
    adapter_load_counts: list[int] = field(default_factory=lambda: [0] * (len(LOAD_SECONDS_BUCKETS) + 1))  # per bucket, +Inf last
    adapter_load_seconds: float = 0.0  # their sum

    # ---- what the modules record -------------------------------------------------------------------------
    def prefilled(self, tokens: int) -> None:
        self.prompt_tokens += tokens

    def generated(self, tokens: int = 1) -> None:
        self.completion_tokens += tokens

    def stepped(self, rows: int) -> None:
        self.decode_steps += 1
        self.batch_sizes[rows] += 1

    def prefix_loaded(self, loads: int, tokens: int) -> None:
        self.prefix_loads += loads
        self.prefix_tokens_loaded += tokens

    def adapter_hit(self, requests: int = 1) -> None:
        self.adapter_hits += requests

    def adapter_missed(self) -> None:
        self.adapter_misses += 1

    def adapter_evicted(self) -> None:
        self.adapter_evictions += 1

    def adapter_load_failed(self) -> None:
        self.adapter_load_failures += 1

    def adapter_loaded(self, seconds: float) -> None:
        self.adapter_load_counts[bisect.bisect_left(LOAD_SECONDS_BUCKETS, seconds)] += 1
        self.adapter_load_seconds += seconds

    # ---- what readers ask ----------------------------------------------------------------------------------
    @property
    def adapter_loads(self) -> int:
        return sum(self.adapter_load_counts)

    def mean_adapter_load_seconds(self) -> float:
        return self.adapter_load_seconds / max(self.adapter_loads, 1)
