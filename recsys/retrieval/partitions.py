"""Partitions of an HNSW index: one small graph per value of an item attribute, for filters that follow it.

A filter on an attribute (``category in {"books"}``) selects items that sit together in the embedding space (a
category is a region, not a random sample). Walking the whole graph for such a set is the filtered search's hard
case: a query whose neighbourhood holds no allowed item walks through the disallowed region around it until it
reaches the nearest allowed clusters (benchmarks/index_bench.py ``--filtered``, "clusters": 4-6x a plain query at
p99). Filtered vector engines answer it with structure built for the attribute (Qdrant's extra graph links per
payload value, Milvus's partition keys); here it is one HNSW graph per value, over that value's items with their
ids (labels) from the main index, built at export (``index.partition_by``, see :class:`recsys.publish`) and
loaded with the bundle. A search whose allowed set lies inside a few values' graphs searches those graphs instead
of walking the main one: a plain search of a smaller graph where the set is the whole value, that graph's own
filtered walk (or exact scan) where the set is part of it (``category = books AND year >= 1990``), and the best
``k`` of the answers merged.

The caller says which partitions may hold the set (:func:`recsys.retrieval.bitset.within`, attached when a filter
is compiled: :class:`recsys.catalogue.filters.FilterCache`); the index checks it in one pass over the set's words
(:meth:`Partitions.plan`: the allowed ids in each partition and outside all of them), so a set that strays (an
item moved to another value since the export, ids added to the main index) is searched the usual way.

Cost: the vectors and links again for every partitioned item (about the main index's size once per single-valued
attribute) and one more graph build of that many items at export.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Hashable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from recsys.retrieval import bitset
from recsys.retrieval._arrays import merge_topk

if TYPE_CHECKING:
    from recsys.retrieval.hnsw import HnswIndex


@dataclasses.dataclass(frozen=True)
class Partition:
    """One value's graph: ``index`` (labels = the main index's ids), ``members`` (those ids as a bitset over the
    main index's ids) and their number."""

    key: Hashable
    index: HnswIndex
    members: np.ndarray
    count: int


@dataclasses.dataclass(frozen=True)
class Plan:
    """How :meth:`Partitions.search` answers one allowed set: ``graphs``, the partitions searched by their graphs
    (with the allowed ids in each), and ``rest``, the allowed ids in none of them, scanned exactly."""

    graphs: list[tuple[Partition, int]]
    rest: int


class Partitions:
    """The partitions of one index, by key (``(attribute, value)`` in a bundle), and the ``attributes`` they
    partition (a filter on one of those carries the hint, whether or not each of its values has a graph)."""

    # Above this many partitions holding part of one allowed set, the main graph's filtered walk answers: a
    # search per partition costs about a plain search of that partition's graph (benchmarks/index_bench.py).
    max_parts = 6
    # The allowed ids outside the searched graphs (values too small for a graph, an item that moved to another
    # value since the export) are scanned exactly up to this many times the index's exact-scan switch, else the
    # main walk answers. More than the switch itself: a set known to follow an attribute is the walk's hard case
    # (benchmarks/catalogue_bench.py's trained 100k bundle: 5 categories of 2%, the walk 860 us p50 at Recall@10
    # 0.84 against the scan's 316 us, exact).
    scan_factor = 2.0

    def __init__(self, parts: Sequence[Partition], *, n_ids: int, attributes: Sequence[str] = ()) -> None:
        self.parts = {p.key: p for p in parts}
        self.n_ids = int(n_ids)
        self.attributes = tuple(attributes)
        union = np.zeros(bitset.n_words(self.n_ids), dtype=np.uint64)
        for p in parts:
            union[: p.members.shape[0]] |= p.members
        # no id in two partitions (a single-valued attribute): answers merge without a duplicate check
        self.disjoint = bitset.count(union) == sum(p.count for p in parts)

    def __len__(self) -> int:
        return len(self.parts)

    @classmethod
    def build(cls, main: HnswIndex, groups: Mapping[Hashable, np.ndarray], *,
              attributes: Sequence[str] = ()) -> Partitions:
        """One graph per ``groups`` entry (key -> ids of ``main``), built from ``main``'s vectors with its
        parameters (M, ef_construction, seed, ef, ef_filtered, traversal)."""
        from recsys.retrieval.hnsw import HnswIndex

        n_ids = int(main.ids.max()) + 1 if main.size else 0
        parts = []
        for key, ids in groups.items():
            ids = np.unique(np.asarray(ids, dtype=np.int64))
            if not ids.size:
                raise ValueError(f"partition {key!r} has no ids")
            index = HnswIndex(main.get_vectors(ids), ids, metric=main.metric, M=main.M,
                              ef_construction=main.ef_construction, ef=main.ef, num_threads=main.num_threads,
                              seed=main.seed, ef_filtered=main.ef_filtered,
                              native=main.native_filter or None, search_precision=main.search_precision)
            parts.append(Partition(key, index, bitset.from_ids(ids, n_ids), int(ids.size)))
        return cls(parts, n_ids=n_ids, attributes=attributes)

    @classmethod
    def attach(cls, indexes: Mapping[Hashable, HnswIndex], *, n_ids: int,
               attributes: Sequence[str] = ()) -> Partitions:
        """From loaded graphs (key -> :class:`HnswIndex` whose ids are the main index's)."""
        return cls([Partition(key, ix, bitset.from_ids(ix.ids, n_ids), int(ix.size)) for key, ix in indexes.items()],
                   n_ids=n_ids, attributes=attributes)

    def tune(self, queries: np.ndarray, *, k: int = 10, target_recall: float = 0.99,
             efs: Sequence[int] | None = None) -> dict[Hashable, int]:
        """Each partition's ``ef``: the smallest of ``efs`` whose Recall@``k`` against the exact search of that
        partition reaches ``target_recall`` on ``queries`` (held-out users: any of them may filter on any value, so
        all of them; :func:`recsys.retrieval.autotune_ef`). A partition's items are one region of the space and
        most queries lie outside it, where a graph needs a wider search than at home (at the main index's ef 32,
        Recall@10 0.98 on a 10% value of benchmarks/index_bench.py's 100k items). The width of its filtered
        walks follows (``ef_filtered`` = that ef). -> key -> ef."""
        from recsys.retrieval.exact import ExactIndex
        from recsys.retrieval.tune import autotune_ef

        out = {}
        for key, part in self.parts.items():
            ix = part.index
            exact = ExactIndex(ix.get_vectors(ix.ids), ix.ids, metric=ix.metric)
            kwargs = {} if efs is None else {"efs": efs}
            ef, _ = autotune_ef(ix, exact, queries, k=min(k, part.count), target_recall=target_recall,
                                latency_queries=1, **kwargs)
            ix.set_ef_filtered(None)
            out[key] = ef
        return out

    def plan(self, words: np.ndarray, keys: Sequence[Hashable], *, scan_limit: float) -> Plan | None:
        """How to search the allowed set ``words`` said to lie within ``keys`` (:class:`Plan`), or None when the
        main graph must answer. The keys' graphs holding more than ``scan_limit`` (the main index's
        :attr:`HnswIndex.exact_scan_limit`: fewer are scanned with the rest) allowed
        ids are searched; the allowed ids in none of those are scanned exactly when there are at most
        :attr:`scan_factor` x ``scan_limit`` of them; more, or more than :attr:`max_parts` graphs: None. Checked
        in one pass over the set's words (:func:`cover_counts`), so a hint that does not hold costs a scan or the
        main walk, never a wrong answer."""
        graphs = [p for p in (self.parts.get(key) for key in dict.fromkeys(keys)) if p is not None]
        counts, outside = cover_counts(words, [p.members for p in graphs])
        searched = [(p, int(c)) for p, c in zip(graphs, counts.tolist(), strict=True) if c > scan_limit]
        rest = outside + sum(int(c) for c in counts.tolist() if 0 < c <= scan_limit)
        if len(searched) > self.max_parts or rest > self.scan_factor * scan_limit:
            return None
        return Plan(searched, rest)

    def search(self, main: HnswIndex, q: np.ndarray, k: int, excl: list[np.ndarray | None] | None,
               words: np.ndarray, plan: Plan) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of ``q [n, dim]`` over the allowed ids ``words`` minus ``excl``, as ``plan`` says: each
        searched partition a plain search of its graph when the whole of it is allowed, else its own allowed
        search; the rest scanned exactly in ``main``; the answers merged by score."""
        answers = []
        for part, count in plan.graphs:
            ex = _within(excl, part.members)
            if count == part.count:
                answers.append(part.index.search(q, k, exclude=ex))
            else:
                answers.append(part.index._search_allowed(q, k, ex, None, words, count=count))
        if plan.rest:
            answers.append(main._scan(q, k, excl, rest_words(words, plan)))
        if not answers:
            n = q.shape[0]
            return np.full((n, k), -1, dtype=np.int64), np.full((n, k), -np.inf, dtype=np.float32)
        if len(answers) == 1:
            return answers[0]
        return merge_topk(answers, k, unique=not self.disjoint)


def _within(excl: list[np.ndarray | None] | None, members: np.ndarray) -> list[np.ndarray | None] | None:
    """Each exclusion list cut to the ids of one partition when it is long (a live view's masked rows): a
    partition's search goes exact past a share of its size excluded (``exact_fallback_fraction``)."""
    if excl is None:
        return None
    return [e if e is None or e.size <= 64 else e[bitset.contains(members, e)] for e in excl]


def rest_words(words: np.ndarray, plan: Plan) -> np.ndarray:
    """The allowed ids of ``words`` outside the graphs ``plan`` searches (the ones it scans), as a bitset."""
    rest = bitset.check(words)
    if plan.graphs:
        rest = rest.copy()
        for part, _ in plan.graphs:
            m = part.members[: rest.shape[0]]
            rest[: m.shape[0]] &= ~m
    return rest


def native_parts(main: HnswIndex, plan: Plan, words: np.ndarray) -> tuple[list[tuple], tuple | None] | None:
    """The ``plan`` of :meth:`Partitions.plan` as the native recommender's ``parts`` and ``scan`` (``recsys._hnsw``
    ``KnownUserRecommender.recommend``: the searches :meth:`Partitions.search` runs, at the same widths, and the
    exact scan of the rest over ``main``'s vectors), or None when a partition would scan its own allowed ids (the
    Python path does that) or an index is not native."""
    parts = main.partitions
    if parts is None or not main.native_filter or not main._idmap.identity:
        return None
    out = []
    for part, count in plan.graphs:
        ix = part.index
        if not ix.native_filter:
            return None
        if count == part.count:
            out.append((ix._index, ix.ef, ix.ef_filtered, 0, 0, count, 0, parts.disjoint))
            continue
        walk = ix.allow_walk(words, count)
        if walk is None:
            return None
        out.append((ix._index, ix.ef, ix.ef_filtered, walk.width, walk.budget, walk.count, walk.near_width,
                    parts.disjoint))
    scan = (main._exact().vectors, rest_words(words, plan)) if plan.rest else None
    return out, scan


def cover_counts(words: np.ndarray, members: Sequence[np.ndarray]) -> tuple[np.ndarray, int]:
    """(allowed ids in each of ``members`` [m] int64, allowed ids in none of them); the extension's one pass over
    the set's non-zero words when it is built, numpy otherwise."""
    from recsys.retrieval.hnsw import _native_module

    mod = _native_module()
    if mod is not None:
        counts, outside = mod.cover_counts(words, list(members))
        return counts, int(outside)
    w = bitset.check(words)
    rest = w.copy()
    counts = np.zeros(len(members), dtype=np.int64)
    for j, m in enumerate(members):
        mm = np.zeros_like(w)
        mm[: min(m.shape[0], w.shape[0])] = m[: w.shape[0]]
        counts[j] = bitset.count(w & mm)
        rest &= ~mm
    return counts, bitset.count(rest)
