"""gRPC servicers: thin adapters between ``recsys.v1`` messages and :mod:`server.service`.

Every RPC goes through :meth:`_Base._call`, the one place that maps errors to status codes, checks deadlines,
tags the request id, counts metrics and logs. Handlers grab the serving bundle once (``store.current``) and use
only that reference, so a hot reload never switches models under a request in flight.
"""

from __future__ import annotations

import hmac
import itertools
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from recsys.v1 import recommender_pb2 as pb
from recsys.v1 import recommender_pb2_grpc as pb_grpc
from server import fastpath, service
from server.metrics import Metrics
from server.service import (
    FailedPrecondition,
    InvalidArgument,
    Limits,
    NotFound,
    ServiceError,
    Unauthenticated,
    Unavailable,
)
from server.store import ModelStore
from server.wire import SOURCE, add_items, embeddings_response, item_filter, recommend_response

log = logging.getLogger("recsys.server")


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before the answer was ready."""


# The ONE mapping from domain errors to status codes; anything else is a bug -> INTERNAL, generic message.
STATUS_OF: dict[type[ServiceError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
}

REQUEST_ID = "x-request-id"


# Generated request ids (errors, and every request when access logs are on): a random per-process prefix + a
# counter, 32 hex chars like uuid4().hex, unique without a urandom syscall per request (next() on itertools.count is
# atomic under the GIL).
_ID_PREFIX = uuid.uuid4().hex[:16]
_ID_COUNTER = itertools.count()


def _client_request_id(context: grpc.ServicerContext) -> str | None:
    """The caller's ``x-request-id`` (echoed back and logged), or None."""
    for key, value in context.invocation_metadata() or ():
        if key == REQUEST_ID and isinstance(value, str) and 0 < len(value) <= 128:
            return value
    return None


def _new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFFFFFFFFFFFFFF:016x}"


def _check_deadline(context: grpc.ServicerContext) -> None:
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        raise DeadlineExceeded("deadline exceeded before the answer was ready")


class _Base:
    # RPC names of this servicer: their metric children are bound at startup (``Metrics.bind``)
    METHODS: tuple[str, ...] = ()
    SERVICE = ""  # the proto service's name
    RAW_METHODS: frozenset[str] = frozenset()

    def __init__(self, store: ModelStore, limits: Limits, metrics: Metrics, *, log_requests: bool = False) -> None:
        self.store = store
        self.limits = limits
        self.metrics = metrics
        self._access_level = logging.INFO if log_requests else logging.DEBUG
        self._ok = {m: metrics.bind(m, "OK") for m in self.METHODS}  # method -> bound OK count + latency

    def _call(
        self, method: str, request: Any, context: grpc.ServicerContext, handler: Callable[[Any, Any], Any],
        *, needs_model: bool = True,
    ) -> Any:
        t0 = time.perf_counter()
        given = _client_request_id(context)
        try:
            _check_deadline(context)
            bundle = self.store.current  # grabbed once: this request finishes on this model
            if needs_model and bundle is None:
                raise Unavailable("no model loaded yet")
            response = handler(bundle, request)
            _check_deadline(context)
        except ServiceError as e:
            rid = given or _new_request_id()
            code = STATUS_OF.get(type(e), grpc.StatusCode.INTERNAL)
            details = str(e)
        except Exception:
            rid = given or _new_request_id()
            code = grpc.StatusCode.INTERNAL
            details = f"internal error (request id {rid})"
            log.exception("internal error in %s", method, extra={"request_id": rid, "method": method})
        else:
            # The OK path: bound metric children; a request id only where it names something -- the caller's own
            # (echoed), or a generated one when access logs are on (the id of that log record).
            elapsed = time.perf_counter() - t0
            ok = self._ok.get(method)
            if ok is None:
                self.metrics.observe(method, "OK", elapsed)
            else:
                ok.observe(elapsed)
            if log.isEnabledFor(self._access_level):
                rid = given or _new_request_id()
                self._log(self._access_level, method, grpc.StatusCode.OK, rid, elapsed, "")
                context.set_trailing_metadata(((REQUEST_ID, rid),))
            elif given is not None:
                context.set_trailing_metadata(((REQUEST_ID, given),))
            return response
        # Errors: always logged, always with a request id (the caller's, else a generated one) in the trailers.
        elapsed = time.perf_counter() - t0
        context.set_trailing_metadata(((REQUEST_ID, rid),))
        self.metrics.observe(method, code.name, elapsed)
        if log.isEnabledFor(logging.INFO):
            self._log(logging.INFO, method, code, rid, elapsed, details)
        context.abort(code, details)  # raises

    @staticmethod
    def _log(level: int, method: str, code: grpc.StatusCode, rid: str, elapsed: float, details: str) -> None:
        log.log(
            level, "%s %s", method, code.name,
            extra={"request_id": rid, "method": method, "code": code.name, "latency_ms": round(elapsed * 1e3, 3),
                   "details": details},
        )


