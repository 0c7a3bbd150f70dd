"""What each optional loss term does inside the trainer's step, shown on small known-answer setups.

``test_train.py`` checks that these options still learn the clusters; the tests here fail when an option is
accepted but does nothing: uniform negatives and the MoCo queue must reach the softmax as extra columns (the right
items, the right embeddings, the right logQ), a learned temperature must get a gradient, move by the optimizer's
step and be checkpointed, and the SSL term must add ``ssl_weight * feature_dropout_ssl_loss`` of two views of the
batch's items.
"""

from __future__ import annotations

import pytest
import torch
from test_train import make_clustered

from recsys.core.data import load_prepared
from recsys.train import losses, objective
from recsys.train.config import LossConfig, ModelConfig, TrainConfig
from recsys.train.loop import Trainer

torch.set_num_threads(1)

B = 8  # rows per step


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_prepared(make_clustered(tmp_path_factory.mktemp("clustered") / "prepared"))


def _trainer(data, **loss_over) -> Trainer:
    # no dropout anywhere: a tower's output for an item is a function of the weights only, so it can be recomputed
    model = ModelConfig(dim=8, embedding_dim=8, history_len=4, dropout=0.0, item_id_dropout=0.0,
                        user_id_dropout=0.0)
    train = TrainConfig(batch_size=B, lr=0.01, epochs=1, progress=False, tensorboard=False, patience=0, refit=False)
    loss = LossConfig(**{"temperature": 0.1, "logq_correction": False, **loss_over})
    trainer = Trainer(data, model_cfg=model, train_cfg=train, loss_cfg=loss, device=torch.device("cpu"))
    trainer.set_interactions(data.train)
    return trainer


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """Every call of the trainer's softmax: its keyword arguments, ``q``, ``c`` and the loss it returned."""
    seen: list[dict] = []
    real = objective.contrastive_loss

    def spy(q, c, **kw):
        out = real(q, c, **kw)
        # the queue's tensors are views of its ring buffer, which the step's enqueue overwrites: keep copies
        kw = {k: v.clone() if isinstance(v, torch.Tensor) and k.startswith("extra") else v for k, v in kw.items()}
        seen.append({"q": q, "c": c, **kw, "loss": out[0]})
        return out

    monkeypatch.setattr(objective, "contrastive_loss", spy)
    return seen


def _rows(step: int) -> torch.Tensor:
    """Batch ``step`` (< 10): row ``step`` of 8 users 12 apart (each user has 10 train rows): 8 distinct users,
    two per cluster, so the same-user mask leaves every other in-batch column a negative."""
    return torch.arange(B) * 120 + step


# ---------------------------------------------------------------------------------------------- uniform negatives
def test_uniform_negatives_are_extra_columns_of_the_softmax(data, calls):
    trainer = _trainer(data, n_uniform_negatives=5, logq_correction=True)
    loss = trainer.loss(_rows(0))
    (call,) = calls
    ids, extra = call["extra_ids"], call["extra_c"]
    assert ids.shape == (5,) and extra.shape == (5, 8)
    assert ids.min() >= 0 and ids.max() < data.n_items
    with torch.no_grad():  # the columns are the item tower's current output for the sampled items
        torch.testing.assert_close(extra, trainer.model._items(ids))
    assert extra.requires_grad  # negatives get gradient too (they are not a frozen pool)
    # logQ: the extras are corrected as draws of the batch + uniform mixture, the in-batch columns too
    n, m = data.n_items, 5
    log_p = trainer.log_p
    torch.testing.assert_close(call["extra_log_q"], torch.log((B * log_p[ids].exp() + m / n) / (B + m)))
    items = trainer.t_item[_rows(0)]
    torch.testing.assert_close(call["log_q"], torch.log((B * log_p[items].exp() + m / n) / (B + m)))
    # the loss is the softmax over the B + 5 columns (recomputed independently: logits = q . c / t - log_q, the
    # positive's own logit uncorrected, the default logq_correct_positive = False)
    cands = torch.cat([call["c"], extra])
    logits = call["q"] @ cands.T / 0.1 - torch.cat([call["log_q"], call["extra_log_q"]])
    logits[torch.arange(B), torch.arange(B)] += call["log_q"]
    same = items[:, None] == torch.cat([items, ids])[None, :]
    same[torch.arange(B), torch.arange(B)] = False
    want = torch.nn.functional.cross_entropy(logits.masked_fill(same, float("-inf")), torch.arange(B))
    torch.testing.assert_close(loss, want)


def test_uniform_negatives_are_drawn_uniformly_from_the_catalogue(data, calls):
    trainer = _trainer(data, n_uniform_negatives=16)
    torch.manual_seed(0)
    with torch.no_grad():
        for s in range(60):
            trainer.loss(_rows(s % 10))
    ids = torch.cat([c["extra_ids"] for c in calls])
    counts = torch.bincount(ids, minlength=data.n_items)  # 960 draws over 48 items: 20 expected per item
    assert counts.shape == (data.n_items,) and counts.min() >= 5 and counts.max() <= 40


