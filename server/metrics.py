"""Prometheus metrics of one server (own registry, so several servers can live in one test process)."""

from __future__ import annotations

import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# sub-millisecond resolution: a healthy Recommend answers in well under 1 ms
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.5, 1.0, 5.0)


class Bound:
    """One (method, code)'s request counter and the method's latency histogram, labels resolved once."""

    __slots__ = ("_count", "_latency")

    def __init__(self, count: Any, latency: Any) -> None:
        self._count = count.inc
        self._latency = latency.observe

    def observe(self, seconds: float) -> None:
        self._count()
        self._latency(seconds)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "recsys_requests", "RPCs answered, by method and status code", ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "recsys_request_latency_seconds", "RPC handling time, by method", ["method"],
            buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.model_version = Gauge(
            "recsys_model_version_info", "1 for the model version currently serving", ["version"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "recsys_model_reloads", "Model loads, by result (ok, refused, error)", ["result"],
            registry=self.registry,
        )
        # labelled children cached: .labels() takes a lock and hashes the labels on every call
        self._req: dict[tuple[str, str], object] = {}
        self._lat: dict[str, object] = {}
        self._lock = threading.Lock()

    def _children(self, method: str, code: str) -> tuple[Any, Any]:
        """The counter child of (method, code) and the latency child of method, created on first use."""
        req, lat = self._req.get((method, code)), self._lat.get(method)
        if req is None or lat is None:
            with self._lock:  # labels() returns the existing child, so a lost race only repeats a lookup
                req = self._req.setdefault((method, code), self.requests.labels(method, code))
                lat = self._lat.setdefault(method, self.latency.labels(method))
        return req, lat

    def bind(self, method: str, code: str) -> Bound:
        """The (method, code) children bound once (for the hot path)."""
        return Bound(*self._children(method, code))

    def observe(self, method: str, code: str, seconds: float) -> None:
        req, lat = self._children(method, code)
        req.inc()
        lat.observe(seconds)

    def set_version(self, version: str) -> None:
        with self._lock:
            self.model_version.clear()
            self.model_version.labels(version).set(1)
