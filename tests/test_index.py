"""ExactIndex / HnswIndex: known answers, recall vs exact (before and after save/load), the exclusion rule.

Every HnswIndex test runs on both code paths: the native in-search filter (``recsys._hnsw``) and the fallback
(hnswlib package + over-fetch), via the ``native`` fixture.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

import recsys.retrieval.exact as exact_mod
from recsys.retrieval import (
    ExactIndex,
    HnswIndex,
    IndexConfig,
    autotune_ef,
    check_hnsw_file,
    merge_exclusions,
    native_available,
    recall_vs_exact,
    retrieve,
)

NATIVE_PARAMS = [
    pytest.param(True, id="native", marks=pytest.mark.skipif(not native_available(), reason="recsys._hnsw not built")),
    pytest.param(False, id="fallback"),
]


class _Hnsw:
    """``HnswIndex`` pinned to one code path, usable where a test takes an index class."""

    def __init__(self, native: bool) -> None:
        self.native = native

    def __call__(self, *args, **kwargs) -> HnswIndex:
        idx = HnswIndex(*args, native=self.native, **kwargs)
        assert idx.native_filter is self.native
        return idx

    def load(self, *args, **kwargs) -> HnswIndex:
        return HnswIndex.load(*args, native=self.native, **kwargs)


CLASSES = [pytest.param(_Hnsw(True), id="hnsw-native", marks=NATIVE_PARAMS[0].marks),
           pytest.param(_Hnsw(False), id="hnsw-fallback"), pytest.param(ExactIndex, id="exact")]


def clustered(n: int, dim: int, *, n_clusters: int = 40, n_queries: int = 300, seed: int = 0):
    """Unit item vectors around cluster centres + queries drawn near the same centres (trained-like geometry)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, dim))
    items = centres[rng.integers(0, n_clusters, n)] + 0.6 * rng.normal(size=(n, dim))
    queries = centres[rng.integers(0, n_clusters, n_queries)] + 0.8 * rng.normal(size=(n_queries, dim))
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    return items.astype(np.float32), queries.astype(np.float32)


@pytest.fixture(scope="module")
def data():
    return clustered(4000, 32)


@pytest.fixture(scope="module", params=NATIVE_PARAMS)
def native(request) -> bool:
    return request.param


@pytest.fixture(scope="module")
def built(data, native):
    items, _ = data
    return HnswIndex(items, M=16, ef_construction=100, ef=64, num_threads=2, native=native), ExactIndex(items)


# -- exact: hand-worked answers ------------------------------------------------------------------------------------


def test_exact_known_answer_cosine():
    vecs = np.array([[1, 0], [0, 1], [0.6, 0.8], [-1, 0]], dtype=np.float32)
    ex = ExactIndex(vecs)
    # query [2, 0] normalises to [1, 0]; dots = [1, 0, 0.6, -1]
    ids, scores = ex.search(np.array([[2.0, 0.0]]), 3)
    assert ids.tolist() == [[0, 2, 1]]
    assert scores[0] == pytest.approx([1.0, 0.6, 0.0], abs=1e-6)
    assert ids.dtype == np.int64 and scores.dtype == np.float32


def test_exact_known_answer_dot_and_normalisation_of_items():
    vecs = np.array([[1, 2], [3, 1], [0, 0.5]], dtype=np.float32)
    # dot: query [1, 1] -> [3, 4, 0.5]
    ids, scores = ExactIndex(vecs, metric="dot").search(np.array([[1.0, 1.0]]), 2)
    assert ids.tolist() == [[1, 0]] and scores[0] == pytest.approx([4.0, 3.0])
    # cosine normalises the items too: [0, 0.5] -> [0, 1] scores 1 against [0, 1]
    ids, scores = ExactIndex(vecs).search(np.array([[0.0, 3.0]]), 1)
    assert ids.tolist() == [[2]] and scores[0, 0] == pytest.approx(1.0)


def test_exact_blocked_equals_unblocked(data, monkeypatch):
    items, queries = data
    ex = ExactIndex(items)
    full = ex.search(queries[:50], 7)
    monkeypatch.setattr(exact_mod, "EXACT_BLOCK_FLOATS", 3 * items.shape[0])  # 3 queries per block
    blocked = ex.search(queries[:50], 7)
    np.testing.assert_array_equal(full[0], blocked[0])
    np.testing.assert_allclose(full[1], blocked[1], rtol=1e-6)


