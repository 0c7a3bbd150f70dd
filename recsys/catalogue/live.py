"""A published bundle with its catalogue delta applied: the view the server answers from.

The bundle's HNSW graph is never changed after export. Items upserted since live in a small *delta segment*
scanned exactly (the way Milvus answers from a growing segment until it is indexed), and retired items are cleared
from a live-item bitset that every search takes as its allowed set (inside the native graph walk):

* a new item gets the next row after the bundle's (``n_items`` grows), its vector in the delta segment;
* an updated item keeps its row; the bundle's vector is masked out of the graph and the new one is in the segment;
* a retired item's row is cleared from the live set, so no search returns it (it stays in the vocabulary, so
  histories, exclusion lists and SimilarItems' query item still accept it); an upsert restores it.

:func:`live_bundle` makes the view: a shallow copy of the :class:`recsys.bundle.Bundle` whose item-side fields
(vocabulary, vectors, popularity, ``index`` / ``exact``) cover the live catalogue; the users, histories and towers
are the bundle's own. A bundle with no changes gets a view whose index *is* the bundle's (so the native known-user
Recommend still serves it). Views are immutable: a change makes a new view, swapped in like a hot reload.

The user tower reads items of the bundle's vocabulary only (``tower_items``): an upserted new item in a history
is excluded from the answer like any seen item but does not move the user's embedding until a retrain.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np

from recsys.bundle import Bundle
from recsys.catalogue.delta import CatalogueState
from recsys.catalogue.filters import Attributes, FilterCache
from recsys.retrieval import ExactIndex, HnswIndex, bitset, merge_topk, topk_rows


@dataclasses.dataclass(frozen=True)
class CatalogueInfo:
    """What ``GetModelInfo`` reports of a view's catalogue."""

    size: int
    """Servable items: the bundle's plus the upserted new ones, minus the retired."""
    upserted: int
    """Items upserted since export (new or updated), retired or not."""
    retired: int
    """Items retired and not restored."""
    seq: int
    """The last catalogue change applied (0 = none)."""


class LiveVocab:
    """The bundle's item vocabulary followed by the upserted new IDs (rows ``n_base..``)."""

    def __init__(self, base: Any, new_ids: Sequence[str]) -> None:
        self._base = base
        self._new = {t: len(base) + j for j, t in enumerate(new_ids)}
        self.ids = np.concatenate([np.asarray(base.ids, dtype=object), np.asarray(list(new_ids), dtype=object)])
        self.ids.setflags(write=False)
        self.name = base.name

    def number(self, id_: Any, missing: Any = None) -> Any:
        r = self._base.number(id_)
        if r is not None:
            return r
        return self._new.get(str(id_), missing)

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def __contains__(self, id_: object) -> bool:
        return self.number(id_) is not None


