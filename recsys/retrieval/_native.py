"""The native search path of :class:`recsys.retrieval.hnsw.HnswIndex` (the ``recsys._hnsw`` extension): one C++
call per batch, the exclusion filtered inside the graph walk, exact scans for the rows the graph cannot answer.
A mixin: its methods use the index's attributes (``_index``, ``_ef``, ``_lock``, ``_idmap``, ...)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from recsys.retrieval._arrays import IdMap, as_matrix, check_k, per_query


class NativeSearch:
    def _search_native(
        self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray | None] | None,
        include: Sequence[np.ndarray | None] | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The native path: one C++ call for the batch, the exclusion filtered inside the search.

        Kept lean for ONE query (the gRPC hot path): validation, one ``knn`` call, ``1 - distance``.
        """
        k = check_k(k)
        q = as_matrix(queries, self.dim, self.metric, name="queries")
        n = q.shape[0]
        labels: np.ndarray | None = None
        offsets: np.ndarray | None = None
        longest = 0
        if exclude is not None:
            if n == 1 and include is None and len(exclude) == 1:
                # The serving call: one list, no per-query machinery.
                e = exclude[0]
                if e is not None:
                    e = np.asarray(e).reshape(-1)
                    if e.size:
                        if e.dtype.kind not in "iu":
                            raise ValueError(f"`exclude[0]` must hold integer ids, got dtype {e.dtype}")
                        labels = np.ascontiguousarray(e, dtype=np.int64)
                        offsets = np.array([0, labels.shape[0]], dtype=np.int64)
                        longest = labels.shape[0]
            else:
                excl = per_query(exclude, n, name="exclude")
                assert excl is not None
                lens = np.array([0 if e is None else e.shape[0] for e in excl], dtype=np.int64)
                if lens.any():
                    labels = np.concatenate([e for e in excl if e is not None]).astype(np.int64, copy=False)
                    offsets = np.zeros(n + 1, dtype=np.int64)
                    np.cumsum(lens, out=offsets[1:])
                    longest = int(lens.max())
        incl = per_query(include, n, name="include") if include is not None else None
        if incl is not None and all(e is None for e in incl):
            incl = None
        self._lock.acquire_read()
        try:
            idmap = self._idmap
            size = idmap.ids.shape[0]
            if incl is None and longest <= self.exact_fallback_fraction * size:
                lab, dist = self._index.knn(q, k, self._ef, labels, offsets, self.num_threads, -1, self.ef_filtered)
                # A short row (-1 padding) is fine only when the catalogue minus the exclusion is exhausted.
                if n == 1:
                    if size >= k and lab[0, k - 1] >= 0:
                        return lab, 1.0 - dist
                elif not n or (size >= k and lab[:, k - 1].min() >= 0):
                    return lab, 1.0 - dist
            else:
                lab, dist = self._knn_some(q, k, labels, offsets, incl, size)
            return self._finish_native(q, k, lab, dist, labels, offsets, incl, idmap)
        finally:
            self._lock.release_read()

    def _knn_some(
        self, q: np.ndarray, k: int, labels: np.ndarray | None, offsets: np.ndarray | None,
        incl: list[np.ndarray | None] | None, size: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The native search for the rows without an include-list or a huge exclusion (the others are scanned
        exactly by :meth:`_finish_native`); -1 / inf in the rows not searched."""
        n = q.shape[0]
        lab = np.full((n, k), -1, dtype=np.int64)
        dist = np.full((n, k), np.inf, dtype=np.float32)
        lens = np.diff(offsets) if offsets is not None else np.zeros(n, dtype=np.int64)
        rows = np.flatnonzero(lens <= self.exact_fallback_fraction * size)
        if incl is not None:
            rows = rows[[incl[i] is None for i in rows]]
        if not rows.size:
            return lab, dist
        sub_labels = sub_offsets = None
        if labels is not None and offsets is not None and lens[rows].any():
            sub_labels = np.concatenate([labels[offsets[i]:offsets[i + 1]] for i in rows])
            sub_offsets = np.zeros(rows.size + 1, dtype=np.int64)
            np.cumsum(lens[rows], out=sub_offsets[1:])
        lab[rows], dist[rows] = self._index.knn(np.ascontiguousarray(q[rows]), k, self._ef, sub_labels, sub_offsets,
                                                self.num_threads, -1, self.ef_filtered)
        return lab, dist

    def _finish_native(
        self, q: np.ndarray, k: int, lab: np.ndarray, dist: np.ndarray, labels: np.ndarray | None,
        offsets: np.ndarray | None, incl: list[np.ndarray | None] | None, idmap: IdMap,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows the graph search cannot answer: include-lists (exact scoring), huge exclusions and short rows
        (exact scan). ``lab``/``dist [n, k]``: the native answer, -1/inf where not searched."""
        n = q.shape[0]
        size = idmap.ids.shape[0]
        ids_out, scores = lab, 1.0 - dist
        ex: list[np.ndarray | None] = [None] * n
        if labels is not None and offsets is not None:
            for i in range(n):
                if offsets[i + 1] > offsets[i]:
                    ex[i] = np.sort(idmap.present(labels[offsets[i]:offsets[i + 1]]))
        exact_rows: list[int] = []
        for i in range(n):
            if incl is not None and incl[i] is not None:
                ids_out[i], scores[i] = self._score_include(q[i], k, idmap.members(incl[i]), ex[i])
                continue
            n_ex = 0 if ex[i] is None else int(np.unique(ex[i]).size)
            remain = min(k, size - n_ex)  # what a complete answer holds
            if n_ex > self.exact_fallback_fraction * size or int((ids_out[i] >= 0).sum()) < remain:
                exact_rows.append(i)
        if exact_rows:
            rows = np.array(exact_rows, dtype=np.int64)
            ids_e, sc_e = self._exact().search_rows(q, rows, k, ex)
            ids_out[rows], scores[rows] = ids_e, sc_e
        return ids_out, scores

    def _native_allowed(
        self, q: np.ndarray, k: int, excl: list[np.ndarray | None] | None, incl: list[np.ndarray | None] | None,
        idmap: IdMap, words: np.ndarray, count: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The native path with an allowed set (``words``, checked; ``count``: how many of this index's ids it
        allows when the caller knows, else its popcount; the read lock held): include-lists scored
        exactly, then either the exact scan of the allowed ids (:meth:`allow_plan`) or one ``knn`` call whose
        filter is allowed AND not excluded, at width :meth:`allow_width`; short rows and huge exclusions are
        scanned exactly."""
        n = q.shape[0]
        size = idmap.ids.shape[0]
        if not n or not size:
            return np.full((n, k), -1, dtype=np.int64), np.full((n, k), -np.inf, dtype=np.float32)
        out_ids = np.empty((n, k), dtype=np.int64)  # every row is written below
        out_scores = np.empty((n, k), dtype=np.float32)
        ex = present_exclusions(excl, idmap, n)
        walk = self.allow_walk(words, count)  # AllowWalk, or None: the exact scan answers every row
        scan = walk is None
        graph_rows: list[int] = []
        exact_rows: list[int] = []
        for i in range(n):
            if incl is not None and incl[i] is not None:
                out_ids[i], out_scores[i] = self._score_include(q[i], k, idmap.members(incl[i]), ex[i], words)
            elif scan or (ex[i] is not None and ex[i].size > self.exact_fallback_fraction * size):
                exact_rows.append(i)
            else:
                graph_rows.append(i)
        if graph_rows:
            whole = len(graph_rows) == n  # every row walks the graph (the usual case): no gather, no scatter
            rows = np.arange(n) if whole else np.array(graph_rows, dtype=np.int64)
            labels, offsets = _csr(ex, rows) if excl is not None else (None, None)
            lab, dist = self._index.knn(q if whole else np.ascontiguousarray(q[rows]), k, self._ef, labels, offsets,
                                        self.num_threads, -1, walk.width, words, -1, walk.budget, walk.count,
                                        walk.near_width)
            short = lab[:, k - 1] < 0  # fewer than k allowed ones exist, or the walk missed some: scan exactly
            if whole and not short.any():
                return lab, 1.0 - dist
            out_ids[rows], out_scores[rows] = lab, 1.0 - dist
            exact_rows.extend(rows[short].tolist())
        if exact_rows:
            rows = np.array(sorted(exact_rows), dtype=np.int64)
            out_ids[rows], out_scores[rows] = self._scan_allowed(q, rows, k, ex, words, idmap)
        return out_ids, out_scores

    def _scan_allowed(
        self, q: np.ndarray, rows: np.ndarray, k: int, ex: list[np.ndarray | None], words: np.ndarray, idmap: IdMap,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact answers for ``q[rows]`` over the allowed ids: the extension's ``scan_allowed`` (reads the bitset's
        words directly; ~6-10x the numpy gather + matmul at 0.3-1% of 1M items, benchmarks/index_bench.py) when
        ids are row positions (the bundle's items), else :meth:`ExactIndex.search_rows`."""
        exact = self._exact()
        if not idmap.identity:
            return exact.search_rows(q, rows, k, ex, words)
        labels, offsets = _csr(ex, rows)
        sub = q if rows.size == q.shape[0] else np.ascontiguousarray(q[rows])
        lab, dist = self._native.scan_allowed(exact.vectors, sub, k, words, -1, labels, offsets, self.num_threads)
        return lab, 1.0 - dist


def present_exclusions(excl: list[np.ndarray | None] | None, idmap: IdMap, n: int) -> list[np.ndarray | None]:
    """Each of the ``n`` rows' excluded ids that are in the index, distinct and sorted (None: nothing excluded)."""
    ex: list[np.ndarray | None] = [None] * n
    if excl is not None:
        for i, e in enumerate(excl):
            if e is not None and e.size:
                ex[i] = np.unique(idmap.present(e))
    return ex


def _csr(ex: list[np.ndarray | None], rows: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The exclusion lists of ``rows`` as the extension's CSR (labels, offsets [len(rows) + 1]); (None, None) when
    none of them excludes anything."""
    lens = np.array([0 if ex[i] is None else ex[i].size for i in rows], dtype=np.int64)
    if not lens.any():
        return None, None
    offsets = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return np.concatenate([ex[i] for i in rows if ex[i] is not None]), offsets
