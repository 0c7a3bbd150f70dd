"""A known user's fresh events (issue 14): on a REAL exported bundle of the tiny clustered dataset (test_bundle.py:
users u0-u39 and items i0-i15 are cluster 0, u40-u79 / i16-i31 cluster 1, ...), through a real server.

Events from another cluster move the user's list toward it, are excluded unless ``include_seen``, and are embedded
by the user tower on the stored history + the events (``bundle.embed_users``); the batch path answers each user as
single calls do; EmbedUser gives the same embeddings. A no-op feature (events ignored) fails every test here."""

from __future__ import annotations

import logging

import grpc
import numpy as np
import pytest
from test_server_helpers import code_of, running_server

from recsys.v1 import recommender_pb2 as pb
from recsys.v1 import recommender_pb2_grpc as pb_grpc
from server import service

test_bundle = pytest.importorskip("test_bundle")  # the tiny clustered dataset + training run, built once

PER = test_bundle.ITEMS_PER_CLUSTER
# users of cluster 0 with a full stored history (u % 4 == 3 are the "cold" ones)
CLUSTER0_USERS = [f"u{u}" for u in range(0, test_bundle.USERS_PER_CLUSTER, 3) if u % 4 != 3]
EVENTS_B = [f"i{2 * PER + j}" for j in range(6)]  # six items of cluster 2, oldest first


def _cluster(item_id: str) -> int:
    return int(item_id[1:]) // PER


def _ids(resp) -> list[str]:
    return [it.item_id for it in resp.items]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from recsys.bundle import Bundle
    from recsys.publish import export
    from server.store import default_loader

    _data, run = test_bundle.trained(tmp_path_factory)
    models = tmp_path_factory.mktemp("events_models")
    path = export(run, models, index_cfg=test_bundle.index_cfg(), version="v1")
    with running_server(models, loader=default_loader, max_k=100) as (app, target), \
            grpc.insecure_channel(target) as channel:
        yield pb_grpc.RecommenderStub(channel), Bundle.load(path), app


def test_fresh_events_move_a_known_user_toward_their_cluster(served):
    stub, _bundle, _app = served
    plain_share, events_share = [], []
    for user in CLUSTER0_USERS:
        plain = stub.Recommend(pb.RecommendRequest(user_id=user, k=10))
        fresh = stub.Recommend(pb.RecommendRequest(user_id=user, history_item_ids=EVENTS_B, k=10))
        assert plain.source == pb.SOURCE_KNOWN_USER
        assert fresh.source == pb.SOURCE_KNOWN_USER_WITH_EVENTS and list(fresh.unknown_item_ids) == []
        assert len(fresh.items) == 10 and not set(EVENTS_B) & set(_ids(fresh))  # fresh items excluded like seen
        plain_share.append(np.mean([_cluster(t) == 2 for t in _ids(plain)]))
        events_share.append(np.mean([_cluster(t) == 2 for t in _ids(fresh)]))
    # the stored embedding lives in cluster 0; 6 of the tower's 8 history slots now hold cluster 2's items (the
    # user ID still says cluster 0): measured 0.0 -> 0.48 of the lists
    assert np.mean(plain_share) <= 0.1, plain_share
    assert np.mean(events_share) >= 0.3 and np.mean(events_share) >= np.mean(plain_share) + 0.25, events_share


def test_include_seen_unknown_ids_and_the_request_lists(served):
    stub, _bundle, _app = served
    user = CLUSTER0_USERS[0]
    fresh = _ids(stub.Recommend(pb.RecommendRequest(user_id=user, history_item_ids=EVENTS_B, k=10)))
    # include_seen: the events may come back (the user's own cluster-0 items, no longer excluded, rank first)
    kept_events = 0
    for u in CLUSTER0_USERS:
        kept = stub.Recommend(pb.RecommendRequest(user_id=u, history_item_ids=EVENTS_B, k=20, include_seen=True))
        dropped = stub.Recommend(pb.RecommendRequest(user_id=u, history_item_ids=EVENTS_B, k=20))
        assert kept.source == dropped.source == pb.SOURCE_KNOWN_USER_WITH_EVENTS
        assert not set(EVENTS_B) & set(_ids(dropped))
        kept_events += len(set(EVENTS_B) & set(_ids(kept)))
    assert kept_events >= len(CLUSTER0_USERS) // 2, kept_events
    # unknown IDs are ignored (same answer) and reported, in request order
    mixed = stub.Recommend(pb.RecommendRequest(user_id=user, history_item_ids=["nope", *EVENTS_B, "zz"], k=10))
    assert _ids(mixed) == fresh and list(mixed.unknown_item_ids) == ["nope", "zz"]
    assert mixed.source == pb.SOURCE_KNOWN_USER_WITH_EVENTS
    # none known: the stored embedding answers, the IDs are still reported
    none_known = stub.Recommend(pb.RecommendRequest(user_id=user, history_item_ids=["nope", "zz"], k=10))
    assert none_known.source == pb.SOURCE_KNOWN_USER and list(none_known.unknown_item_ids) == ["nope", "zz"]
    assert _ids(none_known) == _ids(stub.Recommend(pb.RecommendRequest(user_id=user, k=10)))
    # exclude / allowed still apply on top of the events
    allowed = [f"i{2 * PER + j}" for j in range(PER)] + ["i1", "i2"]
    within = stub.Recommend(pb.RecommendRequest(user_id=user, history_item_ids=EVENTS_B, k=5, allowed_item_ids=allowed,
                                                exclude_item_ids=fresh[:2]))
    got = _ids(within)
    assert len(got) == 5 and set(got) <= set(allowed) and not set(got) & {*EVENTS_B, *fresh[:2]}


