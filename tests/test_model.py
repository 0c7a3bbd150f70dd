"""The two-tower model: cold users from history, cold items from features, geometry, save/load, shapes and errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import ITEMS_PER_CLUSTER, N_CLUSTERS, make_clustered, tiny_cfgs

from recsys.core import schema
from recsys.train.config import FeatureSpec, ModelConfig
from recsys.train.loop import train
from recsys.train.model import TwoTower

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("model")
    data = make_clustered(root / "prepared", seed=1)
    m, t, lc = tiny_cfgs(epochs=8, eval_every=8)  # validate once, at the end: these tests want the trained model
    train(data, root / "run", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    return root / "run"


@pytest.fixture(scope="module")
def model(run_dir) -> TwoTower:
    return TwoTower.from_run(run_dir)


def _cluster(rows: torch.Tensor) -> torch.Tensor:
    return rows // ITEMS_PER_CLUSTER


def test_outputs_are_unit_vectors_and_metric_is_cosine(model):
    items = model.encode_items(torch.arange(model.n_items))
    users = model.encode_users(torch.tensor([0, 5, -1]), torch.tensor([[-1, 3], [1, 2], [-1, -1]]))
    assert items.shape == (model.n_items, 16) and users.shape == (3, 16)
    assert torch.allclose(items.norm(dim=1), torch.ones(model.n_items), atol=1e-5)
    assert torch.allclose(users.norm(dim=1), torch.ones(3), atol=1e-5)
    assert model.metric == "cosine" and model.item_feature_names == ["category"]


def test_new_user_from_history_ranks_that_cluster_first(model):
    items = model.encode_items(torch.arange(model.n_items))
    hits = []
    for c in range(N_CLUSTERS):
        hist = torch.arange(c * ITEMS_PER_CLUSTER, c * ITEMS_PER_CLUSTER + 4)[None, :]  # 4 items of cluster c
        q = model.encode_users(torch.tensor([-1]), hist)  # a user never seen in training
        scores = (q @ items.T)[0]
        scores[hist[0]] = float("-inf")  # seen items excluded, as in serving
        top = scores.topk(ITEMS_PER_CLUSTER - 4).indices  # as many as the cluster has unseen items
        assert _cluster(top[:3]).tolist() == [c] * 3, f"cluster {c}: {top.tolist()}"
        hits.append((_cluster(top) == c).float().mean())
    # chance is 1/4; a perfect model gets 1.0
    assert torch.stack(hits).mean() >= 0.9, hits


def test_item_from_features_alone_lands_near_its_cluster(model):
    items = model.encode_items(torch.arange(model.n_items))
    cold = model.encode_item_features(torch.arange(1, N_CLUSTERS + 1)[:, None])  # category code = cluster + 1
    nearest = (cold @ items.T).topk(5, dim=1).indices  # [clusters, 5]
    assert (_cluster(nearest) == torch.arange(N_CLUSTERS)[:, None]).float().mean() >= 0.9
    # and a cluster's cold vector is closer to its own cluster's centroid than to any other
    centroids = torch.stack([items[_cluster(torch.arange(model.n_items)) == c].mean(0) for c in range(N_CLUSTERS)])
    assert torch.equal((cold @ centroids.T).argmax(1), torch.arange(N_CLUSTERS))


def test_from_run_rebuilds_the_same_model(run_dir, model):
    meta = json.loads((run_dir / schema.MODEL_JSON).read_text())
    assert meta["metric"] == "cosine" and meta["dim"] == 16 and meta["item_features"] == [["category", N_CLUSTERS + 1]]
    again = TwoTower.from_run(run_dir)
    rows = torch.arange(model.n_items)
    assert torch.equal(model.encode_items(rows), again.encode_items(rows))
    assert not again.training


def test_padding_and_unknown_user_rules():
    torch.manual_seed(0)
    for pooling, last_item in (("mean", False), ("attention", False), ("attention", True)):
        cfg = ModelConfig(dim=8, embedding_dim=8, history_len=4, history_pooling=pooling, last_item=last_item)
        m = TwoTower(FeatureSpec(n_users=3, n_items=10), cfg).eval()
        a = m.encode_users(torch.tensor([-1]), torch.tensor([[2, 5]]))
        b = m.encode_users(torch.tensor([-1]), torch.tensor([[-1, -1, 2, 5]]))  # left padding changes nothing
        assert torch.allclose(a, b, atol=1e-6), pooling
        c = m.encode_users(torch.tensor([-1]), torch.tensor([[9, 9, 9, 9, 2, 5]])[:, -4:])
        d = m.encode_users(torch.tensor([-1]), torch.tensor([[1, 1, 9, 9, 9, 9, 2, 5]]))  # only the last 4 count
        assert torch.allclose(c, d, atol=1e-6), pooling
        empty = m.encode_users(torch.tensor([-1, 0]), torch.full((2, 3), -1))
        assert torch.isfinite(empty).all()
    # explicit options: the defaults (attention + last item) are order-aware
    mean_cfg = ModelConfig(dim=8, embedding_dim=8, history_pooling="mean", last_item=False)
    mean = TwoTower(FeatureSpec(n_users=3, n_items=10), mean_cfg).eval()
    x = mean.encode_users(torch.tensor([-1]), torch.tensor([[1, 2, 3]]))
    y = mean.encode_users(torch.tensor([-1]), torch.tensor([[3, 1, 2]]))
    assert torch.allclose(x, y, atol=1e-6)  # mean pooling ignores order
    # the default last_item path sees the most recent item: the same set in another order is another user
    seq = TwoTower(FeatureSpec(n_users=3, n_items=10), ModelConfig(dim=8, embedding_dim=8)).eval()
    assert seq.cfg.last_item and seq.cfg.share_history_embeddings and seq.history_emb is None
    x = seq.encode_users(torch.tensor([-1]), torch.tensor([[1, 2, 3]]))
    y = seq.encode_users(torch.tensor([-1]), torch.tensor([[3, 1, 2]]))
    assert not torch.allclose(x, y, atol=1e-4)


def test_multi_valued_feature_is_the_mean_of_its_values():
    """A feature with 2 columns: the item input adds the mean embedding of the codes present (0 pads), so [1, 3]
    gives (E1 + E3) / 2, [2, 0] gives E2 and [0, 0] nothing; model.json records the width and rebuilds it."""
    spec = FeatureSpec(n_users=2, n_items=3, item_features={"genre": 4, "year": 3}, item_feature_widths={"genre": 2})
    feats = torch.tensor([[1, 3, 2], [2, 0, 1], [0, 0, 0]])
    m = TwoTower(spec, ModelConfig(dim=8, embedding_dim=8), item_feats=feats).eval()
    ids = torch.arange(3)
    got = m._item_input(ids, m.item_feats[ids], None)
    e_id, e_genre, e_year = m.item_id.weight, m.item_feat[0].weight, m.item_feat[1].weight
    torch.testing.assert_close(got[0], e_id[0] + (e_genre[1] + e_genre[3]) / 2 + e_year[2])
    torch.testing.assert_close(got[1], e_id[1] + e_genre[2] + e_year[1])
    torch.testing.assert_close(got[2], e_id[2])
    # a new item from its features alone: the same columns
    torch.testing.assert_close(m.encode_item_features(feats[:1]), m._item_head(got[:1] - e_id[:1]))
    with pytest.raises(ValueError, match=r"`feats` must have shape \[B, 3\] \(features \['genre', 'year'\], "
                                         r"columns \[2, 1\]\), got \[1, 2\]"):  # fmt: skip
        m.encode_item_features(torch.zeros(1, 2, dtype=torch.long))
    meta = m.model_json()
    assert meta["item_features"] == [["genre", 4, 2], ["year", 3]]
    again = TwoTower.from_model_json(meta)
    assert again.item_feats.shape == (3, 3) and again._item_cols == [(0, 2), (2, 1)]


def test_bad_inputs_name_the_argument_and_value():
    m = TwoTower(FeatureSpec(n_users=3, n_items=10, item_features={"genre": 4}), ModelConfig(dim=8, embedding_dim=8))
    with pytest.raises(ValueError, match=r"`item_idx` must be in \[0, 10\), got values in \[0, 10\]"):
        m.encode_items(torch.tensor([0, 10]))
    with pytest.raises(ValueError, match=r"`user_idx` must be in \[-1, 3\)"):
        m.encode_users(torch.tensor([3]), torch.tensor([[1]]))
    with pytest.raises(ValueError, match=r"`history` item rows must be in \[-1, 10\), got values in \[-2, 1\]"):
        m.encode_users(torch.tensor([0]), torch.tensor([[-2, 1]]))
    with pytest.raises(ValueError, match=r"`feats` must have shape \[B, 1\] \(features \['genre'\]\), got \[2, 2\]"):
        m.encode_item_features(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"item feature 'genre' codes must be in \[0, 4\), got values in \[0, 7\]"):
        m.encode_item_features(torch.tensor([[0], [7]]))
    with pytest.raises(ValueError, match=r"`model.user_id_dropout` must be in \[0, 1\), got 1.0"):
        ModelConfig(user_id_dropout=1.0).validate()


def test_text_feature_path_on_titles(tmp_path):  # needs the `text` extra, part of `dev`: no skip that hides it
    from recsys.core.data import embed_titles

    emb = embed_titles(["space rocket launch", "rocket to the moon", "pasta recipe with tomato"])
    assert emb.shape == (3, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > emb[0] @ emb[2]  # the two space titles are closer than space vs cooking

    data = make_clustered(tmp_path / "prepared", titles=True)
    m, t, lc = tiny_cfgs(epochs=2)
    m = ModelConfig(**{**m.__dict__, "use_text": True})
    train(data, tmp_path / "run", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    model = TwoTower.from_run(tmp_path / "run")
    assert model.text_dim == 384 and model.item_text.shape == (model.n_items, 384)
    title = torch.as_tensor(embed_titles(["space rocket galaxy 999"]))
    v = model.encode_item_features(torch.tensor([[0]]), title)  # unknown category, title only
    assert v.shape == (1, 16) and torch.isfinite(v).all()