class RecommenderServicer(_Base, pb_grpc.RecommenderServicer):
    SERVICE = "Recommender"
    METHODS = ("Recommend", "BatchRecommend", "SimilarItems", "GetUserEmbeddings", "GetItemEmbeddings", "EmbedUser",
               "GetModelInfo")

    # Methods registered with bytes in and out (see add_to_server): the servicer parses and serialises them itself.
    RAW_METHODS = frozenset({"Recommend"})

    def Recommend(self, request, context):  # noqa: N802 - gRPC method names
        if type(request) is bytes:  # as registered: the serialized request -> the serialized response
            return self._call("Recommend", request, context, self._recommend_bytes)
        return self._call("Recommend", request, context, self._recommend)  # a message (direct calls)

    def __init__(self, store: ModelStore, limits: Limits, metrics: Metrics, *, native: bool = True, **kw) -> None:
        super().__init__(store, limits, metrics, **kw)
        self.native = native  # the native known-user Recommend (server/fastpath.py); False = Python path only

    def _recommend_bytes(self, bundle, data: bytes) -> bytes:
        fast = fastpath.for_bundle(bundle) if self.native else None
        if fast is not None:
            out = fast.recommend(data, self.limits.max_k, self.limits.max_id_length, self.limits.max_history)
            if out is not None:
                return out
        try:
            request = pb.RecommendRequest.FromString(data)
        except DecodeError as e:
            raise InvalidArgument(f"malformed RecommendRequest ({len(data)} bytes): {e}") from None
        if fast is not None and request.HasField("filter"):
            out = fastpath.recommend_filtered(fast, bundle, request, data, self.limits)
            if out is not None:
                return out
        return self._recommend(bundle, request).SerializeToString()

    def _recommend(self, bundle, r):
        return recommend_response(bundle, r, self.limits)

    def BatchRecommend(self, request, context):  # noqa: N802
        return self._call("BatchRecommend", request, context, self._batch)

    def _batch(self, bundle, r):
        histories = {u: lst.item_ids for u, lst in r.history_item_ids.items()} if r.history_item_ids else None
        results, unknown = service.batch_recommend(
            bundle, user_ids=r.user_ids, k=r.k, include_seen=r.include_seen, exclude_item_ids=r.exclude_item_ids,
            allowed_item_ids=r.allowed_item_ids, allow_fallback=r.allow_fallback, history_item_ids=histories,
            item_filter=item_filter(r.filter) if r.HasField("filter") else None, limits=self.limits,
        )
        response = pb.BatchRecommendResponse(model_version=bundle.version, unknown_user_ids=unknown)
        add_result = response.results.add
        for u, rec in zip(r.user_ids, results, strict=True):
            result = add_result(user_id=u, found=rec.found, fallback=rec.fallback, source=SOURCE[rec.source])
            if rec.unknown_item_ids:
                result.unknown_item_ids.extend(rec.unknown_item_ids)
            add_items(result.items, rec)
        return response

    def SimilarItems(self, request, context):  # noqa: N802
        return self._call("SimilarItems", request, context, self._similar)

    def _similar(self, bundle, r):
        rec = service.similar_items(
            bundle, item_id=r.item_id, k=r.k, exclude_item_ids=r.exclude_item_ids,
            allowed_item_ids=r.allowed_item_ids,
            item_filter=item_filter(r.filter) if r.HasField("filter") else None, limits=self.limits,
        )
        response = pb.SimilarItemsResponse(model_version=bundle.version)
        add_items(response.items, rec)
        return response

    def GetUserEmbeddings(self, request, context):  # noqa: N802
        return self._call("GetUserEmbeddings", request, context, self._user_embeddings)

    def _user_embeddings(self, bundle, r):
        known, vecs, unknown = service.user_embeddings(bundle, r.user_ids, limits=self.limits)
        return embeddings_response(bundle, known, vecs, unknown)

    def GetItemEmbeddings(self, request, context):  # noqa: N802
        return self._call("GetItemEmbeddings", request, context, self._item_embeddings)

    def _item_embeddings(self, bundle, r):
        known, vecs, unknown = service.item_embeddings(bundle, r.item_ids, limits=self.limits)
        return embeddings_response(bundle, known, vecs, unknown)

    def EmbedUser(self, request, context):  # noqa: N802
        return self._call("EmbedUser", request, context, self._embed_user)

    def _embed_user(self, bundle, r):
        vec, unknown, source = service.embed_user(bundle, r.history_item_ids, user_id=r.user_id, limits=self.limits)
        return pb.EmbedUserResponse(
            embedding=vec.tolist(), unknown_item_ids=unknown, dim=int(bundle.dim), model_version=bundle.version,
            source=SOURCE[source],
        )

    def GetModelInfo(self, request, context):  # noqa: N802
        return self._call("GetModelInfo", request, context, self._info)

    def _info(self, bundle, r):
        return pb.ModelInfo(**service.model_info(bundle), loaded_at=self.store.loaded_at)


