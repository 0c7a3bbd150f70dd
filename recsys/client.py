"""Python client of the ``recsys.v1`` gRPC API, returning plain Python results.

    with RecommenderClient("localhost:50051") as client:
        rec = client.recommend("u42", k=10)
        rec.item_ids, rec.scores, rec.model_version

The target is one server (``"HOST:PORT"``), a Kubernetes headless Service (``"dns:///NAME:PORT"``: every ready
pod's address) or a fixed set of replicas (``"10.0.0.1:50051,10.0.0.2:50051"``); calls are spread over all the
addresses the target names with gRPC's ``round_robin`` policy. Every call has a deadline (``timeout`` seconds,
default 1 s) and UNAVAILABLE (on reads also CANCELLED, what a stopping replica answers) is retried by gRPC
itself, with exponential backoff and a retry budget, through the channel's service config (:func:`service_config`),
so a replica that is restarting or draining costs a retry on another one instead of failing the caller. Errors are raised as :class:`RecommenderError` carrying the status code
and the server's message.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from recsys.catalogue.filters import ItemFilter, parse_filter
from recsys.v1 import recommender_pb2 as pb
from recsys.v1 import recommender_pb2_grpc as pb_grpc

# the names of server.service's SOURCE_* constants; SOURCE_UNSPECIFIED (nothing answered) -> ""
_SOURCE = {pb.SOURCE_KNOWN_USER: "known_user", pb.SOURCE_KNOWN_USER_WITH_EVENTS: "known_user_with_events",
           pb.SOURCE_HISTORY: "history", pb.SOURCE_POPULARITY: "popularity"}


LOAD_BALANCING = ("round_robin", "pick_first")

# target schemes grpcio resolves itself; anything else without a comma is one address for the default (dns) resolver
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


@dataclass(frozen=True)
class RetryBudget:
    """gRPC retry throttling (the service config's ``retryThrottling``, gRFC A6): a token bucket of the channel
    (each client has its own; with grpcio 1.85 two channels to the same target do not share one). An attempt that
    fails with a retryable code takes one token, a successful call gives back ``token_ratio``; while the bucket
    holds ``max_tokens / 2`` or less, failed calls are not retried. So a fleet-wide outage costs about
    ``max_tokens / 2`` extra attempts per client, then ~1 attempt per call instead of ``max_attempts``; a burst of
    failures smaller than that (a replica killed with calls in flight) is retried in full."""

    max_tokens: float = 100
    """Bucket size, in (0, 1000] (gRPC's bound); half of it is the burst of failures that is still retried."""
    token_ratio: float = 0.1
    """Tokens a successful call earns, > 0: retries keep flowing while fewer than ~1 attempt in (1 + 1/ratio)
    fails (1 in 11 at 0.1)."""

    def __post_init__(self) -> None:
        if not 0 < self.max_tokens <= 1000:
            raise ValueError(f"`max_tokens` must be in (0, 1000], got {self.max_tokens}")
        if not self.token_ratio > 0:
            raise ValueError(f"`token_ratio` must be > 0, got {self.token_ratio}")


def service_config(
    *,
    load_balancing: str = "round_robin",
    max_attempts: int = 4,
    initial_backoff_s: float = 0.05,
    max_backoff_s: float = 1.0,
    retry_budget: RetryBudget | None = RetryBudget(),
) -> str:
    """The channel's service config JSON: ``load_balancing`` over the target's addresses, and retries with
    exponential backoff within ``retry_budget`` (None: unthrottled) of

    * ``recsys.v1.RecommenderAdmin``: UNAVAILABLE only (no model yet, connection lost: the reload did not run).
    * ``recsys.v1.Recommender`` (read-only, so safe to repeat): UNAVAILABLE and CANCELLED. The server cancels a
      call itself only as it stops: a call that reached a replica just as it began to stop, before a worker picked
      it up, ends CANCELLED (gRPC's server does that on any stop, graceful or not: under load about one stop in
      three lost a call so until it was retried), and is worth another replica. Calls cut off when the grace runs
      out end UNAVAILABLE. A call the caller cancels or whose deadline passes is never retried.

    ``max_attempts`` counts the first try; 1 means no retries (gRPC requires >= 2 in a retryPolicy). No hedging:
    a hedged call runs on several replicas at once, which adds load exactly when the fleet is slow, and gRPC allows
    either a hedging or a retry policy per method; these calls take about a millisecond, so a retry of the rare
    failure costs less than a standing second copy.
    """
    if load_balancing not in LOAD_BALANCING:
        raise ValueError(f"`load_balancing` must be one of {', '.join(LOAD_BALANCING)}, got {load_balancing!r}")
    if max_attempts < 1:
        raise ValueError(f"`max_attempts` must be >= 1, got {max_attempts}")
    methods = [({"service": "recsys.v1.RecommenderAdmin"}, ["UNAVAILABLE"]),
               ({"service": "recsys.v1.Recommender"}, ["UNAVAILABLE", "CANCELLED"])]
    config: dict[str, Any] = {"loadBalancingConfig": [{load_balancing: {}}]}
    if max_attempts == 1:
        config["methodConfig"] = [{"name": [name for name, _ in methods]}]
        return json.dumps(config)
    config["methodConfig"] = [
        {"name": [name], "retryPolicy": {
            "maxAttempts": max_attempts,
            "initialBackoff": f"{initial_backoff_s}s",
            "maxBackoff": f"{max_backoff_s}s",
            "backoffMultiplier": 2,
            "retryableStatusCodes": codes,
        }}
        for name, codes in methods
    ]
    if retry_budget is not None:
        config["retryThrottling"] = {"maxTokens": retry_budget.max_tokens, "tokenRatio": retry_budget.token_ratio}
    return json.dumps(config)


def _ip_address(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of ``"1.2.3.4:PORT"`` / ``"[::1]:PORT"``, None when the host is a name or the port is missing."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def channel_target(target: str | Sequence[str]) -> str:
    """The gRPC target for ``target``: a URI (``dns:///NAME:PORT``, ``ipv4:...``, ``unix:...``) or a single
    ``HOST:PORT`` as given; several ``IP:PORT`` addresses (a comma-separated string or a sequence) as one
    ``ipv4:``/``ipv6:`` target, each address a subchannel of the load-balancing policy.

    A list must name IP addresses of one family: gRPC resolves one name per target, and IPs looked up here
    once would go stale when a replica moves. For a set of replicas behind one name use ``dns:///NAME:PORT``.
    """
    if isinstance(target, str):
        if target.startswith(_SCHEMES) or "," not in target:
            if not target.strip():
                raise ValueError("`target` must name a server, got ''")
            return target
        addresses = [a.strip() for a in target.split(",")]
    else:
        addresses = [a.strip() for a in target]
        if len(addresses) == 1:
            return channel_target(addresses[0])
    if not addresses or not all(addresses):
        raise ValueError(f"`target` must list addresses separated by commas, got {target!r}")
    ips = [_ip_address(a) for a in addresses]
    for address, ip in zip(addresses, ips, strict=True):
        if ip is None:
            raise ValueError(
                f"`target`: every address of a list must be IP:PORT ([IPv6]:PORT), got {address!r}; "
                "for replicas behind one DNS name use 'dns:///NAME:PORT'"
            )
    versions = {ip.version for ip in ips if ip is not None}
    if len(versions) > 1:
        raise ValueError(f"`target`: a list must be all IPv4 or all IPv6 addresses, got {target!r}")
    return f"ipv{versions.pop()}:{','.join(addresses)}"


class RecommenderError(Exception):
    """A failed RPC: ``code`` (grpc.StatusCode), ``details`` (the server's message), ``request_id``."""

    def __init__(self, code: grpc.StatusCode, details: str, *, request_id: str = "") -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details
        self.request_id = request_id


@dataclass
class Recommendation:
    """Recommended item IDs and scores (best first) for one user; ``source``: "known_user",
    "known_user_with_events", "history", "popularity" ("item" for similar items, "" when not found)."""

    item_ids: list[str]
    scores: list[float]
    model_version: str = ""
    fallback: bool = False
    source: str = ""
    found: bool = True
    user_id: str = ""
    unknown_item_ids: list[str] = field(default_factory=list)


def _read(path: str | Path | None) -> bytes | None:
    return None if path is None else Path(path).read_bytes()


class RecommenderClient:
    """Client of one server or of a set of replicas. Thread-safe (one channel, shared by all calls).

    ``target``: ``"HOST:PORT"``, ``"dns:///NAME:PORT"`` (a headless Service: all its ready pods), or several
    ``IP:PORT`` (a comma-separated string or a sequence); see :func:`channel_target`. ``load_balancing``:
    ``"round_robin"`` (each call to the next connected address) or ``"pick_first"`` (one connected address at a time, the
    next one only when it fails). Retries (``max_attempts``, ``retry_budget``): see :func:`service_config`. Admin
    calls go through the same policy, so over several replicas each one reaches a single replica.

    TLS: pass ``tls_ca`` (PEM of the CA that signed the server certificate; ``True`` = system roots) and, for
    mTLS, ``tls_cert`` + ``tls_key``; over an address list also ``tls_server_name`` (the name in the servers'
    certificate), since the list itself is no host name. ``admin_token`` is sent as ``authorization: Bearer ...``
    on admin calls.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        *,
        timeout: float = 1.0,
        admin_token: str | None = None,
        tls_ca: str | Path | bool | None = None,
        tls_cert: str | Path | None = None,
        tls_key: str | Path | None = None,
        tls_server_name: str | None = None,
        max_attempts: int = 4,
        load_balancing: str = "round_robin",
        retry_budget: RetryBudget | None = RetryBudget(),
        options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if timeout <= 0:
            raise ValueError(f"`timeout` must be > 0 seconds, got {timeout}")
        config = service_config(load_balancing=load_balancing, max_attempts=max_attempts, retry_budget=retry_budget)
        self.target = channel_target(target)  # what the channel dials, e.g. "ipv4:10.0.0.1:50051,10.0.0.2:50051"
        tls = tls_ca is not None or tls_cert is not None
        if tls and not tls_server_name and self.target.startswith(("ipv4:", "ipv6:")) and "," in self.target:
            raise ValueError(f"`tls_server_name` is needed with TLS over an address list, got target {target!r}")
        self.timeout = timeout
        self._admin_token = admin_token
        opts = [
            ("grpc.enable_retries", 1 if max_attempts > 1 else 0),
            ("grpc.service_config", config),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            *options,
        ]
        if tls_server_name:
            opts.append(("grpc.ssl_target_name_override", tls_server_name))
        if tls:
            creds = grpc.ssl_channel_credentials(
                root_certificates=None if tls_ca in (None, True) else _read(tls_ca),  # type: ignore[arg-type]
                private_key=_read(tls_key),
                certificate_chain=_read(tls_cert),
            )
            self._channel = grpc.secure_channel(self.target, creds, options=opts)
        else:
            self._channel = grpc.insecure_channel(self.target, options=opts)
        self._stub = pb_grpc.RecommenderStub(self._channel)
        self._admin = pb_grpc.RecommenderAdminStub(self._channel)

    # ------------------------------------------------------------------ plumbing
    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> RecommenderClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until the channel is connected, to one replica at least (raises grpc.FutureTimeoutError after
        ``timeout`` s)."""
        grpc.channel_ready_future(self._channel).result(timeout=timeout)

    def _call(self, method: Any, request: Any, *, timeout: float | None, admin: bool = False,
              request_id: str | None = None) -> Any:
        metadata = []
        if request_id:
            metadata.append(("x-request-id", request_id))
        if admin and self._admin_token:
            metadata.append(("authorization", f"Bearer {self._admin_token}"))
        try:
            return method(request, timeout=self.timeout if timeout is None else timeout, metadata=metadata or None)
        except grpc.RpcError as e:
            rid = ""
            for key, value in (e.trailing_metadata() or ()) if hasattr(e, "trailing_metadata") else ():
                if key == "x-request-id":
                    rid = value
            raise RecommenderError(e.code(), e.details() or "", request_id=rid) from None

    @staticmethod
    def _rec(msg: Any, **extra: Any) -> Recommendation:
        return Recommendation(
            item_ids=[it.item_id for it in msg.items],
            scores=[it.score for it in msg.items],
            fallback=msg.fallback,
            **extra,
        )

    # ------------------------------------------------------------------ Recommender
    def recommend(
        self,
        user_id: str = "",
        *,
        history: Sequence[str] = (),
        k: int = 10,
        include_seen: bool = False,
        exclude: Sequence[str] = (),
        allowed: Sequence[str] = (),
        allow_fallback: bool = False,
        filter: Sequence[str] | ItemFilter | None = None,  # noqa: A002 - the proto's name
        timeout: float | None = None,
        request_id: str | None = None,
    ) -> Recommendation:
        """Top-``k`` items for a known ``user_id`` (with ``history``: its fresh events since the model was built,
        oldest first, which move its embedding and are excluded unless ``include_seen``), or for a new user from
        ``history`` (item IDs, oldest first). ``filter``: conditions on item attributes, all of which must hold,
        as terms (``["category=books,music", "year>=1990", "kind!=ebook"]``, the syntax of ``recsys evaluate
        --filter``) or an :class:`~recsys.catalogue.filters.ItemFilter`."""
        req = pb.RecommendRequest(
            user_id=user_id, history_item_ids=history, k=k, include_seen=include_seen, exclude_item_ids=exclude,
            allowed_item_ids=allowed, allow_fallback=allow_fallback, filter=filter_message(filter),
        )
        resp = self._call(self._stub.Recommend, req, timeout=timeout, request_id=request_id)
        return self._rec(
            resp, model_version=resp.model_version, source=_SOURCE.get(resp.source, ""), user_id=user_id,
            unknown_item_ids=list(resp.unknown_item_ids),
        )

    def batch_recommend(
        self,
        user_ids: Sequence[str],
        *,
        k: int = 10,
        include_seen: bool = False,
        exclude: Sequence[str] = (),
        allowed: Sequence[str] = (),
        allow_fallback: bool = False,
        histories: Mapping[str, Sequence[str]] | None = None,
        filter: Sequence[str] | ItemFilter | None = None,  # noqa: A002 - the proto's name
        timeout: float | None = None,
    ) -> list[Recommendation]:
        """One :class:`Recommendation` per user, in order; unknown users without a usable history have
        ``found=False`` (no fallback). ``histories``: per-user item IDs, oldest first, keyed by IDs of ``user_ids``
        (a known user's fresh events, a new user's history; the semantics of :meth:`recommend`'s ``history``)."""
        req = pb.BatchRecommendRequest(
            user_ids=user_ids, k=k, include_seen=include_seen, exclude_item_ids=exclude, allowed_item_ids=allowed,
            allow_fallback=allow_fallback, filter=filter_message(filter),
            history_item_ids={u: pb.ItemIdList(item_ids=h) for u, h in (histories or {}).items()},
        )
        resp = self._call(self._stub.BatchRecommend, req, timeout=timeout)
        return [
            self._rec(r, model_version=resp.model_version, found=r.found, user_id=r.user_id,
                      source=_SOURCE.get(r.source, ""), unknown_item_ids=list(r.unknown_item_ids))
            for r in resp.results
        ]

    def similar_items(
        self,
        item_id: str,
        *,
        k: int = 10,
        exclude: Sequence[str] = (),
        allowed: Sequence[str] = (),
        filter: Sequence[str] | ItemFilter | None = None,  # noqa: A002 - the proto's name
        timeout: float | None = None,
    ) -> Recommendation:
        """The ``k`` items most similar to ``item_id`` (never the item itself); ``filter`` as in :meth:`recommend`."""
        req = pb.SimilarItemsRequest(item_id=item_id, k=k, exclude_item_ids=exclude, allowed_item_ids=allowed,
                                     filter=filter_message(filter))
        resp = self._call(self._stub.SimilarItems, req, timeout=timeout)
        return Recommendation(
            item_ids=[it.item_id for it in resp.items], scores=[it.score for it in resp.items],
            model_version=resp.model_version, source="item",
        )

    @staticmethod
    def _embeddings(resp: Any) -> tuple[dict[str, np.ndarray], list[str]]:
        out = {e.id: np.asarray(e.values, dtype=np.float32) for e in resp.embeddings}
        return out, list(resp.unknown_ids)

    def user_embeddings(
        self, user_ids: Sequence[str], *, timeout: float | None = None
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        """({user_id: embedding [dim] float32} for known users, unknown user IDs)."""
        resp = self._call(self._stub.GetUserEmbeddings, pb.GetUserEmbeddingsRequest(user_ids=user_ids),
                          timeout=timeout)
        return self._embeddings(resp)

    def item_embeddings(
        self, item_ids: Sequence[str], *, timeout: float | None = None
    ) -> tuple[dict[str, np.ndarray], list[str]]:
        """({item_id: embedding [dim] float32} for known items, unknown item IDs)."""
        resp = self._call(self._stub.GetItemEmbeddings, pb.GetItemEmbeddingsRequest(item_ids=item_ids),
                          timeout=timeout)
        return self._embeddings(resp)

    def embed_user(
        self, history: Sequence[str] = (), *, user_id: str = "", timeout: float | None = None
    ) -> tuple[np.ndarray, list[str]]:
        """(embedding [dim] float32, unknown item IDs): the user tower on a new user's ``history`` (item IDs,
        oldest first), or for a known ``user_id`` its stored embedding, or with ``history`` (its fresh events)
        the tower on its stored history + the events."""
        req = pb.EmbedUserRequest(history_item_ids=history, user_id=user_id)
        resp = self._call(self._stub.EmbedUser, req, timeout=timeout)
        return np.asarray(resp.embedding, dtype=np.float32), list(resp.unknown_item_ids)

    def model_info(self, *, timeout: float | None = None) -> dict[str, Any]:
        """Version, created_at, dim, metric, n_users, n_items, evaluation (flat dict), loaded_at, items_in_logs,
        trained_interactions, trained_until, and the live catalogue: catalogue_size, upserted_items, retired_items,
        catalogue_seq, attributes."""
        m = self._call(self._stub.GetModelInfo, pb.GetModelInfoRequest(), timeout=timeout)
        return {
            "version": m.version, "created_at": m.created_at, "dim": m.dim, "metric": m.metric,
            "n_users": m.n_users, "n_items": m.n_items, "evaluation": dict(m.evaluation), "loaded_at": m.loaded_at,
            "items_in_logs": m.items_in_logs, "trained_interactions": m.trained_interactions,
            "trained_until": m.trained_until, "catalogue_size": m.catalogue_size, "upserted_items": m.upserted_items,
            "retired_items": m.retired_items, "catalogue_seq": m.catalogue_seq, "attributes": list(m.attributes),
        }

    # ------------------------------------------------------------------ admin
    def reload_model(self, version: str | None = None, *, timeout: float | None = 60.0) -> dict[str, Any]:
        """Ask the server to load ``version`` (default LATEST); needs ``admin_token``."""
        r = self._call(self._admin.ReloadModel, pb.ReloadModelRequest(version=version or ""), timeout=timeout,
                       admin=True)
        return {"previous_version": r.previous_version, "version": r.version, "changed": r.changed}

    def upsert_items(self, items: Sequence[Mapping[str, Any]], *, change_id: str = "",
                     timeout: float | None = 60.0) -> dict[str, Any]:
        """Add or update catalogue items without a retrain; needs ``admin_token``. ``items``: ``{"item_id": ...,
        <attribute>: value or list of values, "title": ...}`` (the items file's columns). ``change_id`` makes a
        retry safe (applied once). Returns added, updated, unknown_values [(item, attribute, value)],
        catalogue_seq, change_id, applied, model_version."""
        records = []
        for it in items:
            attrs = {str(name): pb.StringSet(values=[str(v)] if isinstance(v, (str, int, float)) else
                                             [str(x) for x in v])
                     for name, v in it.items() if name not in ("item_id", "title") and v is not None}
            records.append(pb.ItemRecord(item_id=str(it["item_id"]), attributes=attrs, title=str(it.get("title") or "")))
        r = self._call(self._admin.UpsertItems, pb.UpsertItemsRequest(items=records, change_id=change_id),
                       timeout=timeout, admin=True)
        return {"added": r.added, "updated": r.updated, "catalogue_seq": r.catalogue_seq, "change_id": r.change_id,
                "applied": r.applied, "model_version": r.model_version,
                "unknown_values": [(u.item_id, u.attribute, u.value) for u in r.unknown_values]}

    def retire_items(self, item_ids: Sequence[str], *, change_id: str = "",
                     timeout: float | None = 60.0) -> dict[str, Any]:
        """Withdraw items from every recommendation (an upsert restores them); needs ``admin_token``. Returns
        retired, unknown_item_ids, catalogue_seq, change_id, applied, model_version."""
        r = self._call(self._admin.RetireItems, pb.RetireItemsRequest(item_ids=item_ids, change_id=change_id),
                       timeout=timeout, admin=True)
        return {"retired": r.retired, "unknown_item_ids": list(r.unknown_item_ids), "catalogue_seq": r.catalogue_seq,
                "change_id": r.change_id, "applied": r.applied, "model_version": r.model_version}

    def list_models(self, *, timeout: float | None = None) -> list[dict[str, Any]]:
        """The model versions on the server, newest first; needs ``admin_token``."""
        r = self._call(self._admin.ListModels, pb.ListModelsRequest(), timeout=timeout, admin=True)
        return [
            {"version": m.version, "created_at": m.created_at, "latest": m.latest, "serving": m.serving}
            for m in r.models
        ]

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The standard health status name: "SERVING", "NOT_SERVING", ..."""
        stub = health_pb2_grpc.HealthStub(self._channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service),
                              timeout=self.timeout if timeout is None else timeout)
        except grpc.RpcError as e:
            raise RecommenderError(e.code(), e.details() or "") from None
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)


def filter_message(f: Sequence[str] | ItemFilter | None) -> pb.ItemFilter | None:
    """A filter as terms (``["genre=Comedy,Drama", "year>=1990"]``) or an ``ItemFilter`` -> the proto message
    (None for no filter)."""
    if f is None:
        return None
    if not isinstance(f, ItemFilter):
        if isinstance(f, str):
            raise TypeError(f"`filter` takes a list of terms, got the string {f!r} (wrap it in a list)")
        f = parse_filter(f)
    out = pb.ItemFilter()
    for c in f.conditions:
        cond = out.all_of.add(attribute=c.attribute)
        if c.op == "range":
            cond.range.SetInParent()
            if c.low is not None:
                cond.range.min = c.low
            if c.high is not None:
                cond.range.max = c.high
        else:
            getattr(cond, c.op).values.extend(c.values)
    return out