def test_no_uniform_negatives_no_queue_means_no_extra_columns(data, calls):
    trainer = _trainer(data)
    trainer.step(_rows(0))
    trainer.step(_rows(1))
    assert [c["extra_c"] for c in calls] == [None, None]


# --------------------------------------------------------------------------------------------------- MoCo queue
def test_queue_feeds_the_previous_batches_as_negatives(data, calls):
    trainer = _trainer(data, queue_size=12)
    for s in range(3):
        trainer.step(_rows(s))
    first, second, third = calls
    assert first["extra_c"] is None  # nothing queued before the first step
    # step 2: the 8 item embeddings of step 1, as the tower computed them then (before step 1's update)
    torch.testing.assert_close(second["extra_c"], first["c"].detach())
    assert torch.equal(second["extra_ids"], trainer.t_item[_rows(0)])
    assert not second["extra_c"].requires_grad
    # step 3: a ring of 12: step 2's last 4 overwrote slots 0-3, slots 4-7 still hold step 1's last 4
    c1, c2 = first["c"].detach(), second["c"].detach()
    torch.testing.assert_close(third["extra_c"], torch.cat([c2[4:], c1[4:], c2[:4]]))
    i1, i2 = trainer.t_item[_rows(0)], trainer.t_item[_rows(1)]
    assert torch.equal(third["extra_ids"], torch.cat([i2[4:], i1[4:], i2[:4]]))
    # the queued columns are in the softmax: the loss is that of all B + 12 columns, and higher than the loss of
    # the in-batch columns alone (no logQ here: extra negatives only add to each row's log-sum-exp)
    q, c, extra = third["q"], third["c"], third["extra_c"]
    items = trainer.t_item[_rows(2)]
    with_queue = losses.in_batch_softmax(q, c, temperature=0.1, item_ids=items, extra_c=extra,
                                         extra_item_ids=third["extra_ids"])
    torch.testing.assert_close(third["loss"], with_queue)
    alone = losses.in_batch_softmax(q, c, temperature=0.1, item_ids=items)
    assert third["loss"].item() > alone.item() + 1e-3


def test_queue_entries_get_the_batch_logq(data, calls):
    trainer = _trainer(data, queue_size=16, logq_correction=True)
    trainer.step(_rows(0))
    trainer.step(_rows(1))
    queued = trainer.t_item[_rows(0)]
    torch.testing.assert_close(calls[1]["extra_log_q"], trainer.log_p[queued])  # no uniform part: log_q = log p


def test_queue_is_checkpointed_and_restored(data):
    trainer = _trainer(data, queue_size=12)
    for s in range(3):
        trainer.step(_rows(s))
    emb, ids = trainer.queue.tensors()
    assert len(trainer.queue) == 12
    other = _trainer(data, queue_size=12)
    assert len(other.queue) == 0
    other.load_state(trainer.state_tensors(), trainer.state_meta())
    emb2, ids2 = other.queue.tensors()
    assert torch.equal(emb2, emb) and torch.equal(ids2, ids) and other.queue._ptr == trainer.queue._ptr == 0


# ------------------------------------------------------------------------------------------- learned temperature
def test_learned_temperature_gets_a_gradient_moves_and_is_saved(data, calls):
    trainer = _trainer(data, temperature=0.2, learn_temperature=True)
    assert trainer.temperature_value() == pytest.approx(0.2)
    before = trainer.log_inv_t.item()
    trainer.step(_rows(0))
    t = calls[0]["temperature"]
    assert isinstance(t, torch.Tensor) and t.requires_grad and t.item() == pytest.approx(0.2)
    g = trainer.log_inv_t.grad
    assert g is not None and g.abs().item() > 1e-6
    # AdamW's first step moves a parameter by lr * g / (|g| + eps) after the decoupled decay lr * wd * p
    lr, wd = 0.01, trainer.tcfg.weight_decay
    after = trainer.log_inv_t.item()
    assert after - before * (1 - lr * wd) == pytest.approx(-lr * torch.sign(g).item(), rel=1e-4)
    assert trainer.temperature_value() == pytest.approx(1 / torch.tensor(after).exp().item())
    for s in range(1, 20):
        trainer.step(_rows(s))
    moved = trainer.temperature_value()
    assert abs(moved - 0.2) > 0.01
    # the checkpoint carries it, and a resumed trainer uses it
    state = trainer.state_tensors()
    assert state["loss.log_inv_t"].item() == pytest.approx(trainer.log_inv_t.item())
    other = _trainer(data, temperature=0.2, learn_temperature=True)
    other.load_state(state, trainer.state_meta())
    assert other.temperature_value() == pytest.approx(moved)


def test_learned_temperature_stays_within_its_clamp(data):
    trainer = _trainer(data, temperature=0.1, learn_temperature=True, min_temperature=0.05)
    with torch.no_grad():
        trainer.log_inv_t.fill_(10.0)  # 1 / e^10, below the floor
    assert trainer.temperature_value() == pytest.approx(0.05)
    with torch.no_grad():
        trainer.log_inv_t.fill_(-1.0)  # above 1
    assert trainer.temperature_value() == pytest.approx(1.0)


