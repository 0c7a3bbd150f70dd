"""Recommendation logic over a loaded :class:`recsys.bundle.Bundle`, free of gRPC.

The gRPC servicer (``server/servicer.py``) is a thin adapter: it turns a request message into a call of one
function here, the result into a response message, and a :class:`ServiceError` into a status code (in one
place, ``server.servicer.STATUS_OF``). Every function takes the bundle explicitly, so a request that grabbed a
bundle at its start finishes on it even when the server swaps models underneath.

Row conventions follow the bundle: item rows index ``bundle.item_embeddings`` [n_items, dim] and the index; the
index returns ids [n, k] int64 and scores [n, k] float32, padded with id -1 / score -inf.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import math
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from recsys.bundle import Bundle
from recsys.catalogue.filters import FilterCache, ItemFilter, UnknownAttribute
from recsys.retrieval import bitset, retrieve, retrieve_one

SOURCE_KNOWN_USER = "known_user"
SOURCE_KNOWN_USER_WITH_EVENTS = "known_user_with_events"
SOURCE_HISTORY = "history"
SOURCE_POPULARITY = "popularity"


class ServiceError(Exception):
    """A request the service cannot answer; the subclass decides the status code."""


class InvalidArgument(ServiceError):
    """The request itself is malformed (the message names the field and the value received)."""


class NotFound(ServiceError):
    """A user, item or model version the request needs is unknown."""


class Unavailable(ServiceError):
    """No model is loaded yet, or the server is shutting down."""


class FailedPrecondition(ServiceError):
    """A model bundle was refused (fails verification); the current model keeps serving."""


class Unauthenticated(ServiceError):
    """An admin call without the configured bearer token."""


@dataclass(frozen=True)
class Limits:
    """Request limits; every violation is INVALID_ARGUMENT, never a silent clamp."""

    # largest `k` a request may ask for
    max_k: int = 1000
    # most IDs in one list field (user_ids, exclude_item_ids, allowed_item_ids, ...; a batch's per-user
    # history_item_ids lists count together as one field)
    max_ids: int = 1000
    # most history items (a new user's history, or a known user's fresh events) for one user
    max_history: int = 1000
    # longest ID, in characters
    max_id_length: int = 256


@dataclass(slots=True)
class Recommendation:
    """Top-k answer for one query: parallel lists of item IDs and scores, best first. ``source``: one of the
    ``SOURCE_*`` names, "" when nothing answered (``found`` False)."""

    item_ids: list[str]
    scores: list[float]
    source: str
    fallback: bool = False
    found: bool = True
    unknown_item_ids: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------- validation


def _show(value: Any, limit: int = 40) -> str:
    """A short repr for error messages (a 1 MB ID is not echoed back in full)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"...' ({len(value)} chars)"


def check_k(k: int, limits: Limits, *, name: str = "k") -> int:
    if not 1 <= k <= limits.max_k:
        raise InvalidArgument(f"`{name}` must be in [1, {limits.max_k}], got {k}")
    return k


def check_id(value: str, limits: Limits, *, name: str) -> str:
    if not value:
        raise InvalidArgument(f"`{name}` must be a non-empty ID, got ''")
    if len(value) > limits.max_id_length:
        raise InvalidArgument(
            f"`{name}` must be at most {limits.max_id_length} characters, got {_show(value)}"
        )
    return value


def check_ids(values: Sequence[str], limits: Limits, *, name: str, max_n: int | None = None) -> list[str]:
    """Validate a list of IDs: at most ``max_n`` (default ``limits.max_ids``), each non-empty and not too long."""
    max_n = limits.max_ids if max_n is None else max_n
    if len(values) > max_n:
        raise InvalidArgument(f"`{name}` may hold at most {max_n} IDs, got {len(values)}")
    out = list(values)
    longest = limits.max_id_length
    for i, v in enumerate(out):
        if not v or len(v) > longest:
            check_id(v, limits, name=f"{name}[{i}]")
    return out


# ---------------------------------------------------------------------------------------------------- helpers


