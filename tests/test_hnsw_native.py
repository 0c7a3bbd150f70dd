"""recsys._hnsw: the in-search exclusion filter, hnswlib file compatibility both ways, threads, bad inputs, and
the fallback when the extension is missing."""

from __future__ import annotations

import functools
import subprocess
import sys
import threading

import numpy as np
import pytest
import test_index

from recsys.retrieval import ExactIndex, HnswIndex, autotune_ef, native_available, recall_vs_exact

pytestmark = pytest.mark.skipif(not native_available(), reason="recsys._hnsw not built (no C++ compiler)")


# test_index's trained-like geometry, with this module's sizes (30 clusters, 200 queries)
clustered = functools.partial(test_index.clustered, n_clusters=30, n_queries=200)


@pytest.fixture(scope="module")
def data():
    return clustered(3000, 24)


@pytest.fixture(scope="module")
def raw(data):
    from recsys import _hnsw

    items, _ = data
    idx = _hnsw.Index(24)
    idx.init_index(3000, 16, 100, 100)
    idx.add_items(items, np.arange(3000, dtype=np.int64), 2)
    idx.set_ef(64)
    return idx


def csr(lists):
    """Per-row label lists -> (flat int64 labels, offsets [n + 1])."""
    offsets = np.zeros(len(lists) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in lists], out=offsets[1:])
    flat = np.concatenate([np.asarray(x, dtype=np.int64) for x in lists]) if offsets[-1] else np.zeros(0, np.int64)
    return flat, offsets


# -- the extension itself --------------------------------------------------------------------------------------


def test_distances_are_one_minus_dot_and_nearest_first():
    from recsys import _hnsw

    vecs = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], dtype=np.float32)
    idx = _hnsw.Index(2)
    idx.init_index(4, 16, 50, 1)
    idx.add_items(vecs, np.array([10, 11, 12, 13], dtype=np.int64), 1)
    # query [1, 0]: dots = [1, 0, 0.6, -1] -> distances 1 - dot = [0, 1, 0.4, 2]
    labels, dist = idx.knn(np.array([[1.0, 0.0]], dtype=np.float32), 4)
    assert labels.tolist() == [[10, 12, 11, 13]]
    np.testing.assert_allclose(dist[0], [0.0, 0.4, 1.0, 2.0], atol=1e-6)
    # excluding 10 and 12 leaves 11, 13 then padding -1 / inf
    labels, dist = idx.knn(np.array([[1.0, 0.0]], dtype=np.float32), 4, 0, *csr([[12, 10]]))
    assert labels.tolist() == [[11, 13, -1, -1]]
    assert np.isinf(dist[0, 2:]).all() and labels.dtype == np.int64 and dist.dtype == np.float32
    assert idx.get_ids_list().tolist() == [10, 11, 12, 13]
    np.testing.assert_array_equal(idx.get_items(np.array([12, 10], dtype=np.int64)), vecs[[2, 0]])


def test_exclusion_never_returned_exactly_k_bitset_and_sorted_agree(data, raw):
    items, queries = data
    ex = ExactIndex(items)
    top, _ = ex.search(queries, 60)
    rng = np.random.default_rng(1)
    # the hard case: each row excludes its true top-40, plus random ids, unknown ids and negative ids
    lists = [np.concatenate([top[i, :40], rng.choice(3000, 200, replace=False), [5000, 10**7, -3]])
             for i in range(len(queries))]
    lists[7] = np.array([], dtype=np.int64)  # a row without exclusions in the same batch
    flat, off = csr(lists)
    results = {}
    for mode in (1, 0):  # 1 = bitset over labels, 0 = sorted array + binary search
        labels, dist = raw.knn(queries, 10, 64, flat, off, 1, mode)
        for row, e in zip(labels, lists, strict=True):
            assert (row >= 0).all() and len(set(row.tolist())) == 10
            assert not np.isin(row, e).any()
        results[mode] = (labels, dist)
    np.testing.assert_array_equal(results[0][0], results[1][0])
    truth, _ = ex.search(queries, 10, exclude=[e[e >= 0] for e in lists])
    assert recall_vs_exact(results[1][0], truth) > 0.95
    # the same batch on two threads gives the same answer
    par, _ = raw.knn(queries, 10, 64, flat, off, 2, -1)
    np.testing.assert_array_equal(par, results[1][0])
    # the per-thread bitset is clean after each row: a later call excluding one far item gets the plain top back
    plain, _ = raw.knn(queries[:1], 10, 64)
    far = np.array([int(top[0, -1])], dtype=np.int64)  # rank 60: outside the top-10
    again, _ = raw.knn(queries[:1], 10, 64, *csr([far]))
    np.testing.assert_array_equal(again, plain)


