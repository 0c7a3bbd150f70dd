"""Benchmark the retrieval index: HNSW vs exact on trained-like embeddings, and the cost of exclusions.

Usage::

    python benchmarks/index_bench.py                               # 100k items, dim 64 and 128
    nice -n 19 python benchmarks/index_bench.py --sizes 1000000    # the 1M rows (slow: minutes per dim)
    python benchmarks/index_bench.py --embeddings items.npy --queries users.npy   # a trained model's vectors
    nice -n 10 python benchmarks/index_bench.py --filtered --sizes 100000 1000000 --cache /tmp/bench   # allow=

Why not Gaussian vectors: isotropic random vectors in 64+ dims have no neighbourhood structure (every point is
almost equidistant), which makes HNSW look far worse than on a trained model's embeddings. So by default the
embeddings are *trained-like*, made by this procedure:

1. A synthetic implicit-feedback matrix with the structure of real logs: items belong to fine clusters
   (``n_items / 100`` of them) grouped into genres (10 fine clusters each); item popularity is Zipf (s = 1) inside
   and across clusters. Each user picks a genre (Zipf) and two fine clusters in it, and draws interactions:
   60% from the first cluster, 20% the second, 10% the genre, 10% the global popularity distribution.
   ``n_items`` users with ~30 interactions each (geometric lengths) train the factorisation.
2. Embeddings from a rank-``dim`` randomised truncated SVD (3 power iterations) of the binarised matrix after
   dividing each item column by ``pop^0.25`` (damps popularity, as in-batch logQ training does):
   items = V * sqrt(S); items with no interactions keep a small random vector (an untrained ID embedding).
   Rows are L2-normalised (the towers' ``metric = "cosine"``).
3. Queries are *held-out* users embedded from their history the way the user tower's mean pooling does
   (normalised sum of their items' embeddings): 1,000 typical users for the auto-tune, 1,000 others to measure
   recall and latency, and 1,000 heavy users with exactly 500 distinct seen items, whose histories are the
   exclusion lists of the exclusion test (seen items sit near the user: the hard case for post-filtering), plus
   1,000 other heavy users to auto-tune ``ef_filtered`` on.

With ``--embeddings``, items come from the file; queries from ``--queries`` (or 4,000 held-out items); the
500 "seen" items of each heavy query are sampled from its exact top-2,000.

Measured: build time (``--threads``, default 2), index size, single-query latency p50/p99 (one query per call,
k=10), batch latency/throughput, Recall@10 vs exact for several ef, the auto-tuned ef, exact search side by side,
and the cost of excluding 500 seen items, single queries, paired with a plain query on the same user:

* ``excl_native``: the exclusion filtered inside the graph search (``recsys._hnsw``) at the auto-tuned
  ``ef_filtered`` (tuned on the other heavy users), and ``excl_native_at_ef`` at the plain ef;
* ``excl_adaptive`` / ``excl_full``: the fallback path (hnswlib package, over-fetch + post-filter) on the same
  graph (the native index's file loaded by ``hnswlib``), side by side;
* ``heavy_plain_recall@10``: the plain query's recall on the same heavy users at the same ef (these users are
  harder queries than typical ones: the comparison that isolates what the filter costs);
* ``filter_bitset_*`` / ``filter_sorted_*``: the two filter representations of the extension, raw calls.

Prints a table and writes ``benchmarks/results/index_bench.json``.

Filtered search (``--filtered``: this section only; the default run adds it for dim 64): an allowed set
(``allow=``, a packed bitset shared by the call, :mod:`recsys.retrieval.bitset`) keeping 30%, 10%, 3%, 1% and 0.1%
of the catalogue, drawn two ways: ``random`` items, and ``clusters`` -- whole fine clusters of the synthetic logs
picked at random (an attribute filter such as a genre: allowed items sit together, often far from the query).
On the typical held-out users at the auto-tuned ef: which path answers (``HnswIndex.allow_plan``: ``exact`` scan
of the allowed ids or the filtered ``graph`` walk), Recall@10 against the exact filtered search, and single-query
p50/p90/p99 of the filtered call paired with a plain call on the same user (same run, random order) and their ratio,
each the median over ``--filter-rounds`` rounds (5) of all the queries (a stall of the shared machine moves one
round's p99; each round's p99 ratio is in the JSON);
on the graph path also the nodes the native walk scored (``recsys._hnsw.last_walk_scored``, p50: the walk's work,
steadier than a latency on a shared machine), next to what it scores with every item allowed (a plain search of
the same width). ``--filter-ef-min`` overrides ``HnswIndex.filter_ef_min`` (the walk's width floor: the latency / recall trade-off).
Then an attribute (unless ``--no-partitions``): values that each group whole fine clusters into ~10% of the
items, with one graph per value (``HnswIndex.partitions``, what ``index.partition_by`` builds at export, each
graph's ef auto-tuned on the tuning queries; cached beside the index), and three filters on it, each measured
twice in the same run: without the hint (``walk``: the main graph's filtered walk, or its exact scan) and with it
(``parts``: the values' graphs): one value (~10%), one value AND a random half of the items (~5%: a second
condition), two values (~20%).
Prints a table and writes ``benchmarks/results/index_filter.json``. ``--cache DIR`` keeps the generated
embeddings and the built index between runs (the 1M case takes ~10 minutes to make on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from recsys.core.io import atomic_write_json
from recsys.retrieval import (
    ExactIndex,
    HnswIndex,
    autotune_ef,
    blas_threads,
    native_available,
    recall_vs_exact,
)

K = 10
N_SEEN = 500


# -- trained-like embeddings -----------------------------------------------------------------------------------


def _zipf_weights(n: int, rng: np.random.Generator, s: float = 1.0) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** s
    return w[rng.permutation(n)]


class SyntheticLogs:
    """Clustered power-law interactions (see the module docstring)."""

    def __init__(self, n_items: int, *, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.n_items = n_items
        self.n_fine = max(10, n_items // 100)
        self.n_genres = max(1, self.n_fine // 10)
        self.item_cluster = np.sort(rng.integers(0, self.n_fine, n_items))  # items grouped by cluster
        self.pop = _zipf_weights(n_items, rng)
        self.starts = np.searchsorted(self.item_cluster, np.arange(self.n_fine + 1))
        # Per-cluster cdf laid end to end, offset by the cluster number: searchsorted(cdf, c + u) samples cluster c.
        cdf = np.empty(n_items)
        for c in range(self.n_fine):
            a, b = self.starts[c], self.starts[c + 1]
            if b > a:
                w = np.cumsum(self.pop[a:b])
                cdf[a:b] = c + w / w[-1]
        self.cdf = cdf
        self.global_cdf = np.cumsum(self.pop) / self.pop.sum()
        self.genre_p = _zipf_weights(self.n_genres, rng, 0.8)
        self.genre_p /= self.genre_p.sum()

    def _sample_in_clusters(self, clusters: np.ndarray) -> np.ndarray:
        u = self.rng.random(clusters.shape[0]) * (1 - 1e-12)
        idx = np.searchsorted(self.cdf, clusters + u, side="right")
        lo, hi = self.starts[clusters], self.starts[clusters + 1]
        empty = hi <= lo
        idx = np.clip(idx, lo, np.maximum(hi - 1, lo))
        # an empty fine cluster: draw from global popularity instead
        idx[empty] = np.searchsorted(self.global_cdf, self.rng.random(int(empty.sum())))
        return np.minimum(idx, self.n_items - 1)

    def users(self, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Interactions of ``len(lengths)`` new users -> (user index per event, item per event)."""
        rng = self.rng
        n = lengths.shape[0]
        genre = rng.choice(self.n_genres, n, p=self.genre_p)
        base = genre * 10
        c1 = np.minimum(base + rng.integers(0, 10, n), self.n_fine - 1)
        c2 = np.minimum(base + rng.integers(0, 10, n), self.n_fine - 1)
        user = np.repeat(np.arange(n), lengths)
        kind = rng.random(user.shape[0])
        cl = np.where(kind < 0.6, c1[user], c2[user])
        in_genre = (kind >= 0.8) & (kind < 0.9)
        cl[in_genre] = np.minimum(base[user[in_genre]] + rng.integers(0, 10, int(in_genre.sum())), self.n_fine - 1)
        item = self._sample_in_clusters(cl)
        glob = kind >= 0.9
        item[glob] = np.minimum(np.searchsorted(self.global_cdf, rng.random(int(glob.sum()))), self.n_items - 1)
        return user, item


