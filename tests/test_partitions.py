"""Index partitions (recsys.retrieval.partitions): one graph per attribute value, searched for sets inside them."""

from __future__ import annotations

import numpy as np
import pytest

from recsys.retrieval import ExactIndex, HnswIndex, bitset, native_available
from recsys.retrieval.partitions import Partitions, cover_counts

BACKENDS = [pytest.param(True, marks=pytest.mark.skipif(not native_available(), reason="recsys._hnsw not built")),
            False]


def _clustered(n_clusters=20, per=60, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    cluster = np.repeat(np.arange(n_clusters), per)
    x = centres[cluster] + 0.35 * rng.normal(size=(cluster.size, dim))
    x = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    q = centres[rng.integers(0, n_clusters, 40)] + 0.5 * rng.normal(size=(40, dim))
    return x, cluster, q.astype(np.float32)


def _setup(native, groups_of, scale=0.0):
    x, cluster, q = _clustered()
    index = HnswIndex(x, M=8, ef_construction=100, ef=32, num_threads=1, native=native)
    index.partitions = Partitions.build(index, groups_of(cluster))
    # 0: every partition holding an allowed id is searched by its graph, and nothing is scanned beside them
    index.filter_exact_scale = scale
    return x, cluster, q, index


def _exact(x, q, k, allow, exclude=None):
    return ExactIndex(x).search(q, k, allow=allow, exclude=exclude)


def _recall(got, want):
    return np.mean([len(set(g[g >= 0]) & set(w[w >= 0])) / max((w >= 0).sum(), 1) for g, w in zip(got, want, strict=True)])


@pytest.mark.parametrize("native", BACKENDS)
def test_a_set_inside_partitions_is_answered_by_their_graphs(native, monkeypatch):
    # value = cluster // 4: five values of 240 items each
    x, cluster, q, index = _setup(native, lambda c: {("v", str(v)): np.flatnonzero(c // 4 == v) for v in range(5)})
    value = cluster // 4
    # the main graph must not answer: only the partitions' graphs may
    for name in ("_native_allowed", "_search_general"):
        original = getattr(HnswIndex, name)

        def guarded(self, *a, _original=original, _name=name, **kw):
            if self is index:
                pytest.fail(f"the main graph answered ({_name})")
            return _original(self, *a, **kw)

        monkeypatch.setattr(HnswIndex, name, guarded)
    rng = np.random.default_rng(1)
    half = rng.random(x.shape[0]) < 0.5
    seen = [rng.choice(x.shape[0], 30, replace=False) for _ in range(q.shape[0])]
    cases = {
        "one whole value": (value == 2, [("v", "2")]),
        "two whole values": ((value == 1) | (value == 3), [("v", "1"), ("v", "3")]),
        "part of a value (value AND another condition)": ((value == 4) & half, [("v", "4")]),
        "two values, one of them in part": ((value == 0) | ((value == 3) & half), [("v", "0"), ("v", "3")]),
    }
    for name, (mask, keys) in cases.items():
        allow = bitset.from_mask(mask)
        for exclude in (None, seen):
            want = _exact(x, q, 10, allow, exclude)[0]
            got, scores = index.search(q, 10, allow=bitset.within(allow, keys), exclude=exclude)
            assert bitset.contains(allow, got).all(), name
            if exclude is not None:
                assert not any(np.isin(g, s).any() for g, s in zip(got, seen, strict=True)), name
            assert (np.diff(scores, axis=1) <= 1e-6).all(), name  # best first across the merged partitions
            assert _recall(got, want) >= 0.97, name


@pytest.mark.parametrize("native", BACKENDS)
def test_a_set_that_strays_outside_its_partitions_walks_the_main_graph(native):
    x, cluster, q, index = _setup(native, lambda c: {("v", str(v)): np.flatnonzero(c // 4 == v) for v in range(5)})
    value = cluster // 4
    mask = value == 2
    stray = int(np.flatnonzero(value == 0)[0])
    mask[stray] = True  # e.g. an item moved to value 2 since the export
    allow = bitset.within(bitset.from_mask(mask), [("v", "2")])
    assert index.partitions.plan(bitset.check(allow), [("v", "2")], scan_limit=0) is None
    assert index.partitions.plan(bitset.from_mask(value == 2), [("v", "2")], scan_limit=0) is not None
    # a query at the stray item: it must come back first (the partitions alone would miss it)
    got = index.search(x[stray:stray + 1], 5, allow=allow)[0]
    assert got[0, 0] == stray
    # a key without a partition, and no hint at all: the main graph too, same answers as exact
    for a in (bitset.within(bitset.from_mask(value == 2), [("v", "9")]), bitset.from_mask(value == 2)):
        assert _recall(index.search(q, 10, allow=a)[0], _exact(x, q, 10, bitset.from_mask(value == 2))[0]) >= 0.97


@pytest.mark.parametrize("native", BACKENDS)
def test_overlapping_partitions_return_each_item_once_and_exactly_k(native):
    # a multi-valued attribute: clusters 0-7 are "a", clusters 4-11 are "b" (4-7 are both)
    x, cluster, q, index = _setup(native, lambda c: {("g", "a"): np.flatnonzero(c < 8),
                                                     ("g", "b"): np.flatnonzero((c >= 4) & (c < 12))})
    assert not index.partitions.disjoint
    mask = cluster < 12
    allow = bitset.from_mask(mask)
    got, _ = index.search(q, 20, allow=bitset.within(allow, [("g", "a"), ("g", "b")]))
    assert all(np.unique(g).size == 20 and (g >= 0).all() for g in got)
    assert _recall(got, _exact(x, q, 20, allow)[0]) >= 0.97
    # fewer allowed than k: all of them, then padding
    few = bitset.from_ids(np.flatnonzero(cluster == 5)[:3], x.shape[0])
    got, scores = index.search(q[:2], 5, allow=bitset.within(few, [("g", "a"), ("g", "b")]))
    assert sorted(got[0, :3].tolist()) == np.flatnonzero(cluster == 5)[:3].tolist()
    assert got[:, 3:].tolist() == [[-1, -1], [-1, -1]] and np.isneginf(scores[:, 3:]).all()


@pytest.mark.parametrize("native", BACKENDS)
def test_allowed_ids_outside_the_searched_graphs_are_scanned_exactly(native, monkeypatch):
    """A value's graph searched, a stray item and a small value's items scanned beside it; with the index's
    default switch two small values are scanned whole -- the main graph is never walked."""
    groups = lambda c: {("v", str(v)): np.flatnonzero(c // 4 == v) for v in range(5)}  # noqa: E731
    x, cluster, q, index = _setup(native, groups, scale=5.0)  # switch 5 * sqrt(1200) = 173 < 240 per value
    value = cluster // 4
    monkeypatch.setattr(HnswIndex, "_native_allowed", lambda *a, **kw: pytest.fail("main graph walked"))
    monkeypatch.setattr(HnswIndex, "_search_general",
                        lambda self, *a, **kw: pytest.fail("main graph searched") if self is index else None)
    stray = int(np.flatnonzero(value == 0)[0])
    mask = value == 2
    mask[stray] = True
    allow = bitset.from_mask(mask)
    plan = index.partitions.plan(bitset.check(allow), [("v", "2")], scan_limit=index.exact_scan_limit)
    assert [p.key for p, _ in plan.graphs] == [("v", "2")] and plan.rest == 1
    if not native:  # the fallback's partition graphs search through _search_general too
        monkeypatch.undo()
    got = index.search(x[stray:stray + 1], 5, allow=bitset.within(allow, [("v", "2")]))[0]
    assert got[0, 0] == stray and bitset.contains(allow, got).all()
    q_got = index.search(q, 10, allow=bitset.within(allow, [("v", "2")]))[0]
    assert _recall(q_got, _exact(x, q, 10, allow)[0]) >= 0.97
    # the default switch (16 * sqrt(1200) = 554 >= 240): no graph searched, the two values' 480 items scanned
    index.filter_exact_scale = 16.0
    two = bitset.from_mask((value == 1) | (value == 3))
    plan = index.partitions.plan(two, [("v", "1"), ("v", "3")], scan_limit=index.exact_scan_limit)
    assert plan.graphs == [] and plan.rest == 480
    got = index.search(q, 10, allow=bitset.within(two, [("v", "1"), ("v", "3")]))[0]
    assert (np.sort(got, axis=1) == np.sort(_exact(x, q, 10, two)[0], axis=1)).all()  # exact


def test_cover_counts_counts_each_partition_and_what_lies_outside():
    allow = bitset.from_ids([0, 3, 64, 100, 129], 130)
    parts = [bitset.from_ids([0, 64, 65], 130), bitset.from_ids([3, 64], 70)]  # a shorter set: no id past it
    counts, outside = cover_counts(allow, parts)
    assert counts.tolist() == [2, 2] and outside == 2  # 100 and 129
    assert bitset.within_of(bitset.within(allow, ["x"])) == ("x",)
    assert bitset.within_of(bitset.within(allow, ["x"]) & allow) is None  # any operation drops the hint
