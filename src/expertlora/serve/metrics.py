"""Prometheus metrics for GET /metrics: per-adapter counts and latencies seen by the server, and
the engine's state (running / waiting requests, KV cache, adapters) read at each scrape.

Each server has its own registry (never the process-wide default), so several servers, or a
server and a benchmark, can live in one process. Base requests carry ``adapter="none"`` (a
name no adapter may take).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..runtime import Engine, RequestOutput

PREFIX = "expertlora"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12)


class Metrics:
    """One server's metrics; ``track()`` follows one request."""

    def __init__(self, engine: Engine):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(f"{PREFIX}_requests", "Finished generation requests", ["adapter", "finish_reason"], registry=r)
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "Prompt tokens of finished requests", ["adapter"], registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "Generated tokens", ["adapter"], registry=r)
        self.errors = Counter(f"{PREFIX}_http_errors", "Error answers, by HTTP status", ["status"], registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "From the request's arrival to its first token",
                              ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "Between consecutive generated tokens",
                             ["adapter"], buckets=TOKEN_BUCKETS, registry=r)
        self.latency = Histogram(f"{PREFIX}_request_latency_seconds", "From the request's arrival to its last token",
                                 ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        r.register(_EngineCollector(engine))

    def track(self, adapter: str | None, arrival: float) -> RequestTracker:
        return RequestTracker(self, adapter or "none", arrival)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTracker:
    """Times one request's outputs as the server receives them (``time.monotonic``)."""

    def __init__(self, metrics: Metrics, adapter: str, arrival: float):
        self.m, self.adapter, self.arrival = metrics, adapter, arrival
        self.last: float | None = None
        self.done = False

    def observe(self, out: RequestOutput) -> None:
        now = time.monotonic()
        n = len(out.new_token_ids)
        if n:
            if self.last is None:
                self.m.ttft.labels(self.adapter).observe(now - self.arrival)
            else:
                gap = (now - self.last) / n
                for _ in range(n):
                    self.m.itl.labels(self.adapter).observe(gap)
            self.last = now
            self.m.generation_tokens.labels(self.adapter).inc(n)
        if out.finished:
            self._finish(out.finish_reason or "abort", out.prompt_tokens, now)

    def abandoned(self, prompt_tokens: int) -> None:
        """The answer ended before the request's final output (the client left): counted as aborted."""
        if not self.done:
            self._finish("abort", prompt_tokens, time.monotonic())

    def _finish(self, reason: str, prompt_tokens: int, now: float) -> None:
        self.done = True
        self.m.requests.labels(self.adapter, reason).inc()
        self.m.prompt_tokens.labels(self.adapter).inc(prompt_tokens)
        self.m.latency.labels(self.adapter).observe(now - self.arrival)


class _EngineCollector:
    """Gauges read from ``engine.stats()`` when Prometheus scrapes."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def describe(self):
        return []  # collected lazily: describing would call stats() at registration

    def collect(self):
        s = self.engine.stats()
        for name, doc, value in (
            ("requests_running", "Requests in the running batch", s.running),
            ("requests_waiting", "Requests queued, not yet running", s.waiting),
            ("kv_cache_usage_ratio", "Share of KV cache slots in use", s.kv_slots_used / max(s.kv_slots, 1)),
            ("kv_cache_slots", "KV cache slots (sequences it can hold)", s.kv_slots),
            ("kv_cache_bytes", "Bytes the KV cache holds", s.kv_cache_bytes),
            ("adapters_loaded", "Adapters loaded", len(s.adapters)),
        ):
            yield GaugeMetricFamily(f"{PREFIX}_{name}", doc, value=value)
        yield CounterMetricFamily(f"{PREFIX}_engine_steps", "Model steps the engine has run", value=s.steps)
        loaded = GaugeMetricFamily(f"{PREFIX}_adapter_loaded", "1 for each loaded adapter", labels=["adapter"])
        for name in s.adapters:
            loaded.add_metric([name], 1)
        yield loaded
