"""The one retrieval rule, for serving, evaluation, the retrain gate and the trainer's validation alike.

Top-``k`` of each query among the ids that are allowed (``allow``: one packed bitset for the whole call, a
request's attribute filter; :mod:`recsys.retrieval.bitset`) AND not excluded (a user's seen items, the request's
exclusions) AND in its include-list when it has one; exactly ``k`` ids whenever ``k`` candidates remain, else
padding -1 / -inf. How an index meets it (the native in-graph filter, the exact scan of a small allowed set, the
hnswlib package's adaptive over-fetch, exact scoring of an include-list, the exact fallback for huge exclusions)
is the index's business (:mod:`recsys.retrieval.hnsw`);
callers go through :func:`retrieve` (a batch) or :func:`retrieve_one` (the request path's single query). The C++
known-user Recommend (``server/fastpath.py``) accelerates the same rule and is checked against it at load.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.retrieval.exact import ExactIndex
from recsys.retrieval.hnsw import HnswIndex


def merge_exclusions(n: int, *sources: Sequence[np.ndarray | None] | None) -> list[np.ndarray | None] | None:
    """Union per-query id lists (e.g. a user's seen items and a request's exclusions) -> one list per query."""
    live = [s for s in sources if s is not None]
    if not live:
        return None
    if len(live) == 1 and len(live[0]) == n:
        return list(live[0])  # one source: nothing to union (the index tolerates repeated ids)
    out: list[np.ndarray | None] = []
    for j, s in enumerate(live):
        if len(s) != n:
            raise ValueError(f"exclusion source {j} must hold one entry per query ({n}), got {len(s)}")
    for i in range(n):
        parts = [np.asarray(s[i], dtype=np.int64).reshape(-1) for s in live if s[i] is not None]
        out.append(np.unique(np.concatenate(parts)) if parts else None)
    return out


def retrieve(
    index: ExactIndex | HnswIndex,
    queries: np.ndarray,
    k: int,
    *,
    seen: Sequence[np.ndarray | None] | None = None,
    exclude: Sequence[np.ndarray | None] | None = None,
    include: Sequence[np.ndarray | None] | None = None,
    allow: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` minus (seen ∪ exclude), within include, for a batch of queries (see the module docstring).

    ``queries [n, dim]``; ``seen`` / ``exclude`` / ``include``: one id array (or None) per query; ``allow``: the
    ids any query may return, one :mod:`recsys.retrieval.bitset` for the whole call (an attribute filter).
    Returns ``(ids [n, k] int64, scores [n, k] float32)``: exactly ``k`` ids whenever ``k`` candidates remain,
    otherwise padded with -1 / -inf.
    """
    q = np.asarray(queries)
    n = q.shape[0] if q.ndim == 2 else -1
    if n < 0:
        raise ValueError(f"`queries` must be 2-D [n, {index.dim}], got shape {q.shape}")
    if allow is None:
        return index.search(q, k, exclude=merge_exclusions(n, seen, exclude), include=include)
    return index.search(q, k, exclude=merge_exclusions(n, seen, exclude), include=include, allow=allow)


def retrieve_one(
    index: ExactIndex | HnswIndex,
    query: np.ndarray,
    k: int,
    *,
    exclude: np.ndarray | None = None,
    include: np.ndarray | None = None,
    allow: np.ndarray | None = None,
) -> tuple[list[int], list[float]]:
    """The same rule for ONE query ``[1, dim]`` -> ``(ids, scores)`` as Python lists, best first, padding dropped.

    The request path's call: one index search, no per-query list machinery.
    """
    ex = None if exclude is None or not len(exclude) else [exclude]
    inc = None if include is None else [include]
    if allow is None:
        ids, scores = index.search(query, k, exclude=ex, include=inc)
    else:
        ids, scores = index.search(query, k, exclude=ex, include=inc, allow=allow)
    rows, sc = ids[0].tolist(), scores[0].tolist()
    if rows and rows[-1] < 0:  # padding: fewer than k candidates remain
        n = sum(1 for r in rows if r >= 0)
        rows, sc = rows[:n], sc[:n]
    return rows, sc