def test_exact_custom_ids_and_padding():
    vecs = np.array([[1, 0], [0.8, 0.6], [0, 1]], dtype=np.float32)
    ex = ExactIndex(vecs, ids=np.array([70, 50, 90]))
    ids, scores = ex.search(np.array([[1.0, 0.0]]), 5, exclude=[np.array([50, 12345])])
    assert ids.tolist() == [[70, 90, -1, -1, -1]]
    assert scores[0, :2] == pytest.approx([1.0, 0.0], abs=1e-6) and np.isneginf(scores[0, 2:]).all()


# -- hnsw vs exact -------------------------------------------------------------------------------------------------


def test_hnsw_recall_vs_exact_and_after_save_load(data, built, tmp_path):
    items, queries = data
    hnsw, ex = built
    hnsw.set_ef(64)
    truth, truth_scores = ex.search(queries, 10)
    got, got_scores = hnsw.search(queries, 10)
    assert recall_vs_exact(got, truth) > 0.95
    # scores are similarities (1 - hnswlib distance), not distances: the top hit matches the exact top score
    same = got[:, 0] == truth[:, 0]
    np.testing.assert_allclose(got_scores[same, 0], truth_scores[same, 0], atol=1e-5)
    assert (np.diff(got_scores, axis=1) <= 1e-6).all()  # best first

    path = tmp_path / "index.hnsw"
    hnsw.save(path)
    loaded = HnswIndex.load(path, dim=32, metric="cosine", size=items.shape[0], ef=64, native=hnsw.native_filter)
    assert loaded.native_filter is hnsw.native_filter
    assert (loaded.size, loaded.dim, loaded.M) == (items.shape[0], 32, 16)
    got2, scores2 = loaded.search(queries, 10)
    assert recall_vs_exact(got2, truth) > 0.95
    np.testing.assert_array_equal(got2, got)
    np.testing.assert_allclose(scores2, got_scores, atol=1e-6)
    assert not list(tmp_path.glob(".*tmp*"))  # no temp file left behind


def test_single_query_and_float64_noncontiguous_queries(data, built):
    _, queries = data
    hnsw, ex = built
    base_ids, base_scores = hnsw.search(queries[:20], 5)
    # float64, scaled (cosine normalises), non-contiguous (every other column of a wider array)
    wide = np.zeros((20, 64))
    wide[:, ::2] = queries[:20] * 3.0
    ids, scores = hnsw.search(wide[:, ::2], 5)
    np.testing.assert_array_equal(ids, base_ids)
    np.testing.assert_allclose(scores, base_scores, atol=1e-5)
    one_ids, _ = hnsw.search(queries[3:4], 5)
    np.testing.assert_array_equal(one_ids[0], base_ids[3])
    e_ids, _ = ex.search(wide[:, ::2], 5)
    np.testing.assert_array_equal(e_ids, ex.search(queries[:20], 5)[0])


# -- exclusion rule ------------------------------------------------------------------------------------------------


def _check_excluded(ids, exclude, k):
    for row, e in zip(ids, exclude, strict=True):
        assert row.shape == (k,)
        assert (row >= 0).all(), "exactly k results whenever k candidates remain"
        assert len(set(row.tolist())) == k
        assert not np.isin(row, e).any()


def test_exclusion_exactly_k_never_excluded(data, built):
    items, queries = data
    hnsw, ex = built
    hnsw.set_ef(64)
    k = 10
    truth, _ = ex.search(queries, 40)
    rng = np.random.default_rng(1)
    # The hard case: exclude the true top-30 (all the near neighbours), plus 500 random "seen" items for others.
    exclude = [truth[i, :30] if i % 2 else rng.choice(items.shape[0], 500, replace=False)
               for i in range(queries.shape[0])]
    ids, scores = hnsw.search(queries, k, exclude=exclude)
    _check_excluded(ids, exclude, k)
    exact_ids, _ = ex.search(queries, k, exclude=exclude)
    _check_excluded(exact_ids, exclude, k)
    assert recall_vs_exact(ids, exact_ids) > 0.95
    # Excluding most of the catalogue takes the exact fallback: still exactly k and the exact answer.
    big = [rng.choice(items.shape[0], 3000, replace=False) for _ in range(5)]
    ids, _ = hnsw.search(queries[:5], k, exclude=big)
    _check_excluded(ids, big, k)
    np.testing.assert_array_equal(ids, ex.search(queries[:5], k, exclude=big)[0])