def add_to_server(servicer: _Base, server: grpc.Server) -> None:
    """Register ``servicer``'s service like the generated ``add_*Servicer_to_server`` does, except that the methods
    in ``servicer.RAW_METHODS`` get the serialized messages (bytes in, bytes out)."""
    service = pb.DESCRIPTOR.services_by_name[servicer.SERVICE]
    handlers = {}
    for m in service.methods:
        fn = getattr(servicer, m.name)
        if m.name in servicer.RAW_METHODS:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(fn)
        else:
            handlers[m.name] = grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=getattr(pb, m.input_type.name).FromString,
                response_serializer=getattr(pb, m.output_type.name).SerializeToString,
            )
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
    server.add_registered_method_handlers(service.full_name, handlers)


class AdminServicer(_Base, pb_grpc.RecommenderAdminServicer):
    """Admin RPCs; each needs ``authorization: Bearer <admin_token>`` metadata."""

    SERVICE = "RecommenderAdmin"
    METHODS = ("ReloadModel", "ListModels", "UpsertItems", "RetireItems")

    def __init__(self, store: ModelStore, limits: Limits, metrics: Metrics, *, admin_token: str, **kw) -> None:
        super().__init__(store, limits, metrics, **kw)
        self._expected = f"Bearer {admin_token}".encode() if admin_token else None

    def _authorize(self, context: grpc.ServicerContext) -> None:
        given = ""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                given = value
        if self._expected is None:
            raise Unauthenticated("admin calls are disabled: the server has no admin token configured")
        # constant-time comparison: the token must not leak through response timing
        if not hmac.compare_digest(given.encode(), self._expected):
            raise Unauthenticated("missing or wrong `authorization: Bearer <token>` metadata")

    def ReloadModel(self, request, context):  # noqa: N802
        def handle(_bundle, r):
            self._authorize(context)
            prev, version, changed = self.store.reload(r.version or None)
            return pb.ReloadModelResponse(previous_version=prev, version=version, changed=changed)

        return self._call("ReloadModel", request, context, handle, needs_model=False)

    def ListModels(self, request, context):  # noqa: N802
        def handle(bundle, r):
            self._authorize(context)
            serving = "" if bundle is None else str(bundle.version)
            latest = self.store.latest_version()
            models = [
                pb.ModelVersion(
                    version=str(v["version"]), created_at=str(v.get("created_at") or ""),
                    latest=str(v["version"]) == latest, serving=str(v["version"]) == serving,
                )
                for v in self.store.list_versions()
            ]
            return pb.ListModelsResponse(models=models, serving_version=serving)

        return self._call("ListModels", request, context, handle, needs_model=False)

    def UpsertItems(self, request, context):  # noqa: N802
        def handle(bundle, r):
            self._authorize(context)
            rows = upsert_rows(r, self.limits)
            result = self.store.upsert(rows, change_id=r.change_id or None)
            return pb.UpsertItemsResponse(
                added=result.added, updated=result.updated, catalogue_seq=result.seq, change_id=result.change_id,
                applied=result.applied, model_version=str(self.store.current.version),
                unknown_values=[pb.UnknownValue(item_id=i, attribute=f, value=v) for i, f, v in result.unknown],
            )

        return self._call("UpsertItems", request, context, handle)

    def RetireItems(self, request, context):  # noqa: N802
        def handle(bundle, r):
            self._authorize(context)
            ids = service.check_ids(r.item_ids, self.limits, name="item_ids")
            if not ids:
                raise InvalidArgument("`item_ids` must not be empty")
            result = self.store.retire(ids, change_id=r.change_id or None)
            return pb.RetireItemsResponse(
                retired=result.retired, unknown_item_ids=result.unknown_ids, catalogue_seq=result.seq,
                change_id=result.change_id, applied=result.applied, model_version=str(self.store.current.version),
            )

        return self._call("RetireItems", request, context, handle)


def upsert_rows(r: pb.UpsertItemsRequest, limits: Limits) -> list[dict[str, Any]]:
    """``UpsertItemsRequest.items`` -> the rows of recsys.catalogue.changes.upsert_items, checked: IDs present,
    unique and within the limits; at most ``max_ids`` items; an attribute with no value is INVALID_ARGUMENT."""
    if not r.items:
        raise InvalidArgument("`items` must not be empty")
    ids = service.check_ids([it.item_id for it in r.items], limits, name="items.item_id")
    seen: set[str] = set()
    rows = []
    for i, (item_id, it) in enumerate(zip(ids, r.items, strict=True)):
        if not item_id:
            raise InvalidArgument(f"`items[{i}].item_id` must not be empty")
        if item_id in seen:
            raise InvalidArgument(f"`items[{i}].item_id` {item_id[:80]!r} appears twice in the request")
        seen.add(item_id)
        row: dict[str, Any] = {"item_id": item_id}
        for name, values in it.attributes.items():
            if not values.values:
                raise InvalidArgument(f"`items[{i}].attributes[{name[:80]!r}]` has no value")
            row[name] = list(values.values)  # a list is taken as the values themselves (never split)
        if it.title:
            row["title"] = it.title
        rows.append(row)
    return rows