class Prepared:
    """Per-bundle views for the request path, built once per bundle (see :func:`prepared`).

    ``item_ids`` holds the external item IDs as Python ``str`` objects: answers reuse them instead of converting
    numpy unicode scalars on every request.
    """

    __slots__ = ("__weakref__", "item_ids", "version")

    def __init__(self, bundle: Bundle) -> None:
        base = getattr(bundle, "base", None)
        if base is not None and base is not bundle:  # a live-catalogue view: its bundle's IDs, then the new ones
            head = _PREPARED.get(base).item_ids
            self.item_ids: list[str] = head + [str(t) for t in np.asarray(bundle.item_ids[len(head):]).tolist()]
        else:
            self.item_ids = [str(t) for t in np.asarray(bundle.item_ids).tolist()]
        self.version = str(bundle.version)


_MISSING = object()


class PerBundle:
    """A value built once per bundle by ``build(bundle)`` (None included), kept while the bundle lives.

    The last bundle's entry is checked first: calling a weakref is cheaper than WeakKeyDictionary.get (which builds
    a new weakref per call). A weakref, so a swapped-out bundle is not kept alive; one tuple, so readers see a
    consistent pair while another thread replaces it. Built under a lock, once per bundle.
    """

    def __init__(self, build: Any) -> None:
        self._build = build
        self._cache: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
        self._lock = threading.RLock()  # re-entrant: a live-catalogue view's value may be its bundle's
        self._last: tuple[Any, Any] = (lambda: None, _MISSING)

    def get(self, bundle: Bundle) -> Any:
        ref, value = self._last
        if ref() is bundle and value is not _MISSING:
            return value
        value = self._cache.get(bundle, _MISSING)
        if value is _MISSING:
            with self._lock:
                value = self._cache.get(bundle, _MISSING)
                if value is _MISSING:
                    value = self._cache[bundle] = self._build(bundle)
        self._last = (weakref.ref(bundle), value)
        return value


_PREPARED = PerBundle(Prepared)


def prepared(bundle: Bundle) -> Prepared:
    """The bundle's :class:`Prepared` views (built on first use; dropped with the bundle after a hot reload)."""
    return _PREPARED.get(bundle)


