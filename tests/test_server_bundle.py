"""The server on a REAL exported bundle (tiny clustered dataset -> train -> export, shared with test_bundle.py):
answers match the exact index, respect the clusters and exclusions; hot reload to a new export; a tampered
bundle is refused by Bundle.load's verification while the old model keeps serving."""

from __future__ import annotations

import datetime as dt
import shutil
import time

import grpc
import numpy as np
import pytest
from test_server_helpers import running_server

from recsys.v1 import recommender_pb2 as pb
from recsys.v1 import recommender_pb2_grpc as pb_grpc

test_bundle = pytest.importorskip("test_bundle")  # the tiny clustered dataset + training run, built once


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    from recsys.bundle import Bundle
    from recsys.publish import export

    _data, run = test_bundle.trained(tmp_path_factory)
    models = tmp_path_factory.mktemp("served_models")
    path = export(run, models, index_cfg=test_bundle.index_cfg(), version="v1")
    return run, models, Bundle.load(path)


def _cluster(item_id: str) -> int:
    return int(item_id[1:]) // test_bundle.ITEMS_PER_CLUSTER


def test_real_bundle_answers(published):
    _run, models, bundle = published
    with running_server(models, loader=_default_loader(), max_k=100) as (app, target), \
            grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        in_cluster, overlap = [], []
        users = [f"u{u}" for u in range(0, 160, 7)]
        batch = stub.BatchRecommend(pb.BatchRecommendRequest(user_ids=users, k=5))
        for user, result in zip(users, batch.results, strict=True):
            resp = stub.Recommend(pb.RecommendRequest(user_id=user, k=5))
            got = [it.item_id for it in resp.items]
            assert got == [it.item_id for it in result.items]  # one batched query == single queries
            row = bundle.user_row(user)
            seen = bundle.seen_items(row)
            assert not set(got) & set(bundle.item_ids[seen].tolist())  # seen items excluded
            ids, _ = bundle.exact.search(bundle.user_embeddings[row : row + 1], 5, exclude=[seen])
            overlap.append(len(set(got) & set(bundle.item_ids[ids[0]].tolist())) / 5)
            c = (int(user[1:]) // test_bundle.USERS_PER_CLUSTER)
            in_cluster.append(np.mean([_cluster(t) == c for t in got]))
        assert np.mean(overlap) >= 0.95  # HNSW vs exact
        assert np.mean(in_cluster) >= 0.7  # the clusters were learned

        # a new user from a cluster-2 history gets cluster-2 items; the history itself is excluded
        history = [f"i{32 + j}" for j in range(4)]
        resp = stub.Recommend(pb.RecommendRequest(history_item_ids=history, k=5))
        assert resp.source == pb.SOURCE_HISTORY and not set(history) & {it.item_id for it in resp.items}
        assert np.mean([_cluster(it.item_id) == 2 for it in resp.items]) >= 0.6
        emb = np.asarray(stub.EmbedUser(pb.EmbedUserRequest(history_item_ids=history)).embedding)
        np.testing.assert_allclose(emb, bundle.embed_history([np.arange(32, 36)])[0], atol=1e-5)
        sim = stub.SimilarItems(pb.SimilarItemsRequest(item_id="i20", k=5))
        assert "i20" not in [it.item_id for it in sim.items]
        assert np.mean([_cluster(it.item_id) == 1 for it in sim.items]) >= 0.6
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.version, info.n_items, info.dim, info.metric) == ("v1", bundle.n_items, bundle.dim, "cosine")
        # what the dashboard and the stale-retrain alert read
        sample = app.metrics.registry.get_sample_value
        assert sample("recsys_model_items") == bundle.n_items and sample("recsys_model_users") == bundle.n_users
        created = dt.datetime.fromisoformat(bundle.created_at.replace("Z", "+00:00")).timestamp()
        assert bundle.created_at and sample("recsys_model_created_timestamp_seconds") == created
        assert sample("recsys_model_version_info", {"version": "v1"}) == 1


def _default_loader():
    from server.store import default_loader

    return default_loader


def test_real_hot_reload_and_tampered_bundle(published, tmp_path):
    from recsys.publish import export

    run, src, _bundle = published
    models = tmp_path / "models"
    shutil.copytree(src, models)
    with running_server(models, loader=_default_loader(), poll_s=0.05) as (app, target), \
            grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).version == "v1"
        export(run, models, index_cfg=test_bundle.index_cfg(), version="v2")
        deadline = time.monotonic() + 30
        while stub.GetModelInfo(pb.GetModelInfoRequest()).version != "v2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).version == "v2"

        # tamper with a copy: same size, one flipped byte in the embeddings -> sha256 mismatch -> refused
        bad = models / "v3"
        shutil.copytree(models / "v2", bad)
        emb = bad / "item_embeddings.npy"
        data = bytearray(emb.read_bytes())
        data[-1] ^= 0xFF
        emb.write_bytes(bytes(data))
        (models / "LATEST").write_text("v3\n")
        refused = app.metrics.registry.get_sample_value
        deadline = time.monotonic() + 30
        while refused("recsys_model_reloads_total", {"result": "refused"}) != 1.0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert refused("recsys_model_reloads_total", {"result": "refused"}) == 1.0
        resp = stub.Recommend(pb.RecommendRequest(user_id="u1", k=5))
        assert resp.model_version == "v2" and len(resp.items) == 5
