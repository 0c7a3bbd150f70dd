"""Wiring: ``create_server(address, settings) -> (server, port)`` and the SIGTERM-aware serving loop."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from recsys.v1 import recommender_pb2 as pb
from server.metrics import Metrics, RejectionCounter
from server.servicer import AdminServicer, RecommenderServicer, add_to_server
from server.settings import ServeSettings
from server.store import ModelStore, default_loader

log = logging.getLogger("recsys.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Recommender"].full_name
ADMIN_SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RecommenderAdmin"].full_name


class RecommenderServer:
    """A started-or-not gRPC server plus what it serves: ``store`` (the model), ``health``, ``metrics``.

    Quacks like ``grpc.Server`` for ``start``, ``stop(grace)`` and ``wait_for_termination``; ``stop`` first turns
    health NOT_SERVING and stops the reload watcher, then lets in-flight requests drain for ``grace`` seconds.
    """

    def __init__(self, grpc_server: grpc.Server, *, settings: ServeSettings, store: ModelStore,
                 health_servicer: health.HealthServicer, metrics: Metrics) -> None:
        self.grpc_server = grpc_server
        self.settings = settings
        self.store = store
        self.health = health_servicer
        self.metrics = metrics
        self._metrics_http: Any = None
        self.metrics_port: int | None = None

    def start(self) -> None:
        if self.store.current is None:
            try:
                self.store.poll_once()  # serve at once when a model is already published
            except Exception:
                log.exception("initial model load failed")
        if self.settings.metrics_port:
            self._metrics_http = start_http_server(self.settings.metrics_port, registry=self.metrics.registry)
            self.metrics_port = self.settings.metrics_port
        self.grpc_server.start()
        self.store.start_watcher(self.settings.poll_s)

    def stop(self, grace: float | None = None) -> threading.Event:
        """Health NOT_SERVING, stop the watcher, drain in-flight RPCs for ``grace`` seconds; returns an Event set
        when the server has fully stopped."""
        self.health.enter_graceful_shutdown()
        self.store.stop()
        done = self.grpc_server.stop(grace)
        if self._metrics_http is not None:
            httpd = self._metrics_http[0] if isinstance(self._metrics_http, tuple) else None
            if httpd is not None:
                httpd.shutdown()
            self._metrics_http = None
        return done

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self.grpc_server.wait_for_termination(timeout)


def _set_serving(health_servicer: health.HealthServicer) -> Callable[[Any], None]:
    def on_change(_bundle: Any) -> None:
        for name in ("", SERVICE_NAME):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    return on_change


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def create_server(
    address: str,
    settings: ServeSettings,
    *,
    loader: Callable[[Path], Any] | None = None,
    store: ModelStore | None = None,
) -> tuple[RecommenderServer, int]:
    """Build (not start) the server bound to ``address`` (e.g. ``"127.0.0.1:0"`` for a free port).

    ``loader(path) -> bundle`` loads a version directory (default: ``Bundle.load(path, verify=True)``).
    Raises OSError when the address cannot be bound (port taken: SO_REUSEPORT is off, so a second server on
    the same port fails here instead of silently sharing it).
    """
    metrics = Metrics()
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for name in ("", SERVICE_NAME):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    if store is None:
        store = ModelStore(
            settings.models_dir, loader=loader or default_loader, metrics=metrics,
            warmup_queries=settings.warmup_queries, on_change=_set_serving(health_servicer),
            native_recommend=settings.native_recommend,
        )
    limits = settings.limits()
    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", max(settings.max_message_bytes, 64 * 1024 * 1024)),
    ]
    rejections = RejectionCounter(metrics)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=settings.resolved_workers(), thread_name_prefix="rpc"),
        options=options,
        maximum_concurrent_rpcs=settings.max_concurrency,
        interceptors=(rejections,),
    )
    rejections.attach(server)
    kw = {"log_requests": settings.log_requests}
    add_to_server(RecommenderServicer(store, limits, metrics, native=settings.native_recommend, **kw), server)
    add_to_server(AdminServicer(store, limits, metrics, admin_token=settings.admin_token, **kw), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    try:
        if settings.tls_cert:
            creds = grpc.ssl_server_credentials(
                [(_read(settings.tls_key), _read(settings.tls_cert))],
                root_certificates=_read(settings.tls_client_ca) if settings.tls_client_ca else None,
                require_client_auth=bool(settings.tls_client_ca),
            )
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as e:  # newer grpcio raises instead of returning 0
        raise OSError(f"cannot listen on {address!r} (port in use or bad address): {e}") from None
    if port == 0:
        raise OSError(f"cannot listen on {address!r} (port in use or bad address)")
    return RecommenderServer(server, settings=settings, store=store, health_servicer=health_servicer,
                             metrics=metrics), port


def serve_until_signal(app: RecommenderServer, *, grace_s: float) -> None:
    """Block until SIGTERM/SIGINT, then stop gracefully: health NOT_SERVING, drain in-flight RPCs, return.

    Must be called from the main thread (signal handlers live there).
    """
    stopping = threading.Event()

    def handle(signum: int, _frame: Any) -> None:
        if not stopping.is_set():
            log.info("signal %s: draining for up to %.1fs", signal.Signals(signum).name, grace_s)
            stopping.set()

    previous = {s: signal.signal(s, handle) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopping.wait(0.5):
            pass
        app.stop(grace_s).wait()
        log.info("server stopped")
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
