"""Server settings: one frozen dataclass (section ``[serve]``), parsed once at startup.

Precedence, lowest first: field defaults < the ``[serve]`` table of ``--config`` < ``RECSYS_<FIELD>``
environment variables (e.g. ``RECSYS_ADMIN_TOKEN``, ``RECSYS_MAX_K``) < command-line flags. Nothing else in the
server reads the environment.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.core.config import ConfigError, from_dict, merge, read_toml, usable_cpus
from server.service import Limits

ENV_PREFIX = "RECSYS_"


@dataclass(frozen=True)
class ServeSettings:
    """How ``recsys serve`` runs; every field can come from TOML ``[serve]``, ``RECSYS_<FIELD>`` or a flag."""

    # directory of model versions + LATEST (written by `recsys export --models`)
    models_dir: str = "models"
    # interface to listen on ("[::]" = all, "127.0.0.1" = local only)
    host: str = "[::]"
    # gRPC port; 0 picks a free one
    port: int = 50051
    # largest `k` a request may ask for
    max_k: int = Limits.max_k
    # most IDs in one list field of a request (user_ids, exclude/allowed item IDs)
    max_ids: int = Limits.max_ids
    # most history items in one request
    max_history: int = Limits.max_history
    # longest accepted ID, in characters
    max_id_length: int = Limits.max_id_length
    # largest request message accepted, in bytes (bigger ones are refused by gRPC with RESOURCE_EXHAUSTED)
    max_message_bytes: int = 4 * 1024 * 1024
    # RPCs admitted at once (running + queued); above it callers get RESOURCE_EXHAUSTED at once
    max_concurrency: int = 64
    # threads answering RPCs; 0 = one per usable CPU core, 2 to 8 (the known-user Recommend searches without the
    # GIL, so one thread per core keeps the cores busy; past that, and past ~8 on big hosts, threads mostly queue
    # for the GIL: run more replicas instead)
    workers: int = 0
    # bearer token for RecommenderAdmin; empty: every admin call is UNAUTHENTICATED
    admin_token: str = ""
    # PEM server certificate chain; with tls_key enables TLS
    tls_cert: str = ""
    # PEM private key of tls_cert
    tls_key: str = ""
    # PEM CA bundle; when set, clients must present a certificate it signed (mTLS)
    tls_client_ca: str = ""
    # port of the Prometheus /metrics endpoint; 0 disables it
    metrics_port: int = 0
    # seconds between polls of MODELS_DIR/LATEST for hot reload; 0 disables the watcher
    poll_s: float = 2.0
    # seconds in-flight requests get to finish on shutdown (SIGTERM)
    grace_s: float = 10.0
    # queries run on a freshly loaded bundle before it takes traffic
    warmup_queries: int = 8
    # answer known-user Recommend requests natively (server/fastpath.py: request bytes to response bytes in C++,
    # byte-identical to the Python path; holds a second user-ID map: 1M users took 0.18 s and 38 MiB); false = Python only
    native_recommend: bool = True
    # log every request at INFO (default: only errors; OK requests at DEBUG)
    log_requests: bool = False

    def limits(self) -> Limits:
        """The request limits (``server.service.Limits``) these settings name: its fields, by name."""
        return Limits(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Limits)})

    def resolved_workers(self) -> int:
        """``workers``, with 0 resolved to one per usable CPU core, clamped to [2, 8]."""
        return self.workers or min(8, max(2, usable_cpus()))

    def validate(self) -> None:
        for name in ("max_k", "max_ids", "max_history", "max_id_length", "max_message_bytes", "max_concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"`serve.{name}` must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ConfigError(f"`serve.workers` must be >= 0 (0 = one per CPU core), got {self.workers}")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"`serve.{name}` must be in [0, 65535], got {getattr(self, name)}")
        for name in ("poll_s", "grace_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"`serve.{name}` must be >= 0, got {getattr(self, name)}")
        if self.warmup_queries < 0:
            raise ConfigError(f"`serve.warmup_queries` must be >= 0, got {self.warmup_queries}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError(
                f"`serve.tls_cert` and `serve.tls_key` go together, got tls_cert={self.tls_cert!r} "
                f"tls_key={self.tls_key!r}"
            )
        if self.tls_client_ca and not self.tls_cert:
            raise ConfigError("`serve.tls_client_ca` (mTLS) needs `serve.tls_cert` and `serve.tls_key`")
        for name in ("tls_cert", "tls_key", "tls_client_ca"):
            path = getattr(self, name)
            if path and not Path(path).is_file():
                raise ConfigError(f"`serve.{name}` file {path!r} does not exist")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _parse_env(name: str, tp: Any, raw: str) -> Any:
    if tp is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off", ""):
            return False
        raise ConfigError(f"environment variable {ENV_PREFIX}{name.upper()} must be true/false, got {raw!r}")
    try:
        return tp(raw) if tp in (int, float) else raw
    except ValueError:
        raise ConfigError(
            f"environment variable {ENV_PREFIX}{name.upper()} must be {tp.__name__}, got {raw!r}"
        ) from None


def env_layer(env: Mapping[str, str]) -> dict[str, Any]:
    """The ``RECSYS_<FIELD>`` variables that name a ServeSettings field, parsed to the field's type."""
    hints = typing.get_type_hints(ServeSettings)
    out = {}
    for f in dataclasses.fields(ServeSettings):
        key = ENV_PREFIX + f.name.upper()
        if key in env:
            out[f.name] = _parse_env(f.name, hints[f.name], env[key])
    return out


def load_settings(
    *,
    config: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> ServeSettings:
    """Defaults < ``[serve]`` of ``config`` < ``RECSYS_*`` of ``env`` (default ``os.environ``) < ``overrides``.

    ``overrides`` are field values from command-line flags; ``None`` values mean "flag not given".
    """
    file_layer = read_toml(config).get("serve", {})
    env_values = env_layer(os.environ if env is None else env)
    flag_layer = {k: v for k, v in (overrides or {}).items() if v is not None}
    return from_dict(ServeSettings, merge(file_layer, env_values, flag_layer))