def test_all_but_k_excluded_returns_exactly_the_remaining_items(data, raw):
    items, queries = data
    keep = np.array([3, 700, 1500, 2999, 42])
    lists = [np.setdiff1d(np.arange(3000), keep)] * 3
    labels, dist = raw.knn(queries[:3], 5, 0, *csr(lists))
    for row in labels:  # the filtered walk goes through the whole graph to find them
        assert sorted(row.tolist()) == sorted(keep.tolist())
    labels, _ = raw.knn(queries[:3], 8, 0, *csr(lists))  # k > what remains: padded, never an error
    assert (labels[:, 5:] == -1).all() and (np.sort(labels[:, :5], axis=1) == np.sort(keep)).all()


def test_large_labels_use_the_sorted_filter():
    from recsys import _hnsw

    items, queries = clustered(300, 8, n_queries=20, seed=2)
    big = np.arange(300, dtype=np.int64) + (1 << 40)  # far beyond a bitset's reach
    idx = _hnsw.Index(8)
    idx.init_index(300, 16, 64, 1)
    idx.add_items(items, big, 1)
    top, _ = idx.knn(queries, 5, 64)
    labels, _ = idx.knn(queries, 5, 64, *csr([t[:3] for t in top]))
    assert (labels >= 1 << 40).all()
    for row, t in zip(labels, top, strict=True):
        assert not np.isin(row, t[:3]).any() and row[0] == t[3]
    assert _hnsw.MAX_BITSET_LABEL < 1 << 40


def test_bad_inputs_are_refused_with_the_parameter_named(raw):
    q = np.zeros((2, 24), dtype=np.float32)
    with pytest.raises(ValueError, match="`queries` must have 24 columns"):
        raw.knn(np.zeros((2, 16), dtype=np.float32), 5)
    with pytest.raises(ValueError, match="`queries` must be float32, got dtype float64"):
        raw.knn(np.zeros((2, 24)), 5)
    with pytest.raises(ValueError, match="C-contiguous"):
        raw.knn(np.zeros((24, 2), dtype=np.float32).T, 5)
    with pytest.raises(ValueError, match="2-D"):
        raw.knn(np.zeros(24, dtype=np.float32), 5)
    with pytest.raises(ValueError, match="`k` must be >= 1"):
        raw.knn(q, 0)
    with pytest.raises(ValueError, match="n \\+ 1 = 3 offsets, got 2"):
        raw.knn(q, 5, 0, np.array([1], dtype=np.int64), np.array([0, 1], dtype=np.int64))
    with pytest.raises(ValueError, match="both be given"):
        raw.knn(q, 5, 0, np.array([1], dtype=np.int64), None)
    with pytest.raises(ValueError, match="`exclude_labels` must be int64"):
        raw.knn(q, 5, 0, np.array([1], dtype=np.int32), np.array([0, 1, 1], dtype=np.int64))
    with pytest.raises(ValueError, match="end at len"):
        raw.knn(q, 5, 0, np.array([1], dtype=np.int64), np.array([0, 1, 2], dtype=np.int64))
    with pytest.raises(ValueError, match="non-decreasing"):
        raw.knn(q, 5, 0, np.array([1], dtype=np.int64), np.array([0, 2, 1], dtype=np.int64))
    with pytest.raises(KeyError, match="label 99999 is not in the index"):
        raw.get_items(np.array([1, 99999], dtype=np.int64))
    with pytest.raises(ValueError, match="`labels` must be >= 0, got -1"):
        raw.add_items(np.zeros((1, 24), dtype=np.float32), np.array([-1], dtype=np.int64), 1)
    with pytest.raises(ValueError, match="exceeds max_elements"):
        raw.add_items(np.zeros((1, 24), dtype=np.float32), np.array([5000], dtype=np.int64), 1)


