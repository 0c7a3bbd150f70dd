"""server.service's request path, without gRPC: the single and batch paths give the exact answer (seen items and
exclusions removed, -1 padding when too few remain), each request is ONE index call through recsys.retrieval (the
one owner of the exclusion rule), and the native and fallback HNSW paths agree."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from test_server_helpers import N_ITEMS, N_USERS, FakeBundle, _ExactSearch

from server import service


class _CountingHnsw(_ExactSearch):
    """Exact answers behind an HNSW-shaped interface (``ef``), recording every ``search`` call."""

    def __init__(self, vectors: np.ndarray, *, ef: int) -> None:
        super().__init__(vectors)
        self.ef = ef
        self.calls: list[tuple[int, int, bool]] = []  # (n queries, k, exclude given)

    def search(self, queries, k, *, exclude=None, include=None):
        self.calls.append((len(queries), k, exclude is not None))
        return super().search(queries, k, exclude=exclude, include=include)


@pytest.fixture
def bundle(tmp_path) -> FakeBundle:
    return FakeBundle(tmp_path, version="v1", seed=3)


def _ids(names: list[str]) -> list[int]:
    return [int(t[1:]) for t in names]


def test_single_and_batch_equal_the_exact_answer_for_every_user(bundle):
    exclude = ["i0", "i7", "i33", "nope"]  # an unknown ID is ignored
    users = [f"u{j}" for j in range(N_USERS)]
    batch, unknown = service.batch_recommend(bundle, user_ids=users, k=7, exclude_item_ids=exclude)
    assert unknown == []
    for j, (user, rec) in enumerate(zip(users, batch, strict=True)):
        seen = bundle.seen_items(j).tolist()  # {j, j+1, j+2}
        want = bundle.expected_top(bundle.user_embeddings[j], 7, exclude=[*seen, 0, 7, 33])
        single = service.recommend(bundle, user_id=user, k=7, exclude_item_ids=exclude)
        assert single.item_ids == want and rec.item_ids == want
        scores = bundle.item_embeddings[_ids(want)] @ bundle.user_embeddings[j]
        np.testing.assert_allclose(rec.scores, scores, rtol=1e-5)
        np.testing.assert_allclose(single.scores, scores, rtol=1e-5)


def test_include_seen_and_similar_items(bundle):
    rec = service.recommend(bundle, user_id="u4", k=5, include_seen=True)
    assert rec.item_ids == bundle.expected_top(bundle.user_embeddings[4], 5)
    batch, _ = service.batch_recommend(bundle, user_ids=["u4"], k=5, include_seen=True)
    assert batch[0].item_ids == rec.item_ids
    sim = service.similar_items(bundle, item_id="i9", k=4, exclude_item_ids=["i1"])
    assert sim.item_ids == bundle.expected_top(bundle.item_embeddings[9], 4, exclude=[9, 1])


def test_too_few_candidates_are_padded_then_dropped(bundle):
    # 120 items - 110 excluded - user 2's seen items {2, 3, 4} (outside the excluded range) -> 7 remain < k = 50
    exclude = [f"i{j}" for j in range(10, 120)]
    limits = service.Limits(max_ids=200)
    single = service.recommend(bundle, user_id="u2", k=50, exclude_item_ids=exclude, limits=limits)
    batch, _ = service.batch_recommend(bundle, user_ids=["u2", "u0"], k=50, exclude_item_ids=exclude, limits=limits)
    want_u2 = bundle.expected_top(bundle.user_embeddings[2], 7, exclude=[2, 3, 4, *range(10, 120)])
    assert sorted(_ids(want_u2)) == [0, 1, 5, 6, 7, 8, 9]
    assert single.item_ids == want_u2 and batch[0].item_ids == want_u2
    want_u0 = bundle.expected_top(bundle.user_embeddings[0], 7, exclude=[0, 1, 2, *range(10, 120)])
    assert batch[1].item_ids == want_u0 and len(want_u0) == 7  # {3..9}
    assert len(single.scores) == 7 and np.isfinite(single.scores).all()


def test_prepared_views_follow_the_bundle(tmp_path):
    bundle = FakeBundle(tmp_path, version="v9", seed=1)
    p = service.prepared(bundle)
    assert service.prepared(bundle) is p and p.item_ids[:3] == ["i0", "i1", "i2"] and len(p.item_ids) == N_ITEMS
    alive = weakref.ref(bundle)
    del bundle
    gc.collect()
    assert alive() is None  # a bundle swapped out by a hot reload is not kept alive by the cache


def test_every_request_is_one_excluding_index_call(bundle):
    # the exclusion rule (over-fetch, refetch, in-graph filter) belongs to the index (recsys.retrieval): the
    # service hands it each query's exclusions in one call and filters nothing itself
    index = bundle.index = _CountingHnsw(bundle.item_embeddings, ef=10)
    q = bundle.user_embeddings[6]
    deep = [f"i{j}" for j in _ids(bundle.expected_top(q, 8))]  # the over-fetch path would refetch here
    rec = service.recommend(bundle, user_id="u6", k=5, exclude_item_ids=deep)
    assert rec.item_ids == bundle.expected_top(q, 5, exclude=[6, 7, 8, *_ids(deep)])
    assert index.calls == [(1, 5, True)]  # no over-fetch, no Python filter, no second call
    index.calls.clear()
    batch, _ = service.batch_recommend(bundle, user_ids=["u6", "u7", "u8"], k=5, exclude_item_ids=deep)
    assert index.calls == [(3, 5, True)]
    for j, rec in zip((6, 7, 8), batch, strict=True):
        assert rec.item_ids == bundle.expected_top(bundle.user_embeddings[j], 5, exclude=[j, j + 1, j + 2,
                                                                                         *_ids(deep)])
    index.calls.clear()
    service.recommend(bundle, user_id="u6", k=5, include_seen=True)  # nothing to exclude: the plain query
    assert index.calls == [(1, 5, False)]


def _hnsw_pair(vectors: np.ndarray) -> tuple[object, object]:
    from recsys.retrieval import HnswIndex

    try:
        native = HnswIndex(vectors, M=8, ef_construction=100, ef=40, num_threads=1, native=True)
    except ImportError:
        pytest.skip("the recsys._hnsw extension is not built")
    fallback = HnswIndex(vectors, M=8, ef_construction=100, ef=40, num_threads=1, native=False)
    assert native.native_filter and not fallback.native_filter
    return native, fallback


def test_native_and_fallback_paths_agree_and_never_return_seen_items(tmp_path):
    # 2,000 items in 20 tight clusters, each user drawn near one cluster and having "seen" 30 of its items: the
    # seen items crowd the top of the list, the case the over-fetch path has to refetch for.
    rng = np.random.default_rng(5)
    n_items, n_users, dim = 2000, 60, 16
    centers = rng.normal(size=(20, dim))
    cluster = rng.integers(0, 20, n_items)
    items = centers[cluster] + 0.3 * rng.normal(size=(n_items, dim))
    items = (items / np.linalg.norm(items, axis=1, keepdims=True)).astype(np.float32)
    user_cluster = rng.integers(0, 20, n_users)
    users = centers[user_cluster] + 0.3 * rng.normal(size=(n_users, dim))
    users = (users / np.linalg.norm(users, axis=1, keepdims=True)).astype(np.float32)
    seen = [np.sort(rng.choice(np.flatnonzero(cluster == c), 30, replace=False)) for c in user_cluster]

    bundle = FakeBundle(tmp_path, version="v1")
    bundle.n_items, bundle.n_users, bundle.dim = n_items, n_users, dim
    bundle.item_ids = np.array([f"i{j}" for j in range(n_items)])
    bundle.item_embeddings, bundle.user_embeddings = items, users
    bundle._item_row = {f"i{j}": j for j in range(n_items)}
    bundle._user_row = {f"u{j}": j for j in range(n_users)}
    bundle.seen_items = lambda row: seen[row]
    native, fallback = _hnsw_pair(items)
    user_ids = [f"u{j}" for j in range(n_users)]
    k = 10
    answers = {}
    for name, index in (("native", native), ("fallback", fallback)):
        bundle.index = index
        single = [service.recommend(bundle, user_id=u, k=k) for u in user_ids]
        batch, _ = service.batch_recommend(bundle, user_ids=user_ids, k=k)
        answers[name] = (single, batch)
    hits = 0
    for j in range(n_users):
        want = bundle.expected_top(users[j], k, exclude=seen[j].tolist())
        for recs in (*answers["native"], *answers["fallback"]):
            got = _ids(recs[j].item_ids)
            assert len(got) == k and not set(got) & set(seen[j].tolist())
            hits += len(set(got) & set(_ids(want)))
            np.testing.assert_allclose(recs[j].scores, items[got] @ users[j], rtol=1e-4, atol=1e-5)
            assert recs[j].scores == sorted(recs[j].scores, reverse=True)
        # the single-query and batch paths of one index give the same list
        assert answers["native"][0][j].item_ids == answers["native"][1][j].item_ids
        assert answers["fallback"][0][j].item_ids == answers["fallback"][1][j].item_ids
    recall = hits / (4 * n_users * k)
    assert recall >= 0.97, recall  # both paths near the exact answer with exclusion (measured: 1.0 at ef 40)


def test_prepared_alternating_bundles_get_their_own_views(tmp_path):
    # requests that started on the old model finish on it while new ones use the new one: the one-entry fast
    # cache in front of the weak dictionary must never hand one bundle's item IDs to the other
    old, new = FakeBundle(tmp_path, version="v1", seed=1), FakeBundle(tmp_path, version="v2", seed=2)
    new.item_ids = np.array([f"n{j}" for j in range(N_ITEMS)])
    for _ in range(3):
        assert service.prepared(old).item_ids[0] == "i0" and service.prepared(old).version == "v1"
        assert service.prepared(new).item_ids[0] == "n0" and service.prepared(new).version == "v2"
    assert service.prepared(old) is service.prepared(old) and service.prepared(new) is not service.prepared(old)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_fresh_events_single_and_batch_equal_the_exact_answer(bundle):
    # the fake tower: unit(stored vector + mean of the history items); u4's stored history is {4, 5, 6}
    index = bundle.index = _CountingHnsw(bundle.item_embeddings, ef=10)
    events = ["i50", "nope", "i51"]
    q4 = _unit(bundle.user_embeddings[4] + bundle.item_embeddings[[4, 5, 6, 50, 51]].mean(axis=0))
    want4 = bundle.expected_top(q4, 6, exclude=[4, 5, 6, 50, 51])
    single = service.recommend(bundle, user_id="u4", history_item_ids=events, k=6)
    assert single.item_ids == want4 and single.source == service.SOURCE_KNOWN_USER_WITH_EVENTS
    assert single.unknown_item_ids == ["nope"]
    kept = service.recommend(bundle, user_id="u4", history_item_ids=events, k=6, include_seen=True)
    assert kept.item_ids == bundle.expected_top(q4, 6)
    qnew = _unit(bundle.item_embeddings[[3, 9]].mean(axis=0))  # an unknown user with a history: a new user
    index.calls.clear()
    calls = []
    real = bundle.embed_users
    bundle.embed_users = lambda rows, histories: calls.append(rows.tolist()) or real(rows, histories)
    users = ["u4", "u7", "new", "u4", "ghost"]
    batch, unknown = service.batch_recommend(bundle, user_ids=users, k=6,
                                             history_item_ids={"u4": events, "new": ["i3", "i9"], "u7": []})
    assert calls == [[4, -1]]  # ONE tower call for the users with usable events (a duplicate embedded once)
    assert index.calls == [(4, 6, True)]  # ONE search for every user answered from an embedding
    assert unknown == ["new", "ghost"]
    assert [r.source for r in batch] == [service.SOURCE_KNOWN_USER_WITH_EVENTS, service.SOURCE_KNOWN_USER,
                                         service.SOURCE_HISTORY, service.SOURCE_KNOWN_USER_WITH_EVENTS, ""]
    assert batch[0].item_ids == batch[3].item_ids == want4 and batch[0].unknown_item_ids == ["nope"]
    assert batch[1].item_ids == bundle.expected_top(bundle.user_embeddings[7], 6, exclude=[7, 8, 9])
    assert batch[2].item_ids == bundle.expected_top(qnew, 6, exclude=[3, 9])
    assert not batch[4].found and batch[4].item_ids == []
    for rec, user in zip(batch[:4], users, strict=False):  # the single path gives the same lists
        single = service.recommend(bundle, user_id=user, history_item_ids={"u4": events, "new": ["i3", "i9"]}.get(
            user, ()), k=6)
        assert rec.item_ids == single.item_ids and rec.source == single.source


def test_fresh_events_that_are_all_unknown_keep_the_stored_embedding(bundle):
    plain = service.recommend(bundle, user_id="u2", k=5)
    rec = service.recommend(bundle, user_id="u2", history_item_ids=["x", "y"], k=5)
    assert rec.item_ids == plain.item_ids and rec.source == service.SOURCE_KNOWN_USER
    assert rec.unknown_item_ids == ["x", "y"]
    batch, _ = service.batch_recommend(bundle, user_ids=["u2"], k=5, history_item_ids={"u2": ["x", "y"]})
    assert batch[0].item_ids == plain.item_ids and batch[0].source == service.SOURCE_KNOWN_USER
    assert batch[0].unknown_item_ids == ["x", "y"]


@pytest.mark.parametrize(
    ("histories", "text"),
    [
        ({"u9": ["i1"]}, "`history_item_ids` has the key 'u9', which is not one of `user_ids`"),
        ({"u1": ["i1"] * 3, "u2": ["i2"] * 3}, "`history_item_ids` may hold at most 5 IDs in all lists together, got 6"),
        ({"u1": ["i1"] * 5}, "`history_item_ids['u1']` may hold at most 4 IDs, got 5"),
        ({"u2": ["i1", ""]}, "`history_item_ids['u2'][1]` must be a non-empty ID, got ''"),
    ],
)
def test_batch_history_errors_name_the_field_and_value(bundle, histories, text):
    limits = service.Limits(max_ids=5, max_history=4)
    with pytest.raises(service.InvalidArgument) as e:
        service.batch_recommend(bundle, user_ids=["u1", "u2"], k=3, history_item_ids=histories, limits=limits)
    assert text in str(e.value)


def test_embed_user_by_user_id(bundle):
    vec, unknown, source = service.embed_user(bundle, user_id="u6")
    np.testing.assert_array_equal(vec, bundle.user_embeddings[6])
    assert (unknown, source) == ([], service.SOURCE_KNOWN_USER)
    vec, unknown, source = service.embed_user(bundle, ["i20", "zz"], user_id="u6")
    np.testing.assert_allclose(vec, _unit(bundle.user_embeddings[6] + bundle.item_embeddings[[6, 7, 8, 20]].mean(0)),
                               rtol=1e-6)
    assert (unknown, source) == (["zz"], service.SOURCE_KNOWN_USER_WITH_EVENTS)
    vec, _, source = service.embed_user(bundle, ["i20"], user_id="newcomer")
    np.testing.assert_allclose(vec, bundle.item_embeddings[20], rtol=1e-6)
    assert source == service.SOURCE_HISTORY
    with pytest.raises(service.NotFound, match="unknown `user_id` 'ghost'"):
        service.embed_user(bundle, user_id="ghost")
    with pytest.raises(service.InvalidArgument, match="`history_item_ids` must not be empty"):
        service.embed_user(bundle)
