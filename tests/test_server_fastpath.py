"""The native known-user Recommend (server/fastpath.py, recsys._hnsw.KnownUserRecommender): byte-identical to the
Python path on a real exported bundle, declines (None) everything it does not own, and through a real server
answers the same as the Python path while malformed requests still get INVALID_ARGUMENT."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from test_server_helpers import code_of, running_server

from recsys.retrieval import native_available
from recsys.v1 import recommender_pb2 as pb
from recsys.v1 import recommender_pb2_grpc as pb_grpc
from server.service import Limits

pytestmark = pytest.mark.skipif(not native_available(), reason="recsys._hnsw not built (no C++ compiler)")
test_bundle = pytest.importorskip("test_bundle")  # the tiny clustered dataset + training run, built once

LIMITS = Limits(max_k=100, max_ids=1000, max_history=1000, max_id_length=64)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from recsys.bundle import Bundle
    from recsys.publish import export

    _data, run = test_bundle.trained(tmp_path_factory)
    models = tmp_path_factory.mktemp("fastpath_models")
    path = export(run, models, index_cfg=test_bundle.index_cfg(), version="v1")
    return models, Bundle.load(path)


@pytest.fixture(scope="module")
def servicer():
    from server.metrics import Metrics
    from server.servicer import RecommenderServicer

    return RecommenderServicer(store=None, limits=LIMITS, metrics=Metrics())


def python_answer(servicer, bundle, request: pb.RecommendRequest) -> bytes:
    return servicer._recommend(bundle, request).SerializeToString()


def filtered_answered(fast, bundle, servicer, requests) -> int:
    """How many filtered ``requests`` the native side answers, each asserted equal to the Python path's bytes."""
    from server import fastpath

    answered = 0
    for r in requests:
        out = fastpath.recommend_filtered(fast, bundle, r, r.SerializeToString(), LIMITS)
        if out is not None:
            answered += 1
            assert out == python_answer(servicer, bundle, r), r
    return answered


def test_fast_answers_are_byte_identical_to_the_python_path(published, servicer):
    from server import fastpath

    _models, bundle = published
    fast = fastpath.build(bundle)
    assert fast is not None and fast.n_users == bundle.n_users
    answered = total = 0
    for row in range(bundle.n_users):
        for k, include_seen in ((1, False), (5, False), (10, True), (37, False)):
            req = pb.RecommendRequest(user_id=str(bundle.user_ids[row]), k=k, include_seen=include_seen)
            out = fast.recommend(req.SerializeToString(), LIMITS.max_k, LIMITS.max_id_length)
            total += 1
            if out is None:
                continue
            answered += 1
            assert out == python_answer(servicer, bundle, req), (row, k, include_seen)
            resp = pb.RecommendResponse.FromString(out)
            assert len(resp.items) == k and resp.model_version == "v1" and resp.source == pb.SOURCE_KNOWN_USER
            if not include_seen:
                seen = set(bundle.item_ids[bundle.seen_items(row)].tolist())
                assert not seen & {it.item_id for it in resp.items}
    assert answered >= 0.95 * total  # it must actually take the requests it exists for
    # fresh events of a known user, a new user's events: the user tower (the same native object both paths use)
    rng = np.random.default_rng(3)
    answered = total = 0
    sources = set()
    for row in range(0, bundle.n_users, 3):
        events = [str(i) for i in bundle.item_ids[rng.integers(0, bundle.n_items, 1 + row % 9)]]
        for user_id, include_seen in ((f"u{row}", False), (f"u{row}", True), ("", False), ("stranger", False)):
            req = pb.RecommendRequest(user_id=user_id, history_item_ids=events, k=5, include_seen=include_seen)
            out = fast.recommend(req.SerializeToString(), LIMITS.max_k, LIMITS.max_id_length, LIMITS.max_history)
            total += 1
            if out is None:
                continue
            answered += 1
            assert out == python_answer(servicer, bundle, req), (row, user_id, include_seen)
            resp = pb.RecommendResponse.FromString(out)
            sources.add(resp.source)
            if not include_seen:
                assert not set(events) & {it.item_id for it in resp.items}
    assert answered >= 0.9 * total
    assert sources == {pb.SOURCE_KNOWN_USER_WITH_EVENTS, pb.SOURCE_HISTORY}
    # allow_fallback is meaningless for a known user: same answer
    req = pb.RecommendRequest(user_id="u3", k=5, allow_fallback=True)
    assert fast.recommend(req.SerializeToString(), 100, 64) == python_answer(servicer, bundle, req)


