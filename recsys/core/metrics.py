"""Top-k ranking metrics with binary relevance (numpy only).

Conventions, stated once:

* ``recommended`` is a ranked list of item ids, best first. Id ``-1`` is padding and never counts as a hit; an id
  repeated later in the same list counts only at its first position.
* ``relevant`` is the set of held-out items of one user. Users with no relevant items have undefined recall, so the
  single-user functions return ``nan`` for them and :func:`ranking_metrics` leaves them out of the means.
* ``recall@k  = hits in top-k / |relevant|`` (not ``min(k, |relevant|)``), so ``recall([1,2,3,4], [1,3,5], k=4)``
  is ``2/3``.
* ``ndcg@k = DCG@k / IDCG@k`` with gain 1 and discount ``1 / log2(rank + 1)`` (rank from 1); the ideal list puts
  ``min(k, |relevant|)`` hits first.
* ``hit_rate@k`` is 1 when any relevant item is in the top k.
* ``reciprocal_rank`` is ``1 / rank`` of the first hit (0 without one), over the whole list unless ``k`` is given.
* ``map@k`` (``average_precision_at_k``) is ``sum over hit ranks r <= k of precision@r / min(k, |relevant|)``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

__all__ = [
    "average_precision_at_k",
    "hit_rate_at_k",
    "ndcg_at_k",
    "ranking_metrics",
    "recall_at_k",
    "reciprocal_rank",
]


def _check_k(k: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {k!r}")
    return int(k)


def _hits(recommended: Sequence, relevant: Collection, k: int | None) -> tuple[np.ndarray, int]:
    """Boolean hit vector over the first ``k`` recommendations, and the number of distinct relevant items."""
    rel = {x for x in relevant if not _is_pad(x)}
    rec = list(recommended)[:k] if k is not None else list(recommended)
    seen: set = set()
    hits = np.zeros(len(rec), dtype=bool)
    for i, x in enumerate(rec):
        if _is_pad(x) or x in seen:
            continue
        seen.add(x)
        hits[i] = x in rel
    return hits, len(rel)


def _is_pad(x: object) -> bool:
    # -1 is the padding id of every top-k array in the project; strings are never padding.
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x < 0


def recall_at_k(recommended: Sequence, relevant: Collection, k: int) -> float:
    """Fraction of the relevant items found in the top ``k``; ``nan`` when ``relevant`` is empty."""
    hits, n_rel = _hits(recommended, relevant, _check_k(k))
    return float(hits.sum() / n_rel) if n_rel else float("nan")


def hit_rate_at_k(recommended: Sequence, relevant: Collection, k: int) -> float:
    """1.0 when at least one relevant item is in the top ``k``, else 0.0; ``nan`` when ``relevant`` is empty."""
    hits, n_rel = _hits(recommended, relevant, _check_k(k))
    return float(hits.any()) if n_rel else float("nan")


def ndcg_at_k(recommended: Sequence, relevant: Collection, k: int) -> float:
    """Binary-gain NDCG over the top ``k`` with log2 discounts; ``nan`` when ``relevant`` is empty."""
    k = _check_k(k)
    hits, n_rel = _hits(recommended, relevant, k)
    if not n_rel:
        return float("nan")
    disc = 1.0 / np.log2(np.arange(2, k + 2))  # [k] discount of ranks 1..k
    dcg = float((disc[: len(hits)] * hits).sum())
    idcg = float(disc[: min(k, n_rel)].sum())
    return dcg / idcg


def reciprocal_rank(recommended: Sequence, relevant: Collection, k: int | None = None) -> float:
    """``1 / rank`` of the first relevant item (0.0 if none in the list or its first ``k``); ``nan`` if no relevant."""
    hits, n_rel = _hits(recommended, relevant, None if k is None else _check_k(k))
    if not n_rel:
        return float("nan")
    idx = np.flatnonzero(hits)
    return float(1.0 / (idx[0] + 1)) if idx.size else 0.0


def average_precision_at_k(recommended: Sequence, relevant: Collection, k: int) -> float:
    """Average precision over the top ``k``, normalised by ``min(k, |relevant|)``; ``nan`` if no relevant."""
    k = _check_k(k)
    hits, n_rel = _hits(recommended, relevant, k)
    if not n_rel:
        return float("nan")
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float((precision * hits).sum() / min(k, n_rel))


def ranking_metrics(
    topk: np.ndarray, relevant: Sequence[np.ndarray], ks: Sequence[int] = (10, 20, 50, 100)
) -> dict[str, float]:
    """Mean recall/ndcg/hit_rate/map at each k in ``ks`` plus MRR, over users with at least one relevant item.

    Args:
        topk: ``[n, K]`` integer item ids per user, best first; ``-1`` is padding.
        relevant: ``n`` integer arrays of held-out item ids (any order; duplicates and negatives ignored).
        ks: cut-offs, each in ``[1, K]``.

    Returns:
        ``{"recall@20": ..., "ndcg@20": ..., "hit_rate@20": ..., "map@20": ..., ..., "mrr": ...}``; MRR uses all
        ``K`` columns. Users whose ``relevant`` is empty are left out of every mean; if no user has a relevant
        item this is a ``ValueError``.
    """
    topk = np.asarray(topk)
    if topk.ndim != 2:
        raise ValueError(f"`topk` must be a 2-D array [n_users, K], got shape {topk.shape}")
    if topk.size and not np.issubdtype(topk.dtype, np.integer):
        raise ValueError(f"`topk` must hold integer item ids, got dtype {topk.dtype}")
    n, big_k = topk.shape
    if len(relevant) != n:
        raise ValueError(f"`relevant` must have one entry per row of `topk` (got {len(relevant)} and {n})")
    ks = [_check_k(k, "ks") for k in ks]
    too_big = [k for k in ks if k > big_k]
    if too_big:
        raise ValueError(f"`ks` values {too_big} exceed the {big_k} columns of `topk`")
    topk = topk.astype(np.int64, copy=False)

    rel_rows, rel_items = [], []
    for u, r in enumerate(relevant):
        r = np.unique(np.asarray(r, dtype=np.int64).ravel())
        r = r[r >= 0]
        rel_rows.append(np.full(r.size, u, dtype=np.int64))
        rel_items.append(r)
    n_rel = np.array([r.size for r in rel_items], dtype=np.int64)  # [n]
    keep = n_rel > 0
    if not keep.any():
        raise ValueError(f"no user has a relevant item (all {n} entries of `relevant` are empty)")

    # One key per (user, item) pair, so membership for every cell is a single vectorised np.isin.
    width = int(max(topk.max(initial=-1), max((int(r.max()) for r in rel_items if r.size), default=-1))) + 2
    rel_keys = np.concatenate(rel_rows) * width + np.concatenate(rel_items)
    row = np.arange(n, dtype=np.int64)[:, None]
    keys = row * width + topk  # [n, K]
    hits = np.isin(keys, rel_keys) & (topk >= 0)
    # A repeated id counts once, at its first position.
    flat = keys.ravel()
    _, first = np.unique(flat, return_index=True)
    first_mask = np.zeros(flat.size, dtype=bool)
    first_mask[first] = True
    hits &= first_mask.reshape(n, big_k)

    hits, n_rel = hits[keep].astype(np.float64), n_rel[keep]
    disc = 1.0 / np.log2(np.arange(2, big_k + 2))  # [K]
    ideal = np.concatenate([[0.0], np.cumsum(disc)])  # ideal[m] = IDCG with m hits
    precision = np.cumsum(hits, axis=1) / np.arange(1, big_k + 1)  # [n, K] precision@r
    out: dict[str, float] = {}
    for k in ks:
        h = hits[:, :k]
        out[f"recall@{k}"] = float(np.mean(h.sum(1) / n_rel))
        out[f"ndcg@{k}"] = float(np.mean((h * disc[:k]).sum(1) / ideal[np.minimum(k, n_rel)]))
        out[f"hit_rate@{k}"] = float(np.mean(h.any(1)))
        out[f"map@{k}"] = float(np.mean((precision[:, :k] * h).sum(1) / np.minimum(k, n_rel)))
    any_hit = hits.any(1)
    first_rank = np.argmax(hits, axis=1) + 1
    out["mrr"] = float(np.mean(np.where(any_hit, 1.0 / first_rank, 0.0)))
    return out
