"""Every RPC's happy path and every status code, against a real server on a free port (fake bundle, exact
answers computed independently in the test)."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_server_helpers import FakeBundle, code_of, fake_loader, running_server, write_fake_version

from recsys.v1 import recommender_pb2 as pb
from recsys.v1 import recommender_pb2_grpc as pb_grpc

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_fake_version(models, "v1", seed=1)
    with running_server(models) as (app, target):
        channel = grpc.insecure_channel(target)
        yield app, channel, fake_loader(models / "v1"), target
        channel.close()


@pytest.fixture
def stub(served):
    return pb_grpc.RecommenderStub(served[1])


@pytest.fixture
def bundle(served) -> FakeBundle:
    return served[2]


def test_recommend_known_user_excludes_seen_items(stub, bundle):
    resp = stub.Recommend(pb.RecommendRequest(user_id="u5", k=7))
    expected = bundle.expected_top(bundle.user_embeddings[5], 7, exclude=[5, 6, 7])
    assert [it.item_id for it in resp.items] == expected
    assert resp.model_version == "v1" and resp.source == pb.SOURCE_KNOWN_USER and not resp.fallback
    scores = [it.score for it in resp.items]
    assert scores == sorted(scores, reverse=True)
    assert scores[0] == pytest.approx(float(bundle.item_embeddings[int(expected[0][1:])] @ bundle.user_embeddings[5]),
                                      rel=1e-5)


def test_recommend_include_seen_exclude_and_allowed(stub, bundle):
    q = bundle.user_embeddings[5]
    with_seen = stub.Recommend(pb.RecommendRequest(user_id="u5", k=5, include_seen=True))
    assert [it.item_id for it in with_seen.items] == bundle.expected_top(q, 5)
    top = [it.item_id for it in with_seen.items]
    excl = stub.Recommend(pb.RecommendRequest(user_id="u5", k=5, include_seen=True, exclude_item_ids=top[:2]))
    assert [it.item_id for it in excl.items] == bundle.expected_top(q, 5, exclude=[int(t[1:]) for t in top[:2]])
    # include-list: only these, ranked by score; the seen item i5 and the unknown ID drop out
    allowed = ["i5", "i50", "i60", "i70", "nope"]
    resp = stub.Recommend(pb.RecommendRequest(user_id="u5", k=10, allowed_item_ids=allowed))
    got = [it.item_id for it in resp.items]
    want = sorted(["i50", "i60", "i70"], key=lambda t: -float(bundle.item_embeddings[int(t[1:])] @ q))
    assert got == want  # fewer than k: only 3 candidates remain


def test_recommend_new_user_from_history_and_fallback(stub, bundle):
    resp = stub.Recommend(pb.RecommendRequest(user_id="new", history_item_ids=["i3", "i9", "zzz"], k=4))
    q = bundle.embed_history([np.array([3, 9])])[0]
    assert [it.item_id for it in resp.items] == bundle.expected_top(q, 4, exclude=[3, 9])
    assert resp.source == pb.SOURCE_HISTORY and list(resp.unknown_item_ids) == ["zzz"]
    fb = stub.Recommend(pb.RecommendRequest(user_id="new", k=3, allow_fallback=True, exclude_item_ids=["i1"]))
    assert [it.item_id for it in fb.items] == ["i0", "i2", "i3"]  # popularity order minus the exclusion
    assert fb.fallback and fb.source == pb.SOURCE_POPULARITY
    assert [it.score for it in fb.items] == pytest.approx([1.0, 1 / 3, 1 / 4])


def test_batch_recommend_matches_single_calls_and_reports_unknown(stub):
    resp = stub.BatchRecommend(pb.BatchRecommendRequest(user_ids=["u1", "ghost", "u2", "u1"], k=5))
    singles = {u: [it.item_id for it in stub.Recommend(pb.RecommendRequest(user_id=u, k=5)).items]
               for u in ("u1", "u2")}
    assert [r.user_id for r in resp.results] == ["u1", "ghost", "u2", "u1"]
    assert [it.item_id for it in resp.results[0].items] == singles["u1"]
    assert [it.item_id for it in resp.results[2].items] == singles["u2"]
    assert [it.item_id for it in resp.results[3].items] == singles["u1"]
    assert not resp.results[1].found and len(resp.results[1].items) == 0
    assert [r.source for r in resp.results] == [pb.SOURCE_KNOWN_USER, pb.SOURCE_UNSPECIFIED, pb.SOURCE_KNOWN_USER,
                                                pb.SOURCE_KNOWN_USER]
    assert list(resp.unknown_user_ids) == ["ghost"]
    fb = stub.BatchRecommend(pb.BatchRecommendRequest(user_ids=["ghost"], k=2, allow_fallback=True))
    assert fb.results[0].found and fb.results[0].fallback and fb.results[0].source == pb.SOURCE_POPULARITY
    assert [it.item_id for it in fb.results[0].items] == ["i0", "i1"]


def test_similar_items_excludes_the_item_itself(stub, bundle):
    resp = stub.SimilarItems(pb.SimilarItemsRequest(item_id="i10", k=5, exclude_item_ids=["i11"]))
    assert [it.item_id for it in resp.items] == bundle.expected_top(bundle.item_embeddings[10], 5, exclude=[10, 11])
    assert "i10" not in [it.item_id for it in resp.items]


def test_embeddings_report_unknown_ids(stub, bundle):
    users = stub.GetUserEmbeddings(pb.GetUserEmbeddingsRequest(user_ids=["u3", "nobody", "u0"]))
    assert [e.id for e in users.embeddings] == ["u3", "u0"] and list(users.unknown_ids) == ["nobody"]
    np.testing.assert_allclose(users.embeddings[0].values, bundle.user_embeddings[3], rtol=1e-6)
    items = stub.GetItemEmbeddings(pb.GetItemEmbeddingsRequest(item_ids=["x", "i7"]))
    assert [e.id for e in items.embeddings] == ["i7"] and list(items.unknown_ids) == ["x"] and items.dim == 8
    np.testing.assert_allclose(items.embeddings[0].values, bundle.item_embeddings[7], rtol=1e-6)
    emb = stub.EmbedUser(pb.EmbedUserRequest(history_item_ids=["i1", "i2", "?"]))
    np.testing.assert_allclose(emb.embedding, bundle.embed_history([np.array([1, 2])])[0], rtol=1e-5)
    assert list(emb.unknown_item_ids) == ["?"] and emb.model_version == "v1"


def test_model_info_health_reflection_and_request_id(served, stub):
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    assert (info.version, info.dim, info.metric, info.n_users, info.n_items) == ("v1", 8, "cosine", 40, 120)
    assert dict(info.evaluation) == {"test.recall@20": 0.25, "test.n_users": 40.0}
    assert info.created_at.startswith("2024-01-01") and info.loaded_at
    health = health_pb2_grpc.HealthStub(served[1])
    for name in ("", "recsys.v1.Recommender"):
        assert health.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    refl = reflection_pb2_grpc.ServerReflectionStub(served[1])
    answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {"recsys.v1.Recommender", "recsys.v1.RecommenderAdmin", "grpc.health.v1.Health"} <= names
    _, call = stub.Recommend.with_call(pb.RecommendRequest(user_id="u1", k=1), metadata=[("x-request-id", "abc-1")])
    assert ("x-request-id", "abc-1") in tuple(call.trailing_metadata())
    # no id sent, access logs off: an OK answer names no log record, so it carries no generated id ...
    _, call = stub.Recommend.with_call(pb.RecommendRequest(user_id="u1", k=1))
    assert "x-request-id" not in dict(call.trailing_metadata() or ())
    # ... an error does (it is logged under that id), generated when the caller sent none
    with pytest.raises(grpc.RpcError) as e:
        stub.Recommend(pb.RecommendRequest(user_id="u1", k=0))
    generated = dict(e.value.trailing_metadata())["x-request-id"]
    assert len(generated) == 32 and int(generated, 16) >= 0


@pytest.mark.parametrize(
    ("request_", "field", "value"),
    [
        (pb.RecommendRequest(user_id="u1", k=0), "`k`", "got 0"),
        (pb.RecommendRequest(user_id="u1", k=-3), "`k`", "got -3"),
        (pb.RecommendRequest(user_id="u1", k=51), "`k` must be in [1, 50]", "got 51"),
        (pb.RecommendRequest(user_id="x" * 33, k=1), "`user_id`", "xxx"),
        (pb.RecommendRequest(user_id="u1", k=1, exclude_item_ids=["i1", ""]), "`exclude_item_ids[1]`", "''"),
        (pb.RecommendRequest(user_id="u1", k=1, exclude_item_ids=["i"] * 101), "`exclude_item_ids`", "got 101"),
        (pb.RecommendRequest(history_item_ids=["i1"] * 51, k=1), "`history_item_ids`", "got 51"),
        (pb.RecommendRequest(k=1), "`user_id` or a non-empty `history_item_ids`", "neither"),
    ],
)
def test_invalid_argument_names_field_and_value(stub, request_, field, value):
    code, details = code_of(stub.Recommend, request_)
    assert code == INVALID and field in details and value in details, details


def _batch_with_history(users: list[str], histories: dict[str, list[str]]) -> pb.BatchRecommendRequest:
    return pb.BatchRecommendRequest(user_ids=users, k=1, history_item_ids={
        u: pb.ItemIdList(item_ids=h) for u, h in histories.items()})


def test_invalid_argument_on_other_rpcs(stub):
    cases = [
        (stub.EmbedUser, pb.EmbedUserRequest(), "`history_item_ids` must not be empty"),
        (stub.BatchRecommend, pb.BatchRecommendRequest(user_ids=["u1"] * 101, k=1), "`user_ids`"),
        (stub.BatchRecommend, pb.BatchRecommendRequest(user_ids=[], k=1), "`user_ids` must not be empty"),
        (stub.BatchRecommend, _batch_with_history(["u1"], {"u2": ["i1"]}),
         "`history_item_ids` has the key 'u2', which is not one of `user_ids`"),
        (stub.BatchRecommend, _batch_with_history(["u1", "u2", "u3"], {"u1": ["i1"] * 50, "u2": ["i2"] * 50,
                                                                       "u3": ["i3"]}),
         "`history_item_ids` may hold at most 100 IDs in all lists together, got 101"),
        (stub.BatchRecommend, _batch_with_history(["u1"], {"u1": ["i1"] * 51}),
         "`history_item_ids['u1']` may hold at most 50 IDs, got 51"),
        (stub.SimilarItems, pb.SimilarItemsRequest(item_id="", k=1), "`item_id`"),
        (stub.GetItemEmbeddings, pb.GetItemEmbeddingsRequest(item_ids=["ok", "y" * 40]), "`item_ids[1]`"),
    ]
    for method, req, text in cases:
        code, details = code_of(method, req)
        assert code == INVALID and text in details, (req, details)


def test_not_found(stub):
    code, details = code_of(stub.Recommend, pb.RecommendRequest(user_id="ghost", k=3))
    assert code == grpc.StatusCode.NOT_FOUND and "'ghost'" in details
    code, details = code_of(stub.Recommend, pb.RecommendRequest(user_id="ghost", history_item_ids=["zz"], k=3))
    assert code == grpc.StatusCode.NOT_FOUND and "history_item_ids" in details
    assert code_of(stub.SimilarItems, pb.SimilarItemsRequest(item_id="nope", k=3))[0] == grpc.StatusCode.NOT_FOUND
    assert code_of(stub.EmbedUser, pb.EmbedUserRequest(history_item_ids=["nope"]))[0] == grpc.StatusCode.NOT_FOUND
    code, details = code_of(stub.EmbedUser, pb.EmbedUserRequest(user_id="ghost"))
    assert code == grpc.StatusCode.NOT_FOUND and "`user_id` 'ghost'" in details


def test_oversized_message_is_refused(stub):
    # max_message_bytes=4 MiB by default in settings; send ~5 MB of IDs
    code, _ = code_of(stub.Recommend, pb.RecommendRequest(user_id="u1", k=1, exclude_item_ids=["a" * 1000] * 5000))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_admin_requires_token(served):
    admin = pb_grpc.RecommenderAdminStub(served[1])
    for metadata in (None, [("authorization", "Bearer wrong")], [("authorization", "s3cret")]):
        code, _ = code_of(admin.ListModels, pb.ListModelsRequest(), metadata=metadata)
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert code_of(admin.ReloadModel, pb.ReloadModelRequest(), metadata=metadata)[0] == \
            grpc.StatusCode.UNAUTHENTICATED
    resp = admin.ListModels(pb.ListModelsRequest(), metadata=[("authorization", "Bearer s3cret")])
    assert [(m.version, m.latest, m.serving) for m in resp.models] == [("v1", True, True)]


def test_unavailable_before_a_model_is_loaded(tmp_path):
    with running_server(tmp_path) as (_app, target), grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        code, details = code_of(stub.Recommend, pb.RecommendRequest(user_id="u1", k=1))
        assert code == grpc.StatusCode.UNAVAILABLE and "no model" in details
        health = health_pb2_grpc.HealthStub(ch)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        # the model appears; an admin reload makes it serve
        write_fake_version(tmp_path, "v1")
        admin = pb_grpc.RecommenderAdminStub(ch)
        r = admin.ReloadModel(pb.ReloadModelRequest(), metadata=[("authorization", "Bearer s3cret")])
        assert (r.previous_version, r.version, r.changed) == ("", "v1", True)
        assert health.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        assert code_of(stub.Recommend, pb.RecommendRequest(user_id="u1", k=1))[0] == OK


def test_internal_error_is_generic_and_logged(tmp_path, caplog):
    write_fake_version(tmp_path, "v1", fail=True)
    with running_server(tmp_path, warmup_queries=0) as (_app, target), grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        code, details = code_of(stub.Recommend, pb.RecommendRequest(user_id="u1", k=1),
                                metadata=[("x-request-id", "req-77")])
    assert code == grpc.StatusCode.INTERNAL
    assert "secret" not in details and "req-77" in details
    assert any(getattr(r, "request_id", None) == "req-77" and r.exc_info for r in caplog.records)


def test_access_logs_carry_a_request_id_back_to_the_caller(tmp_path, caplog):
    import logging

    write_fake_version(tmp_path, "v1")
    with caplog.at_level(logging.INFO, logger="recsys.server"), \
            running_server(tmp_path, log_requests=True) as (_app, target), grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        _, call = stub.Recommend.with_call(pb.RecommendRequest(user_id="u1", k=1))
        generated = dict(call.trailing_metadata())["x-request-id"]
        _, call = stub.Recommend.with_call(pb.RecommendRequest(user_id="u2", k=1), metadata=[("x-request-id", "r-5")])
        echoed = dict(call.trailing_metadata())["x-request-id"]
    assert len(generated) == 32 and echoed == "r-5"
    ok = [r for r in caplog.records if getattr(r, "method", None) == "Recommend" and r.code == "OK"]
    assert [r.request_id for r in ok] == [generated, "r-5"] and all(r.latency_ms > 0 for r in ok)


def test_resource_exhausted_and_deadline(tmp_path):
    write_fake_version(tmp_path, "v1", delay_s=0.3)
    with running_server(tmp_path, warmup_queries=0, max_concurrency=2) as (app, target), \
            grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        codes = []
        rejected = app.metrics.registry.get_sample_value

        def call():
            codes.append(code_of(stub.Recommend, pb.RecommendRequest(user_id="u1", k=1), timeout=5)[0])

        threads = [threading.Thread(target=call) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert set(codes) == {OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert codes.count(OK) <= 4
        # every refusal the callers saw is counted for the dashboard (gRPC refuses them before any handler)
        assert rejected("recsys_requests_rejected_total", {"reason": "concurrency"}) == \
            codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        code, _ = code_of(stub.Recommend, pb.RecommendRequest(user_id="u1", k=1), timeout=0.05)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_port_in_use_fails_loudly(served, tmp_path):
    from test_server_helpers import settings

    from server.app import create_server

    with pytest.raises(OSError, match="cannot listen"):
        create_server(served[3], settings(tmp_path))


def test_metrics_endpoint_and_shutdown_health(tmp_path):
    import socket
    import urllib.request

    write_fake_version(tmp_path, "v1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with running_server(tmp_path, metrics_port=port) as (app, target), grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        stub.Recommend(pb.RecommendRequest(user_id="u1", k=2))
        code_of(stub.Recommend, pb.RecommendRequest(user_id="u1", k=0))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'recsys_requests_total{code="OK",method="Recommend"} 1.0' in text
        assert 'recsys_requests_total{code="INVALID_ARGUMENT",method="Recommend"} 1.0' in text
        assert 'recsys_model_version_info{version="v1"} 1.0' in text
        assert 'recsys_request_latency_seconds_count{method="Recommend"} 2.0' in text
        app.stop(0.5).wait(5)
        status = app.health.Check(health_pb2.HealthCheckRequest(service=""), None).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