# -- files: the same format as the hnswlib package, both ways --------------------------------------------------


def test_file_round_trip_with_the_hnswlib_package_both_ways(data, tmp_path):
    import hnswlib

    items, queries = data
    ours = HnswIndex(items, M=12, ef_construction=80, ef=50, num_threads=2, native=True)
    path = tmp_path / "ours.hnsw"
    ours.save(path)
    theirs = hnswlib.Index(space="ip", dim=24)
    theirs.load_index(str(path))
    theirs.set_ef(50)
    t_labels, t_dist = theirs.knn_query(queries, k=10, num_threads=1)
    o_labels, o_scores = ours.search(queries, 10)
    # same graph, same search: identical answers, score = 1 - hnswlib's distance
    np.testing.assert_array_equal(o_labels, t_labels.astype(np.int64))
    np.testing.assert_allclose(o_scores, 1.0 - t_dist, atol=1e-6)
    np.testing.assert_array_equal(np.sort(theirs.get_ids_list()), np.arange(3000))

    # hnswlib package -> ours
    built = hnswlib.Index(space="ip", dim=24)
    built.init_index(max_elements=3000, M=10, ef_construction=60, random_seed=7)
    built.add_items(items, np.arange(3000) + 100, num_threads=1)
    built.set_ef(40)
    path2 = tmp_path / "theirs.hnsw"
    built.save_index(str(path2))
    loaded = HnswIndex.load(path2, dim=24, metric="cosine", size=3000, ef=40, native=True)
    assert loaded.native_filter and (loaded.M, loaded.ef_construction) == (10, 60)
    np.testing.assert_array_equal(loaded.ids, np.arange(3000) + 100)
    b_labels, b_dist = built.knn_query(queries, k=10, num_threads=1)
    l_labels, l_scores = loaded.search(queries, 10)
    np.testing.assert_array_equal(l_labels, b_labels.astype(np.int64))
    np.testing.assert_allclose(l_scores, 1.0 - b_dist, atol=1e-6)
    np.testing.assert_array_equal(loaded.get_vectors(np.array([100, 3099])), items[[0, 2999]])
    # and the bytes round-trip: saving the loaded index reproduces the package's file
    path3 = tmp_path / "again.hnsw"
    loaded.save(path3)
    assert path3.read_bytes() == path2.read_bytes()


def test_nodes_are_renumbered_to_their_labels_and_the_graph_is_unchanged(data, tmp_path):
    """hnswlib numbers nodes in insertion order, which threads shuffle; the extension renumbers them to their
    labels when the labels are 0..n-1 (the filtered walk then reads no label), after its own build and on loading
    a file, without changing the graph: every answer equals the package's on the same file."""
    import hnswlib

    from recsys import _hnsw
    from recsys.retrieval import bitset

    items, queries = data
    theirs = hnswlib.Index(space="ip", dim=24)
    theirs.init_index(max_elements=3000, M=12, ef_construction=80, random_seed=3)
    order = np.random.default_rng(3).permutation(3000)  # inserted out of label order, as threads would
    theirs.add_items(items[order], order, num_threads=1)
    theirs.set_ef(50)
    path = tmp_path / "theirs.hnsw"
    theirs.save_index(str(path))
    loaded = HnswIndex.load(path, dim=24, metric="cosine", size=3000, ef=50, native=True)
    np.testing.assert_array_equal(loaded._index.get_ids_list(), np.arange(3000))
    t_labels, t_dist = theirs.knn_query(queries, k=10, num_threads=1)
    l_labels, l_scores = loaded.search(queries, 10)
    np.testing.assert_array_equal(l_labels, t_labels.astype(np.int64))
    np.testing.assert_allclose(l_scores, 1.0 - t_dist, atol=1e-6)
    np.testing.assert_array_equal(loaded.get_vectors(np.array([0, 1234, 2999])), items[[0, 1234, 2999]])
    # the renumbered file loads in the package and answers the same
    again = tmp_path / "again.hnsw"
    loaded.save(again)
    back = hnswlib.Index(space="ip", dim=24)
    back.load_index(str(again))
    back.set_ef(50)
    assert again.stat().st_size == path.stat().st_size and again.read_bytes() != path.read_bytes()  # moved
    np.testing.assert_array_equal(back.knn_query(queries, k=10, num_threads=1)[0], t_labels)
    # our own two-thread build is in label order too; labels that are not 0..n-1 are left as inserted
    ours = HnswIndex(items, M=12, ef_construction=80, ef=50, num_threads=2, native=True)
    np.testing.assert_array_equal(ours._index.get_ids_list(), np.arange(3000))
    odd = HnswIndex(items, np.arange(3000, dtype=np.int64) * 2, M=12, ef_construction=80, ef=50, num_threads=2,
                    native=True)
    assert sorted(odd._index.get_ids_list().tolist()) == list(range(0, 6000, 2))
    assert _hnsw.popcount(bitset.from_ids([0, 5, 64, 2999], 3000)) == 4
    assert _hnsw.popcount(np.zeros(3, dtype=np.uint64)) == 0