def _known_rows(bundle: Bundle, ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    """Item rows [m] int64 of the known IDs (request order) and the unknown IDs."""
    if not ids:
        return np.empty(0, dtype=np.int64), []
    rows, unknown = bundle.item_rows(ids)
    return np.asarray(rows, dtype=np.int64), list(unknown)


_TOWER_TOLERANCE = 1e-5  # largest |difference| to bundle.embed_users accepted in the self-check


class NativeUserTower:
    """``recsys._hnsw.UserTower``: the C++ twin of the user tower (``recsys.train.model.NumpyUserTower``'s arrays, the
    same math one user at a time, without the GIL), called like the numpy twin. The native known-user Recommend
    (server/fastpath.py) runs the same object, so both paths embed a user bit for bit alike."""

    __slots__ = ("__weakref__", "native")

    def __init__(self, twin: Any) -> None:
        from recsys import _hnsw  # compiled extension: optional (not built without a C++ compiler)

        self.native = _hnsw.UserTower(**twin.arrays())

    def __call__(self, rows: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        """user rows [n] int64 (-1 = a new user), histories (item rows, oldest first) -> [n, dim] float32."""
        offsets = np.zeros(len(histories) + 1, dtype=np.int64)
        np.cumsum([len(h) for h in histories], out=offsets[1:])
        items = np.concatenate(histories).astype(np.int64, copy=False) if len(histories) else offsets[:0]
        return self.native.embed(np.asarray(rows, dtype=np.int64), offsets, items)


def _build_tower(bundle: Bundle) -> Any:
    """The bundle's user tower for request paths: :class:`NativeUserTower` where the extension is built, else
    ``recsys.train.model.NumpyUserTower`` (the tower's math as a few numpy calls on the model's weights): one user in
    ~10 / ~50 us where the torch forward takes ~300 us. Each is checked against ``bundle.embed_users`` on users
    spread over the bundle (known users with their stored history + a few items, new users with and without a
    history, several batch shapes); the first that agrees serves. None -- every call then goes to
    ``bundle.embed_users`` -- when the bundle has no torch model or neither twin agrees (logged)."""
    base = getattr(bundle, "base", None)
    if base is not None and base is not bundle:  # a live-catalogue view: the towers are its bundle's
        return _TOWER.get(base)
    log = logging.getLogger("server.service")
    try:
        from recsys.train.model import NumpyUserTower, TwoTower  # torch: not on the serving import path

        model = bundle.model
    except Exception as e:  # a bundle without towers (test doubles) or without torch
        log.warning("no request-path user tower for model %s (%s: %s); bundle.embed_users serves",
                    getattr(bundle, "version", "?"), type(e).__name__, e)
        return None
    if not isinstance(model, TwoTower) or int(bundle.n_users) < 1 or int(bundle.n_items) < 1:
        return None
    n_users, n_items = int(bundle.n_users), int(bundle.tower_items)
    rng = np.random.default_rng(0)
    rows = np.unique(np.linspace(0, n_users - 1, min(8, n_users)).astype(np.int64))
    rows = np.concatenate([rows, [-1, -1]])
    width = int(bundle.max_history or 8)
    histories = [
        np.concatenate((bundle.history(int(r)) if r >= 0 else np.empty(0, np.int64),
                        rng.integers(0, n_items, 1 + i % max(width, 1)))).astype(np.int64)
        for i, r in enumerate(rows)
    ]
    histories[-1] = histories[-1][:0]  # a new user with no history at all

    def disagreement(tower: Any) -> float:
        worst = 0.0
        for batch in (slice(None), slice(0, 1), slice(len(rows) - 1, None), slice(2, 5)):
            got = tower(rows[batch], histories[batch])
            want = np.asarray(bundle.embed_users(rows[batch], histories[batch]), dtype=np.float32)
            worst = max(worst, float(np.abs(got - want).max()) if got.shape == want.shape else math.inf)
        return worst

    try:
        twin = NumpyUserTower(model)
        towers = [twin]
        try:
            towers.insert(0, NativeUserTower(twin))
        except (ImportError, AttributeError, TypeError):  # no extension (or an older one), or a tower it lacks: numpy
            pass
        for tower in towers:
            diff = disagreement(tower)
            if diff <= _TOWER_TOLERANCE:
                return tower
            log.error("%s disabled for model %s: it differs from bundle.embed_users by %g", type(tower).__name__,
                      bundle.version, diff)
    except Exception:
        log.exception("request-path user tower disabled for model %s (bundle.embed_users serves)", bundle.version)
    return None


_TOWER = PerBundle(_build_tower)


def user_tower(bundle: Bundle) -> Any:
    """The bundle's checked request-path tower, :class:`NativeUserTower` or ``recsys.train.model.NumpyUserTower`` (built
    on first use; the model store builds it at warm-up), or None when ``bundle.embed_users`` must serve."""
    return _TOWER.get(bundle)


def _tower_queries(bundle: Bundle, rows: Sequence[int], items: Sequence[np.ndarray]) -> np.ndarray:
    """ONE user-tower call: user rows [n] (-1 = a new user) with, per user, the stored history (known users)
    followed by the request's item rows (oldest first) -> queries [n, dim] float32. The tower keeps the most
    recent items, as many as it reads (``max_history``)."""
    history = bundle.history
    if bundle.tower_items < bundle.n_items:  # a live catalogue: the tower reads the bundle's items only
        items = [e[e < bundle.tower_items] for e in items]
    combined = [e if r < 0 else np.concatenate((history(r), e)) for r, e in zip(rows, items, strict=True)]
    tower = _TOWER.get(bundle)
    embed = bundle.embed_users if tower is None else tower
    return np.asarray(embed(np.asarray(rows, dtype=np.int64), combined), dtype=np.float32)


def _filter_cache(bundle: Bundle) -> FilterCache:
    # a live catalogue view (recsys.catalogue.live) carries its own; a plain bundle gets one on first use
    got = getattr(bundle, "filters", None)
    return got if got is not None else FilterCache.for_bundle(bundle)


_FILTERS = PerBundle(_filter_cache)


def allowed_by(bundle: Bundle, item_filter: ItemFilter | None) -> np.ndarray | None:
    """The items ``item_filter`` allows, as a bitset over item rows (None = no filter); an attribute the bundle
    does not have is InvalidArgument naming it."""
    if not item_filter:
        return None
    try:
        return _FILTERS.get(bundle).allowed(item_filter)
    except UnknownAttribute as e:
        raise InvalidArgument(f"`filter`: {e}") from None


def _union(*parts: np.ndarray | None) -> np.ndarray | None:
    arrays = [p for p in parts if p is not None and len(p)]
    if not arrays:
        return None
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def _as_recommendation(
    bundle: Bundle, ids: np.ndarray, scores: np.ndarray, *, source: str, unknown: list[str] | None = None
) -> Recommendation:
    keep = ids >= 0  # drop the -1 padding when fewer than k candidates remain
    if not keep.all():
        ids, scores = ids[keep], scores[keep]
    names = prepared(bundle).item_ids
    return Recommendation(
        item_ids=[names[i] for i in ids.tolist()],
        scores=scores.tolist(),
        source=source,
        fallback=source == SOURCE_POPULARITY,
        unknown_item_ids=unknown or [],
    )


def popular(
    bundle: Bundle, k: int, *, exclude: np.ndarray | None = None, allowed: np.ndarray | None = None,
    allow: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` most popular item rows after exclusions, with rank scores ``1 / (1 + rank)`` (1 for the top).

    Popular means recent: ``bundle.popular_items`` ranks by each item's events in the window the export chose
    (the last W days before the end of the logs), ties by all-time counts, then by row; bundles from before the
    window rank by all-time counts.
    """
    rows = np.asarray(bundle.popular_items, dtype=np.int64)
    rank = np.arange(rows.size)
    keep = np.ones(rows.size, dtype=bool)
    if exclude is not None and len(exclude):
        keep &= ~np.isin(rows, exclude)
    if allowed is not None:
        keep &= np.isin(rows, allowed)
    if allow is not None:  # a filter's bitset
        keep &= bitset.contains(allow, rows)
    rows, rank = rows[keep][:k], rank[keep][:k]
    return rows, (1.0 / (1.0 + rank)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------- queries


def recommend(
    bundle: Bundle,
    *,
    user_id: str = "",
    history_item_ids: Sequence[str] = (),
    k: int,
    include_seen: bool = False,
    exclude_item_ids: Sequence[str] = (),
    allowed_item_ids: Sequence[str] = (),
    allow_fallback: bool = False,
    item_filter: ItemFilter | None = None,
    limits: Limits = Limits(),
) -> Recommendation:
    """Top-k items for one user (see ``RecommendRequest`` in the proto for the semantics of each option).

    A known ``user_id`` uses its stored embedding, or, with ``history_item_ids`` (its fresh events) of which at
    least one is known, the user tower on its stored history + those events (the events excluded like seen
    items); otherwise the user tower embeds the known items of ``history_item_ids`` (a new user); otherwise, with
    ``allow_fallback``, the most popular items.
    """
    check_k(k, limits)
    if user_id:
        check_id(user_id, limits, name="user_id")
    row = bundle.user_row(user_id) if user_id else None
    if row is not None and not (history_item_ids or exclude_item_ids or allowed_item_ids or item_filter):
        # a known user and nothing else (the most common request): the stored embedding, seen items excluded
        seen = None if include_seen else bundle.seen_items(row)
        return _answer(bundle, bundle.user_embeddings[row : row + 1], k, seen, None, source=SOURCE_KNOWN_USER)
    if history_item_ids:
        check_ids(history_item_ids, limits, name="history_item_ids", max_n=limits.max_history)
    if exclude_item_ids:
        check_ids(exclude_item_ids, limits, name="exclude_item_ids")
    if allowed_item_ids:
        check_ids(allowed_item_ids, limits, name="allowed_item_ids")
    if not user_id and not history_item_ids:
        raise InvalidArgument("give `user_id` or a non-empty `history_item_ids`, got neither")

    exclude = _known_rows(bundle, exclude_item_ids)[0] if exclude_item_ids else None
    allowed = _known_rows(bundle, allowed_item_ids)[0] if allowed_item_ids else None
    allow = allowed_by(bundle, item_filter)
    history, unknown = _known_rows(bundle, history_item_ids)
    if row is not None:
        seen = None if include_seen else bundle.seen_items(row)
        if not history.size:  # no fresh events (or none the model knows): the stored embedding
            query = bundle.user_embeddings[row : row + 1]  # [1, dim]
            return _answer(bundle, query, k, _union(seen, exclude), allowed, source=SOURCE_KNOWN_USER,
                           unknown=unknown, allow=allow)
        query = _tower_queries(bundle, [row], [history])  # [1, dim]
        fresh = None if include_seen else history
        return _answer(bundle, query, k, _union(seen, fresh, exclude), allowed,
                       source=SOURCE_KNOWN_USER_WITH_EVENTS, unknown=unknown, allow=allow)

    if history.size:
        query = _tower_queries(bundle, [-1], [history])  # [1, dim]
        seen = None if include_seen else history
        return _answer(bundle, query, k, _union(seen, exclude), allowed, source=SOURCE_HISTORY, unknown=unknown,
                       allow=allow)

    if not allow_fallback:
        if history_item_ids:
            raise NotFound(
                f"none of the {len(history_item_ids)} `history_item_ids` is a known item "
                f"(first: {_show(history_item_ids[0])}) and `allow_fallback` is not set"
            )
        raise NotFound(f"unknown `user_id` {_show(user_id)} (send `history_item_ids` or set `allow_fallback`)")
    seen = None if include_seen else history
    ids, scores = popular(bundle, k, exclude=_union(seen, exclude), allowed=allowed, allow=allow)
    return _as_recommendation(bundle, ids, scores, source=SOURCE_POPULARITY, unknown=unknown)


def _answer(
    bundle: Bundle, query: np.ndarray, k: int, exclude: np.ndarray | None, allowed: np.ndarray | None, *,
    source: str, unknown: list[str] | None = None, allow: np.ndarray | None = None,
) -> Recommendation:
    """Search for one query [1, dim] (:func:`recsys.retrieval.retrieve_one`) and wrap the answer."""
    rows, scores = retrieve_one(bundle.index, query, k, exclude=exclude, include=allowed, allow=allow)
    names = prepared(bundle).item_ids
    return Recommendation(item_ids=[names[r] for r in rows], scores=scores, source=source,
                          unknown_item_ids=unknown or [])


def check_histories(
    histories: Mapping[str, Sequence[str]], user_ids: Sequence[str], limits: Limits, *,
    name: str = "history_item_ids",
) -> dict[str, list[str]]:
    """Validate a batch's per-user item lists: every key one of ``user_ids``, each list at most ``max_history``
    IDs, all lists together at most ``max_ids``, each ID as :func:`check_ids`. Returns the non-empty lists."""
    if not histories:
        return {}
    wanted = set(user_ids)
    total = 0
    for user, ids in histories.items():
        if user not in wanted:
            raise InvalidArgument(f"`{name}` has the key {_show(user)}, which is not one of `user_ids`")
        total += len(ids)
    if total > limits.max_ids:
        raise InvalidArgument(f"`{name}` may hold at most {limits.max_ids} IDs in all lists together, got {total}")
    return {
        user: check_ids(ids, limits, name=f"{name}[{_show(user)}]", max_n=limits.max_history)
        for user, ids in histories.items()
        if ids
    }


_NO_EVENTS: tuple[np.ndarray, list[str]] = (np.empty(0, dtype=np.int64), [])


# ~90 lines: one tower call and one index search for the whole batch, then the answers in request order; the
# steps share the per-user bookkeeping, so they stay together.
def batch_recommend(
    bundle: Bundle,
    *,
    user_ids: Sequence[str],
    k: int,
    include_seen: bool = False,
    exclude_item_ids: Sequence[str] = (),
    allowed_item_ids: Sequence[str] = (),
    allow_fallback: bool = False,
    history_item_ids: Mapping[str, Sequence[str]] | None = None,
    item_filter: ItemFilter | None = None,
    limits: Limits = Limits(),
) -> tuple[list[Recommendation], list[str]]:
    """Top-k items for many users: ONE user-tower call for the users with usable fresh events / histories, then
    ONE batched index query over every user answered from an embedding.

    ``history_item_ids`` maps a user ID of ``user_ids`` to its items, with the semantics of ``recommend``'s
    ``history_item_ids`` (a known user's fresh events, a new user's history; see :func:`check_histories` for the
    limits). Returns one :class:`Recommendation` per requested user (request order; an unknown user without a
    usable history gets ``found=False`` and no items, or the popularity fallback with ``allow_fallback``) and the
    list of user IDs the model does not know (request order).
    """
    check_k(k, limits)
    check_ids(user_ids, limits, name="user_ids")
    if not user_ids:
        raise InvalidArgument("`user_ids` must not be empty")
    check_ids(exclude_item_ids, limits, name="exclude_item_ids")
    check_ids(allowed_item_ids, limits, name="allowed_item_ids")
    histories = check_histories(history_item_ids or {}, user_ids, limits)
    exclude, _ = _known_rows(bundle, exclude_item_ids)
    exclude_or_none = exclude if exclude.size else None
    allowed = _known_rows(bundle, allowed_item_ids)[0] if allowed_item_ids else None
    allow = allowed_by(bundle, item_filter)

    user_row = bundle.user_row
    rows = [user_row(u) for u in user_ids]
    unknown_ids = [u for u, r in zip(user_ids, rows, strict=True) if r is None]
    # each distinct user's items: (known item rows, unknown IDs); the tower embeds each such user once
    events = {u: _known_rows(bundle, ids) for u, ids in histories.items()}
    tower: dict[str, int] = {u: j for j, u in enumerate(u for u, (e, _) in events.items() if e.size)}
    answered = [i for i, (u, r) in enumerate(zip(user_ids, rows, strict=True)) if r is not None or u in tower]
    results: list[Recommendation | None] = [None] * len(user_ids)
    if answered:
        query_rows = np.asarray([0 if rows[i] is None else rows[i] for i in answered], dtype=np.int64)
        queries = bundle.user_embeddings[query_rows]  # [n_answered, dim] (a copy: the tower rows go in below)
        sources = [SOURCE_KNOWN_USER] * len(answered)
        if tower:
            row_of = dict(zip(user_ids, rows, strict=True))
            users = list(tower)
            tower_rows = [-1 if row_of[u] is None else row_of[u] for u in users]
            fresh = _tower_queries(bundle, tower_rows, [events[u][0] for u in users])  # [n_tower, dim]
            for j, i in enumerate(answered):
                t = tower.get(user_ids[i])
                if t is not None:
                    queries[j] = fresh[t]
                    sources[j] = SOURCE_HISTORY if rows[i] is None else SOURCE_KNOWN_USER_WITH_EVENTS
        if include_seen:
            excludes = [exclude_or_none] * len(answered)
        else:
            seen_items = bundle.seen_items
            excludes = [
                _union(None if rows[i] is None else seen_items(rows[i]), events.get(user_ids[i], _NO_EVENTS)[0],
                       exclude_or_none)
                for i in answered
            ]
        ids, scores = retrieve(bundle.index, queries, k, exclude=excludes,
                               include=None if allowed is None else [allowed] * len(answered), allow=allow)
        names = prepared(bundle).item_ids
        flat_ids, flat_scores = ids.tolist(), scores.tolist()  # one conversion for the whole batch
        for j, i in enumerate(answered):
            row_ids, row_scores = flat_ids[j], flat_scores[j]
            if row_ids[-1] < 0:  # padding: fewer than k candidates remain
                n = sum(1 for r in row_ids if r >= 0)
                row_ids, row_scores = row_ids[:n], row_scores[:n]
            results[i] = Recommendation(
                item_ids=[names[r] for r in row_ids], scores=row_scores, source=sources[j],
                unknown_item_ids=list(events.get(user_ids[i], _NO_EVENTS)[1]),
            )
    if len(answered) < len(user_ids):
        if allow_fallback:
            pop_ids, pop_scores = popular(bundle, k, exclude=exclude, allowed=allowed, allow=allow)
            fallback = _as_recommendation(bundle, pop_ids, pop_scores, source=SOURCE_POPULARITY)
        for i, u in enumerate(user_ids):
            if results[i] is None:
                unknown = list(events.get(u, _NO_EVENTS)[1])
                results[i] = (
                    dataclasses.replace(fallback, unknown_item_ids=unknown)
                    if allow_fallback
                    else Recommendation(item_ids=[], scores=[], source="", found=False, unknown_item_ids=unknown)
                )
    return results, unknown_ids  # type: ignore[return-value]


def similar_items(
    bundle: Bundle,
    *,
    item_id: str,
    k: int,
    exclude_item_ids: Sequence[str] = (),
    allowed_item_ids: Sequence[str] = (),
    item_filter: ItemFilter | None = None,
    limits: Limits = Limits(),
) -> Recommendation:
    """The ``k`` items closest to ``item_id`` (the item itself excluded)."""
    check_k(k, limits)
    check_id(item_id, limits, name="item_id")
    check_ids(exclude_item_ids, limits, name="exclude_item_ids")
    check_ids(allowed_item_ids, limits, name="allowed_item_ids")
    row = bundle.item_row(item_id)
    if row is None:
        raise NotFound(f"unknown `item_id` {_show(item_id)}")
    exclude, _ = _known_rows(bundle, exclude_item_ids)
    allowed = _known_rows(bundle, allowed_item_ids)[0] if allowed_item_ids else None
    allow = allowed_by(bundle, item_filter)
    query = bundle.item_queries(np.array([row]))  # [1, dim]
    ex = np.concatenate([np.array([row], dtype=np.int64), exclude])
    return _answer(bundle, query, k, ex, allowed, source=SOURCE_KNOWN_USER, allow=allow)


def _lookup(
    ids: Sequence[str], row_of: Any, table: np.ndarray, *, name: str, limits: Limits
) -> tuple[list[str], np.ndarray, list[str]]:
    check_ids(ids, limits, name=name)
    if not ids:
        raise InvalidArgument(f"`{name}` must not be empty")
    rows = [row_of(x) for x in ids]
    known = [x for x, r in zip(ids, rows, strict=True) if r is not None]
    unknown = [x for x, r in zip(ids, rows, strict=True) if r is None]
    idx = np.array([r for r in rows if r is not None], dtype=np.int64)
    return known, table[idx], unknown


def user_embeddings(
    bundle: Bundle, user_ids: Sequence[str], *, limits: Limits = Limits()
) -> tuple[list[str], np.ndarray, list[str]]:
    """(known IDs in request order, their embeddings [m, dim] float32, unknown IDs)."""
    return _lookup(user_ids, bundle.user_row, bundle.user_embeddings, name="user_ids", limits=limits)


def item_embeddings(
    bundle: Bundle, item_ids: Sequence[str], *, limits: Limits = Limits()
) -> tuple[list[str], np.ndarray, list[str]]:
    """(known IDs in request order, their embeddings [m, dim] float32, unknown IDs)."""
    return _lookup(item_ids, bundle.item_row, bundle.item_embeddings, name="item_ids", limits=limits)


def embed_user(
    bundle: Bundle, history_item_ids: Sequence[str] = (), *, user_id: str = "", limits: Limits = Limits()
) -> tuple[np.ndarray, list[str], str]:
    """A user's embedding [dim] float32, the unknown IDs of ``history_item_ids`` and the ``SOURCE_*`` used.

    The rules of :func:`recommend`: a known ``user_id`` with fresh events (``history_item_ids``, at least one
    known) -> the user tower on its stored history + the events; a known ``user_id`` otherwise -> its stored
    embedding; an empty or unknown ``user_id`` -> the tower on ``history_item_ids`` alone (a new user).
    """
    if user_id:
        check_id(user_id, limits, name="user_id")
    check_ids(history_item_ids, limits, name="history_item_ids", max_n=limits.max_history)
    row = bundle.user_row(user_id) if user_id else None
    history, unknown = _known_rows(bundle, history_item_ids)
    if row is not None:
        if not history.size:
            return np.array(bundle.user_embeddings[row], dtype=np.float32), unknown, SOURCE_KNOWN_USER
        return _tower_queries(bundle, [row], [history])[0], unknown, SOURCE_KNOWN_USER_WITH_EVENTS
    if not history_item_ids:
        if user_id:
            raise NotFound(f"unknown `user_id` {_show(user_id)} (send `history_item_ids` to embed a new user)")
        raise InvalidArgument("`history_item_ids` must not be empty when `user_id` is empty")
    if history.size == 0:
        raise NotFound(
            f"none of the {len(history_item_ids)} `history_item_ids` is a known item "
            f"(first: {_show(history_item_ids[0])})"
        )
    vec = _tower_queries(bundle, [-1], [history])[0]
    return vec, unknown, SOURCE_HISTORY


def flatten_numbers(tree: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"test": {"recall@20": 0.3}}`` -> ``{"test.recall@20": 0.3}``; non-numeric leaves are dropped."""
    out: dict[str, float] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_numbers(value, prefix=name + "."))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            if math.isfinite(float(value)):
                out[name] = float(value)
    return out


def model_info(bundle: Bundle) -> dict[str, Any]:
    """Version, created-at, dim, metric, counts, the flattened evaluation summary ("split.metric" keys) and what
    the final fit trained on (interactions, newest time) of a bundle."""
    evaluation = bundle.evaluation or {}
    split = evaluation.get("split")
    manifest = getattr(bundle, "manifest", None) or {}
    trained = manifest.get("trained_on") or {}
    until = trained.get("ts_max_ms")
    return {
        "version": str(bundle.version),
        "created_at": str(bundle.created_at or ""),
        "dim": int(bundle.dim),
        "metric": str(bundle.metric),
        "n_users": int(bundle.n_users),
        "n_items": int(bundle.n_items),
        "evaluation": flatten_numbers(evaluation, prefix=f"{split}." if isinstance(split, str) else ""),
        "items_in_logs": int((manifest.get("catalogue") or {}).get("items_before_kcore") or 0),
        "trained_interactions": int(trained.get("rows") or 0),
        "trained_until": "" if until is None else
        dt.datetime.fromtimestamp(until / 1000, dt.timezone.utc).isoformat().replace("+00:00", "Z"),
        "fallback_window_days": float(getattr(bundle, "popularity_window_days", None) or 0.0),
        **catalogue_info(bundle),
    }


def catalogue_info(bundle: Bundle) -> dict[str, Any]:
    """The live catalogue's counts (``ModelInfo.catalogue_*``) and the attributes a filter can name."""
    info = getattr(bundle, "catalogue", None)
    attributes = getattr(getattr(bundle, "filters", None), "attributes", None)
    return {
        "catalogue_size": int(info.size) if info is not None else int(bundle.n_items),
        "upserted_items": int(info.upserted) if info is not None else 0,
        "retired_items": int(info.retired) if info is not None else 0,
        "catalogue_seq": int(info.seq) if info is not None else 0,
        "attributes": list(attributes.names) if attributes is not None else [],
    }