def test_adaptive_overfetch_refetches_when_excluded_items_crowd_the_top(data, built, monkeypatch):
    items, queries = data
    hnsw, ex = built
    if hnsw.native_filter:
        pytest.skip("the over-fetch policy belongs to the fallback path")
    hnsw.set_ef(16)
    truth, _ = ex.search(queries[:40], 60)
    rng = np.random.default_rng(6)
    # each row excludes its true top-25 (every item the first ef=16 fetch can return) plus 400 random items
    exclude = [np.concatenate([truth[i, :25], rng.choice(items.shape[0], 400, replace=False)]) for i in range(40)]
    calls: list[int] = []
    knn = hnsw._knn
    monkeypatch.setattr(hnsw, "_knn", lambda q, kf: (calls.append(kf), knn(q, kf))[1])
    exact_ids, _ = ex.search(queries[:40], 10, exclude=exclude)
    results = {}
    for policy in ("adaptive", "full"):
        monkeypatch.setattr(hnsw, "overfetch", policy)
        calls.clear()
        ids, _ = hnsw.search(queries[:40], 10, exclude=exclude)
        _check_excluded(ids, exclude, 10)
        assert recall_vs_exact(ids, exact_ids) > 0.95
        results[policy] = list(calls)
    # adaptive: a first fetch of ef=16 (all excluded), then a wider one, never wider than k + |exclude| * ef / k;
    # full: one fetch of k + |exclude| (425, rounded up to 448)
    assert results["adaptive"][0] == 16 and len(results["adaptive"]) >= 2
    assert max(results["adaptive"]) <= 448 * 16 / 10
    assert results["full"] == [448]
    hnsw.set_ef(64)


@pytest.mark.parametrize("cls", CLASSES)
def test_exclusion_on_catalogue_barely_larger_than_k(cls):
    items, queries = clustered(12, 8, n_clusters=3, n_queries=6, seed=3)
    idx = cls(items, ids=np.arange(100, 112))
    k = 10
    excl2 = [np.array([100 + i, 100 + (i + 5) % 12]) for i in range(6)]
    ids, _ = idx.search(queries, k, exclude=excl2)
    _check_excluded(ids, excl2, k)
    for row, e in zip(ids, excl2, strict=True):  # the 10 remaining items, all of them
        assert set(row.tolist()) == set(range(100, 112)) - set(e.tolist())
    # 3 excluded -> only 9 remain: 9 results then one pad
    excl3 = [np.array([100, 101, 102])] * 6
    ids, scores = idx.search(queries, k, exclude=excl3)
    assert (ids[:, 9] == -1).all() and np.isneginf(scores[:, 9]).all()
    assert (ids[:, :9] >= 103).all()
    # k larger than the catalogue: padded, never hnswlib's "contiguous 2D array" error
    ids, scores = idx.search(queries, 15)
    assert (np.sort(ids[:, :12], axis=1) == np.arange(100, 112)).all() and (ids[:, 12:] == -1).all()


@pytest.mark.parametrize("cls", CLASSES)
def test_include_list(data, cls):
    items, queries = data
    idx = cls(items[:1000]) if cls is ExactIndex else cls(items[:1000], num_threads=1, ef_construction=50)
    ex = ExactIndex(items[:1000])
    rng = np.random.default_rng(2)
    include = [rng.choice(1000, 25, replace=False) for _ in range(20)]
    include[0] = np.array([5, 7, 9, 99999])  # 3 known + 1 id not in the index: fewer than k -> padded
    include[1] = None  # no constraint on this row
    exclude = [None] * 20
    exclude[2] = include[2][:5]
    ids, scores = idx.search(queries[:20], 10, include=include, exclude=exclude)
    assert set(ids[0, :3].tolist()) == {5, 7, 9} and (ids[0, 3:] == -1).all()
    for i in range(2, 20):
        assert np.isin(ids[i], include[i]).all()
        # include-lists are scored exactly: the answer is the exact top-10 of the allowed items
        allowed = np.setdiff1d(include[i], exclude[i] if exclude[i] is not None else [])
        s = items[allowed] @ queries[i]
        np.testing.assert_array_equal(ids[i], allowed[np.argsort(-s, kind="stable")[:10]])
        np.testing.assert_allclose(scores[i], np.sort(s)[::-1][:10], atol=1e-5)
    assert not np.isin(ids[2], exclude[2]).any()
    np.testing.assert_array_equal(ids[1], ex.search(queries[1:2], 10)[0][0])


