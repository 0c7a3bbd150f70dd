"""``model.time_prior``: score = cos(u, v) + g(user state) . h(item time inputs), trained with each in-batch
candidate as of its row's time, served exactly by a cosine index through extra dimensions."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_recency import N_USERS, NEW, OLD, _drifting

from recsys.train import losses, recency
from recsys.train.config import LossConfig, ModelConfig, TrainConfig
from recsys.train.distributed import DistContext
from recsys.train.model import PRIOR_BOUND, TwoTower
from recsys.train.objective import contrastive_loss
from recsys.train.recency import DAY_MS


def _prior_model(k: int = 3) -> TwoTower:
    from recsys.train.config import FeatureSpec

    torch.manual_seed(0)
    return TwoTower(FeatureSpec(n_users=5, n_items=7), ModelConfig(dim=8, embedding_dim=8, time_prior=True,
                                                                   time_prior_rank=k)).eval()


def test_served_vectors_are_unit_and_rank_exactly_by_cos_plus_prior():
    model, k = _prior_model(3), 3
    gen = torch.Generator().manual_seed(1)
    u = torch.nn.functional.normalize(torch.randn(6, 8, generator=gen), dim=1)
    v = torch.nn.functional.normalize(torch.randn(50, 8, generator=gen), dim=1)
    g = torch.randn(6, k, generator=gen) * 2
    h = (torch.rand(50, k, generator=gen) * 2 - 1) * PRIOR_BOUND * 0.999
    q, z = model.served_users(u, g), model.served_items(v, h)
    assert q.shape == (6, 8 + k + 1) and z.shape == (50, 8 + k + 1) and model.out_dim == 8 + k + 1
    torch.testing.assert_close(q.norm(dim=1), torch.ones(6))
    torch.testing.assert_close(z.norm(dim=1), torch.ones(50))
    want = u @ v.T + g @ h.T  # the model's score
    got = (q @ z.T) * torch.sqrt(1 + (g * g).sum(1, keepdim=True)) * math.sqrt(1 + k * PRIOR_BOUND**2)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(torch.argsort(q @ z.T, dim=1, descending=True), torch.argsort(want, dim=1, descending=True))
    # the prior changes the order (a prior that did nothing would leave it at the cosine order)
    assert not torch.equal(torch.argsort(want, dim=1), torch.argsort(u @ v.T, dim=1))


def test_a_model_without_prior_serves_its_tower_outputs():
    from recsys.train.config import FeatureSpec

    model = TwoTower(FeatureSpec(n_users=5, n_items=7), ModelConfig(dim=8, embedding_dim=8)).eval()
    assert model.out_dim == 8 and model.prior_item is None and model.user_now is None
    with torch.no_grad():
        torch.testing.assert_close(model.encode_items(torch.arange(7)), model._items(torch.arange(7)))


def test_pair_features_are_each_item_as_of_the_start_of_each_rows_day():
    items = np.array([0, 0, 1, 0, 1, 2, 1])
    ts = np.array([0.2, 1.5, 2.1, 3.0, 3.4, 3.6, 5.0]) * DAY_MS
    ts = ts.astype(np.int64)
    index = recency.EventIndex(items, ts, 3)
    rows_t = np.array([3.5, 3.9, 5.2]) * DAY_MS  # two rows on day 3, one on day 5
    cols = np.array([1, 0, 2, 1])
    got = recency.pair_time_features(index, cols, rows_t.astype(np.int64), [1, 7])
    assert got.shape == (3, 4, recency.n_time_features([1, 7]))
    for r, t in enumerate(rows_t):
        day_start = np.full(len(cols), int(t) // DAY_MS * DAY_MS)
        np.testing.assert_array_equal(got[r], recency.item_time_features(index, cols, day_start, [1, 7]))
    np.testing.assert_array_equal(got[0], got[1])  # same day, same state: events of day 3 are not seen
    # by hand, item 0 as of day 3 (its events at 0.2 and 1.5 days; item 1's at 2.1): log((c + 1) / (T + 1) * 3)
    n = 3
    assert got[0, 1, 1] == pytest.approx(math.log(3 / 4 * n))  # 7 days: 2 of its own among 3
    assert got[0, 1, 0] == pytest.approx(math.log(1 / 2 * n))  # 1 day: none of its own among 1
    # no leakage: deleting or moving every event from the row's day on does not change the row's features
    keep = ts < 3 * DAY_MS
    other = recency.EventIndex(items[keep], ts[keep], 3)
    np.testing.assert_array_equal(recency.pair_time_features(other, cols, rows_t[:1].astype(np.int64), [1, 7]),
                                  got[:1])


def test_user_state_by_hand():
    # user 0: events at days 0, 2, 10; user 2: one event at day 4; user 1: none
    user = np.array([0, 0, 0, 2])
    ts = (np.array([0, 2, 10, 4]) * DAY_MS).astype(np.int64)
    start = np.array([0, 0, 0, 3])
    per_row, now = recency.user_time_state(user, ts, start, 3)
    np.testing.assert_allclose(per_row, np.log1p([[0, 0], [2, 1], [10, 2], [0, 0]]), rtol=1e-6)
    end_days = 10 + 1 / DAY_MS  # one ms after the newest event
    np.testing.assert_allclose(now, np.log1p([[end_days, 3], [0, 0], [end_days - 4, 1]]), rtol=1e-6)


def test_score_bias_enters_the_logits_before_the_temperature():
    gen = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(5, 4, generator=gen, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(5, 4, generator=gen, dtype=torch.float64), dim=1)
    bias = torch.randn(5, 5, generator=gen, dtype=torch.float64)
    ids = torch.tensor([0, 1, 0, 2, 3])
    got = losses.in_batch_softmax(q, c, temperature=0.2, item_ids=ids, score_bias=bias)
    logits = (q @ c.T + bias) / 0.2
    logits[2, 0] = logits[0, 2] = -math.inf  # the accidental hit (item 0 twice)
    want = torch.nn.functional.cross_entropy(logits, torch.arange(5))
    torch.testing.assert_close(got, want)
    assert not torch.isclose(got, losses.in_batch_softmax(q, c, temperature=0.2, item_ids=ids))
    with pytest.raises(ValueError, match="score_bias"):
        losses.in_batch_softmax(q, c, temperature=0.2, score_bias=bias[:, :4])
    kw = dict(temperature=0.2, items=ids, users=ids, log_q=None, weights=None, mask_items=True, mask_users=False,
              correct_positive=True, extra_c=None, extra_ids=None, extra_log_q=None, score_bias=bias)
    torch.testing.assert_close(contrastive_loss(q, c, ctx=DistContext(), **kw)[0], got)
    with pytest.raises(ValueError, match="plain in-batch softmax"):
        contrastive_loss(q, c, ctx=DistContext(), chunk_size=2, **kw)


@pytest.fixture(scope="module")
def drifting(tmp_path_factory):
    return _drifting(tmp_path_factory.mktemp("drift_prior") / "prepared")


def _train(data, out, *, prior: bool) -> TwoTower:
    from recsys.train.loop import train

    m = ModelConfig(dim=16, embedding_dim=16, history_len=8, time_prior=prior)
    t = TrainConfig(batch_size=64, lr=0.01, epochs=12, progress=False, tensorboard=False, patience=0, refit=False)
    train(data, out, model_cfg=m, train_cfg=t, loss_cfg=LossConfig(temperature=0.1), device="cpu")
    return TwoTower.from_run(out)


def _known_margin(model: TwoTower) -> float:
    """Served score(NEW) - score(OLD) for every known user, each asked with the same random history: users tied
    but for their own ID and state."""
    with torch.no_grad():
        items = model.encode_items(torch.arange(int(model.n_items)))
        hist = torch.randint(2, int(model.n_items), (1, 8), generator=torch.Generator().manual_seed(0))
        s = model.encode_users(torch.arange(N_USERS), hist.expand(N_USERS, -1)) @ items.T
    return float((s[:, NEW] - s[:, OLD]).mean())


def test_prior_ranks_last_weeks_hit_above_an_old_one(drifting, tmp_path):
    with_prior = _train(drifting, tmp_path / "prior", prior=True)
    without = _train(drifting, tmp_path / "plain", prior=False)
    with torch.no_grad():  # the end-of-logs state: NEW is hot, OLD has had nothing for over a year
        h = with_prior.item_prior(with_prior.item_now)
    assert not torch.equal(h[NEW], h[OLD])
    # measured: the served NEW - OLD margin is 0.58 with the prior, -0.02 without
    assert _known_margin(with_prior) > 0.3
    assert _known_margin(with_prior) > _known_margin(without) + 0.3
    # the run's weights carry the users' and items' end-of-logs states: a reload serves the same vectors
    again = TwoTower.from_run(tmp_path / "prior")
    torch.testing.assert_close(again.user_now, with_prior.user_now)
    with torch.no_grad():
        torch.testing.assert_close(again.encode_items(torch.arange(5)), with_prior.encode_items(torch.arange(5)))


@pytest.fixture(scope="module")
def prior_bundle(tmp_path_factory):
    from test_bundle import HISTORY_LEN, index_cfg, make_dataset

    from recsys.bundle import Bundle
    from recsys.publish import export
    from recsys.train.loop import train

    root = tmp_path_factory.mktemp("prior_bundle")
    data = make_dataset(root / "data")
    train(data, root / "run", model_cfg=ModelConfig(dim=16, embedding_dim=16, history_len=HISTORY_LEN, time_prior=True),
          train_cfg=TrainConfig(batch_size=64, lr=0.02, epochs=4, progress=False, tensorboard=False, patience=0,
                                num_threads=1),
          loss_cfg=LossConfig(temperature=0.1), device="cpu")  # fmt: skip
    return Bundle.load(export(root / "run", root / "models", index_cfg=index_cfg(), keep=2))


def test_export_serves_the_prior_exactly_through_the_index(prior_bundle):
    from server import service

    b, k = prior_bundle, ModelConfig().time_prior_rank
    assert b.dim == 16 + k + 1 and b.tower_dim == 16
    assert b.manifest["model"]["served_dim"] == b.dim and b.manifest["model"]["config"]["time_prior"] is True
    model = b.model
    # the refit (train + valid) serves with the prior weight the fit chose on validation
    summary = b.manifest["run"]["summary"]
    assert summary["refit_epochs"] > 0 and summary["final_fit"]["splits"][:2] == ["train", "valid"]
    assert float(model.prior_scale) == summary["best_metrics"]["prior_scale"] != 1.0  # measured: 0.5
    with torch.no_grad():  # the stored vectors are the towers' served vectors, end-of-logs prior included
        h = model.item_prior(model.item_now)
        assert float(h.std()) > 0  # the prior is not a constant (it would not change any ranking)
        torch.testing.assert_close(torch.tensor(b.item_embeddings), model.encode_items(torch.arange(b.n_items)))
    np.testing.assert_allclose(np.linalg.norm(b.item_embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(b.user_embeddings, axis=1), 1.0, atol=1e-5)
    # HNSW over the augmented vectors finds the exact top-10 of cos + g . h
    q = b.user_embeddings
    got = b.index.search(q, 10)[0]
    exact = np.argsort(-(q @ b.item_embeddings.T), axis=1, kind="stable")[:, :10]
    assert np.mean([len(set(a) & set(e)) / 10 for a, e in zip(got, exact, strict=True)]) >= 0.99
    # the request path's twin appends g like the torch tower (the service checks it at build; it must serve)
    tower = service.user_tower(b)
    assert tower is not None
    rows = np.array([0, 3, -1])
    hist = [b.history(0), np.array([1, 2]), np.array([5, 6, 7])]
    np.testing.assert_allclose(tower(rows, hist), b.embed_users(rows, hist), atol=1e-5)
    # SimilarItems ranks by cosine of the tower part: what is similar, not what is popular now
    row = 3
    sim = service.similar_items(b, item_id=str(b.item_ids[row]), k=5)
    v = b.item_embeddings[:, : b.tower_dim]
    cos = v @ v[row] / (np.linalg.norm(v, axis=1) * np.linalg.norm(v[row]))
    cos[row] = -np.inf
    assert [b.item_row(i) for i in sim.item_ids] == list(np.argsort(-cos, kind="stable")[:5])


def test_native_recommend_answers_a_prior_bundle_like_the_python_path(prior_bundle):
    from recsys.retrieval import native_available

    if not native_available():
        pytest.skip("recsys._hnsw not built (no C++ compiler)")
    from recsys.v1 import recommender_pb2 as pb
    from server import fastpath
    from server.metrics import Metrics
    from server.service import Limits
    from server.servicer import RecommenderServicer

    b, limits = prior_bundle, Limits(max_k=100, max_ids=1000, max_history=1000, max_id_length=64)
    servicer = RecommenderServicer(store=None, limits=limits, metrics=Metrics())
    fast = fastpath.build(b)
    assert fast is not None
    rng = np.random.default_rng(0)
    answered, sources = 0, set()
    for row in range(0, b.n_users, 5):
        events = [str(i) for i in b.item_ids[rng.integers(0, b.n_items, 1 + row % 6)]]
        for user_id, hist in ((str(b.user_ids[row]), []), (str(b.user_ids[row]), events), ("", events)):
            req = pb.RecommendRequest(user_id=user_id, history_item_ids=hist, k=7)
            out = fast.recommend(req.SerializeToString(), limits.max_k, limits.max_id_length, limits.max_history)
            if out is None:
                continue
            answered += 1
            assert out == servicer._recommend(b, req).SerializeToString(), (row, user_id, len(hist))
            sources.add(pb.RecommendResponse.FromString(out).source)
    assert answered >= 20 and sources == {pb.SOURCE_KNOWN_USER, pb.SOURCE_KNOWN_USER_WITH_EVENTS, pb.SOURCE_HISTORY}


def test_validation_chooses_the_prior_weight_and_the_model_serves_it():
    """Validation items are exactly the items the prior favours; the cosine part points elsewhere: the evaluator
    must pick the largest weight, report it, leave the model's own weight alone, and a model set to it serves
    score = cos + weight * g . h."""
    from recsys.train.loop import Evaluator
    from recsys.train.model import PRIOR_SCALES

    model = _prior_model(2)
    n_items = 7
    with torch.no_grad():
        model.item_now.copy_(torch.randn(n_items, model.item_now.shape[1]))
        model.user_now.copy_(torch.rand(5, 2))
        h = model.item_prior(model.item_now)
        assert float(h.abs().max()) == 0.0  # the item side starts at zero: give it weights
        for p in model.prior_item.parameters():
            p.add_(torch.randn_like(p))
        users = torch.arange(5)
        hist = torch.full((5, 3), -1)
        g = model.user_prior(model.user_state(users, hist))
        prior = g @ model.item_prior(model.item_now).T  # [5, n_items]
    relevant = [np.array([int(torch.argmax(prior[u]))]) for u in range(5)]
    ev = Evaluator(users=users.numpy(), history=hist.numpy(), seen=[np.zeros(0, np.int64)] * 5, relevant=relevant,
                   n_items=n_items, k=1, device=torch.device("cpu"))
    by_hand = []
    for scale in PRIOR_SCALES:  # recall@1 at each weight, by hand
        model.prior_scale.fill_(scale)
        top = ev.topk(model)
        by_hand.append(np.mean([top[u, 0] == relevant[u][0] for u in range(5)]))
    model.prior_scale.fill_(1.0)
    chosen = PRIOR_SCALES[int(np.argmax(by_hand))]  # the first of the best
    assert chosen != 1.0 and max(by_hand) > by_hand[0]  # the weight matters here
    metrics = ev(model, select="recall@1")
    assert metrics["prior_scale"] == chosen and metrics["recall@1"] == max(by_hand)
    assert float(model.prior_scale) == 1.0  # left as it was
    model.prior_scale.fill_(chosen)
    with torch.no_grad():
        q, z = model.encode_users(users, hist), model.encode_items(torch.arange(n_items))
        u, v = model._users(users, hist), model._items(torch.arange(n_items))
        want = u @ v.T + chosen * prior
    assert torch.equal(torch.argsort(q @ z.T, dim=1, descending=True), torch.argsort(want, dim=1, descending=True))