# -- HnswIndex on the native path ------------------------------------------------------------------------------


def test_mixed_batch_matches_row_by_row_and_exact_fallbacks(data):
    items, queries = data
    idx = HnswIndex(items, ef=64, num_threads=2, native=True)
    ex = ExactIndex(items)
    rng = np.random.default_rng(3)
    n = 12
    exclude: list = [rng.choice(3000, 50, replace=False) for _ in range(n)]
    include: list = [None] * n
    exclude[1] = None
    exclude[2] = rng.choice(3000, 2000, replace=False)  # > exact_fallback_fraction of the catalogue: exact scan
    include[3] = rng.choice(3000, 30, replace=False)  # include-list: exact scoring of those
    ids, scores = idx.search(queries[:n], 10, exclude=exclude, include=include)
    for i in range(n):
        one, one_s = idx.search(queries[i:i + 1], 10, exclude=[exclude[i]], include=[include[i]])
        np.testing.assert_array_equal(ids[i], one[0])
        np.testing.assert_allclose(scores[i], one_s[0], atol=1e-6)
        if exclude[i] is not None:
            assert not np.isin(ids[i], exclude[i]).any()
    exact_ids, _ = ex.search(queries[2:4], 10, exclude=exclude[2:4], include=include[2:4])
    np.testing.assert_array_equal(ids[2:4], exact_ids)
    assert np.isin(ids[3], include[3]).all()


