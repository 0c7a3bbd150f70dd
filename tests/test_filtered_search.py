"""The allowed-set filter (issue #18): the bitset helpers by hand, the retrieval rule with ``allow`` (exactly k,
padding, with exclude / include), HNSW recall against the exact filtered answer on both code paths, the
exact-scan switch, and the argument checks."""

from __future__ import annotations

import numpy as np
import pytest
from test_index import NATIVE_PARAMS  # both search paths, the native one skipped where it is not built

from recsys.retrieval import (
    ExactIndex,
    HnswIndex,
    bitset,
    native_available,
    recall_vs_exact,
    retrieve,
    retrieve_one,
)


def clustered(n: int, dim: int, *, n_clusters: int = 40, n_queries: int = 200, seed: int = 0, spread: float = 0.6):
    """Unit item vectors around cluster centres (``spread``: the noise's scale per dimension) + queries near the
    same centres; the item's cluster too."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    cluster = rng.integers(0, n_clusters, n)
    items = centres[cluster] + spread * rng.normal(size=(n, dim))
    queries = centres[rng.integers(0, n_clusters, n_queries)] + 0.8 * rng.normal(size=(n_queries, dim))
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return items.astype(np.float32), queries.astype(np.float32), cluster


def assert_same_answer(got, got_s, want, want_s):
    """Equal ids and scores, except that ids may swap where two scores tie within float32 rounding (the native
    scan and BLAS sum the dot products in different orders)."""
    np.testing.assert_allclose(got_s, want_s, rtol=0, atol=2e-6)
    differ = got != want
    near_tie = np.zeros_like(differ)
    near_tie[:, 1:] |= np.abs(np.diff(want_s, axis=1)) < 2e-6
    near_tie[:, :-1] |= np.abs(np.diff(want_s, axis=1)) < 2e-6
    assert not (differ & ~near_tie).any()
    assert differ.sum() <= 2


@pytest.fixture(scope="module")
def data():
    return clustered(6000, 32)


@pytest.fixture(scope="module", params=NATIVE_PARAMS)
def built(request, data):
    items, _, _ = data
    hnsw = HnswIndex(items, M=16, ef_construction=100, ef=64, num_threads=2, native=request.param)
    assert hnsw.native_filter is request.param
    return hnsw, ExactIndex(items)


# -- bitset helpers, hand-worked ---------------------------------------------------------------------------------


def test_from_ids_packs_bits_little_endian_in_uint64_words():
    w = bitset.from_ids([0, 3, 64], 70)  # word 0: bits 0 and 3 = 0b1001 = 9; word 1: bit 0 (id 64) = 1
    assert w.dtype == np.uint64 and w.tolist() == [9, 1]
    assert bitset.from_ids([63], 64).tolist() == [1 << 63]
    assert bitset.from_ids([], 130).tolist() == [0, 0, 0]  # ceil(130 / 64) = 3 words
    assert bitset.from_ids([5, 5, 1], 8).tolist() == [0b100010]  # repeats and order do not matter


def test_mask_round_trip_count_and_ids():
    mask = np.array([True, False, False, True, False])
    w = bitset.from_mask(mask)
    assert w.tolist() == [9]
    assert bitset.to_mask(w, 5).tolist() == mask.tolist()
    assert bitset.to_mask(w, 66).sum() == 2 and bitset.to_mask(w, 66).shape == (66,)  # past the words: False
    assert bitset.count(np.array([9, 1, 2**64 - 1], dtype=np.uint64)) == 2 + 1 + 64
    assert bitset.ids(np.array([9, 0, 1 << 63], dtype=np.uint64)).tolist() == [0, 3, 191]
    assert bitset.contains(np.array([9], dtype=np.uint64), np.array([0, 1, 3, 64, -1])).tolist() == [
        True, False, True, False, False]


def test_combining_is_numpy_on_words():
    a, b = bitset.from_ids([1, 2, 3], 10), bitset.from_ids([2, 3, 4], 10)
    assert bitset.ids(a & b).tolist() == [2, 3]
    assert bitset.ids(a | b).tolist() == [1, 2, 3, 4]
    assert bitset.ids(a & ~b).tolist() == [1]


def test_bitset_helpers_refuse_bad_input():
    with pytest.raises(ValueError, match=r"`ids` must be in \[0, 10\), got 10"):
        bitset.from_ids([3, 10], 10)
    with pytest.raises(ValueError, match="`mask` must be a bool array"):
        bitset.from_mask(np.array([0, 1]))
    with pytest.raises(ValueError, match="`allow` must be a uint64 bitset, got dtype int64"):
        bitset.count(np.array([9], dtype=np.int64))


# -- the rule: exactly k, padding, with exclude / include --------------------------------------------------------


@pytest.mark.parametrize("native", [p.values[0] for p in NATIVE_PARAMS] + ["exact"],
                         ids=["hnsw-native", "hnsw-fallback", "exact"])
def test_exactly_k_then_padding(native, data):
    if native is True and not native_available():
        pytest.skip("recsys._hnsw not built")
    items, queries, _ = data
    n = items.shape[0]
    index = ExactIndex(items) if native == "exact" else HnswIndex(items, ef=32, num_threads=2, native=native)
    k = 10
    rng = np.random.default_rng(3)
    allowed = np.sort(rng.choice(n, k, replace=False))
    ids, scores = index.search(queries[:5], k, allow=bitset.from_ids(allowed, n))
    assert (np.sort(ids, axis=1) == allowed).all()  # all k allowed ids, best first
    assert (np.diff(scores, axis=1) <= 0).all()
    ids, scores = index.search(queries[:5], k, allow=bitset.from_ids(allowed[:-1], n))
    assert (ids[:, -1] == -1).all() and np.isneginf(scores[:, -1]).all()
    assert (np.sort(ids[:, :-1], axis=1) == allowed[:-1]).all()
    ids, scores = index.search(queries[:5], k, allow=bitset.from_ids([], n))
    assert (ids == -1).all() and np.isneginf(scores).all()


def test_allow_with_exclude_and_include(built, data):
    hnsw, exact = built
    items, queries, cluster = data
    allow = bitset.from_mask(cluster < 20)  # about half the catalogue
    q = queries[:20]
    plain, _ = exact.search(q, 10, allow=allow)
    exclude = [row[:5] for row in plain]  # the five best allowed ones of each query
    for index in (hnsw, exact):
        ids, _ = index.search(q, 10, allow=allow, exclude=exclude)
        assert (ids >= 0).all()
        assert bitset.contains(allow, ids).all()
        assert not any(np.isin(ids[i], exclude[i]).any() for i in range(len(q)))
    # include: only included ids that are also allowed and not excluded
    include = [np.arange(0, 60)] * len(q)
    want = np.arange(60)[(cluster[:60] < 20)]
    want = [np.setdiff1d(want, exclude[i]) for i in range(len(q))]
    for index in (hnsw, exact):
        ids, scores = index.search(q, 100, allow=allow, include=include, exclude=exclude)
        for i in range(len(q)):
            got = ids[i][ids[i] >= 0]
            assert sorted(got.tolist()) == want[i].tolist()
            np.testing.assert_allclose(scores[i][: got.size], items[got] @ q[i], rtol=1e-5, atol=1e-6)
    # the batch and the single-query calls of the retrieval rule agree with the index
    got, _ = retrieve(hnsw, q, 10, seen=exclude, allow=allow)
    one, _ = retrieve_one(hnsw, q[:1], 10, exclude=exclude[0], allow=allow)
    assert got[0].tolist() == one
    assert not np.isin(one, exclude[0]).any() and bitset.contains(allow, np.array(one)).all()


@pytest.mark.parametrize("kind", ["random", "clusters"])
@pytest.mark.parametrize("selectivity", [0.5, 0.2, 0.05])
def test_hnsw_filtered_recall_vs_exact(built, data, kind, selectivity):
    hnsw, exact = built
    items, queries, cluster = data
    n = items.shape[0]
    rng = np.random.default_rng(7)
    if kind == "random":
        allow = bitset.from_mask(rng.random(n) < selectivity)
    else:  # whole clusters, as an attribute filter (genre) would
        allow = bitset.from_mask(np.isin(cluster, rng.permutation(40)[: max(1, round(40 * selectivity))]))
    saved = hnsw.filter_exact_scale
    hnsw.filter_exact_scale = 0.0  # the graph, whatever the count
    try:
        assert hnsw.allow_plan(allow) == "graph"
        got, _ = hnsw.search(queries, 10, allow=allow)
    finally:
        hnsw.filter_exact_scale = saved
    truth, _ = exact.search(queries, 10, allow=allow)
    assert (got >= 0).all() and bitset.contains(allow, got).all()
    assert recall_vs_exact(got, truth) >= 0.95


def test_below_the_switch_the_answer_is_the_exact_one(built, data):
    hnsw, exact = built
    items, queries, _ = data
    n = items.shape[0]
    limit = hnsw.filter_exact_scale * n**0.5  # ~1240 ids of 6000
    rng = np.random.default_rng(11)
    small = bitset.from_ids(rng.choice(n, int(limit) - 1, replace=False), n)
    big = bitset.from_ids(rng.choice(n, int(limit) + 200, replace=False), n)
    assert hnsw.allow_plan(small) == "exact" and hnsw.allow_plan(big) == "graph"
    for q in (queries[:1], queries[:50]):  # the single query and a batch
        got, got_s = hnsw.search(q, 10, allow=small)
        truth, truth_s = exact.search(q, 10, allow=small)
        assert_same_answer(got, got_s, truth, truth_s)
    # a graph answer is approximate: with width filter_ef_min it need not equal the exact one everywhere, but an
    # exact scan (forced by the switch) must
    hnsw_scale = hnsw.filter_exact_scale
    hnsw.filter_exact_scale = 1e9
    try:
        got, got_s = hnsw.search(queries, 10, allow=big)
    finally:
        hnsw.filter_exact_scale = hnsw_scale
    assert_same_answer(got, got_s, *exact.search(queries, 10, allow=big))


def test_non_identity_ids(data):
    items, queries, _ = data
    items = items[:500]
    ids = np.arange(500, dtype=np.int64) * 3 + 7  # labels that are not row positions
    allow = bitset.from_ids(ids[::4], int(ids.max()) + 1)
    exact = ExactIndex(items, ids)
    truth, truth_s = exact.search(queries[:20], 10, allow=allow)
    assert bitset.contains(allow, truth).all()
    assert np.isin(truth, ids[::4]).all()
    for native in [p.values[0] for p in NATIVE_PARAMS]:
        if native and not native_available():
            continue
        hnsw = HnswIndex(items, ids, ef=64, num_threads=2, native=native)
        got, got_s = hnsw.search(queries[:20], 10, allow=allow)
        assert_same_answer(got, got_s, truth, truth_s)  # 125 allowed of 500: below the switch, exact


def test_plain_search_unchanged_by_the_allow_keyword(built, data):
    hnsw, _ = built
    _, queries, _ = data
    everything = bitset.from_mask(np.ones(hnsw.size, dtype=bool))
    a, _ = hnsw.search(queries[:30], 10)
    b, _ = hnsw.search(queries[:30], 10, allow=None)
    c, _ = hnsw.search(queries[:30], 10, allow=everything)
    assert (a == b).all()
    assert recall_vs_exact(c, a) >= 0.97  # all allowed: the filtered walk at ef_filtered, about the plain answer


@pytest.mark.parametrize("index_kind", ["hnsw", "exact"])
def test_wrong_allow_is_refused_with_its_name(built, data, index_kind):
    hnsw, exact = built
    index = hnsw if index_kind == "hnsw" else exact
    _, queries, _ = data
    with pytest.raises(ValueError, match="`allow` must be a uint64 bitset, got dtype bool"):
        index.search(queries[:1], 10, allow=np.ones(hnsw.size, dtype=bool))
    with pytest.raises(ValueError, match="`allow` must be a uint64 bitset, got dtype int64"):
        index.search(queries[:1], 10, allow=np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"`allow` must be a 1-D uint64 bitset, got shape \(2, 2\)"):
        index.search(queries[:1], 10, allow=np.zeros((2, 2), dtype=np.uint64))


def test_native_knn_checks_the_allow_arguments(data):
    if not native_available():
        pytest.skip("recsys._hnsw not built")
    from recsys import _hnsw

    items, queries, _ = data
    hnsw = HnswIndex(items[:300], ef=32, num_threads=1, native=True)
    q = np.ascontiguousarray(queries[:2])
    words = bitset.from_ids([1, 2, 3], 300)
    with pytest.raises(ValueError, match="`allow` must be a uint64 bitset, got dtype int32"):
        hnsw._index.knn(q, 3, 0, None, None, 1, -1, 0, np.zeros(5, dtype=np.int32), -1, 0)
    with pytest.raises(ValueError, match=r"`allow_bits` must be -1 \(all the words' bits\) or in \[0, 64 x 5\]"):
        hnsw._index.knn(q, 3, 0, None, None, 1, -1, 0, words, 321, 0)
    lab, _ = hnsw._index.knn(q, 3, 0, None, None, 1, -1, 0, words, -1, 0)
    assert sorted(lab[0].tolist()) == [1, 2, 3]
    lab, _ = hnsw._index.knn(q, 3, 0, None, None, 1, -1, 0, words, 3, 0)  # ids >= allow_bits: not allowed
    assert sorted(lab[0].tolist()) == [-1, 1, 2]
    with pytest.raises(ValueError, match="`allow` must be a uint64 bitset"):
        _hnsw.scan_allowed(hnsw._exact().vectors, q, 3, np.zeros(5, dtype=np.float64))
    lab, dist = _hnsw.scan_allowed(hnsw._exact().vectors, q, 4, words)
    assert sorted(lab[0].tolist()) == [-1, 1, 2, 3] and dist[0, -1] == np.inf


def test_the_walk_scores_allowed_nodes_not_every_node_it_passes(data):
    """The native filtered walk (two hops through disallowed neighbours, after ACORN-1) scores about what a plain
    search of the same width scores; hnswlib's filtered walk scores every node it passes, ~1 / selectivity times
    as many (it kept ``width`` allowed nodes only after walking ~``width / selectivity`` nodes)."""
    if not native_available():
        pytest.skip("recsys._hnsw not built")
    from recsys import _hnsw

    items, queries, cluster = data
    n = items.shape[0]
    hnsw = HnswIndex(items, M=16, ef_construction=100, ef=64, num_threads=2, native=True)
    rng = np.random.default_rng(3)

    def scored(allow) -> float:
        out = []
        for r in range(100):
            lab, _ = hnsw._index.knn(queries[r:r + 1], 10, 64, None, None, 1, -1, 64, allow, -1, 0)
            assert (lab >= 0).all() and bitset.contains(allow, lab[0]).all()
            out.append(_hnsw.last_walk_scored())
        return float(np.median(out))

    everything = scored(bitset.from_mask(np.ones(n, dtype=bool)))  # = a plain search's work at width 64
    tenth = scored(bitset.from_mask(rng.random(n) < 0.1))
    genres = scored(bitset.from_mask(np.isin(cluster, rng.permutation(40)[:4])))  # 10% as whole clusters
    assert 64 <= everything <= 1000
    assert tenth <= 2.5 * everything  # measured 1.7x; walking through every passed node: ~10x
    assert genres <= 4 * everything  # measured 2.6x (the first steps walk through, see search_allowed)


def test_the_walk_narrows_only_where_the_query_neighbourhood_holds_the_sets_share():
    """``near_width``: the walk keeps the narrower width when the allowed nodes are spread around the query (a
    random set: every row's walk is then the width-32 walk, node for node) and the full width when the query's
    neighbourhood holds none of them (clusters away from the query: the width-64 walk); without the set's size,
    or with near_width 0, it never narrows. HnswIndex.allow_walk hands out filter_near_fraction of the width.
    Tight clusters (spread 0.3), so that a node's two-hop neighbourhood stays in its own cluster, as on trained
    embeddings; with the other tests' overlapping clusters 17 of 60 walks towards far clusters still met their
    share within two hops of the start."""
    if not native_available():
        pytest.skip("recsys._hnsw not built")
    from recsys import _hnsw

    items, queries, cluster = clustered(6000, 32, spread=0.3)
    n = items.shape[0]
    hnsw = HnswIndex(items, M=16, ef_construction=100, ef=64, num_threads=2, native=True)
    rng = np.random.default_rng(5)

    def walk(q, allow, width, count=0, near=0):
        lab, _ = hnsw._index.knn(q, 10, 64, None, None, 1, -1, width, allow, -1, 0, count, near)
        assert (lab >= 0).all() and bitset.contains(allow, lab[0]).all()
        return lab[0].tolist(), _hnsw.last_walk_scored()

    spread = bitset.from_mask(rng.random(n) < 0.1)
    count = bitset.count(spread)
    narrowed = 0
    for r in range(60):
        q = queries[r:r + 1]
        got = walk(q, spread, 64, count, 32)
        assert got in (walk(q, spread, 32), walk(q, spread, 64))
        narrowed += got == walk(q, spread, 32) != walk(q, spread, 64)
        assert walk(q, spread, 64, 0, 32) == walk(q, spread, 64) == walk(q, spread, 64, count, 0)  # no size / no near
    assert narrowed >= 50  # measured 59 of 60

    ids, _ = ExactIndex(items).search(queries[:60], 50)
    kept_full = 0
    for r in range(60):
        q = queries[r:r + 1]
        # 4 clusters (~10% of the items) none of the query's 50 nearest items belongs to
        far = bitset.from_mask(np.isin(cluster, rng.permutation(np.setdiff1d(np.arange(40), cluster[ids[r]]))[:4]))
        got = walk(q, far, 64, bitset.count(far), 32)
        assert got == walk(q, far, 64) or got == walk(q, far, 32)
        kept_full += got == walk(q, far, 64) != walk(q, far, 32)
    assert kept_full >= 45  # measured 49 of 60 (the rest: cross-cluster links met 5% of the start's two hops)

    allow = bitset.from_mask(rng.random(n) < 0.3)
    hnsw.filter_exact_scale = 0.0
    plan = hnsw.allow_walk(allow)
    assert plan.width == hnsw.allow_width(allow) and plan.near_width == -(-plan.width // 2)
    assert plan.count == bitset.count(allow) and plan.budget == hnsw.allow_budget(allow)
    hnsw.filter_near_fraction = 1.0
    assert hnsw.allow_walk(allow).near_width == 0


def test_a_walk_over_budget_gives_up_and_the_exact_scan_answers(built, data):
    hnsw, exact = built
    if not hnsw.native_filter:
        pytest.skip("the budget belongs to the native walk")
    items, queries, cluster = data
    allow = bitset.from_mask(np.isin(cluster, [3, 17, 29]))  # ~7% of the items, far from most queries
    q = np.ascontiguousarray(queries[:20])
    lab, _ = hnsw._index.knn(q, 10, 64, None, None, 1, -1, 64, allow, -1, 0)
    assert (lab >= 0).all()  # no budget: the walk finds its 10
    lab, _ = hnsw._index.knn(q, 10, 64, None, None, 1, -1, 64, allow, -1, 5)
    assert (lab == -1).all()  # 5 nodes scored: every row gave up, and says so by coming back empty
    saved = hnsw.filter_budget_factor, hnsw.filter_exact_scale
    hnsw.filter_budget_factor, hnsw.filter_exact_scale = 1e-6, 0.0  # budget 1 node, the graph whatever the count
    try:
        assert hnsw.allow_plan(allow) == "graph" and hnsw.allow_budget(allow) == 1
        got, got_s = hnsw.search(q, 10, allow=allow)
    finally:
        hnsw.filter_budget_factor, hnsw.filter_exact_scale = saved
    assert_same_answer(got, got_s, *exact.search(q, 10, allow=allow))  # the rows that gave up were scanned


@pytest.mark.parametrize("keep", [0.2, 0.7, 1.0])  # gathered below half the catalogue, masked above
def test_exact_allow_equals_brute_force(data, keep):
    items, queries, _ = data
    n = items.shape[0]
    mask = np.random.default_rng(5).random(n) < keep
    exclude = [np.arange(0, 3000, 7)] * 10
    ids, scores = ExactIndex(items).search(queries[:10], 10, allow=bitset.from_mask(mask), exclude=exclude)
    s = queries[:10] @ items.T
    s[:, ~mask] = -np.inf
    s[:, exclude[0]] = -np.inf
    want = np.argsort(-s, axis=1, kind="stable")[:, :10]
    assert (ids == want).all()
    np.testing.assert_allclose(scores, np.take_along_axis(s, want, axis=1), rtol=1e-5, atol=1e-6)
