"""The exact index: brute-force top-k behind the same interface as HNSW (hnswlib's ``BFIndex`` habit)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from recsys.core.io import atomic_write_bytes
from recsys.retrieval import bitset
from recsys.retrieval._arrays import (
    IdMap,
    as_ids,
    as_matrix,
    check_k,
    check_metric,
    per_query,
    topk_rows,
)

# Rows of the [block, size] score matrix the exact scan materialises at once (float32): ~64 MB.
EXACT_BLOCK_FLOATS = 1 << 24


class ExactIndex:
    """Exact top-k by matrix product + argpartition, blocked over queries (hnswlib's ``BFIndex`` twin).

    ``vectors [size, dim]``; ``ids [size]`` non-negative int64 labels (default ``0..size-1``, the item rows).
    """

    def __init__(
        self, vectors: np.ndarray, ids: np.ndarray | None = None, *, metric: str = "cosine"
    ) -> None:
        self.metric = check_metric(metric)
        vecs = as_matrix(vectors, None, self.metric, name="vectors")
        self.dim = int(vecs.shape[1])
        if self.dim < 1:
            raise ValueError(f"`vectors` must have at least one column, got shape {vecs.shape}")
        n = vecs.shape[0]
        ids_arr = np.arange(n, dtype=np.int64) if ids is None else as_ids(ids, n, name="ids")
        # One tuple swapped atomically by add(): a concurrent search sees old or new, never a mix.
        self._state = (vecs, IdMap(ids_arr))

    @property
    def size(self) -> int:
        return int(self._state[0].shape[0])

    @property
    def ids(self) -> np.ndarray:
        """``[size]`` int64, row position -> id."""
        return self._state[1].ids

    @property
    def vectors(self) -> np.ndarray:
        """``[size, dim]`` float32 (unit rows for cosine)."""
        return self._state[0]

    def __repr__(self) -> str:
        return f"ExactIndex(size={self.size}, dim={self.dim}, metric={self.metric!r})"

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Append new items ``vectors [m, dim]`` with new, unused ``ids [m]`` (copy-on-write)."""
        vecs, idmap = self._state
        new = as_matrix(vectors, self.dim, self.metric, name="vectors")
        new_ids = as_ids(ids, new.shape[0], name="ids")
        clash = new_ids[np.isin(new_ids, idmap.ids)]
        if clash.size:
            raise ValueError(f"`ids` already in the index: {clash[:10].tolist()}")
        self._state = (np.concatenate([vecs, new]), IdMap(np.concatenate([idmap.ids, new_ids])))

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: Sequence[np.ndarray | None] | None = None,
        include: Sequence[np.ndarray | None] | None = None,
        allow: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact top-``k`` of ``queries [n, dim]`` -> ``(ids [n, k] int64, scores [n, k] float32)``, best first.

        ``exclude[i]`` / ``include[i]``: ids never / only returned for query ``i`` (None = no constraint; ids
        not in the index are ignored). ``allow``: the ids every query of the call may return, a packed bitset
        (:mod:`recsys.retrieval.bitset`; None = all). Rows with fewer than ``k`` candidates are padded with -1 /
        -inf. With ``allow`` only the allowed rows are gathered and scored (cost ~ allowed count, not size).
        """
        k = check_k(k)
        vecs, idmap = self._state
        q = as_matrix(queries, self.dim, self.metric, name="queries")
        n = q.shape[0]
        excl = per_query(exclude, n, name="exclude")
        incl = per_query(include, n, name="include")
        words = None if allow is None else bitset.check(allow)
        out_ids = np.full((n, k), -1, dtype=np.int64)
        out_scores = np.full((n, k), -np.inf, dtype=np.float32)
        rows = np.arange(n)
        if incl is not None:
            inc_rows = [i for i in range(n) if incl[i] is not None]
            for i in inc_rows:
                self._search_include(q[i], k, vecs, idmap, incl[i], excl[i] if excl else None, out_ids[i],
                                     out_scores[i], words)
            rows = np.array([i for i in range(n) if incl[i] is None], dtype=np.int64)
        self._search_full(q, rows, k, vecs, idmap, excl, out_ids, out_scores, words)
        return out_ids, out_scores

    def search_rows(
        self, queries: np.ndarray, rows: np.ndarray, k: int, excl: list[np.ndarray | None] | None,
        allow: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Internal fallback for ``HnswIndex``: exact answers for ``queries[rows]`` (already validated; ``allow``
        a checked bitset or None)."""
        vecs, idmap = self._state
        out_ids = np.full((len(rows), k), -1, dtype=np.int64)
        out_scores = np.full((len(rows), k), -np.inf, dtype=np.float32)
        sub_excl = [excl[i] for i in rows] if excl is not None else None
        self._search_full(queries[rows], np.arange(len(rows)), k, vecs, idmap, sub_excl, out_ids, out_scores,
                          allow)
        return out_ids, out_scores

    @staticmethod
    def allowed_positions(idmap: IdMap, words: np.ndarray) -> np.ndarray:
        """Sorted row positions of the allowed ids present in the index."""
        if idmap.identity:
            ids = bitset.ids(words)
            return ids[: np.searchsorted(ids, idmap.ids.shape[0])]
        return np.flatnonzero(bitset.contains(words, idmap.ids))

    @staticmethod
    def _search_include(
        q: np.ndarray, k: int, vecs: np.ndarray, idmap: IdMap, inc: np.ndarray,
        exc: np.ndarray | None, out_ids: np.ndarray, out_scores: np.ndarray, words: np.ndarray | None = None,
    ) -> None:
        pos = idmap.positions(inc)
        if exc is not None and exc.size:
            pos = pos[~np.isin(pos, idmap.positions(exc))]
        if words is not None:
            pos = pos[bitset.contains(words, idmap.ids[pos])]
        pos = np.sort(pos)
        s = vecs[pos] @ q  # [m]
        top_pos, top = topk_rows(s[None, :], k)
        valid = top_pos[0] >= 0
        out_ids[valid] = idmap.ids[pos[top_pos[0][valid]]]
        out_scores[:] = top[0]

    @staticmethod
    def _search_full(
        q: np.ndarray, rows: np.ndarray, k: int, vecs: np.ndarray, idmap: IdMap,
        excl: list[np.ndarray | None] | None, out_ids: np.ndarray, out_scores: np.ndarray,
        words: np.ndarray | None = None,
    ) -> None:
        size = vecs.shape[0]
        if rows.size == 0 or size == 0:
            return
        blocked = None  # [size] bool: not allowed, when the allowed set is too large to gather
        if words is not None:
            pos = ExactIndex.allowed_positions(idmap, words)
            if 2 * pos.shape[0] <= size:
                ExactIndex._search_allowed(q, rows, k, vecs, idmap, excl, out_ids, out_scores, pos)
                return
            blocked = np.ones(size, dtype=bool)
            blocked[pos] = False
        block = max(1, EXACT_BLOCK_FLOATS // size)
        for start in range(0, rows.size, block):
            r = rows[start:start + block]
            s = q[r] @ vecs.T  # [b, size]
            if blocked is not None:
                s[:, blocked] = -np.inf
            if excl is not None:
                for j, i in enumerate(r):
                    if excl[i] is not None and excl[i].size:
                        s[j, idmap.present_positions(excl[i])] = -np.inf
            pos, top = topk_rows(s, k)
            out_ids[r] = np.where(pos >= 0, idmap.ids[np.maximum(pos, 0)], -1)
            out_scores[r] = top

    @staticmethod
    def _search_allowed(
        q: np.ndarray, rows: np.ndarray, k: int, vecs: np.ndarray, idmap: IdMap,
        excl: list[np.ndarray | None] | None, out_ids: np.ndarray, out_scores: np.ndarray, pos: np.ndarray,
    ) -> None:
        """:meth:`_search_full` over the allowed rows ``pos`` (sorted positions) only: gather, then score."""
        m = pos.shape[0]
        if m == 0:
            return
        sub = vecs[pos]  # [m, dim]
        block = max(1, EXACT_BLOCK_FLOATS // m)
        for start in range(0, rows.size, block):
            r = rows[start:start + block]
            s = q[r] @ sub.T  # [b, m]
            if excl is not None:
                for j, i in enumerate(r):
                    if excl[i] is not None and excl[i].size:
                        ex = idmap.present_positions(excl[i])
                        at = np.minimum(np.searchsorted(pos, ex), m - 1)
                        s[j, at[pos[at] == ex]] = -np.inf
            top_pos, top = topk_rows(s, k)  # positions in sub: the same order (and ties) as in the full scan
            out_ids[r] = np.where(top_pos >= 0, idmap.ids[pos[np.maximum(top_pos, 0)]], -1)
            out_scores[r] = top

    def save(self, path: str | Path) -> None:
        """Write ``vectors``, ``ids`` and ``metric`` to one ``.npz`` (no pickle), atomically."""
        vecs, idmap = self._state
        buf = io.BytesIO()
        np.savez(buf, vectors=vecs, ids=idmap.ids, metric=np.array(self.metric))
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path, *, dim: int, metric: str, size: int | None = None) -> ExactIndex:
        """Read an index written by :meth:`save`, refusing a dim / metric / size other than expected."""
        path = Path(path)
        with np.load(path, allow_pickle=False) as z:
            try:
                vecs, ids, got_metric = z["vectors"], z["ids"], str(z["metric"])
            except KeyError as e:
                raise ValueError(f"{str(path)!r} is not an ExactIndex file: missing {e}") from None
        if got_metric != metric:
            raise ValueError(f"{str(path)!r} holds metric {got_metric!r}, expected {metric!r}")
        if vecs.ndim != 2 or vecs.shape[1] != dim:
            raise ValueError(f"{str(path)!r} holds vectors of shape {vecs.shape}, expected dim {dim}")
        if size is not None and vecs.shape[0] != size:
            raise ValueError(f"{str(path)!r} holds {vecs.shape[0]} vectors, expected {size}")
        return cls(vecs, ids, metric=metric)


# ----------------------------------------------------------------------------------------------------------------
# hnsw

# hnswlib 0.8 file header (hnswalg.h saveIndex): offsetLevel0, max_elements, cur_element_count,
# size_data_per_element, label_offset, offsetData (size_t x6), maxlevel (int), enterpoint_node (uint32),
# maxM, maxM0, M (size_t x3), mult (double), ef_construction (size_t).


def torch_search(queries, items, k: int, *, exclude_rows=None, exclude_cols=None):  # noqa: ANN001 - torch tensors
    """:class:`ExactIndex`'s rule (metric ``"dot"``) on torch tensors, for the trainer's validation on its device:
    ``queries [n, d] @ items [m, d].T``, the cells ``(exclude_rows[j], exclude_cols[j])`` excluded, top-``k``.

    Returns ``ids [n, min(k, m)]`` int64, best first, ``-1`` where fewer unexcluded items remain (ties broken as
    ``torch.topk`` does). The vectors are taken as served (the towers normalise their own output).
    """
    import torch  # torch: only the trainer calls this; the serving path never imports torch

    scores = queries @ items.T  # [n, m]
    if exclude_rows is not None and exclude_rows.numel():
        scores[exclude_rows, exclude_cols] = float("-inf")
    val, idx = torch.topk(scores, min(k, items.shape[0]), dim=1)
    return torch.where(torch.isfinite(val), idx, torch.full_like(idx, -1))
