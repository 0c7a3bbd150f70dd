"""Input checks and array helpers shared by the exact and HNSW indexes (geometry: see recsys.retrieval)."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

METRICS = ("cosine", "dot")

# ----------------------------------------------------------------------------------------------------------------
# helpers


@contextlib.contextmanager
def blas_threads(n: int = 1) -> Iterator[bool]:
    """Limit BLAS/OpenMP thread pools to ``n`` threads inside the block (threadpoolctl).

    Use around exact scans run from a threaded server. Yields whether a limit was applied: ``False`` when
    threadpoolctl is not installed, in which case set ``OPENBLAS_NUM_THREADS``/``OMP_NUM_THREADS`` before start.
    """
    try:
        from threadpoolctl import threadpool_limits  # threadpoolctl: optional
    except ImportError:  # optional dependency: without it the block runs unchanged
        yield False
        return
    with threadpool_limits(limits=n):
        yield True


def resolve_threads(num_threads: int) -> int:
    if num_threads == -1:
        return os.cpu_count() or 1
    if num_threads < 1:
        raise ValueError(f"`num_threads` must be -1 (all cores) or >= 1, got {num_threads}")
    return num_threads


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {list(METRICS)}, got {metric!r}")
    return metric


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
    return int(k)


# A cosine query row whose squared norm is within this of 1 is used as it is; others are normalised.
UNIT_SQ_TOL = 1e-4


def as_matrix(x: Any, dim: int | None, metric: str, *, name: str) -> np.ndarray:
    """Validate and return a C-contiguous float32 ``[n, dim]`` copy-if-needed; unit rows for cosine."""
    # This runs on every serving query: the common case (one float32 unit row) costs ~1.5 us.
    arr = x if type(x) is np.ndarray else np.asarray(x)
    if arr.ndim != 2:
        hint = f"; use {name}[None, :] for a single vector" if arr.ndim == 1 else ""
        raise ValueError(f"`{name}` must be 2-D [n, {dim if dim is not None else 'dim'}], got shape {arr.shape}{hint}")
    if dim is not None and arr.shape[1] != dim:
        raise ValueError(f"`{name}` must have {dim} columns (the index dim), got shape {arr.shape}")
    if arr.dtype != np.float32 or not arr.flags.c_contiguous:
        if arr.dtype.kind not in "fiu":
            raise ValueError(f"`{name}` must be a numeric array, got dtype {arr.dtype}")
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    n = arr.shape[0]
    if not n or not arr.shape[1]:
        return arr
    # Squared norms [n] double as the finiteness check: a NaN/inf element makes its row's norm non-finite.
    if n == 1:
        sq1 = float(np.vdot(arr, arr))
        finite = math.isfinite(sq1)
        if finite:  # scalar checks: no array ops on the hot path
            if metric == "dot" or 0.0 < sq1 and abs(sq1 - 1.0) <= UNIT_SQ_TOL:
                return arr
        sq = np.array([sq1], dtype=np.float32)
    else:
        sq = np.einsum("ij,ij->i", arr, arr)
        finite = bool(np.isfinite(sq).all())
    if not finite:
        bad_rows = np.flatnonzero(~np.isfinite(arr).all(axis=1))
        if bad_rows.size:
            raise ValueError(f"`{name}` row {int(bad_rows[0])} holds a NaN or infinite value")
        sq = np.einsum("ij,ij->i", arr, arr, dtype=np.float64)  # finite values whose float32 norm overflowed
    if metric == "cosine":
        if (sq <= 0).any():
            bad = int(np.flatnonzero(sq <= 0)[0])
            raise ValueError(f"`{name}` row {bad} is all zeros: it has no direction under metric 'cosine'")
        # Already unit (the towers' output)? Leave the caller's array alone; float error is far below the tolerance.
        if np.abs(sq - 1.0).max() > UNIT_SQ_TOL:
            arr = (arr / np.sqrt(sq)[:, None]).astype(np.float32)
    return arr


def as_ids(x: Any, n: int, *, name: str) -> np.ndarray:
    ids = np.ascontiguousarray(np.asarray(x).reshape(-1))
    if ids.dtype.kind not in "iu":
        raise ValueError(f"`{name}` must be integers, got dtype {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.shape[0] != n:
        raise ValueError(f"`{name}` must hold one id per vector ({n}), got {ids.shape[0]}")
    if n and ids.min() < 0:
        raise ValueError(f"`{name}` must be >= 0 (-1 is the padding id), got {int(ids.min())}")
    if np.unique(ids).shape[0] != n:
        raise ValueError(f"`{name}` holds duplicate ids")
    return ids


def per_query(lists: Sequence[Any] | None, n: int, *, name: str) -> list[np.ndarray | None] | None:
    if lists is None:
        return None
    if isinstance(lists, np.ndarray) and lists.ndim != 1 and lists.dtype != object:
        lists = list(lists)  # a 2-D array = one row per query
    if len(lists) != n:
        raise ValueError(f"`{name}` must hold one entry (array or None) per query ({n}), got {len(lists)}")
    out: list[np.ndarray | None] = []
    for i, e in enumerate(lists):
        if e is None:
            out.append(None)
            continue
        a = np.asarray(e).reshape(-1)
        if a.size and a.dtype.kind not in "iu":
            raise ValueError(f"`{name}[{i}]` must hold integer ids, got dtype {a.dtype}")
        out.append(a.astype(np.int64, copy=False))
    return out


class IdMap:
    """Item id <-> row position; the identity when ids are 0..n-1 (the bundle's item rows)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids  # [n] int64, position -> id
        n = ids.shape[0]
        self.identity = bool(n == 0 or (ids[0] == 0 and ids[-1] == n - 1 and (np.diff(ids) == 1).all()))
        if not self.identity:
            self._order = np.argsort(ids, kind="stable")
            self._sorted = ids[self._order]

    def positions(self, ids: np.ndarray) -> np.ndarray:
        """Distinct row positions of the ``ids`` present in the index (unknown ids are dropped)."""
        ids = np.unique(ids)
        n = self.ids.shape[0]
        if self.identity:
            return ids[(ids >= 0) & (ids < n)]
        at = np.searchsorted(self._sorted, ids)
        at = np.minimum(at, max(n - 1, 0))
        hit = (self._sorted[at] == ids) if n else np.zeros(ids.shape, bool)
        return self._order[at[hit]]

    def present_positions(self, ids: np.ndarray) -> np.ndarray:
        """Row positions of the ``ids`` present in the index, repeats kept."""
        if self.identity:
            return ids[(ids >= 0) & (ids < self.ids.shape[0])]
        return self.positions(ids)

    def present(self, ids: np.ndarray) -> np.ndarray:
        """The ``ids`` present in the index, repeats kept (cheaper than :meth:`members` on the query path)."""
        if self.identity:
            return ids[(ids >= 0) & (ids < self.ids.shape[0])]
        return self.members(ids)

    def members(self, ids: np.ndarray) -> np.ndarray:
        """The distinct ``ids`` present in the index, sorted."""
        if self.identity:
            return self.positions(ids)  # unique() already sorted them; position == id
        return np.sort(self.ids[self.positions(ids)])


def in_sorted(values: np.ndarray, sorted_ids: np.ndarray) -> np.ndarray:
    """``np.isin(values, sorted_ids)`` for a sorted non-empty ``sorted_ids`` (binary search: ~30x cheaper than
    ``np.isin`` at the sizes of one query's results and a user's seen items)."""
    at = np.minimum(np.searchsorted(sorted_ids, values), sorted_ids.shape[0] - 1)
    return sorted_ids[at] == values


def topk_rows(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k positions and scores of each row of ``scores [b, m]``, best first; ``-inf`` entries become -1.

    Returns ``(pos [b, k] int64, top [b, k] float32)``, padded when ``m < k``. Ties are broken by lower position.
    """
    b, m = scores.shape
    pos = np.full((b, k), -1, dtype=np.int64)
    top = np.full((b, k), -np.inf, dtype=np.float32)
    if m == 0 or b == 0:
        return pos, top
    kk = min(k, m)
    if kk < m:
        part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]  # [b, kk] unordered
    else:
        part = np.broadcast_to(np.arange(m), (b, m))
    part_scores = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_scores), axis=1)  # score desc, then position asc
    part = np.take_along_axis(part, order, axis=1)
    part_scores = np.take_along_axis(part_scores, order, axis=1)
    valid = np.isfinite(part_scores)  # -inf = excluded / not a candidate
    pos[:, :kk] = np.where(valid, part, -1)
    top[:, :kk] = np.where(valid, part_scores, -np.inf)
    return pos, top


def merge_topk(answers: Sequence[tuple[np.ndarray, np.ndarray]], k: int, *,
               unique: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Several ``[n, k_i]`` answers (ids, scores; padded -1 / -inf) of the same queries -> the best ``k`` of them
    per row, best first (ties: the earlier answer first), padded -1 / -inf. ``unique``: an id in several answers
    (overlapping indexes) counts once."""
    ids = np.concatenate([a[0] for a in answers], axis=1)
    sc = np.concatenate([a[1] for a in answers], axis=1)
    order = np.argsort(-sc, axis=1, kind="stable")
    ids, sc = np.take_along_axis(ids, order, axis=1), np.take_along_axis(sc, order, axis=1)
    if unique and len(answers) > 1:
        out_ids = np.full((ids.shape[0], k), -1, dtype=np.int64)
        out_sc = np.full((ids.shape[0], k), -np.inf, dtype=np.float32)
        for r in range(ids.shape[0]):
            row = ids[r]
            _, first = np.unique(row, return_index=True)
            keep = np.sort(first[row[first] >= 0])[:k]
            out_ids[r, : keep.size], out_sc[r, : keep.size] = row[keep], sc[r, keep]
        return out_ids, out_sc
    if ids.shape[1] < k:
        pad = k - ids.shape[1]
        ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
        sc = np.pad(sc, ((0, 0), (0, pad)), constant_values=-np.inf)
    return ids[:, :k], sc[:, :k].astype(np.float32, copy=False)