def test_retrieve_applies_seen_and_request_exclusions(built, data):
    _, queries = data
    hnsw, ex = built
    top, _ = ex.search(queries[:4], 6)
    seen = [top[i, :2] for i in range(4)]
    request = [None, top[1, 2:4], None, np.array([], dtype=np.int64)]
    merged = merge_exclusions(4, seen, request, None)
    assert merged[1].tolist() == sorted(top[1, :4].tolist())
    for idx in (hnsw, ex):
        ids, _ = retrieve(idx, queries[:4], 2, seen=seen, exclude=request)
        assert ids[0].tolist() == top[0, 2:4].tolist()
        assert ids[1].tolist() == top[1, 4:6].tolist()
    assert merge_exclusions(4, None, None) is None
    with pytest.raises(ValueError, match="one entry per query"):
        merge_exclusions(4, seen[:3])


# -- add -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
def test_add_new_items_findable(cls, tmp_path):
    items, queries = clustered(500, 16, seed=4)
    idx = cls(items[:400]) if cls is ExactIndex else cls(items[:400], num_threads=1, ef_construction=64)
    idx.add(items[400:], np.arange(400, 500))
    assert idx.size == 500
    ids, scores = idx.search(items[400:], 1)  # each new item is its own nearest neighbour
    assert (ids[:, 0] == np.arange(400, 500)).mean() >= 0.99
    assert scores[:, 0] == pytest.approx(1.0, abs=1e-5)
    with pytest.raises(ValueError, match="already in the index"):
        idx.add(items[:2], np.array([3, 600]))
    with pytest.raises(ValueError, match="16 columns"):
        idx.add(np.ones((2, 8)), np.array([700, 701]))
    path = tmp_path / ("i.npz" if cls is ExactIndex else "i.hnsw")
    idx.save(path)
    back = cls.load(path, dim=16, metric="cosine", size=500)
    np.testing.assert_array_equal(back.search(items[400:], 1)[0], ids)


@pytest.mark.parametrize("native", NATIVE_PARAMS)
def test_concurrent_search_while_adding(native):
    items, queries = clustered(1200, 16, seed=5)
    idx = HnswIndex(items[:200], num_threads=1, ef_construction=40, native=native)
    errors: list[BaseException] = []

    def searcher():
        try:
            for _ in range(60):
                ids, _ = idx.search(queries[:8], 5, exclude=[np.array([0, 1])] * 8)
                assert (ids >= 0).all() and not np.isin(ids, [0, 1]).any()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=searcher) for _ in range(3)]
    for t in threads:
        t.start()
    for start in range(200, 1200, 100):
        idx.add(items[start:start + 100], np.arange(start, start + 100))
    for t in threads:
        t.join()
    assert not errors
    assert idx.size == 1200


# -- malformed input -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", CLASSES)
def test_malformed_inputs(cls, data):
    items, queries = data
    idx = cls(items[:300]) if cls is ExactIndex else cls(items[:300], num_threads=1, ef_construction=32)
    with pytest.raises(ValueError, match="32 columns"):
        idx.search(queries[:, :16], 5)
    with pytest.raises(ValueError, match="`k` must be an integer >= 1, got 0"):
        idx.search(queries, 0)
    with pytest.raises(ValueError, match="`k`"):
        idx.search(queries, True)
    with pytest.raises(ValueError, match=r"2-D.*queries\[None, :\]"):
        idx.search(queries[0], 5)
    bad = queries[:3].copy()
    bad[1, 4] = np.nan
    with pytest.raises(ValueError, match="row 1"):
        idx.search(bad, 5)
    with pytest.raises(ValueError, match="row 0 is all zeros"):
        idx.search(np.zeros((1, 32)), 5)
    with pytest.raises(ValueError, match=r"one entry .* per query \(4\), got 3"):
        idx.search(queries[:4], 5, exclude=[None, None, None])
    with pytest.raises(ValueError, match="integer ids"):
        idx.search(queries[:1], 5, include=[np.array([1.5])])
    ids, scores = idx.search(queries[:0], 5)
    assert ids.shape == (0, 5) and scores.shape == (0, 5)
    with pytest.raises(ValueError, match="`metric`"):
        cls(items[:10], metric="l2")
    with pytest.raises(ValueError, match="duplicate"):
        cls(items[:3], ids=np.array([1, 1, 2]))