def test_fast_path_declines_what_it_does_not_own(published):
    from server import fastpath

    _models, bundle = published
    fast = fastpath.build(bundle)

    def ask(data: bytes, max_k: int = 100, max_id: int = 64, max_history: int = 1000):
        return fast.recommend(data, max_k, max_id, max_history)

    declined = [
        pb.RecommendRequest(user_id="nobody", k=5),  # unknown user: NOT_FOUND / fallback is Python's
        pb.RecommendRequest(user_id="", k=5),
        pb.RecommendRequest(user_id="u1", k=0),
        pb.RecommendRequest(user_id="u1", k=-3),
        pb.RecommendRequest(user_id="u1", k=101),  # above max_k
        pb.RecommendRequest(user_id="u1", k=5, exclude_item_ids=["i1"]),
        pb.RecommendRequest(user_id="u1", k=5, allowed_item_ids=["i1", "i2"]),
        pb.RecommendRequest(user_id="u1", k=5, history_item_ids=["i1", "nope"]),  # unknown items are reported
        pb.RecommendRequest(history_item_ids=["nope"], k=5),
        pb.RecommendRequest(user_id="u1", k=5, history_item_ids=["i1", ""]),
    ]
    for req in declined:
        assert ask(req.SerializeToString()) is None, req
    good = pb.RecommendRequest(user_id="u1", k=5).SerializeToString()
    assert ask(good) is not None
    assert ask(good, max_id=1) is None  # "u1" is longer than the limit: Python names the error
    assert ask(good, max_k=4) is None
    events = pb.RecommendRequest(user_id="u1", k=5, history_item_ids=["i1", "i2", "i3"]).SerializeToString()
    assert ask(events) is not None and ask(events, max_history=3) is not None
    assert ask(events, max_history=2) is None  # more events than the limit: Python names the error
    assert fast.recommend(events, 100, 64) is None  # no limit given: no events taken
    # more than the catalogue holds (64 items): a short answer, whose completeness the Python path checks
    assert ask(pb.RecommendRequest(user_id="u1", k=65).SerializeToString()) is None
    assert ask(good[:-1]) is None  # truncated
    assert ask(good + b"\x50\x01") is None  # an unknown field (10, varint)
    assert ask(b"\x0a\x7f" + b"u1") is None  # length past the end
    assert ask(b"\xff" * 12) is None  # a varint that never ends


def test_server_answers_match_and_malformed_bytes_are_invalid_argument(published, servicer):
    from server.store import default_loader

    models, bundle = published
    with running_server(models, loader=default_loader, max_k=100) as (_app, target), \
            grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        for user in ("u0", "u17", "u99"):
            for req in (pb.RecommendRequest(user_id=user, k=7),
                        pb.RecommendRequest(user_id=user, k=7, exclude_item_ids=["i1"])):  # fast and Python path
                got = stub.Recommend(req).SerializeToString()
                assert got == python_answer(servicer, bundle, req)
        raw = ch.unary_unary("/recsys.v1.Recommender/Recommend")
        code, details = code_of(raw, b"\x0a\x7fu1")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "malformed RecommendRequest" in details
        code, details = code_of(stub.Recommend, pb.RecommendRequest(user_id="u1", k=0))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "k" in details
        code, _ = code_of(stub.Recommend, pb.RecommendRequest(user_id="nobody", k=3))
        assert code == grpc.StatusCode.NOT_FOUND
        resp = stub.Recommend(pb.RecommendRequest(user_id="nobody", k=3, allow_fallback=True))
        assert resp.fallback and resp.source == pb.SOURCE_POPULARITY and len(resp.items) == 3
        assert np.isfinite([it.score for it in resp.items]).all()


def test_a_fast_path_that_disagrees_with_the_python_path_is_not_used(published, monkeypatch, caplog):
    from server import fastpath

    _models, bundle = published
    real = fastpath.recommend_response

    def other_version(b, r, limits):
        response = real(b, r, limits)
        response.model_version = "not-" + response.model_version
        return response

    assert fastpath.build(bundle) is not None
    monkeypatch.setattr(fastpath, "recommend_response", other_version)
    with caplog.at_level("ERROR", logger="recsys.server"):
        assert fastpath.build(bundle) is None
    assert "native Recommend disabled for model v1: answers differ for user" in caplog.text


