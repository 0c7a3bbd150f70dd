"""recsys.client.RecommenderClient and the `recsys query` CLI against a real server (fake bundle)."""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
from test_server_helpers import fake_loader, running_server, write_fake_version

from recsys.cli import main
from recsys.client import RecommenderClient, RecommenderError, service_config


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_fake_version(models, "v1", seed=1)
    with running_server(models) as (_app, target):
        yield target, fake_loader(models / "v1")


def test_client_methods_return_plain_python(served):
    target, bundle = served
    with RecommenderClient(target, admin_token="s3cret") as c:
        rec = c.recommend("u5", k=4)
        assert rec.item_ids == bundle.expected_top(bundle.user_embeddings[5], 4, exclude=[5, 6, 7])
        assert rec.model_version == "v1" and rec.source == "known_user" and len(rec.scores) == 4
        new = c.recommend(history=["i3", "i9"], k=3)
        assert new.source == "history" and not {"i3", "i9"} & set(new.item_ids)
        batch = c.batch_recommend(["u1", "ghost"], k=2)
        assert batch[0].item_ids == c.recommend("u1", k=2).item_ids and not batch[1].found
        assert "i10" not in c.similar_items("i10", k=5).item_ids
        found, unknown = c.item_embeddings(["i2", "nope"])
        np.testing.assert_allclose(found["i2"], bundle.item_embeddings[2], rtol=1e-6)
        assert unknown == ["nope"]
        vec, unknown = c.embed_user(["i1", "zz"])
        assert vec.shape == (8,) and unknown == ["zz"]
        vec, unknown = c.embed_user(user_id="u5")  # a known user alone: the stored embedding
        np.testing.assert_allclose(vec, bundle.user_embeddings[5], rtol=1e-6)
        vec, unknown = c.embed_user(["i40", "zz"], user_id="u5")  # + fresh events: the tower (the fake's: sum)
        want = bundle.embed_users(np.array([5]), [np.array([5, 6, 7, 40])])[0]
        np.testing.assert_allclose(vec, want, rtol=1e-5)
        assert unknown == ["zz"]
        assert c.model_info()["n_items"] == 120
        assert [m["version"] for m in c.list_models()] == ["v1"]
        assert c.reload_model() == {"previous_version": "v1", "version": "v1", "changed": False}
        assert c.health() == "SERVING"
        with pytest.raises(RecommenderError) as e:
            c.recommend("ghost", k=3, request_id="rid-9")
        assert e.value.code == grpc.StatusCode.NOT_FOUND and e.value.request_id == "rid-9"
    with RecommenderClient(target) as anon, pytest.raises(RecommenderError) as e:
        anon.list_models()
    assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_client_fresh_events(served):
    target, bundle = served
    with RecommenderClient(target) as c:
        rec = c.recommend("u5", history=["i40", "i41", "zz"], k=4)
        q = bundle.embed_users(np.array([5]), [np.array([5, 6, 7, 40, 41])])[0]
        assert rec.item_ids == bundle.expected_top(q, 4, exclude=[5, 6, 7, 40, 41])
        assert rec.source == "known_user_with_events" and rec.unknown_item_ids == ["zz"]
        batch = c.batch_recommend(["u5", "u1", "ghost", "new"], k=4,
                                  histories={"u5": ["i40", "i41", "zz"], "new": ["i3"]})
        assert batch[0].item_ids == rec.item_ids and batch[0].unknown_item_ids == ["zz"]
        assert [(r.source, r.found) for r in batch] == [("known_user_with_events", True), ("known_user", True),
                                                         ("", False), ("history", True)]
        with pytest.raises(RecommenderError) as e:
            c.batch_recommend(["u5"], histories={"u6": ["i1"]})
        assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "'u6'" in e.value.details


def test_retry_policy_in_service_config():
    cfg = json.loads(service_config(max_attempts=3))
    policy = cfg["methodConfig"][0]["retryPolicy"]
    assert policy["maxAttempts"] == 3 and policy["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "retryPolicy" not in json.loads(service_config(max_attempts=1))["methodConfig"][0]
    with pytest.raises(ValueError, match="`max_attempts`"):
        service_config(max_attempts=0)


def test_query_cli(served, capsys):
    target, bundle = served
    assert main(["query", "recommend", "--target", target, "--user", "u5", "-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [it["item_id"] for it in out["items"]] == bundle.expected_top(bundle.user_embeddings[5], 3,
                                                                        exclude=[5, 6, 7])
    assert main(["query", "similar", "--target", target, "--item", "i4", "-k", "2"]) == 0
    assert len(json.loads(capsys.readouterr().out)["items"]) == 2
    assert main(["query", "embed", "--target", target, "--items", "i1", "x"]) == 0
    assert json.loads(capsys.readouterr().out)["unknown_ids"] == ["x"]
    assert main(["query", "embed", "--target", target, "--user", "u5", "--history", "i40", "x"]) == 0
    out = json.loads(capsys.readouterr().out)
    want = bundle.embed_users(np.array([5]), [np.array([5, 6, 7, 40])])[0]
    np.testing.assert_allclose(out["embedding"], want, rtol=1e-5)
    assert out["unknown_item_ids"] == ["x"]
    assert main(["query", "embed", "--target", target, "--user", "u5"]) == 0
    np.testing.assert_allclose(json.loads(capsys.readouterr().out)["embedding"], bundle.user_embeddings[5], rtol=1e-6)
    assert main(["query", "embed", "--target", target]) == 2
    assert "needs --users, --items, --history or --user" in capsys.readouterr().err
    assert main(["query", "recommend", "--target", target, "--user", "u5", "--history", "i40", "-k", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "known_user_with_events" and "i40" not in [it["item_id"] for it in out["items"]]
    assert main(["query", "info", "--target", target]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v1"
    assert main(["query", "recommend", "--target", target, "--user", "ghost"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err
