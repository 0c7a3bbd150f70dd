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
from recsys.retrieval import ExactIndex, HnswIndex, bitset


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
    result holds exactly ``k`` items whenever ``k`` live, allowed, non-excluded ones exist."""

    def __init__(self, base: ExactIndex | HnswIndex, *, n_items: int, live: np.ndarray, delta_rows: np.ndarray,
                 delta_vectors: np.ndarray) -> None:
        self.base = base
        self.dim = base.dim
        self.metric = base.metric
        self.size = int(n_items)
        self.live = live  # bitset over rows 0..n_items-1
        n_base = int(base.size)
        in_delta = bitset.from_ids(delta_rows[delta_rows < n_base], n_base)
        # the graph's rows that may answer: live and not replaced by a newer vector in the segment
        self._base_live = live[: in_delta.size] & ~in_delta
        if bitset.count(self._base_live) == n_base:  # nothing retired or replaced: the plain (fastest) search
            self._base_live = None
        self.delta = (ExactIndex(delta_vectors, ids=delta_rows, metric=base.metric) if delta_rows.size else None)

    @property
    def ef(self) -> int:  # read by tuning reports and GetModelInfo-like callers
        return int(getattr(self.base, "ef", 0))

    def search(self, queries: np.ndarray, k: int, *, exclude: Sequence[np.ndarray | None] | None = None,
               include: Sequence[np.ndarray | None] | None = None,
               allow: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        base_allow = self._base_live if allow is None else allow if self._base_live is None else _and(
            self._base_live, allow)
        ids, scores = self.base.search(queries, k, exclude=exclude, include=include, allow=base_allow)
        if self.delta is None:
            return ids, scores
        delta_allow = self.live if allow is None else _and(self.live, allow)
        d_ids, d_scores = self.delta.search(queries, k, exclude=exclude, include=include, allow=delta_allow)
        return merge_topk(ids, scores, d_ids, d_scores, k)


def _and(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    n = min(a.size, b.size)
    return a[:n] & b[:n]


def merge_topk(ids_a: np.ndarray, sc_a: np.ndarray, ids_b: np.ndarray, sc_b: np.ndarray,
               k: int) -> tuple[np.ndarray, np.ndarray]:
    """Two ``[n, k]`` answers (padded -1 / -inf) -> the best ``k`` of both per row, best first (ties: ``a``
    first)."""
    ids = np.concatenate([ids_a, ids_b], axis=1)
    sc = np.concatenate([sc_a, sc_b], axis=1)
    order = np.argsort(-sc, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, axis=1), np.take_along_axis(sc, order, axis=1)


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
        view.filters = FilterCache(attributes)  # type: ignore[attr-defined]
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
    view.filters = FilterCache(attributes.extended(n_items, rows, [u.features for _, u in upserts]))  # type: ignore[attr-defined]
    view.catalogue = CatalogueInfo(size=int(live_mask.sum()), upserted=len(upserts),  # type: ignore[attr-defined]
                                   retired=int(retired_rows.size), seq=state.seq)
    return view


def _ro(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a
