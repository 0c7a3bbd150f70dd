"""The hnswlib-package search path of :class:`recsys.retrieval.hnsw.HnswIndex` (no compiler where the package was
installed): adaptive over-fetch and post-filtering, refetching wider when the k-th kept result ranks too deep for
the tuned recall, exact scans past that. A mixin: its methods use the index's attributes."""

from __future__ import annotations

import math

import numpy as np

from recsys.retrieval import bitset
from recsys.retrieval._arrays import IdMap, in_sorted


def _round_up_fetch(x: int) -> int:
    """Round a fetch size up to 1/8 of its power of two, so a batch groups into few hnswlib calls (<12.5% extra)."""
    if x <= 16:
        return 16
    step = 1 << max(0, x.bit_length() - 4)
    return -(-x // step) * step


# Accept a fetch whose k-th kept result needs a search up to this factor wider than the one made (1 = strict).
REFETCH_SLACK = 1.25


def search_width(depth: int, k: int, ef: int) -> int:
    """How many candidates a search must explore for its top ``depth`` to keep the recall ``ef`` was tuned for at
    ``k``: ``depth * max(ef, k) / k``, within :data:`REFETCH_SLACK`. The one owner of the over-fetch rule:
    ``HnswIndex`` refetches until a fetch of ``kf`` (which explores ``max(ef, kf)``) is that wide, and the serving
    path (``server.service``) asks the same of the lists it cuts."""
    return math.ceil(depth * (max(ef, k) / k) / REFETCH_SLACK)



class PackageSearch:
    def _knn(self, q: np.ndarray, kf: int) -> tuple[np.ndarray, np.ndarray]:
        # One query: run on this thread (hnswlib would otherwise spawn threads for it).
        threads = 1 if q.shape[0] == 1 else self.num_threads
        return self._index.knn_query(q, k=kf, num_threads=threads)

    def _next_fetch(self, keep: np.ndarray | None, k: int, kf: int, n_ex: int) -> int:
        """After fetching ``kf`` results (``keep [kf]``: not excluded, and allowed), 0 = done, -1 = scan exactly,
        else the next fetch size. ``n_ex``: how many ids of the index cannot be returned (excluded, or not
        allowed), which bounds the fetch.

        Quality, not only count: hnswlib's top-``kf`` list is accurate near its head and looser near its tail, and
        ``ef`` was tuned for the top ``k``. If the k-th kept result sits at position ``p``, the list must come from
        a search at least ``p * ef / k`` wide (within ``REFETCH_SLACK``: :func:`search_width`) for the same recall -- fetching ``kf`` results
        makes hnswlib explore ``max(ef, kf)`` candidates. Without ``k`` kept yet, ``p`` is extrapolated from the
        share of kept results (x1.5 margin). Counting alone would be satisfied by ``k + |exclude|``.
        """
        if keep is None:  # nothing excluded: hnswlib searched max(ef, kf) >= the plain query's width
            return 0
        got = int(np.count_nonzero(keep))
        if got >= k and self.overfetch == "full":
            return 0
        width = max(self._ef, k) / k  # candidates explored per wanted result at the tuned ef
        cap = math.ceil((k + n_ex) * width)  # wide enough for the worst case: all excluded ids ranked first
        if got >= k:
            p = int(np.flatnonzero(keep)[k - 1]) + 1
            need = search_width(p, k, self._ef)
            if need <= max(kf, self._ef) or kf >= cap:  # hnswlib explored max(ef, kf)
                return 0
        else:
            if kf >= k + n_ex:  # a fetch that had to hold k kept ones came back short: hnswlib missed nodes
                return -1
            p = kf + math.ceil(1.5 * (k - got) * kf / max(got, 1))
            need = math.ceil(p * width)
        return min(cap, _round_up_fetch(max(need, kf + 1)))

    def _search_general(
        self, q: np.ndarray, k: int, excl: list[np.ndarray | None] | None,
        incl: list[np.ndarray | None] | None, idmap: IdMap, words: np.ndarray | None = None,
        count: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Everything but the plain query. ``words``: the allowed set (checked) or None; ``count``: how many of
        this index's ids it allows, when the caller knows (a partition's share of a larger set). An allowed set at or below
        the exact-scan switch (:meth:`HnswIndex.allow_plan`) is scanned exactly; above it the rows are post-filtered
        (allowed AND not excluded) from a fetch of about ``ef / selectivity`` results -- the depth where the k-th
        allowed one is expected, at the width the tuned recall needs there -- refetched wider by the same rule as
        exclusions, and scanned exactly past ``exact_fallback_fraction`` of the catalogue."""
        n = q.shape[0]
        size = idmap.ids.shape[0]
        out_ids = np.full((n, k), -1, dtype=np.int64)
        out_scores = np.full((n, k), -np.inf, dtype=np.float32)
        if size == 0 or n == 0:
            return out_ids, out_scores
        # Excluded ids that are in the index, per row: their count sizes the over-fetch. Not deduplicated on the
        # hot path (a repeat only over-counts, which keeps k + count a safe bound).
        ex: list[np.ndarray | None] = [None] * n
        if excl is not None:
            for i, e in enumerate(excl):
                if e is not None and e.size:
                    ex[i] = np.sort(idmap.present(e))
        exact_rows: list[int] = []
        fetch: dict[int, list[int]] = {}  # fetch size -> rows
        if words is not None and count is None:
            count = bitset.count(words)
        allowed = 0 if words is None else min(size, count)
        scan_allowed = words is not None and self.allow_plan(words, count) == "exact"
        for i in range(n):
            if incl is not None and incl[i] is not None:
                out_ids[i], out_scores[i] = self._score_include(q[i], k, idmap.members(incl[i]), ex[i], words)
                continue
            n_ex = 0 if ex[i] is None else int(ex[i].size)
            if words is not None:
                if scan_allowed or n_ex > self.exact_fallback_fraction * size:
                    exact_rows.append(i)
                else:
                    depth = math.ceil(k * size / max(allowed, 1))  # where the k-th allowed result should sit
                    kf = _round_up_fetch(max(search_width(depth, k, self._ef), k))
                    if kf >= size or kf > self.exact_fallback_fraction * size:
                        exact_rows.append(i)
                    else:
                        fetch.setdefault(kf, []).append(i)
                continue
            bound = k + n_ex  # fetching this many always leaves k after removing the excluded
            if bound >= size or n_ex > self.exact_fallback_fraction * size:
                exact_rows.append(i)  # most of the catalogue excluded, or k ~ catalogue: the scan is cheaper
            elif self.overfetch == "full" or n_ex == 0:
                fetch.setdefault(min(size, _round_up_fetch(bound)), []).append(i)
            else:
                # hnswlib explores max(ef, k) candidates whatever k is, so fetching ef results costs no more
                # than fetching k: try that first. Seen items rarely fill the whole top-ef.
                fetch.setdefault(min(size, bound, max(k, self._ef)), []).append(i)
        while fetch:
            kf = min(fetch)
            rows = np.array(fetch.pop(kf), dtype=np.int64)
            try:
                labels, dist = self._knn(q[rows], kf)
            except RuntimeError:
                # "Cannot return the results in a contiguous 2D array": fewer than kf reachable -> exact.
                exact_rows.extend(rows.tolist())
                continue
            labels = labels.astype(np.int64, copy=False)
            scores = 1.0 - dist
            for j, i in enumerate(rows):
                lab, sc = labels[j], scores[j]
                keep = None
                n_ex = 0 if ex[i] is None else int(ex[i].size)
                if ex[i] is not None:
                    keep = ~in_sorted(lab, ex[i])
                if words is not None:
                    ok = bitset.contains(words, lab)
                    keep = ok if keep is None else keep & ok
                    n_ex += size - allowed
                if keep is not None:
                    lab, sc = lab[keep], sc[keep]
                nxt = self._next_fetch(keep, k, kf, n_ex)
                if nxt == 0:
                    out_ids[i], out_scores[i] = lab[:k], sc[:k]
                elif nxt < 0 or nxt >= size or nxt > self.exact_fallback_fraction * size:
                    exact_rows.append(int(i))
                else:
                    fetch.setdefault(nxt, []).append(int(i))
        if exact_rows:
            rows = np.array(sorted(exact_rows), dtype=np.int64)
            ids_e, sc_e = self._exact().search_rows(q, rows, k, ex if excl is not None else None, words)
            out_ids[rows], out_scores[rows] = ids_e, sc_e
        return out_ids, out_scores