def test_fixed_temperature_is_a_constant(data, calls):
    trainer = _trainer(data, temperature=0.2)
    before = trainer.log_inv_t.item()
    trainer.step(_rows(0))
    assert calls[0]["temperature"] == 0.2
    assert trainer.log_inv_t.item() == before and trainer.log_inv_t.grad is None
    assert all(p is not trainer.log_inv_t for p in trainer.trained)


# -------------------------------------------------------------------------------------------------- SSL term
def test_ssl_adds_its_weighted_loss_on_two_views_of_the_batch_items(data, calls, monkeypatch):
    trainer = _trainer(data, ssl_weight=0.5, ssl_temperature=0.2, ssl_dropout=0.3)
    views = []
    real = trainer.model.item_views

    def spy(item_idx, drop):
        z = real(item_idx, drop)
        views.append((item_idx, drop, *z))
        return z

    monkeypatch.setattr(trainer.model, "item_views", spy)
    torch.manual_seed(3)
    loss = trainer.loss(_rows(0))
    ((idx, drop, z1, z2),) = views
    assert torch.equal(idx, torch.unique(trainer.t_item[_rows(0)])) and drop == 0.3
    assert not torch.allclose(z1, z2)  # two different views
    ssl = losses.feature_dropout_ssl_loss(z1, z2, temperature=0.2)
    assert ssl.item() > 0.01
    torch.testing.assert_close(loss, calls[0]["loss"] + 0.5 * ssl)
    # the term trains the item tower: its gradient on the item-feature table is that of 0.5 * ssl plus the
    # softmax's (the views are built from the same tables the towers use)
    feat = trainer.model.item_feat[0].weight
    g_all = torch.autograd.grad(loss, feat, retain_graph=True)[0]
    g_main = torch.autograd.grad(calls[0]["loss"], feat, retain_graph=True)[0]
    g_ssl = torch.autograd.grad(ssl, feat)[0]
    torch.testing.assert_close(g_all, g_main + 0.5 * g_ssl)
    assert g_ssl.abs().sum().item() > 0


def test_no_ssl_weight_no_views(data, calls, monkeypatch):
    trainer = _trainer(data)
    monkeypatch.setattr(trainer.model, "item_views", lambda *a: pytest.fail("SSL views computed at ssl_weight=0"))
    loss = trainer.loss(_rows(0))
    torch.testing.assert_close(loss, calls[0]["loss"])


# -------------------------------------------------------------------------------- feature dropout of the SSL views
def test_item_views_draw_their_masks_with_feature_dropout(data, monkeypatch):
    """``item_views`` masks the item-tower inputs with :func:`losses.feature_dropout`: at p = 0 both views are the
    plain item embedding, at p = 1 every input is dropped (every item gets the same, all-zero-input, vector), and
    in between the masks are exactly feature_dropout's for the same random state."""
    m = _trainer(data).model
    ids = torch.arange(10)
    with torch.no_grad():
        plain = m._items(ids)
        z1, z2 = m.item_views(ids, 0.0)
        torch.testing.assert_close(z1, plain)
        torch.testing.assert_close(z2, plain)
        z1, z2 = m.item_views(ids, 1.0)
        empty = torch.nn.functional.normalize(m.item_mlp(torch.zeros(1, m.cfg.embedding_dim)).float(), dim=-1)
        torch.testing.assert_close(z1, empty.expand(10, -1))
        torch.testing.assert_close(z2, empty.expand(10, -1))
        torch.manual_seed(11)
        z1, z2 = m.item_views(ids, 0.5)
        torch.manual_seed(11)
        ones = torch.ones(10, 1 + len(m.item_feat), dtype=torch.long)
        want = []
        for _ in range(2):
            keep = losses.feature_dropout(ones, 0.5).float()
            want.append(m._item_head(m._item_input(ids, m.item_feats[ids], None, id_keep=keep[:, 0],
                                                   feat_keep=keep[:, 1:])))
        torch.testing.assert_close(z1, want[0])
        torch.testing.assert_close(z2, want[1])
        assert not torch.allclose(z1, plain)
    # and it is feature_dropout that draws them (the one owner of the rule), on the [B, inputs] presence matrix
    drawn = []
    real = losses.feature_dropout
    monkeypatch.setattr(losses, "feature_dropout", lambda codes, p: drawn.append((codes.shape, p)) or real(codes, p))
    m.item_views(ids, 0.25)
    assert drawn == [((10, 1 + len(m.item_feat)), 0.25)] * 2


def test_feature_dropout_draws_one_number_per_entry_at_any_p():
    """p = 0 draws as much as any p: a run's random stream (and so its result) does not depend on ssl_dropout
    being 0 or not through the number of draws."""
    codes = torch.ones(4, 3, dtype=torch.long)
    torch.manual_seed(0)
    losses.feature_dropout(codes, 0.0)
    a = torch.rand(1)
    torch.manual_seed(0)
    losses.feature_dropout(codes, 0.4)
    b = torch.rand(1)
    assert torch.equal(a, b)