def test_autotune_sets_ef_filtered_from_exclusion_queries(data, tmp_path):
    items, queries = data
    # a sparse graph, and excluding users who mix three interests (harder queries than the tuning ones): the
    # filtered search needs a wider ef than the plain one
    idx = HnswIndex(items, ef=64, M=6, ef_construction=40, num_threads=1, native=True)
    ex = ExactIndex(items)
    rng = np.random.default_rng(0)
    mixed = queries + queries[rng.permutation(len(queries))] + queries[rng.permutation(len(queries))]
    mixed /= np.linalg.norm(mixed, axis=1, keepdims=True)
    top, _ = ex.search(mixed, 40)
    seen = [top[i] for i in range(len(mixed))]  # every near neighbour "seen": the answer sits deeper
    ladder = (8, 16, 32, 64, 128, 256)
    ef, table = autotune_ef(idx, ex, queries, k=10, target_recall=0.97, efs=ladder, latency_queries=10,
                            exclude=seen, filtered_queries=mixed)
    ftable = idx.ef_filtered_table
    efs_tried = [r["ef"] for r in ftable]
    assert efs_tried == sorted(efs_tried) and ftable[0]["ef"] == ef  # the ladder starts at the plain ef
    # the smallest ef tried that reaches the target is the one chosen, found by bisecting a ladder step to 1/8
    passing = [r["ef"] for r in ftable if r["recall"] >= 0.97]
    assert idx.ef == ef and idx.ef_filtered == min(passing) > ef
    assert idx.ef_filtered not in ladder
    below = max(e for e in efs_tried if e < idx.ef_filtered)
    assert idx.ef_filtered - below <= max(4, below // 8)
    queries = mixed
    got, _ = idx.search(queries, 10, exclude=seen)
    truth, _ = ex.search(queries, 10, exclude=seen)
    assert recall_vs_exact(got, truth) >= 0.97
    assert idx.params()["ef_filtered"] == idx.ef_filtered
    path = tmp_path / "i.hnsw"
    idx.save(path)
    back = HnswIndex.load(path, dim=24, metric="cosine", ef=ef, ef_filtered=idx.ef_filtered)
    assert (back.ef, back.ef_filtered) == (ef, idx.ef_filtered)
    np.testing.assert_array_equal(back.search(queries, 10, exclude=seen)[0], got)
    # set_ef keeps a tuned ef_filtered; the effective filtered width is never below ef
    back.set_ef(8)
    assert back.ef_filtered == idx.ef_filtered
    back.set_ef(1000)
    assert back.ef_filtered == 1000
    with pytest.raises(ValueError, match="`ef_filtered` must be an integer >= 1, got 0"):
        back.set_ef_filtered(0)


def test_two_threads_search_concurrently_and_agree(data):
    items, queries = data
    idx = HnswIndex(items, ef=64, num_threads=1, native=True)
    rng = np.random.default_rng(4)
    lists = [rng.choice(3000, 300, replace=False) for _ in range(len(queries))]
    expected = [idx.search(queries[r:r + 1], 10, exclude=[lists[r]])[0][0] for r in range(len(queries))]
    out: dict[int, list] = {0: [], 1: []}
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        try:
            for _ in range(5):
                for r in range(len(queries)):
                    out[t].append(idx.search(queries[r:r + 1], 10, exclude=[lists[r]])[0][0])
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    for t in (0, 1):
        assert len(out[t]) == 5 * len(queries)
        for j, row in enumerate(out[t]):
            np.testing.assert_array_equal(row, expected[j % len(queries)])


def test_index_imports_and_falls_back_without_the_extension():
    code = (
        "import sys; sys.modules['recsys._hnsw'] = None\n"
        "import numpy as np\n"
        "from recsys.retrieval import HnswIndex, native_available\n"
        "assert not native_available()\n"
        "x = np.eye(4, dtype=np.float32)\n"
        "idx = HnswIndex(x, num_threads=1)\n"
        "ids, _ = idx.search(x[:1], 2, exclude=[np.array([0])])\n"
        "assert not idx.native_filter and ids[0, 0] != 0 and (ids >= 0).all()\n"
        "try:\n"
        "    HnswIndex(x, native=True)\n"
        "except ImportError as e:\n"
        "    assert 'not built' in str(e)\n"
        "else:\n"
        "    raise SystemExit('native=True did not raise')\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"


# -- the bf16 traversal ----------------------------------------------------------------------------------------


def test_bf16_kernel_matches_the_scalar_one_and_rounds_to_nearest_even():
    from recsys import _hnsw

    rng = np.random.default_rng(3)
    for dim in (1, 7, 8, 15, 16, 17, 24, 31, 32, 64, 65, 128):
        q = rng.normal(size=dim).astype(np.float32)
        v = rng.normal(size=dim).astype(np.float32)
        fast, scalar, rounded = _hnsw._bf16_dots(q, v)
        want = float(np.dot(q.astype(np.float64), rounded.astype(np.float64)))
        assert fast == pytest.approx(want, abs=1e-5), (dim, _hnsw.BF16_ISA)
        assert scalar == pytest.approx(want, abs=1e-5), dim
        # bf16 keeps 8 significant bits: rounding moves a value by at most half a unit in the last place, 2^-8 of it
        assert np.all(np.abs(rounded - v) <= np.abs(v) * 2.0**-8)
    # round to nearest, ties to even: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 -> 1 (even mantissa)
    _, _, r = _hnsw._bf16_dots(np.ones(3, np.float32), np.array([1 + 2**-8, 1 + 3 * 2**-8, -2.0], np.float32))
    assert r.tolist() == [1.0, 1 + 2**-6, -2.0]


@pytest.mark.parametrize("dim", [24, 20])  # 20: not a multiple of the SIMD width (scalar tail)
def test_bf16_search_recall_matches_fp32_and_scores_are_exact(dim):
    items, queries = clustered(4000, dim, seed=5)
    exact = ExactIndex(items)
    ex_ids, _ = exact.search(queries, 10)
    assert HnswIndex(items[:100], num_threads=1).search_precision == "fp32"  # the default
    idx = HnswIndex(items, ef=48, num_threads=2, search_precision="bf16")
    assert idx.search_precision == "bf16" and idx.params()["search_precision"] == "bf16"
    got16, s16 = idx.search(queries, 10)
    idx.set_search_precision("fp32")
    got32, _ = idx.search(queries, 10)
    r16, r32 = recall_vs_exact(got16, ex_ids), recall_vs_exact(got32, ex_ids)
    assert r16 >= 0.97 and r16 >= r32 - 0.01, (r16, r32)
    # the returned scores are the float32 dots of the returned items (re-scored, not bf16 approximations)
    want = np.einsum("qd,qkd->qk", queries, items[got16])
    np.testing.assert_allclose(s16, want, atol=2e-6)
    assert np.all(np.diff(s16, axis=1) <= 1e-7)  # best first


def test_bf16_exclusion_is_never_returned_and_add_updates_the_copy(data):
    items, queries = data
    idx = HnswIndex(items[:2500], ef=64, num_threads=2, search_precision="bf16")
    exact = ExactIndex(items[:2500])
    top, _ = exact.search(queries[:50], 15)
    excl = [row[:5].astype(np.int64) for row in top]  # each query's 5 nearest items are excluded
    got, _ = idx.search(queries[:50], 10, exclude=excl)
    for row, e in zip(got, excl, strict=True):
        assert not set(row.tolist()) & set(e.tolist())
    assert recall_vs_exact(got, top[:, 5:15]) >= 0.97
    # items added later are in the bf16 copy too: each is its own nearest neighbour with score 1
    idx.add(items[2500:], np.arange(2500, 3000))
    ids, scores = idx.search(items[2500:2600], 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(2500, 2600))
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-5)


def test_search_precision_survives_save_and_load_and_bad_values_are_named(data, tmp_path):
    from recsys.retrieval import IndexConfig

    items, queries = data
    idx = HnswIndex(items, ef=32, num_threads=2, search_precision="bf16")
    idx.save(tmp_path / "i.hnsw")
    back16 = HnswIndex.load(tmp_path / "i.hnsw", dim=24, metric="cosine", ef=32, search_precision="bf16")
    back32 = HnswIndex.load(tmp_path / "i.hnsw", dim=24, metric="cosine", ef=32)  # older manifests: fp32
    assert (back16.search_precision, back32.search_precision) == ("bf16", "fp32")
    np.testing.assert_array_equal(back16.search(queries, 5)[0], idx.search(queries, 5)[0])
    with pytest.raises(ValueError, match="search_precision.*'int8'"):
        IndexConfig(search_precision="int8")
    with pytest.raises(ValueError, match="search_precision.*'fp16'"):
        idx.set_search_precision("fp16")


def test_bf16_rescoring_resolves_ties_bf16_cannot():
    # 300 near-duplicates of one direction, differing in the 4th-5th significant digit (below bf16's resolution):
    # their bf16 order is noise, so only the float32 re-scoring can find the true top 10 (a fixed re-scoring window
    # of the best ~2k bf16 candidates misses some of them)
    rng = np.random.default_rng(11)
    base = rng.normal(size=32)
    base /= np.linalg.norm(base)
    dup = base + 3e-3 * rng.normal(size=(300, 32))
    other = rng.normal(size=(1700, 32))
    items = np.vstack([dup, other])
    items = (items / np.linalg.norm(items, axis=1, keepdims=True)).astype(np.float32)
    queries = (base + 1e-3 * rng.normal(size=(20, 32))).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    want, want_scores = ExactIndex(items).search(queries, 10)
    idx = HnswIndex(items, ef=400, num_threads=1, search_precision="bf16")  # one thread: a deterministic graph
    got, scores = idx.search(queries, 10)
    # tie-aware: every item returned is a true top-10 up to float32 rounding (BLAS and hnswlib's SIMD sum in another
    # order, so the exact 10th and 11th may swap at ~1e-7); a bf16-ordered answer misses by ~1e-5
    true = np.einsum("qkd,qd->qk", items[got], queries)
    assert (true >= want_scores[:, -1:] - 1e-6).all(), recall_vs_exact(got, want)
    assert recall_vs_exact(got, want) >= 0.99
    np.testing.assert_allclose(scores, want_scores, atol=1e-6)
