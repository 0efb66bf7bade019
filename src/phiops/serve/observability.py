"""The service's ``phiops_*`` Prometheus series, and the middleware that times each request.

Latency as a client feels it: ``phiops_time_to_first_token_seconds`` (request admitted to its
first generated token) and ``phiops_inter_token_latency_seconds`` (between tokens of one choice),
both histograms. Load: ``phiops_queue_depth`` (requests waiting for a batch row),
``phiops_batch_rows_active`` and ``phiops_kv_cache_tokens`` (KV positions held, padding included;
whole pages with the paged pool), and with the paged pool on CUDA ``phiops_kv_pages_free`` and
``phiops_preempted_total`` (rows taken out of a full pool, to resume later), sampled from the engine's counters twice a second (BentoML's multiprocess registry cannot call
back into the engine at scrape time).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class Metrics:
    """The phiops Prometheus series; created once per process (BentoML's /metrics collects them)."""

    def __init__(self) -> None:
        # Imported here, not at module import: BentoML sets PROMETHEUS_MULTIPROC_DIR in the worker
        # after importing this module, and prometheus_client reads it at import.
        import prometheus_client as prom

        def get(kind: Callable[..., Any], name: str, doc: str, **kw: Any) -> Any:
            existing = prom.REGISTRY._names_to_collectors.get(name)  # re-imported service (tests)
            return existing if existing is not None else kind(name, doc, **kw)

        self.duration = get(prom.Histogram, "phiops_request_duration_seconds",
                            "Time from request to last byte of the response, by route and status.",
                            labelnames=["route", "status"],
                            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 60, 120, 300))
        self.generated = get(prom.Counter, "phiops_generated_tokens",
                             "Tokens generated (sampled), all requests, warm-up included.")
        self.prompt = get(prom.Counter, "phiops_prompt_tokens", "Prompt tokens prefilled.")
        self.forward = get(prom.Counter, "phiops_forward_passes", "Model forward passes, by phase.",
                           labelnames=["phase"])
        self.batch = get(prom.Histogram, "phiops_batch_rows", "Rows (requests) per forward pass, by phase.",
                         labelnames=["phase"], buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.running = get(prom.Gauge, "phiops_requests_running",
                           "Requests in a route handler (a stream counts until its last byte is sent).",
                           multiprocess_mode="livesum")
        self.ttft = get(prom.Histogram, "phiops_time_to_first_token_seconds",
                        "From submitting a request's rows to its first generated token.",
                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.itl = get(prom.Histogram, "phiops_inter_token_latency_seconds",
                       "Time between two generated tokens of one choice.",
                       buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.queue = get(prom.Gauge, "phiops_queue_depth", "Requests waiting for a batch row.",
                         multiprocess_mode="livesum")
        self.active = get(prom.Gauge, "phiops_batch_rows_active", "Rows in the running batch.",
                          multiprocess_mode="livesum")
        self.kv = get(prom.Gauge, "phiops_kv_cache_tokens",
                      "KV-cache positions held by the running batch (rows x cached length, padding included).",
                      multiprocess_mode="livesum")
        self.pages_free = get(prom.Gauge, "phiops_kv_pages_free",
                              "Pages of the paged KV pool no row holds (CUDA; 0 without a pool).",
                              multiprocess_mode="livesum")
        self.preempted = get(prom.Counter, "phiops_preempted",
                             "Rows preempted when the paged KV pool ran short (they resume by recomputing).")
        self.rejected = get(prom.Counter, "phiops_requests_rejected",
                            "Requests refused before any model compute, by reason.", labelnames=["reason"])
        self._watching = False
        self._stop = threading.Event()

    def watch_engine(self, stats: Any, every_s: float = 0.5) -> None:
        """Copy the engine's queue depth, active rows and KV use into their gauges, ``every_s``."""
        if self._watching:
            return
        self._watching = True

        def loop() -> None:
            preempted = 0
            while not self._stop.is_set():
                self.queue.set(stats.waiting)
                self.active.set(stats.active)
                self.kv.set(stats.kv_tokens)
                self.pages_free.set(stats.kv_pages_free)
                now = stats.preempted
                if now > preempted:
                    self.preempted.inc(now - preempted)
                preempted = now
                self._stop.wait(every_s)

        threading.Thread(target=loop, name="phiops-metrics", daemon=True).start()

    def stop_watching(self) -> None:
        """End the copying thread (an engine closed; tests)."""
        self._stop.set()


class DurationMiddleware:
    """Observes each /v1 request's duration until its last body byte (streams included)."""

    metrics: "Metrics | None" = None  # set by the service once its series exist

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self.metrics is None:
            return await self.app(scope, receive, send)
        t0, status = time.perf_counter(), [500]

        async def _send(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        route = scope.get("path", "").rsplit("/v1", 1)[-1] or "/"
        route = route if route in ("/chat/completions", "/completions", "/models") else "other"
        try:
            await self.app(scope, receive, _send)
        finally:
            self.metrics.duration.labels(route, str(status[0])).observe(time.perf_counter() - t0)


