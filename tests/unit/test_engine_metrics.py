"""The engine's counters reach their Prometheus series (phiops.serve.observability)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest


def test_the_pool_gauges_and_the_preemption_counter_follow_the_engines_stats() -> None:
    prom = pytest.importorskip("prometheus_client")
    from phiops.serve.observability import Metrics

    m = Metrics()
    stats = SimpleNamespace(waiting=2, active=5, kv_tokens=640, kv_pages_free=7, preempted=0)
    start = prom.REGISTRY.get_sample_value("phiops_preempted_total") or 0.0
    m.watch_engine(stats, every_s=0.01)
    try:
        _check(prom, stats, start)
    finally:
        m.stop_watching()  # the series are the process's: leave them to other tests


def _check(prom: Any, stats: SimpleNamespace, start: float) -> None:
    def settled(name: str, want: float) -> None:
        deadline = time.monotonic() + 5
        while prom.REGISTRY.get_sample_value(name) != want:
            assert time.monotonic() < deadline, f"{name}: {prom.REGISTRY.get_sample_value(name)}, want {want}"
            time.sleep(0.01)

    settled("phiops_kv_pages_free", 7)
    settled("phiops_kv_cache_tokens", 640)
    stats.preempted = 3  # three rows preempted since: the counter grows by three, once
    settled("phiops_preempted_total", start + 3)
    stats.kv_pages_free = 1
    settled("phiops_kv_pages_free", 1)
    assert prom.REGISTRY.get_sample_value("phiops_preempted_total") == start + 3