def test_native_path_on_unicode_ids_matches_a_hand_built_response():
    from recsys import _hnsw
    from recsys.retrieval import HnswIndex

    rng = np.random.default_rng(4)
    items = rng.normal(size=(60, 8)).astype(np.float32)
    items /= np.linalg.norm(items, axis=1, keepdims=True)
    users = rng.normal(size=(3, 8)).astype(np.float32)
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    user_ids = ["ü-1", "用户2", "plain"]
    item_ids = [f"é{i}" for i in range(60)]
    seen = [np.array([3, 7], np.int64), np.zeros(0, np.int64), np.array([59], np.int64)]
    offsets = np.array([0, 2, 2, 3], np.int64)
    index = HnswIndex(items, ef=60, num_threads=1)
    fast = _hnsw.KnownUserRecommender(
        index._index, user_ids, users, np.ones(3, np.uint8), offsets, np.concatenate(seen), item_ids, "v9",
        int(pb.SOURCE_KNOWN_USER), 60, 60, 0.25,
    )
    for row, user in enumerate(user_ids):
        for include_seen in (False, True):
            ids, scores = index.search(users[row:row + 1], 5, exclude=None if include_seen else [seen[row]])
            want = pb.RecommendResponse(model_version="v9", source=pb.SOURCE_KNOWN_USER)
            for i, s in zip(ids[0].tolist(), scores[0].tolist(), strict=True):
                want.items.add(item_id=item_ids[i], score=s)
            req = pb.RecommendRequest(user_id=user, k=5, include_seen=include_seen)
            assert fast.recommend(req.SerializeToString(), 100, 64) == want.SerializeToString(), (user, include_seen)
    # a user whose row is flagged as not usable (e.g. not unit length) is declined
    fast2 = _hnsw.KnownUserRecommender(
        index._index, user_ids, users, np.array([1, 0, 1], np.uint8), offsets, np.concatenate(seen), item_ids, "v9",
        int(pb.SOURCE_KNOWN_USER), 60, 60, 0.25,
    )
    assert fast2.recommend(pb.RecommendRequest(user_id="用户2", k=5).SerializeToString(), 100, 64) is None
    with pytest.raises(ValueError, match="item_ids"):
        _hnsw.KnownUserRecommender(index._index, user_ids, users, np.ones(3, np.uint8), offsets,
                                   np.concatenate(seen), item_ids[:10], "v9", 1, 60, 60, 0.25)


def test_native_recommend_can_be_switched_off(published, monkeypatch):
    from server import fastpath
    from server.settings import load_settings
    from server.store import default_loader

    models, bundle = published
    assert load_settings(env={"RECSYS_NATIVE_RECOMMEND": "false"}).native_recommend is False
    calls = []
    monkeypatch.setattr(fastpath, "for_bundle", lambda b: calls.append(b))
    with running_server(models, loader=default_loader, max_k=100, native_recommend=False) as (app, target), \
            grpc.insecure_channel(target) as ch:
        resp = pb_grpc.RecommenderStub(ch).Recommend(pb.RecommendRequest(user_id="u5", k=4))
        assert len(resp.items) == 4 and resp.source == pb.SOURCE_KNOWN_USER
    assert calls == []  # neither built at warm-up nor asked per request