def test_batch_answers_each_user_like_single_calls(served):
    stub, _bundle, _app = served
    events_c3 = [f"i{3 * PER + j}" for j in range(4)]
    users = ["u0", "u41", "u5", "ghost", "nobody", "u0"]
    histories = {"u0": [*EVENTS_B, "nope"], "u41": events_c3, "ghost": EVENTS_B, "u5": []}
    req = pb.BatchRecommendRequest(user_ids=users, k=7,
                                   history_item_ids={u: pb.ItemIdList(item_ids=h) for u, h in histories.items()})
    resp = stub.BatchRecommend(req)
    assert list(resp.unknown_user_ids) == ["ghost", "nobody"]
    want_source = [pb.SOURCE_KNOWN_USER_WITH_EVENTS, pb.SOURCE_KNOWN_USER_WITH_EVENTS, pb.SOURCE_KNOWN_USER,
                   pb.SOURCE_HISTORY, pb.SOURCE_UNSPECIFIED, pb.SOURCE_KNOWN_USER_WITH_EVENTS]
    assert [r.source for r in resp.results] == want_source
    assert [r.found for r in resp.results] == [True, True, True, True, False, True]
    for user, result in zip(users, resp.results, strict=True):
        if not result.found:
            assert len(result.items) == 0
            continue
        single = stub.Recommend(pb.RecommendRequest(user_id=user, history_item_ids=histories.get(user, []), k=7))
        assert _ids(result) == _ids(single), user  # the same embedding -> the same list
        assert list(result.unknown_item_ids) == list(single.unknown_item_ids)
        np.testing.assert_allclose([it.score for it in result.items], [it.score for it in single.items], atol=1e-5)
    assert list(resp.results[0].unknown_item_ids) == ["nope"]
    plain = stub.Recommend(pb.RecommendRequest(user_id="u41", k=7))  # the events changed u41's query
    assert not np.allclose([it.score for it in resp.results[1].items], [it.score for it in plain.items], atol=1e-3)
    # include_seen keeps the events; the fallback still answers a user with nothing usable
    fb = stub.BatchRecommend(pb.BatchRecommendRequest(
        user_ids=["u9", "nobody"], k=20, include_seen=True, allow_fallback=True,
        history_item_ids={"u9": pb.ItemIdList(item_ids=EVENTS_B), "nobody": pb.ItemIdList(item_ids=["zz"])}))
    single = stub.Recommend(pb.RecommendRequest(user_id="u9", history_item_ids=EVENTS_B, k=20, include_seen=True))
    assert _ids(fb.results[0]) == _ids(single) and set(EVENTS_B) & set(_ids(single))
    assert fb.results[1].fallback and fb.results[1].source == pb.SOURCE_POPULARITY
    assert list(fb.results[1].unknown_item_ids) == ["zz"]


def test_embed_user_with_events_is_the_tower_on_the_combined_history(served):
    stub, bundle, _app = served
    row = bundle.user_row("u3")
    events = ["i40", "i41", "i42"]
    resp = stub.EmbedUser(pb.EmbedUserRequest(user_id="u3", history_item_ids=[*events, "nope"]))
    combined = np.concatenate((bundle.history(row), bundle.item_rows(events)[0]))
    want = bundle.embed_users(np.array([row]), [combined])[0]
    assert resp.source == pb.SOURCE_KNOWN_USER_WITH_EVENTS and list(resp.unknown_item_ids) == ["nope"]
    np.testing.assert_allclose(resp.embedding, want, atol=1e-5)
    assert not np.allclose(resp.embedding, bundle.user_embeddings[row], atol=1e-2)  # the events changed it
    # the user alone (or with no known event): the stored embedding, exactly
    for history in ([], ["nope"]):
        alone = stub.EmbedUser(pb.EmbedUserRequest(user_id="u3", history_item_ids=history))
        assert alone.source == pb.SOURCE_KNOWN_USER and alone.dim == bundle.dim
        np.testing.assert_array_equal(np.asarray(alone.embedding, dtype=np.float32), bundle.user_embeddings[row])
    # an unknown user with a history is a new user; without one it is NOT_FOUND, named
    new = stub.EmbedUser(pb.EmbedUserRequest(user_id="ghost", history_item_ids=events))
    assert new.source == pb.SOURCE_HISTORY
    np.testing.assert_allclose(new.embedding, bundle.embed_history([bundle.item_rows(events)[0]])[0], atol=1e-5)
    code, details = code_of(stub.EmbedUser, pb.EmbedUserRequest(user_id="ghost"))
    assert code == grpc.StatusCode.NOT_FOUND and "`user_id` 'ghost'" in details


def test_the_request_tower_equals_bundle_embed_users(served, caplog):
    from recsys.bundle import Bundle

    _stub, bundle, _app = served
    tower = service.user_tower(bundle)
    assert isinstance(tower, service.NativeUserTower)  # the extension is built: the C++ twin serves
    rng = np.random.default_rng(7)
    rows = np.array([0, 17, -1, 159, 80], dtype=np.int64)
    histories = [rng.integers(0, bundle.n_items, n) for n in (1, 12, 3, 30, 8)]
    for batch in (slice(None), slice(1, 2), slice(2, 4)):
        np.testing.assert_allclose(tower(rows[batch], histories[batch]),
                                   bundle.embed_users(rows[batch], histories[batch]), atol=1e-6)
    # twins that disagree with the bundle's own tower are not used (bundle.embed_users serves)
    other = Bundle.load(bundle.path)
    real = other.embed_users
    other.embed_users = lambda r, h: real(r, h) + 1e-3
    with caplog.at_level(logging.ERROR, logger="server.service"):
        assert service._build_tower(other) is None
    assert "NativeUserTower disabled for model v1" in caplog.text
    assert "NumpyUserTower disabled for model v1" in caplog.text
