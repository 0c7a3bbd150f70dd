"""`recsys serve --models MODELS_DIR [--port 50051]`: the gRPC recommendation server.

Settings come from flags > RECSYS_* environment variables > the [serve] table of --config > defaults
(see server/settings.py). Runs until SIGTERM/SIGINT, then drains in-flight requests for `grace_s` seconds.
"""

from __future__ import annotations

import argparse
import logging
import os

# the server logs JSON lines unless `--log-format text` (recsys.cli adds the flag to every command)
LOG_FORMAT = "json"

# flag -> ServeSettings field (None: flag not given, lower layers decide)
_FLAGS = {
    "models": "models_dir", "host": "host", "port": "port", "max_k": "max_k", "max_ids": "max_ids",
    "max_concurrency": "max_concurrency", "admin_token": "admin_token", "tls_cert": "tls_cert",
    "tls_key": "tls_key", "tls_client_ca": "tls_client_ca", "metrics_port": "metrics_port", "workers": "workers",
    "poll_s": "poll_s", "grace_s": "grace_s", "log_requests": "log_requests",
    "native_recommend": "native_recommend",
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve", help="serve recommendations over gRPC", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--models", metavar="MODELS_DIR", help="models directory (versions + LATEST) [serve.models_dir]")
    p.add_argument("--config", metavar="TOML", help="config file; its [serve] table is read")
    p.add_argument("--host", help='interface to listen on, "[::]" = all [serve.host]')
    p.add_argument("--port", type=int, help="gRPC port, 0 = any free one (default 50051)")
    p.add_argument("--max-k", type=int, help="largest k a request may ask for (default 1000)")
    p.add_argument("--max-ids", type=int, help="most IDs in one list field of a request (default 1000)")
    p.add_argument("--max-concurrency", type=int,
                   help="RPCs admitted at once; above it callers get RESOURCE_EXHAUSTED (default 64)")
    p.add_argument("--workers", type=int, help="RPC handler threads (default 0 = one per usable CPU core, 2 to 8)")
    p.add_argument("--admin-token", help="bearer token of the admin RPCs (or env RECSYS_ADMIN_TOKEN; unset: disabled)")
    p.add_argument("--tls-cert", metavar="PEM", help="server certificate chain (enables TLS with --tls-key)")
    p.add_argument("--tls-key", metavar="PEM", help="server private key")
    p.add_argument("--tls-client-ca", metavar="PEM", help="CA of accepted client certificates (mTLS)")
    p.add_argument("--metrics-port", type=int, help="Prometheus /metrics port (default 0 = off)")
    p.add_argument("--poll-s", type=float, help="seconds between LATEST polls for hot reload, 0 = off (default 2)")
    p.add_argument("--grace-s", type=float, help="seconds to drain in-flight requests on SIGTERM (default 10)")
    p.add_argument("--log-requests", action="store_const", const=True, help="log every request at INFO")
    p.add_argument("--no-native-recommend", dest="native_recommend", action="store_const", const=False,
                   help="answer every Recommend in Python (default: known-user requests natively, byte-identical)")
    p.set_defaults(func=run)


def pin_threads() -> None:
    """One BLAS / OpenMP thread per process: requests run in parallel threads already, and a multi-threaded
    BLAS on a [1, dim] query only adds wake-up latency. Env vars work if numpy is not imported yet;
    threadpoolctl covers the case where it is."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
                "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ.setdefault(var, "1")
    try:
        from threadpoolctl import threadpool_limits  # threadpoolctl: optional
    except ImportError:
        return
    threadpool_limits(1)


def run(args: argparse.Namespace) -> int:
    pin_threads()

    # grpc, numpy: after pin_threads(); `recsys --help` stays fast
    from server import create_server, load_settings, serve_until_signal

    overrides = {field: getattr(args, flag, None) for flag, field in _FLAGS.items()}
    settings = load_settings(config=args.config, overrides=overrides)
    if not os.path.isdir(settings.models_dir):
        raise FileNotFoundError(f"models directory {settings.models_dir!r} does not exist (`--models`)")
    app, port = create_server(settings.address, settings)
    app.start()
    log = logging.getLogger("recsys.server")
    current = app.store.current
    log.info(
        "listening on %s:%d (%s), model %s", settings.host, port, "TLS" if settings.tls_cert else "plaintext",
        current.version if current is not None else "none yet",
        extra={"port": port, "metrics_port": settings.metrics_port or None},
    )
    serve_until_signal(app, grace_s=settings.grace_s)
    return 0