def test_native_answers_survive_hot_reloads_under_load(tmp_path_factory, tmp_path):
    """Callers hammer the native path while two new versions are published: no failed request, each caller's
    versions never go backwards, and every answer matches its version's own Python-path answer."""
    import threading
    import time

    from recsys.bundle import Bundle
    from recsys.publish import export
    from server.store import default_loader

    _data, run = test_bundle.trained(tmp_path_factory)
    models = tmp_path / "models"
    export(run, models, index_cfg=test_bundle.index_cfg(), version="v1")
    stop = threading.Event()
    seen: list[list[tuple[str, bytes]]] = [[] for _ in range(3)]
    errors: list[BaseException] = []

    with running_server(models, loader=default_loader, max_k=100, poll_s=0.05) as (_app, target):
        def caller(slot: int) -> None:
            with grpc.insecure_channel(target) as ch:
                stub = pb_grpc.RecommenderStub(ch)
                i = 0
                while not stop.is_set():
                    req = pb.RecommendRequest(user_id=f"u{(7 * i + slot) % 160}", k=5)
                    try:
                        resp = stub.Recommend(req, timeout=10)
                    except grpc.RpcError as e:  # any failure fails the test
                        errors.append(e)
                        return
                    seen[slot].append((req.user_id, resp.SerializeToString()))
                    i += 1

        threads = [threading.Thread(target=caller, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        try:
            for version in ("v2", "v3"):
                time.sleep(0.3)
                export(run, models, index_cfg=test_bundle.index_cfg(), version=version)
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline and not any(
                    pb.RecommendResponse.FromString(r).model_version == version for lst in seen for _, r in lst[-5:]
                ):
                    time.sleep(0.05)
            time.sleep(0.3)
        finally:
            stop.set()
            for t in threads:
                t.join(30)
    assert not errors, errors[:1]
    order = {"v1": 1, "v2": 2, "v3": 3}
    servicer_limits = LIMITS
    from server.wire import recommend_response

    bundles = {v: Bundle.load(models / v) for v in order}
    for lst in seen:
        versions = [order[pb.RecommendResponse.FromString(r).model_version] for _, r in lst]
        assert versions == sorted(versions) and len(lst) > 10  # never backwards, per caller
        for user, raw in lst[:: max(1, len(lst) // 40)]:  # a sample: each equals its version's Python answer
            version = pb.RecommendResponse.FromString(raw).model_version
            want = recommend_response(bundles[version], pb.RecommendRequest(user_id=user, k=5), servicer_limits)
            assert raw == want.SerializeToString()
    assert {pb.RecommendResponse.FromString(r).model_version for lst in seen for _, r in lst} == set(order)


def test_filtered_requests_answered_natively_are_byte_identical(published, servicer):
    """A Recommend with a filter: the servicer compiles the filter and the native side walks the allowed items at
    the Python path's width and budget; every answer it gives equals the Python path's, and it declines the sets
    the exact scan owns."""
    from server import fastpath

    _models, bundle = published
    fast = fastpath.build(bundle)
    filters = [pb.ItemFilter(all_of=[pb.AttributeCondition(attribute="category", any_of=pb.StringSet(values=[c]))])
               for c in ("space", "piano")]
    filters.append(pb.ItemFilter(all_of=[pb.AttributeCondition(attribute="category",
                                                                none_of=pb.StringSet(values=["space"]))]))
    requests = [pb.RecommendRequest(user_id=str(bundle.user_ids[row]), k=k, filter=f)
                for row in range(0, bundle.n_users, 3) for k in (3, 10) for f in filters]
    # this bundle is small enough for the exact scan: the native side declines, the Python path answers
    assert all(fastpath.recommend_filtered(fast, bundle, r, r.SerializeToString(), LIMITS) is None for r in requests)
    saved = bundle.index.filter_exact_scale
    bundle.index.filter_exact_scale = 0.0  # the graph for every set, on both paths
    try:
        answered = filtered_answered(fast, bundle, servicer, requests)
        # measured 120 of 324: the rest are rows whose walk gave up (a 16-item set's budget is 16 nodes scored)
        # or came back short, which the Python path settles with the exact scan
        assert answered >= len(requests) // 4
        # an attribute the bundle lacks: declined, and the Python path names it
        bad = pb.RecommendRequest(user_id=str(bundle.user_ids[0]), k=5, filter=pb.ItemFilter(all_of=[
            pb.AttributeCondition(attribute="colour", any_of=pb.StringSet(values=["x"]))]))
        assert fastpath.recommend_filtered(fast, bundle, bad, bad.SerializeToString(), LIMITS) is None
        # without the compiled set the native side declines any request with a filter
        assert fast.recommend(requests[0].SerializeToString(), LIMITS.max_k, LIMITS.max_id_length) is None
    finally:
        bundle.index.filter_exact_scale = saved


def test_filtered_requests_on_partitions_are_byte_identical(tmp_path_factory, servicer):
    """A bundle exported with index.partition_by = category: a filter on categories searches their graphs on the
    native side as on the Python path (merged the same way: byte-identical answers), and the main graph is not
    walked by either."""
    from recsys.bundle import Bundle
    from recsys.publish import export
    from recsys.retrieval import HnswIndex, IndexConfig
    from server import fastpath

    _data, run = test_bundle.trained(tmp_path_factory)
    models = tmp_path_factory.mktemp("fastpath_parts")
    bundle = Bundle.load(export(run, models, version="v1", index_cfg=IndexConfig(
        num_threads=1, partition_by=("category",), partition_min_items=1)))
    assert len(bundle.index.partitions) == 4
    bundle.index.filter_exact_scale = 0.0  # 16-item values: their graphs, not the exact scan of a tiny catalogue
    fast = fastpath.build(bundle)
    filters = [pb.ItemFilter(all_of=[pb.AttributeCondition(attribute="category", any_of=pb.StringSet(values=v))])
               for v in (["space"], ["piano", "cooking"], ["football", "space", "piano"])]
    requests = [pb.RecommendRequest(user_id=str(bundle.user_ids[row]), k=k, filter=f, include_seen=seen)
                for row in range(0, bundle.n_users, 3) for k in (3, 10) for f in filters for seen in (False, True)]
    saved = HnswIndex._native_allowed
    walked = []

    def spy(self, *a, **kw):
        walked.append(self is bundle.index)
        return saved(self, *a, **kw)

    HnswIndex._native_allowed = spy
    try:
        answered = filtered_answered(fast, bundle, servicer, requests)
        # declined: users with more seen items than a quarter of a 16-item graph (the exact scan's territory)
        assert answered >= len(requests) // 2
        # the tiny catalogue's own switch (128 ids): no value is worth its graph, the sets are scanned exactly --
        # natively too (measured 638 of 648: the rest are short of k unseen items, or exclude more than the
        # recommender's share of the catalogue, and go to the Python path)
        bundle.index.filter_exact_scale = 16.0
        assert filtered_answered(fast, bundle, servicer, requests) >= 0.95 * len(requests)
    finally:
        HnswIndex._native_allowed = saved
    assert not any(walked)  # the Python path searched the partitions, never the main graph's walk