def _randomized_svd(x, rank: int, *, n_iter: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Truncated SVD of a sparse ``x [m, n]`` -> (s [rank], vt [rank, n]) by randomised range finding."""
    rng = np.random.default_rng(seed)
    omega = rng.normal(size=(x.shape[1], rank + 10)).astype(np.float32)
    q, _ = np.linalg.qr(x @ omega)
    for _ in range(n_iter):  # power iterations sharpen the spectrum
        z, _ = np.linalg.qr(x.T @ q)
        q, _ = np.linalg.qr(x @ z)
    b = (x.T @ q).T  # [rank+10, n]
    _, s, vt = np.linalg.svd(b, full_matrices=False)
    return s[:rank], vt[:rank]


def _normalise(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def trained_like(n_items: int, dim: int, *, n_queries: int = 1000, seed: int = 0):
    """-> (items [n_items, dim], tune [n_queries, dim], test [n_queries, dim], heavy [n_queries, dim],
    seen: list of n_queries arrays of 500 item rows, the heavy users' histories, heavy_tune, seen_tune: another
    n_queries heavy users for the ef_filtered auto-tune)."""
    import scipy.sparse as sp

    logs = SyntheticLogs(n_items, seed=seed)
    rng = logs.rng
    lengths = np.minimum(rng.geometric(1 / 30, n_items), 1000)
    u, i = logs.users(lengths)
    x = sp.csr_matrix((np.ones(u.shape[0], np.float32), (u, i)), shape=(n_items, n_items))
    x.data[:] = 1.0  # binarise repeats
    pop = np.asarray(x.sum(axis=0)).ravel()
    x = x @ sp.diags((1.0 / np.maximum(pop, 1.0) ** 0.25).astype(np.float32))
    s, vt = _randomized_svd(x.tocsr(), dim, seed=seed)
    items = vt.T * np.sqrt(s)  # [n_items, dim]
    cold = pop == 0
    items[cold] = rng.normal(scale=0.01 * np.abs(items[~cold]).mean(), size=(int(cold.sum()), dim))
    items = _normalise(items)
    # held-out users: typical users for the auto-tune and for recall/latency (same distribution), and heavy users
    # with exactly N_SEEN distinct seen items for the exclusion cost
    def fold_in(lengths: np.ndarray) -> np.ndarray:
        uu, ii = logs.users(lengths)
        q = np.zeros((lengths.shape[0], dim), np.float32)
        np.add.at(q, uu, items[ii])
        return _normalise(q)

    tune = fold_in(np.maximum(rng.geometric(1 / 30, n_queries), 1))
    test = fold_in(np.maximum(rng.geometric(1 / 30, n_queries), 1))
    popular = np.argsort(-logs.pop)[: 4 * N_SEEN]

    def heavy_users() -> tuple[np.ndarray, list[np.ndarray]]:
        hu, hi = logs.users(np.full(n_queries, 3 * N_SEEN))
        order = np.argsort(hu, kind="stable")
        bounds = np.searchsorted(hu[order], np.arange(n_queries + 1))
        seen = []
        for r in range(n_queries):
            h = pd_unique(hi[order[bounds[r]:bounds[r + 1]]])[:N_SEEN]
            if h.size < N_SEEN:  # top up from global popularity
                h = np.concatenate([h, np.setdiff1d(popular, h)[: N_SEEN - h.size]])
            seen.append(h.astype(np.int64))
        return _normalise(np.stack([items[h].sum(axis=0) for h in seen])), seen

    heavy, seen = heavy_users()
    heavy_tune, seen_tune = heavy_users()  # drawn last: the sets above are those of earlier runs
    return items, tune, test, heavy, seen, heavy_tune, seen_tune


def cached_trained_like(n: int, dim: int, seed: int, cache: str | None):
    """:func:`trained_like`, kept under ``cache`` (``.npz``, no pickle) when given."""
    if not cache:
        return trained_like(n, dim, seed=seed)
    path = Path(cache) / f"trained_like_{n}_{dim}_{seed}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as z:
            seen = list(z["seen"])
            seen_tune = list(z["seen_tune"])
            return z["items"], z["tune"], z["test"], z["heavy"], seen, z["heavy_tune"], seen_tune
    out = trained_like(n, dim, seed=seed)
    items, tune, test, heavy, seen, heavy_tune, seen_tune = out
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, items=items, tune=tune, test=test, heavy=heavy, seen=np.stack(seen), heavy_tune=heavy_tune,
             seen_tune=np.stack(seen_tune))
    return out


def pd_unique(a: np.ndarray) -> np.ndarray:
    """Distinct values in first-seen order."""
    _, first = np.unique(a, return_index=True)
    return a[np.sort(first)]


def from_files(emb_path: str, query_path: str | None, *, n_queries: int = 1000, seed: int = 0):
    """Real embeddings: queries from ``query_path`` (or held-out items); 'seen' = 500 of each heavy query's
    exact top-2,000 (seen items sit near the user)."""
    items = np.load(emb_path, allow_pickle=False).astype(np.float32)
    rng = np.random.default_rng(seed)
    if query_path:
        queries = np.load(query_path, allow_pickle=False).astype(np.float32)
        queries = queries[rng.permutation(queries.shape[0])[: 4 * n_queries]]
    else:  # hold out items as queries
        perm = rng.permutation(items.shape[0])
        queries, items = items[perm[: 4 * n_queries]], items[np.sort(perm[4 * n_queries:])]
    items, queries = _normalise(items), _normalise(queries)
    part = queries.shape[0] // 4
    tune, test, heavy, heavy_tune = (queries[i * part:(i + 1) * part] for i in range(4))
    exact = ExactIndex(items)

    def seen_of(q: np.ndarray) -> list[np.ndarray]:
        top, _ = exact.search(q, min(2000, items.shape[0]))
        return [rng.choice(row[row >= 0], min(N_SEEN, int((row >= 0).sum())), replace=False) for row in top]

    return items, tune, test, heavy, seen_of(heavy), heavy_tune, seen_of(heavy_tune)


# -- measurement ---------------------------------------------------------------------------------------------------


def single_latency(index, queries: np.ndarray, *, repeat: int = 2) -> np.ndarray:
    """Seconds per call, one query per call (the serving path)."""
    out = []
    for _ in range(repeat):
        for r in range(queries.shape[0]):
            t0 = time.perf_counter()
            index.search(queries[r:r + 1], K)
            out.append(time.perf_counter() - t0)
    return np.array(out)


def paired_latency(index, queries: np.ndarray, seen, *, repeat: int = 2, seed: int = 0):
    """Plain and excluding calls on the same query, back to back in random order (they share the machine's noise,
    and neither always runs second on a warm cache) -> (plain seconds, excluding seconds)."""
    rng = np.random.default_rng(seed)
    plain, excl = [], []
    for _ in range(repeat):
        for r in range(queries.shape[0]):
            q = queries[r:r + 1]
            for which in rng.permutation(2):
                t0 = time.perf_counter()
                if which:
                    index.search(q, K, exclude=[seen[r]])
                else:
                    index.search(q, K)
                (excl if which else plain).append(time.perf_counter() - t0)
    return np.array(plain), np.array(excl)


def ms(x: np.ndarray, q: float) -> float:
    return round(float(np.percentile(x, q)) * 1e3, 4)


def exclusion_row(index, heavy, seen, truth_ex, *, calls: list[int] | None = None) -> dict:
    """Recall vs exact-with-exclusion, exactly-k, and paired single-query latency of excluding ``seen``."""
    got_ex = np.stack([index.search(heavy[r:r + 1], K, exclude=[seen[r]])[0][0] for r in range(len(seen))])
    assert all(not np.isin(got_ex[r], seen[r]).any() for r in range(len(seen))), "excluded item returned"
    n_calls = len(calls) if calls is not None else None
    plain, excl = paired_latency(index, heavy, seen)
    row = {"exactly_k": bool((got_ex >= 0).all()), "recall@10": round(recall_vs_exact(got_ex, truth_ex), 4),
           "p50_ms": ms(excl, 50), "p99_ms": ms(excl, 99), "plain_p50_ms": ms(plain, 50), "plain_p99_ms": ms(plain, 99),
           "p50_ratio": round(ms(excl, 50) / ms(plain, 50), 2), "p99_ratio": round(ms(excl, 99) / ms(plain, 99), 2)}
    if n_calls is not None:
        row["hnsw_calls_per_query"] = round(n_calls / len(seen), 3)
    return row


def bench_one(items, tune, test, heavy, seen, heavy_tune, seen_tune, *, threads: int, M: int, ef_construction: int,
              efs, target: float) -> dict:
    n, dim = items.shape
    row: dict = {"n_items": n, "dim": dim, "M": M, "ef_construction": ef_construction, "build_threads": threads}
    t0 = time.perf_counter()
    hnsw = HnswIndex(items, M=M, ef_construction=ef_construction, ef=64, num_threads=threads)
    row["build_s"] = round(time.perf_counter() - t0, 2)
    row["native_filter"] = hnsw.native_filter
    row["index_mb"] = round(hnsw.index_bytes() / 2**20, 1)
    row["vectors_mb"] = round(items.nbytes / 2**20, 1)
    exact = ExactIndex(items)

    # ef on typical users; ef_filtered on heavy users minus their seen items (not the measured ones)
    ef, table = autotune_ef(hnsw, exact, tune, k=K, target_recall=target, efs=efs, latency_queries=200,
                            exclude=seen_tune, filtered_queries=heavy_tune)
    row["autotune_ef"] = ef
    row["autotune_table"] = table
    row["ef_filtered"] = hnsw.ef_filtered
    row["autotune_filtered_table"] = hnsw.ef_filtered_table

    truth, _ = exact.search(test, K)
    sweep = []
    precision = hnsw.search_precision
    row["search_precision"] = precision
    for e in sorted(set(efs) & {16, 32, 48, 64, 96, 128, 256} | {ef}):
        hnsw.set_ef(e)
        entry: dict = {"ef": e}
        # the default traversal and, on the native path, the other one on the same graph, alternated
        other = "bf16" if precision == "fp32" else "fp32"
        for prec in ([precision, other] if hnsw.native_filter else [precision]):
            hnsw.set_search_precision(prec)
            got, _ = hnsw.search(test, K)
            lat = single_latency(hnsw, test[:300], repeat=2)
            pre = "" if prec == precision else f"{prec}_"
            entry.update({f"{pre}recall@10": round(recall_vs_exact(got, truth), 4), f"{pre}p50_ms": ms(lat, 50),
                          f"{pre}p99_ms": ms(lat, 99)})
        hnsw.set_search_precision(precision)
        sweep.append(entry)
    row["ef_sweep"] = sweep

    hnsw.set_ef(ef)
    got, _ = hnsw.search(test, K)
    row["recall@10"] = round(recall_vs_exact(got, truth), 4)  # held-out queries, not the tuning ones
    lat = single_latency(hnsw, test)
    row["single_p50_ms"], row["single_p99_ms"] = ms(lat, 50), ms(lat, 99)
    for b in (64, 1000):
        bt = []
        for _ in range(5):
            t0 = time.perf_counter()
            hnsw.search(test[:b], K)
            bt.append(time.perf_counter() - t0)
        row[f"batch{b}_ms"] = round(float(np.median(bt)) * 1e3, 2)
    row["batch_qps"] = round(1000 / (row["batch1000_ms"] / 1e3), 0)

    # excluding each heavy user's 500 seen items (the rule serving and evaluation share)
    truth_ex, _ = exact.search(heavy, K, exclude=seen)
    heavy_truth, _ = exact.search(heavy, K)
    row["heavy_plain_recall@10"] = round(recall_vs_exact(hnsw.search(heavy, K)[0], heavy_truth), 4)
    if hnsw.native_filter:
        row["excl_native"] = exclusion_row(hnsw, heavy, seen, truth_ex)
        tuned = hnsw.ef_filtered
        hnsw.set_ef_filtered(None)  # at the plain ef: what the filter alone costs
        row["excl_native_at_ef"] = exclusion_row(hnsw, heavy, seen, truth_ex)
        hnsw.set_ef_filtered(tuned)
        # the plain query on the same heavy users at the filtered width: what that width costs without a filter
        hnsw.set_ef(tuned)
        lat = single_latency(hnsw, heavy)
        row["heavy_plain_at_ef_filtered"] = {
            "ef": tuned, "recall@10": round(recall_vs_exact(hnsw.search(heavy, K)[0], heavy_truth), 4),
            "p50_ms": ms(lat, 50), "p99_ms": ms(lat, 99)}
        hnsw.set_ef(ef)
        # the extension's two filter representations, raw single-query calls at ef_filtered
        for mode, name in ((1, "bitset"), (0, "sorted")):
            lab = [np.ascontiguousarray(s_, dtype=np.int64) for s_ in seen]
            off = np.array([0, N_SEEN], dtype=np.int64)
            out = []
            for _ in range(2):
                for r in range(len(seen)):
                    q = heavy[r:r + 1]
                    t0 = time.perf_counter()
                    hnsw._index.knn(q, K, ef, lab[r], off, 1, mode, tuned)
                    out.append(time.perf_counter() - t0)
            row[f"filter_{name}_p50_ms"], row[f"filter_{name}_p99_ms"] = ms(np.array(out), 50), ms(np.array(out), 99)

    # the fallback path (hnswlib package, over-fetch + post-filter) on the same graph
    with tempfile.TemporaryDirectory() as tmp:
        hnsw.save(Path(tmp) / "index.hnsw")
        old = HnswIndex.load(Path(tmp) / "index.hnsw", dim=dim, metric="cosine", size=n, ef=ef,
                             num_threads=threads, native=False)
    calls: list[int] = []
    knn = old._knn
    old._knn = lambda q, kf: (calls.append(kf), knn(q, kf))[1]  # count hnswlib calls per query
    for policy in ("adaptive", "full"):
        old.overfetch = policy
        calls[:] = []
        row[f"excl_{policy}"] = exclusion_row(old, heavy, seen, truth_ex, calls=calls)
    del old

    top = row["excl_native"] if hnsw.native_filter else row["excl_adaptive"]
    row["excl_p99_ratio"], row["excl_recall@10"] = top["p99_ratio"], top["recall@10"]
    row["excl_p50_ms"], row["excl_p99_ms"] = top["p50_ms"], top["p99_ms"]
    row["old_excl_p99_ratio"], row["old_excl_recall@10"] = (row["excl_adaptive"]["p99_ratio"],
                                                            row["excl_adaptive"]["recall@10"])

    # exact search side by side (BLAS pinned to one thread, as inside a threaded server)
    with blas_threads(1):
        lat = single_latency(exact, test[:200], repeat=1)
        row["exact_single_p50_ms"], row["exact_single_p99_ms"] = ms(lat, 50), ms(lat, 99)
    t0 = time.perf_counter()
    exact.search(test, K)
    row["exact_batch1000_ms"] = round((time.perf_counter() - t0) * 1e3, 1)
    return row


SELECTIVITIES = (0.3, 0.1, 0.03, 0.01, 0.001)


def allowed_set(kind: str, selectivity: float, n: int, cluster: np.ndarray | None, rng: np.random.Generator):
    """An allowed set over ``n`` items -> words: ``random`` items, or whole ``clusters`` (``cluster [n]``: each
    item's fine cluster) picked at random until they hold ``selectivity * n`` items."""
    from recsys.retrieval import bitset

    if kind == "random":
        return bitset.from_ids(rng.choice(n, max(1, round(selectivity * n)), replace=False), n)
    assert cluster is not None
    order = rng.permutation(int(cluster.max()) + 1)
    sizes = np.bincount(cluster, minlength=order.shape[0])[order]
    take = order[: int(np.searchsorted(np.cumsum(sizes), selectivity * n)) + 1]
    return bitset.from_mask(np.isin(cluster, take))


def attribute_values(cluster: np.ndarray, share: float, rng: np.random.Generator) -> np.ndarray:
    """An attribute over the items whose values group whole fine clusters (picked at random) into about ``share``
    of the items each -> each item's value [n] (0, 1, ...)."""
    order = rng.permutation(int(cluster.max()) + 1)
    sizes = np.bincount(cluster, minlength=order.shape[0])[order]
    per_cluster = np.empty(order.shape[0], dtype=np.int64)
    per_cluster[order] = np.cumsum(sizes) * 0.999 // (share * cluster.shape[0])  # cumulative share -> value
    return per_cluster[cluster]


def load_or_build_partitions(hnsw, value: np.ndarray, index_path: Path | None):
    """One graph per attribute value (:class:`recsys.retrieval.partitions.Partitions`), kept next to the cached
    index file when there is one."""
    from recsys.retrieval.partitions import Partitions

    n = value.shape[0]
    files = ([index_path.with_name(f"{index_path.stem}.value{v}.hnsw") for v in range(int(value.max()) + 1)]
             if index_path is not None else None)
    if files and all(f.exists() for f in files):
        loaded = {v: HnswIndex.load(f, dim=hnsw.dim, metric=hnsw.metric, size=int((value == v).sum()), ef=hnsw.ef,
                                    num_threads=hnsw.num_threads) for v, f in enumerate(files)}
        return Partitions.attach(loaded, n_ids=n)
    parts = Partitions.build(hnsw, {v: np.flatnonzero(value == v) for v in range(int(value.max()) + 1)})
    if files:
        for v, f in enumerate(files):
            parts.parts[v].index.save(f)
    return parts


def bench_filtered(items, tune, test, cluster, *, threads: int, M: int, ef_construction: int, efs, target: float,
                   index_path: Path | None = None, seed: int = 0, ef_min: int | None = None, rounds: int = 5,
                   partitions: bool = True) -> dict:
    """The filtered-search section (see the module docstring) -> one result row."""
    from recsys.retrieval import bitset

    n, dim = items.shape
    row: dict = {"n_items": n, "dim": dim, "M": M, "ef_construction": ef_construction}
    t0 = time.perf_counter()
    if index_path is not None and index_path.exists():
        hnsw = HnswIndex.load(index_path, dim=dim, metric="cosine", size=n, ef=64, num_threads=threads)
    else:
        hnsw = HnswIndex(items, M=M, ef_construction=ef_construction, ef=64, num_threads=threads)
        if index_path is not None:
            hnsw.save(index_path)
    row["build_or_load_s"] = round(time.perf_counter() - t0, 1)
    row["native_filter"] = hnsw.native_filter
    if ef_min is not None:
        hnsw.filter_ef_min = ef_min
    row["filter_ef_min"] = hnsw.filter_ef_min
    exact = ExactIndex(items)
    ef, _ = autotune_ef(hnsw, exact, tune, k=K, target_recall=target, efs=efs, latency_queries=50)
    row["autotune_ef"] = ef
    row["exact_scan_limit"] = round(hnsw.exact_scan_limit)
    hnsw._exact()  # the exact scan's vectors, built on first need: not part of a query's latency
    walk_scored = None
    if hnsw.native_filter:
        from recsys import _hnsw

        walk_scored = _hnsw.last_walk_scored
        everything = bitset.from_mask(np.ones(n, dtype=bool))
        counts = []
        near, hnsw.filter_near_fraction = hnsw.filter_near_fraction, 1.0  # the full width, never narrowed
        for r in range(300):  # the all-allowed walk scores what a plain search of that width scores
            hnsw.search(test[r:r + 1], K, allow=everything)
            counts.append(walk_scored())
        hnsw.filter_near_fraction = near
        row["walk_scored_all_allowed_p50"] = float(np.median(counts))
    qs = test[:300]
    rng = np.random.default_rng(seed)  # the allowed sets: the same draws whatever the timing does
    order_rng = np.random.default_rng(seed + 1)  # the paired calls' order
    cases = []

    def measure(kind: str, sel: float, allow: np.ndarray, truth_allow: np.ndarray | None = None) -> None:
        """One case: recall against the exact filtered answer, `rounds` rounds of paired timing (see above)."""
        truth, _ = exact.search(qs, K, allow=allow if truth_allow is None else truth_allow)
        got, scored = [], []
        for r in range(qs.shape[0]):
            got.append(hnsw.search(qs[r:r + 1], K, allow=allow)[0][0])
            scored.append(walk_scored() if walk_scored else 0)
        got = np.stack(got)
        # `rounds` rounds of every query, each filtered call paired with a plain one in random order; the
        # percentiles and ratios quoted are the medians of the rounds' own (one stall of the shared machine
        # moves one round's p99, not the quoted one), each round's p99 ratio is kept too
        per_round = []
        for _ in range(rounds):
            plain, filt = [], []
            for r in range(qs.shape[0]):
                q = qs[r:r + 1]
                for which in order_rng.permutation(2):
                    t1 = time.perf_counter()
                    if which:
                        hnsw.search(q, K, allow=allow)
                    else:
                        hnsw.search(q, K)
                    (filt if which else plain).append(time.perf_counter() - t1)
            per_round.append({f"{name}{p}": ms(np.array(xs), p) for name, xs in (("", filt), ("plain_", plain))
                              for p in (50, 90, 99)})
        med = {key: round(float(np.median([pr[key] for pr in per_round])), 4) for key in per_round[0]}
        words = bitset.check(allow)
        keys = bitset.within_of(allow)
        parted = (keys is not None and hnsw.partitions is not None
                  and hnsw.partitions.plan(words, keys, scan_limit=hnsw.exact_scan_limit))
        case = {"kind": kind, "selectivity": sel, "allowed": bitset.count(words),
                "path": (f"partitions ({len(parted.graphs)}{' + scan' if parted.rest else ''})" if parted
                         else hnsw.allow_plan(words)),
                "width": hnsw.allow_width(words),
                "near_width": (walk.near_width if hnsw.native_filter and not parted and (walk := hnsw.allow_walk(words))
                               else None),
                "recall@10": round(recall_vs_exact(got, truth), 4), "exactly_k": bool((got >= 0).all()),
                "p50_ms": med["50"], "p90_ms": med["90"], "p99_ms": med["99"],
                "plain_p50_ms": med["plain_50"], "plain_p90_ms": med["plain_90"],
                "plain_p99_ms": med["plain_99"], "rounds": rounds,
                "p99_ratio_rounds": [round(pr["99"] / pr["plain_99"], 2) for pr in per_round]}
        if walk_scored and case["path"] == "graph":  # the walk's work: nodes scored (the graph's own cost)
            case["walk_scored_p50"] = float(np.median(scored))
        for p in (50, 90, 99):  # the median of the rounds' ratios
            case[f"p{p}_ratio"] = round(float(np.median([pr[f"{p}"] / pr[f"plain_{p}"] for pr in per_round])), 2)
        cases.append(case)
        print(f"[{n} x {dim}] filtered {kind} {sel}: {case['path']} R@10={case['recall@10']} "
              f"p99 x{case['p99_ratio']}", file=sys.stderr, flush=True)

    with blas_threads(1):
        for kind in ("random", "clusters") if cluster is not None else ("random",):
            for sel in SELECTIVITIES:
                measure(kind, sel, allowed_set(kind, sel, n, cluster, rng))
        if cluster is not None and partitions:
            # an attribute of ~10% values, each a set of whole fine clusters, with a graph per value
            # (HnswIndex.partitions, as `index.partition_by` builds at export); its own rng: the sets above stay
            value = attribute_values(cluster, 0.1, np.random.default_rng(seed + 2))
            t0 = time.perf_counter()
            hnsw.partitions = load_or_build_partitions(hnsw, value, index_path)
            part_efs = hnsw.partitions.tune(tune, k=K, target_recall=target, efs=efs)  # as export tunes them
            row["partitions"] = {"values": int(value.max()) + 1, "build_or_load_s": round(time.perf_counter() - t0, 1),
                                 "bytes": int(sum(p.index.index_bytes() for p in hnsw.partitions.parts.values())),
                                 "ef": {str(v): e for v, e in part_efs.items()}}
            half = bitset.from_mask(np.random.default_rng(seed + 3).random(n) < 0.5)
            one, two = bitset.from_mask(value == 0), bitset.from_mask((value == 1) | (value == 2))
            for kind, sel, words, keys in (("value", 0.1, one, [0]), ("value+half", 0.05, one & half, [0]),
                                           ("2 values", 0.2, two, [1, 2])):
                measure(f"{kind} walk", sel, words)  # the same set without the hint: the main graph's walk
                measure(f"{kind} parts", sel, bitset.within(words, keys))
            hnsw.partitions = None
    row["cases"] = cases
    return row


def width_text(case: dict) -> str:
    """The walk's width, and its near width when it has one (``48/24``)."""
    return f"{case['width']}/{case['near_width']}" if case.get("near_width") else str(case["width"])


def print_filter_table(rows: list[dict]) -> None:
    print("\nfiltered search (allow=): single queries, k=10, paired with a plain query on the same user")
    print(f"{'items':>8} {'kind':>8} {'keep':>6} {'allowed':>8} {'path':>6} {'width':>5} {'R@10':>6} {'p50 ms':>7} "
          f"{'p90 ms':>7} {'p99 ms':>7} {'plain p50':>9} {'plain p90':>9} {'plain p99':>9} {'p50 x':>6} {'p90 x':>6} "
          f"{'p99 x':>6} {'scored':>6}")
    for r in rows:
        if "walk_scored_all_allowed_p50" in r:
            print(f"{r['n_items']:>8}: the walk with every item allowed (= a plain search of its width) scores "
                  f"{r['walk_scored_all_allowed_p50']:.0f} nodes (p50); 'scored' below: the filtered walk's p50")
        for c in r["cases"]:
            print(f"{r['n_items']:>8} {c['kind']:>8} {c['selectivity']:>6.1%} {c['allowed']:>8} {c['path']:>6} "
                  f"{width_text(c):>5} {c['recall@10']:>6.3f} {c['p50_ms']:>7.3f} {c['p90_ms']:>7.3f} {c['p99_ms']:>7.3f} "
                  f"{c['plain_p50_ms']:>9.3f} {c['plain_p90_ms']:>9.3f} {c['plain_p99_ms']:>9.3f} "
                  f"{c['p50_ratio']:>6} {c['p90_ratio']:>6} {c['p99_ratio']:>6} {c.get('walk_scored_p50', ''):>6}")


COLUMNS = [("n_items", "items"), ("dim", "dim"), ("build_s", "build s"), ("index_mb", "MB"),
           ("autotune_ef", "ef*"), ("recall@10", "R@10"), ("single_p50_ms", "p50 ms"), ("single_p99_ms", "p99 ms"),
           ("batch_qps", "batch q/s"), ("ef_filtered", "ef_f*"), ("excl_p50_ms", "excl p50"),
           ("excl_p99_ms", "excl p99"), ("excl_p99_ratio", "excl p99 x"), ("excl_recall@10", "excl R@10"),
           ("heavy_plain_recall@10", "heavy R@10"), ("old_excl_p99_ratio", "old p99 x"),
           ("old_excl_recall@10", "old R@10"), ("exact_single_p50_ms", "exact p50"),
           ("exact_batch1000_ms", "exact b1000 ms")]


def print_table(rows: list[dict]) -> None:
    widths = [max(len(h), 9) for _, h in COLUMNS]
    print("  ".join(h.rjust(w) for (_, h), w in zip(COLUMNS, widths, strict=True)))
    for r in rows:
        print("  ".join(str(r.get(c, "")).rjust(w) for (c, _), w in zip(COLUMNS, widths, strict=True)))
    for r in rows:
        prec = r.get("search_precision", "fp32")
        other = "bf16" if prec == "fp32" else "fp32"
        print(f"\n{r['n_items']} x {r['dim']}: ef sweep (Recall@10 vs exact, single-query ms; {prec} traversal, "
              f"{other} beside it on the same graph)")
        for s in r["ef_sweep"]:
            line = f"  ef={s['ef']:4d}  recall={s['recall@10']:.4f}  p50={s['p50_ms']:.4f}  p99={s['p99_ms']:.4f}"
            if f"{other}_p50_ms" in s:
                line += (f"   | {other} recall={s[f'{other}_recall@10']:.4f}  p50={s[f'{other}_p50_ms']:.4f}  "
                         f"p99={s[f'{other}_p99_ms']:.4f}  (p50 x{s[f'{other}_p50_ms'] / s['p50_ms']:.2f})")
            print(line)
        print(f"{r['n_items']} x {r['dim']}: excluding {N_SEEN} seen items, paired with a plain query on the same "
              f"user (heavy users' plain R@10 at ef={r['autotune_ef']}: {r.get('heavy_plain_recall@10')})")
        if "heavy_plain_at_ef_filtered" in r:
            h = r["heavy_plain_at_ef_filtered"]
            print(f"  plain query on the same users at ef={h['ef']}: R@10={h['recall@10']:.4f}  p50={h['p50_ms']:.4f}  "
                  f"p99={h['p99_ms']:.4f}")
        for key in ("excl_native", "excl_native_at_ef", "excl_adaptive", "excl_full"):
            if key in r:
                e = r[key]
                print(f"  {key:18s} R@10={e['recall@10']:.4f}  p50={e['p50_ms']:.4f} ({e['p50_ratio']}x)  "
                      f"p99={e['p99_ms']:.4f} ({e['p99_ratio']}x)  plain p50={e['plain_p50_ms']:.4f} "
                      f"p99={e['plain_p99_ms']:.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    p.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--threads", type=int, default=2, help="hnswlib threads for build and batch queries")
    p.add_argument("--M", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--efs", type=int, nargs="+", default=[10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512])
    p.add_argument("--target-recall", type=float, default=0.99)
    p.add_argument("--embeddings", help="item embeddings .npy [n, dim] (overrides --sizes/--dims)")
    p.add_argument("--queries", help="query (user) embeddings .npy [m, dim] for --embeddings")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "index_bench.json"))
    p.add_argument("--append", action="store_true", help="merge rows into an existing --out (e.g. the 1M run)")
    p.add_argument("--filtered", action="store_true", help="only the filtered-search section (dim 64 by default)")
    p.add_argument("--filter-out", default=str(Path(__file__).parent / "results" / "index_filter.json"))
    p.add_argument("--cache", help="directory keeping generated embeddings and built indexes between runs")
    p.add_argument("--filter-ef-min", type=int, help="HnswIndex.filter_ef_min for the filtered section")
    p.add_argument("--no-partitions", action="store_true",
                   help="skip the filtered section's partitioned attribute (a graph per value: one more build)")
    p.add_argument("--filter-rounds", type=int, default=5,
                   help="rounds of the filtered section's paired timing (the medians of the rounds are quoted)")
    args = p.parse_args(argv)
    if args.filtered and args.dims == [64, 128]:
        args.dims = [64]

    rows = []
    filter_rows = []
    cases = [(None, None)] if args.embeddings else [(n, d) for n in args.sizes for d in args.dims]
    for n, d in cases:
        t0 = time.perf_counter()
        cluster = None
        if args.embeddings:
            items, tune, test, heavy, seen, heavy_tune, seen_tune = from_files(args.embeddings, args.queries,
                                                                               seed=args.seed)
            source = f"file:{args.embeddings}"
        else:
            items, tune, test, heavy, seen, heavy_tune, seen_tune = cached_trained_like(n, d, args.seed, args.cache)
            cluster = SyntheticLogs(n, seed=args.seed).item_cluster  # the same draw trained_like starts with
            source = "trained-like (synthetic clustered power-law logs + randomised SVD)"
        gen_s = time.perf_counter() - t0
        print(f"[{items.shape[0]} x {items.shape[1]}] embeddings ready in {gen_s:.1f}s", file=sys.stderr, flush=True)
        if args.filtered or items.shape[1] == 64:
            index_path = (Path(args.cache) / f"index_{n}_{d}_{args.seed}_{args.M}_{args.ef_construction}.hnsw"
                          if args.cache and n else None)
            frow = bench_filtered(items, tune, test, cluster, threads=args.threads, M=args.M,
                                  ef_construction=args.ef_construction, efs=args.efs, target=args.target_recall,
                                  index_path=index_path, seed=args.seed, ef_min=args.filter_ef_min,
                                  rounds=args.filter_rounds, partitions=not args.no_partitions)
            frow["source"] = source
            filter_rows.append(frow)
        if args.filtered:
            continue
        row = bench_one(items, tune, test, heavy, seen, heavy_tune, seen_tune, threads=args.threads, M=args.M,
                        ef_construction=args.ef_construction, efs=args.efs, target=args.target_recall)
        row["source"] = source
        row["n_tune_queries"], row["n_test_queries"], row["n_heavy_queries"] = len(tune), len(test), len(heavy)
        rows.append(row)
        print(f"[{items.shape[0]} x {items.shape[1]}] done: build {row['build_s']}s ef*={row['autotune_ef']} "
              f"R@10={row['recall@10']} p50={row['single_p50_ms']}ms", file=sys.stderr, flush=True)
        del items, tune, test, heavy, seen, heavy_tune, seen_tune

    env = {"python": platform.python_version(), "numpy": np.__version__, "cpus": os.cpu_count(),
           "machine": platform.machine(), "note": "shared 2-core machine; latencies are noisy, medians quoted",
           "native_filter": native_available()}
    try:
        from importlib.metadata import version

        env["hnswlib"] = version("hnswlib")
    except Exception:  # metadata missing: not worth failing the run
        pass
    if filter_rows:
        print_filter_table(filter_rows)
        fout = Path(args.filter_out)
        frows = filter_rows
        if args.append and fout.exists():
            done = {(r["n_items"], r["dim"]) for r in filter_rows}
            frows = [r for r in json.loads(fout.read_text()).get("rows", []) if (r["n_items"], r["dim"]) not in done]
            frows += filter_rows
        atomic_write_json(fout, {"k": K, "selectivities": list(SELECTIVITIES), "target_recall": args.target_recall,
                                 "env": env, "rows": frows})
        print(f"\nwrote {fout}")
    if args.filtered:
        return 0
    print_table(rows)
    out = Path(args.out)
    result = {"k": K, "n_seen_excluded": N_SEEN, "target_recall": args.target_recall, "env": env, "rows": rows}
    if args.append and out.exists():
        old = json.loads(out.read_text())
        keep = [r for r in old.get("rows", []) if (r["n_items"], r["dim"]) not in {(r2["n_items"], r2["dim"])
                                                                                    for r2 in rows}]
        result["rows"] = keep + rows
    atomic_write_json(out, result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