def test_load_refuses_mismatched_or_implausible_files(built, tmp_path):
    hnsw, _ = built
    path = tmp_path / "index.hnsw"
    hnsw.save(path)
    assert check_hnsw_file(path, dim=32, size=hnsw.size)["count"] == hnsw.size
    with pytest.raises(ValueError, match="dim 32, expected 64"):
        HnswIndex.load(path, dim=64, metric="cosine")
    with pytest.raises(ValueError, match=f"holds {hnsw.size} items, expected 10"):
        HnswIndex.load(path, dim=32, metric="cosine", size=10)
    with pytest.raises(ValueError, match="`metric`"):
        HnswIndex.load(path, dim=32, metric="euclid")
    raw = path.read_bytes()
    (tmp_path / "cut.hnsw").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="bytes"):
        HnswIndex.load(tmp_path / "cut.hnsw", dim=32, metric="cosine")
    (tmp_path / "tiny.hnsw").write_bytes(b"not an index")
    with pytest.raises(ValueError, match="too short"):
        HnswIndex.load(tmp_path / "tiny.hnsw", dim=32, metric="cosine")
    with pytest.raises(FileNotFoundError):
        HnswIndex.load(tmp_path / "missing.hnsw", dim=32, metric="cosine")


# -- auto-tune and config ------------------------------------------------------------------------------------------


def test_autotune_picks_smallest_ef_reaching_target(data, built):
    _, queries = data
    hnsw, ex = built
    ef, table = autotune_ef(hnsw, ex, queries, k=10, target_recall=0.97, efs=(4, 8, 16, 32, 64, 128),
                            latency_queries=20)
    assert hnsw.ef == ef == table[-1]["ef"]
    assert table[-1]["recall"] >= 0.97
    assert all(row["recall"] < 0.97 for row in table[:-1])
    assert all(row["target_met"] for row in table)
    assert {"ef", "recall", "p50_ms", "p99_ms", "batch_qps"} <= set(table[0])
    # an unreachable target: the largest ef, flagged
    ef, table = autotune_ef(hnsw, ex, queries[:50], target_recall=1.0, efs=(1,), latency_queries=5)
    assert ef == 1 and table[0]["recall"] < 1.0 and not table[0]["target_met"]
    hnsw.set_ef(64)


def test_index_config_section(tmp_path):
    from recsys.core.config import ConfigError, load_section

    toml = tmp_path / "c.toml"
    toml.write_text("[index]\nM = 24\nautotune_efs = [8, 16]\n")
    cfg = load_section(IndexConfig, "index", path=toml, overrides=["index.ef=40"])
    assert (cfg.M, cfg.ef, cfg.autotune_efs, cfg.target_recall) == (24, 40, (8, 16), 0.99)
    with pytest.raises(ValueError, match="`index.M` must be >= 2, got 1"):
        load_section(IndexConfig, "index", overrides=["index.M=1"])
    with pytest.raises(ConfigError):
        load_section(IndexConfig, "index", overrides=["index.nope=1"])
    idx = HnswIndex.from_config(clustered(50, 8, n_queries=1)[0], cfg=IndexConfig(M=8, ef=20, num_threads=1))
    assert (idx.M, idx.ef, idx.ef_filtered) == (8, 20, 20) and idx.params()["space"] == "ip"
    idx = HnswIndex.from_config(clustered(50, 8, n_queries=1)[0], cfg=IndexConfig(ef=20, ef_filtered=50))
    assert idx.params()["ef_filtered"] == 50
    with pytest.raises(ValueError, match="`index.ef_filtered` must be >= 0"):
        IndexConfig(ef_filtered=-1)


def test_torch_search_is_the_exact_rule_on_torch_tensors():
    # the trainer's validation retrieves with retrieval.exact.torch_search: the same answer as ExactIndex (dot)
    import torch

    from recsys.retrieval.exact import torch_search

    rng = np.random.default_rng(3)
    items = rng.normal(size=(50, 8)).astype(np.float32)
    queries = rng.normal(size=(6, 8)).astype(np.float32)
    seen = [rng.choice(50, size=n, replace=False) for n in (0, 3, 10, 45, 48, 1)]
    want, _ = ExactIndex(items, metric="dot").search(queries, 5, exclude=seen)
    rows = torch.as_tensor(np.repeat(np.arange(6), [len(s) for s in seen]))
    cols = torch.as_tensor(np.concatenate(seen))
    got = torch_search(torch.as_tensor(queries), torch.as_tensor(items), 5, exclude_rows=rows, exclude_cols=cols)
    np.testing.assert_array_equal(got.numpy(), want)
    assert (got[4, 2:] == -1).all() and (got[4, :2] >= 0).all()  # 48 of 50 excluded: two left, then padding
    assert torch_search(torch.as_tensor(queries), torch.as_tensor(items), 80).shape == (6, 50)  # k > catalogue