class LiveIndex:
    """The bundle's index (rows ``0..n_base-1``) + the delta segment (exact) + the live-item set, behind the index
    interface (``search(queries, k, exclude=, include=, allow=)``); the two answers are merged by score, so the
    result holds exactly ``k`` items whenever ``k`` live, allowed, non-excluded ones exist.

    The graph's rows that must not answer (retired, or replaced by a newer vector in the segment) join each query's
    exclusion list while they are few (``EXCLUDE_MAX``: the native walk's lean exclusion path, ~ a plain query) and
    become a bitset of the rows that may answer when they are many. The segment is scored by one matrix product.
    """

    # Above this many masked graph rows, a bitset of the live ones (the allowed-set walk) instead of an exclusion list
    EXCLUDE_MAX = 4096

    def __init__(self, base: ExactIndex | HnswIndex, *, n_items: int, live: np.ndarray, delta_rows: np.ndarray,
                 delta_vectors: np.ndarray) -> None:
        self.base = base
        self.dim = base.dim
        self.metric = base.metric
        self.size = int(n_items)
        self.live = live  # bitset over rows 0..n_items-1
        n_base = int(base.size)
        live_mask = bitset.to_mask(live, self.size)
        masked = np.ones(n_base, dtype=bool)
        masked[: min(n_base, self.size)] = ~live_mask[:n_base]
        masked[delta_rows[delta_rows < n_base]] = True
        self._base_masked = np.flatnonzero(masked).astype(np.int64)  # graph rows that must not answer, sorted
        self._base_live = None if self._base_masked.size <= self.EXCLUDE_MAX else bitset.from_mask(~masked)
        self._masked_list = self._base_masked if 0 < self._base_masked.size <= self.EXCLUDE_MAX else None
        # the segment: its live rows only, sorted by row (exclusions are looked up by binary search)
        keep = live_mask[delta_rows] if delta_rows.size else np.zeros(0, dtype=bool)
        order = np.argsort(delta_rows[keep], kind="stable")
        self._delta_rows = delta_rows[keep][order]
        vecs = np.asarray(delta_vectors, dtype=np.float32)[keep][order]
        self._delta_vecs = np.ascontiguousarray(vecs / np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
                                                if self.metric == "cosine" else vecs)

    @property
    def ef(self) -> int:  # the graph's search width, as evaluation reports it for an index (recsys.evaluate.run)
        return int(getattr(self.base, "ef", 0))

    def search(self, queries: np.ndarray, k: int, *, exclude: Sequence[np.ndarray | None] | None = None,
               include: Sequence[np.ndarray | None] | None = None,
               allow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(queries, dtype=np.float32)
        n = q.shape[0] if q.ndim == 2 else -1
        if n < 0:
            raise ValueError(f"`queries` must be 2-D [n, {self.dim}], got shape {q.shape}")
        base_exclude = exclude
        if self._masked_list is not None:
            masked = self._masked_list
            base_exclude = [masked if e is None or not len(e) else np.concatenate((np.asarray(e, dtype=np.int64),
                                                                                    masked))
                            for e in (exclude if exclude is not None else [None] * n)]
        base_allow = self._base_live if allow is None else allow if self._base_live is None else _and(
            self._base_live, allow)
        keys = bitset.within_of(allow)
        if keys is not None and base_allow is not allow:  # the live rows only remove: the hint still holds
            base_allow = bitset.within(base_allow, keys)
        if base_allow is None:
            ids, scores = self.base.search(q, k, exclude=base_exclude, include=include)
        else:
            ids, scores = self.base.search(q, k, exclude=base_exclude, include=include, allow=base_allow)
        if not self._delta_rows.size:
            return ids, scores
        d_ids, d_scores = self._search_delta(q, k, exclude, include, allow)
        return merge_topk([(ids, scores), (d_ids, d_scores)], k)

    def _search_delta(self, q: np.ndarray, k: int, exclude: Sequence[np.ndarray | None] | None,
                      include: Sequence[np.ndarray | None] | None,
                      allow: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of the segment's live rows: ``[n, k]`` ids / scores, padded -1 / -inf."""
        rows, vecs = self._delta_rows, self._delta_vecs
        if self.metric == "cosine":
            q = q / np.maximum(np.sqrt(np.einsum("ij,ij->i", q, q)), 1e-12)[:, None]
        scores = q @ vecs.T  # [n, m]
        if allow is not None:
            scores[:, ~bitset.contains(allow, rows)] = -np.inf
        for i in range(q.shape[0]):
            e = None if exclude is None else exclude[i]
            if e is not None and len(e):
                e = np.asarray(e, dtype=np.int64)
                pos = np.searchsorted(rows, e)
                hit = pos < rows.size
                hit[hit] = rows[pos[hit]] == e[hit]
                scores[i, pos[hit]] = -np.inf
            inc = None if include is None else include[i]
            if inc is not None:
                inside = np.isin(rows, np.asarray(inc, dtype=np.int64))
                scores[i, ~inside] = -np.inf
        if q.shape[0] == 1:  # the request path: one row, without topk_rows' batch machinery
            s0 = scores[0]
            kk = min(k, s0.size)
            part = np.argpartition(-s0, kk - 1)[:kk] if kk < s0.size else np.arange(s0.size)
            order = part[np.argsort(-s0[part], kind="stable")]
            ids = np.full((1, k), -1, dtype=np.int64)
            top = np.full((1, k), -np.inf, dtype=np.float32)
            finite = np.isfinite(s0[order])
            ids[0, :kk] = np.where(finite, rows[order], -1)
            top[0, :kk] = s0[order]
            return ids, top
        pos, top = topk_rows(scores, k)
        return np.where(pos >= 0, rows[np.maximum(pos, 0)], -1), top


def _and(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = min(a.size, b.size)
    return a[:n] & b[:n]


def live_bundle(base: Bundle, state: CatalogueState, *, attributes: Attributes | None = None) -> Bundle:
    """The view of ``base`` with ``state`` applied (see the module docstring). ``attributes``: the base's
    :class:`Attributes` when the caller has them (they are read from the bundle's files otherwise)."""
    n_base = int(base.n_items)
    attributes = Attributes.from_bundle(base) if attributes is None else attributes
    view = copy.copy(base)
    view.base = base  # type: ignore[attr-defined]
    view.catalogue_state = state  # type: ignore[attr-defined]
    view.base_attributes = attributes  # type: ignore[attr-defined]
    view.tower_items = n_base
    upserts = list(state.upserts.items())
    if not upserts and not state.retired:
        view.filters = FilterCache.for_bundle(base, attributes)  # type: ignore[attr-defined]
        view.catalogue = CatalogueInfo(size=n_base, upserted=0, retired=0, seq=state.seq)  # type: ignore[attr-defined]
        return view

    new_ids = [t for t, _ in upserts if base.item_row(t) is None]
    n_items = n_base + len(new_ids)
    vocab = LiveVocab(base.items, new_ids)
    rows = np.array([vocab.number(t) for t, _ in upserts], dtype=np.int64)
    vectors = (np.stack([np.asarray(u.embedding, dtype=np.float32) for _, u in upserts]) if upserts
               else np.zeros((0, base.dim), dtype=np.float32))
    if vectors.shape[1] != base.dim:
        raise ValueError(f"catalogue delta of {base.version}: embeddings have dim {vectors.shape[1]}, the bundle "
                         f"serves {base.dim}")
    emb = np.empty((n_items, base.dim), dtype=np.float32)
    emb[:n_base] = base.item_embeddings
    emb[rows] = vectors
    emb.setflags(write=False)
    retired_rows = np.array([r for r in (vocab.number(t) for t in state.retired) if r is not None], dtype=np.int64)
    live_mask = np.ones(n_items, dtype=bool)
    live_mask[retired_rows] = False
    live = bitset.from_mask(live_mask)
    live.setflags(write=False)

    view.n_items = n_items
    view.items = vocab  # type: ignore[assignment]
    view.item_ids = vocab.ids
    view.item_embeddings = emb
    pad = np.zeros(len(new_ids), dtype=np.int64)
    view.item_popularity = _ro(np.concatenate([base.item_popularity, pad]))
    view.recent_popularity = _ro(np.concatenate([base.recent_popularity, pad]))
    # the fallback's order: the bundle's, then the new items (no events yet), the retired ones left out
    order = np.concatenate([np.asarray(base.popular_items, dtype=np.int64), np.arange(n_base, n_items)])
    view.popular_items = _ro(order[live_mask[order]])
    view.index = LiveIndex(base.index, n_items=n_items, live=live, delta_rows=rows, delta_vectors=vectors)  # type: ignore[assignment]
    view.exact = LiveIndex(base.exact, n_items=n_items, live=live, delta_rows=rows, delta_vectors=vectors)  # type: ignore[assignment]
    view.filters = FilterCache.for_bundle(  # type: ignore[attr-defined]
        base, attributes.extended(n_items, rows, [u.features for _, u in upserts]))
    view.catalogue = CatalogueInfo(size=int(live_mask.sum()), upserted=len(upserts),  # type: ignore[attr-defined]
                                   retired=int(retired_rows.size), seq=state.seq)
    return view


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a
