"""Prometheus metrics of one server (own registry, so several servers can live in one test process)."""

from __future__ import annotations

import datetime as _dt
import logging
import threading
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from recsys.bundle import REFUSAL_REASONS

# sub-millisecond resolution: a healthy Recommend answers in well under 1 ms
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.5, 1.0, 5.0)


# Refusals the server itself makes, besides recsys.bundle's checks: the bundle loaded but failed its warm-up
# queries, or the loader raised something that is not a BundleError.
REFUSED_BY_SERVER = ("warmup", "other")


def refusal_reasons() -> tuple[str, ...]:
    """Every ``reason`` label of ``recsys_bundles_refused``."""
    return (*REFUSAL_REASONS, *REFUSED_BY_SERVER)


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
        self.model_created = Gauge(
            "recsys_model_created_timestamp_seconds",
            "Unix time the serving model version was published (its manifest's created_at)", registry=self.registry,
        )
        self.model_items = Gauge("recsys_model_items", "Items in the serving model's catalogue",
                                 registry=self.registry)
        self.model_users = Gauge("recsys_model_users", "Users the serving model knows by id", registry=self.registry)
        self.rejected = Counter(
            "recsys_requests_rejected",
            "RPCs refused with RESOURCE_EXHAUSTED before a handler ran, by reason (concurrency: [serve] "
            "max_concurrency calls already admitted)", ["reason"], registry=self.registry,
        )
        self.rejected.labels("concurrency")
        for result in ("ok", "refused", "error"):
            self.reloads.labels(result)  # at 0 from the start: an alert's increase() sees the first refusal
        # every refusal of a bundle (a load that failed its checks, a LATEST the server will not follow), by the
        # kind of check (recsys.bundle.REFUSAL_REASONS + REFUSED_BY_SERVER); the known reasons start at 0
        self.bundles_refused = Counter(
            "recsys_bundles_refused", "Bundles refused at load (the previous version keeps serving), by reason",
            ["reason"], registry=self.registry,
        )
        for reason in refusal_reasons():
            self.bundles_refused.labels(reason)
        # catalogue deltas refused (recsys.catalogue.delta.CatalogueError.reason): the catalogue stays as it was
        self.catalogue_refused = Counter(
            "recsys_catalogue_refused", "Catalogue delta records refused (the catalogue stays as it was), by reason",
            ["reason"], registry=self.registry,
        )
        for reason in ("checksum", "sequence", "chain", "version", "invalid", "unreadable"):
            self.catalogue_refused.labels(reason)
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

    def set_version(self, version: str, *, created_at: str = "", n_items: int | None = None,
                    n_users: int | None = None) -> None:
        """The serving model: its version, when it was published (manifest ``created_at``, ISO 8601; the stale-
        retrain alert) and its catalogue's size."""
        with self._lock:
            self.model_version.clear()
            self.model_version.labels(version).set(1)
            if created_at:
                try:
                    when = _dt.datetime.fromisoformat(created_at.replace("Z", "+00:00"))
                except ValueError:
                    pass
                else:
                    self.model_created.set(when.timestamp())
            if n_items is not None:
                self.model_items.set(n_items)
            if n_users is not None:
                self.model_users.set(n_users)


class RejectionCounter:
    """A gRPC server interceptor that counts the calls gRPC's own ``maximum_concurrent_rpcs`` refuses
    (``recsys_requests_rejected{reason="concurrency"}``): those never reach a handler, so nothing else can.

    grpcio decides the refusal in its polling thread, under the server state's lock, as ``active_rpc_count >=
    maximum_concurrent_rpcs``, and calls the interceptors inside that same locked section just before; reading
    the same two numbers here gives the same answer. They are grpcio's private ``Server._state`` (grpcio 1.6x-1.8x);
    :meth:`attach` checks they exist and, if a grpcio without them is installed, logs once and counts nothing
    (``tests/test_server.py`` shows the count equals the RESOURCE_EXHAUSTED answers a client sees). Calls it lets
    through cost one comparison.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._inc = metrics.rejected.labels("concurrency").inc
        self._state: Any = None

    def attach(self, server: Any) -> bool:
        """Read ``server``'s admission state from now on; False (and nothing counted) where grpcio hides it."""
        state = getattr(server, "_state", None)
        if state is None or not hasattr(state, "active_rpc_count") or not hasattr(state, "maximum_concurrent_rpcs"):
            logging.getLogger(__name__).warning(
                "this grpcio does not expose its admission state: recsys_requests_rejected stays at 0")
            return False
        self._state = state
        return True

    def intercept_service(self, continuation: Any, handler_call_details: Any) -> Any:
        state = self._state
        if state is not None:
            limit = state.maximum_concurrent_rpcs
            if limit is not None and state.active_rpc_count >= limit:
                self._inc()
        return continuation(handler_call_details)
