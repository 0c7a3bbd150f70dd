"""``Recommend`` in one native call (``recsys._hnsw.KnownUserRecommender``), built once per bundle.

The most common requests -- a known ``user_id`` and ``k``, seen items excluded or not, no lists; the same user
with fresh events in ``history_item_ids``; a new user's ``history_item_ids``; any of these with a ``filter`` once
the servicer has compiled it (``recommend_filtered``) -- are answered from the serialized
request straight to the serialized response in C++: protobuf parse, user and item lookups, the user tower where
there are events (``server.service.NativeUserTower``, the very object the Python path embeds with), the excluding
graph search and the response bytes, without the GIL. Every other request (and any case the native side is not
sure of: unknown or over-long IDs, k out of range, too many events, a huge exclusion, fewer than k results, a
non-unit query row) gets ``None`` back and takes the Python path, which owns all errors and reports unknown items.
The answer is byte-identical to the Python path's (checked here at build, and ``tests/test_server_fastpath.py``).
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np

from recsys.retrieval import UNIT_SQ_TOL, HnswIndex, bitset
from recsys.retrieval.partitions import native_parts
from recsys.v1 import recommender_pb2 as pb
from server import service
from server.wire import item_filter, recommend_response

log = logging.getLogger("recsys.server")

def build(bundle: Any, *, check_users: int = 16) -> Any | None:
    """A ``KnownUserRecommender`` for ``bundle``, or None when its index is not the native HNSW one -- or when its
    answers for ``check_users`` users spread over the bundle (k=10, seen items excluded and not) differ from the
    Python path's by a single byte: then the error is logged and the Python path serves every request."""
    index = getattr(bundle, "index", None)
    if not isinstance(index, HnswIndex) or not index.native_filter:
        return None
    from recsys import _hnsw  # compiled extension: optional (not built without a C++ compiler)

    users = np.ascontiguousarray(bundle.user_embeddings, dtype=np.float32)
    sq = np.einsum("ij,ij->i", users, users, dtype=np.float64) if users.size else np.zeros(len(users))
    ok = np.isfinite(sq)
    if index.metric == "cosine":
        # the Python path uses a row as-is when its squared norm is within UNIT_SQ_TOL of 1, else normalises it:
        # rows near that edge (or not unit at all) are left to it, so both paths search the same vector
        ok &= np.abs(sq - 1.0) <= 0.9 * UNIT_SQ_TOL
    offsets, rows = bundle.seen_csr()
    tower = service.user_tower(bundle)
    events: dict = {}
    if isinstance(tower, service.NativeUserTower):  # requests with history_item_ids: the same tower, natively
        hist_off, hist_rows = bundle.history_csr()
        events = {"tower": tower.native, "history_offsets": np.ascontiguousarray(hist_off, dtype=np.int64),
                  "history_items": np.ascontiguousarray(hist_rows, dtype=np.int64),
                  "events_source": int(pb.SOURCE_KNOWN_USER_WITH_EVENTS), "history_source": int(pb.SOURCE_HISTORY),
                  "unit_sq_tol": UNIT_SQ_TOL}
    fast = _hnsw.KnownUserRecommender(
        index._index, [str(u) for u in np.asarray(bundle.user_ids).tolist()], users,
        np.ascontiguousarray(ok, dtype=np.uint8), np.ascontiguousarray(offsets, dtype=np.int64),
        np.ascontiguousarray(rows, dtype=np.int64), service.prepared(bundle).item_ids, str(bundle.version),
        int(pb.SOURCE_KNOWN_USER), int(index.ef), int(index.ef_filtered), float(index.exact_fallback_fraction),
        **events,
    )
    problem = _disagreement(fast, bundle, check_users)
    if problem:
        log.error("native Recommend disabled for model %s: %s", bundle.version, problem)
        return None
    return fast


def _disagreement(fast: Any, bundle: Any, n: int) -> str | None:
    """The first request (of ``n`` users x seen excluded / included x alone / with fresh events / a new user with
    their events) on which ``fast`` and the Python path differ."""
    limits = service.Limits()
    n_users, n_items = int(bundle.n_users), int(bundle.n_items)
    names = service.prepared(bundle).item_ids
    rng = np.random.default_rng(0)
    for row in np.unique(np.linspace(0, n_users - 1, min(n, n_users)).astype(np.int64)) if n_users else []:
        fresh = [names[i] for i in rng.integers(0, n_items, 1 + int(row) % 12)]
        user = str(bundle.user_ids[row])
        for include_seen, (user_id, history) in itertools.product((False, True), ((user, []), (user, fresh), ("", fresh))):
            req = pb.RecommendRequest(user_id=user_id, history_item_ids=history, k=min(10, n_items),
                                      include_seen=include_seen)
            got = fast.recommend(req.SerializeToString(), limits.max_k, limits.max_id_length, limits.max_history)
            if got is None:
                continue  # declined: the Python path answers it anyway
            want = recommend_response(bundle, req, limits).SerializeToString()
            if got != want:
                return (f"answers differ for user {req.user_id!r} with {len(history)} events "
                        f"(include_seen={include_seen}): "
                        f"{len(got)} bytes vs {len(want)} from the Python path")
    return None


_FAST = service.PerBundle(build)


def for_bundle(bundle: Any) -> Any | None:
    """The bundle's fast path (built on first use -- the model store builds it at warm-up), or None."""
    return _FAST.get(bundle)


def recommend_filtered(fast: Any, bundle: Any, request: pb.RecommendRequest, data: bytes, limits: Any) -> bytes | None:
    """A request with a ``filter`` (``request``, parsed from ``data``) answered natively: the filter compiled as
    the Python path compiles it (``service.allowed_by``, cached per bundle), then the same request bytes with the
    allowed set, when the index would walk the graph for it (``HnswIndex.allow_plan``) at the Python path's width
    and budget -- or, for a set inside some of the index's partitions (``index.partition_by``), the searches of
    those partitions' graphs and the exact scan beside them that the Python path runs
    (:func:`recsys.retrieval.partitions.native_parts`). None
    (the Python path answers, and owns every error) for a filter the bundle cannot compile, a set small enough for
    the exact scan, or anything the native side declines."""
    try:
        words = service.allowed_by(bundle, item_filter(request.filter))
    except service.InvalidArgument:
        return None
    index = bundle.index
    if words is None or not isinstance(index, HnswIndex):
        return None
    keys, parts = bitset.within_of(words), index.partitions
    if keys is not None and parts is not None:  # a set inside some partitions: their graphs, as the Python path
        plan = parts.plan(words, keys, scan_limit=index.exact_scan_limit)
        if plan is not None:
            spec = native_parts(index, plan, words)
            if spec is None:
                return None
            return fast.recommend(data, limits.max_k, limits.max_id_length, limits.max_history, allow=words,
                                  parts=spec[0], scan=spec[1])
    walk = index.allow_walk(words)
    if walk is None:
        return None
    return fast.recommend(data, limits.max_k, limits.max_id_length, limits.max_history, allow=words,
                          allow_width=walk.width, allow_budget=walk.budget, allow_count=walk.count,
                          allow_near_width=walk.near_width)
