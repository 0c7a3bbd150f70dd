"""Recall against the exact twin, and the auto-tune of HNSW's search width ``ef``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from recsys.retrieval._arrays import as_matrix, check_k, per_query
from recsys.retrieval.exact import ExactIndex
from recsys.retrieval.hnsw import HnswIndex, IndexConfig

# ----------------------------------------------------------------------------------------------------------------
# recall and auto-tune


def recall_vs_exact(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean over rows of ``|approx ∩ exact| / |exact|`` (padding -1 ignored); both ``[n, k]``."""
    if approx_ids.shape != exact_ids.shape:
        raise ValueError(f"id arrays must have the same shape, got {approx_ids.shape} and {exact_ids.shape}")
    hits, total = 0, 0
    for a, e in zip(approx_ids, exact_ids, strict=True):
        e = e[e >= 0]
        total += e.size
        hits += np.intersect1d(a[a >= 0], e, assume_unique=True).size
    return hits / total if total else 1.0


def autotune_ef(
    index: HnswIndex,
    exact: ExactIndex,
    queries: np.ndarray,
    *,
    k: int = 10,
    target_recall: float = 0.99,
    efs: Sequence[int] = IndexConfig.autotune_efs,
    latency_queries: int = 200,
    exclude: Sequence[np.ndarray | None] | None = None,
    filtered_queries: np.ndarray | None = None,
) -> tuple[int, list[dict[str, float]]]:
    """Smallest ``ef`` in ``efs`` whose Recall@k vs ``exact`` on ``queries [n, dim]`` reaches ``target_recall``.

    Use held-out query embeddings (>= 1,000 for a stable estimate). Returns ``(ef, table)``, table rows
    ``{"ef", "recall", "p50_ms", "p99_ms", "batch_qps"}`` (single-query latency over ``latency_queries`` queries,
    one at a time; throughput of one batch call) for the manifest. The index is left at the chosen ef; when no ef
    reaches the target the largest is chosen and every row has ``"target_met": False``.

    ``exclude`` (one id list per query of ``filtered_queries``, default ``queries``: e.g. held-out users' seen
    items) also tunes :attr:`HnswIndex.ef_filtered` on the native path: the smallest ef, at least the chosen one,
    whose Recall@k vs exact-with-exclusion reaches ``target_recall`` (the ladder ``efs``, then bisection of its last
    step); its table (same row keys, no batch_qps, sorted by ef) is left in ``index.ef_filtered_table``. Why only then: at equal ef the in-search filter keeps the
    recall a plain query has *on the same queries* (benchmarks/index_bench.py, 100k x 64, heavy users minus 500
    seen items at ef 48: 0.967 filtered vs 0.944 plain), so the filtered width only needs raising when the users
    who exclude are harder queries than the tuning ones -- which only their own queries can show. Without
    ``exclude``, ``ef_filtered`` stays at ``ef``.
    """
    k = check_k(k)
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"`target_recall` must be in (0, 1], got {target_recall}")
    efs = sorted(int(e) for e in efs)
    if not efs or efs[0] < 1:
        raise ValueError(f"`efs` must be positive ints, got {list(efs)}")
    q = as_matrix(queries, index.dim, index.metric, name="queries")
    if q.shape[0] == 0:
        raise ValueError("`queries` must hold at least one query")
    truth, _ = exact.search(q, k)
    lat_q = q[: max(1, min(latency_queries, q.shape[0]))]
    table: list[dict[str, float]] = []
    chosen: int | None = None
    for ef in efs:
        index.set_ef(ef)
        t0 = time.perf_counter()
        got, _ = index.search(q, k)
        batch_s = time.perf_counter() - t0
        rec = recall_vs_exact(got, truth)
        lat = np.empty(lat_q.shape[0])
        for j in range(lat_q.shape[0]):
            t0 = time.perf_counter()
            index.search(lat_q[j:j + 1], k)
            lat[j] = time.perf_counter() - t0
        table.append({"ef": ef, "recall": round(rec, 5), "p50_ms": round(float(np.median(lat)) * 1e3, 4),
                      "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 4),
                      "batch_qps": round(q.shape[0] / batch_s, 1)})
        if rec >= target_recall:
            chosen = ef
            break
    met = chosen is not None
    if chosen is None:
        chosen = efs[-1]
    for row in table:
        row["target_met"] = met
    index.set_ef(chosen)
    if exclude is not None and index.native_filter:
        fq = q if filtered_queries is None else as_matrix(filtered_queries, index.dim, index.metric,
                                                             name="filtered_queries")
        lists = per_query(exclude, fq.shape[0], name="exclude")
        index.ef_filtered_table = _tune_filtered(
            index, exact, fq, lists, k=k, target_recall=target_recall, efs=[e for e in efs if e >= chosen] or [chosen],
            latency_queries=latency_queries)
    return chosen, table


def _tune_filtered(
    index: HnswIndex, exact: ExactIndex, q: np.ndarray, lists: list[np.ndarray | None] | None, *, k: int,
    target_recall: float, efs: Sequence[int], latency_queries: int,
) -> list[dict[str, Any]]:
    """The ``ef_filtered`` ladder of :func:`autotune_ef`; leaves the index at the chosen value."""
    if q.shape[0] == 0 or lists is None:
        raise ValueError("`exclude` tuning needs at least one query and one exclusion list per query")
    truth, _ = exact.search(q, k, exclude=lists)
    n_lat = max(1, min(latency_queries, q.shape[0]))
    table: list[dict[str, Any]] = []

    def reaches(ef: int) -> bool:
        index.set_ef_filtered(ef)
        got, _ = index.search(q, k, exclude=lists)
        rec = recall_vs_exact(got, truth)
        lat = np.empty(n_lat)
        for j in range(n_lat):
            t0 = time.perf_counter()
            index.search(q[j:j + 1], k, exclude=lists[j:j + 1])
            lat[j] = time.perf_counter() - t0
        table.append({"ef": ef, "recall": round(rec, 5), "p50_ms": round(float(np.median(lat)) * 1e3, 4),
                      "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 4)})
        return rec >= target_recall

    chosen: int | None = None
    below: int | None = None  # the largest ladder ef that missed the target
    for ef in efs:
        if reaches(ef):
            chosen = ef
            break
        below = ef
    if chosen is not None and below is not None:
        # The ladder's steps are ~1.5x apart and the filtered search's cost is ~linear in ef: bisect the last step
        # (down to ~1/8 of it) rather than pay up to 1.5x for the target.
        while chosen - below > max(4, below // 8):
            mid = (below + chosen) // 2
            if reaches(mid):
                chosen = mid
            else:
                below = mid
    met = chosen is not None
    table.sort(key=lambda row: row["ef"])
    for row in table:
        row["target_met"] = met
    index.set_ef_filtered(efs[-1] if chosen is None else chosen)
    return table
