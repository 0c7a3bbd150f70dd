"""New items from raw features (recsys.catalogue.encode): the codes prepare would give them, and vectors from the
bundle's item tower (features + title, ID dropped) that land with their topic.

One bundle for the module: raw CSV logs + an items file (a category with stray whitespace, "|"-separated genres, a
year, a title) of clustered users (4 topics) -> ``prepare`` -> a tiny ``train`` with ``model.use_text`` ->
``export``. The title tests need the `text` extra (part of `dev`).
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from recsys.bundle import Bundle
from recsys.catalogue.encode import EncodedItems, embed_new_items, encode_items, read_items
from recsys.core import schema
from recsys.core.data import feature_codes
from recsys.prepare import PrepareConfig, prepare
from recsys.publish import export
from recsys.retrieval import IndexConfig
from recsys.train.config import LossConfig, ModelConfig, TrainConfig
from recsys.train.loop import train
from recsys.train.model import PRIOR_BOUND

torch.set_num_threads(1)

TOPICS = {  # topic -> (category, its genres, title words)
    "space": ("Space", ["sci-fi", "adventure"], "space rocket galaxy astronaut"),
    "food": ("Food", ["cooking", "family"], "cooking recipe pasta kitchen"),
    "sport": ("Sport", ["football", "action"], "football match goal stadium"),
    "music": ("Music", ["piano", "concert"], "piano concert music orchestra"),
}
ITEMS_PER_TOPIC = 12
USERS_PER_TOPIC = 20
PER_USER = 9
CONFIG = PrepareConfig(multi_valued={"genres": "|"}, kcore_users=1)


def _write_raw(d, rng: np.random.Generator) -> tuple[str, str, dict[str, str]]:
    """events.csv + items.csv; item -> topic. Items ``x*`` have no events (never in the bundle)."""
    items, topic_of = [], {}
    for t, (cat, genres, words) in TOPICS.items():
        for j in range(ITEMS_PER_TOPIC + 2):
            iid = f"{t}{j}" if j < ITEMS_PER_TOPIC else f"x{t}{j}"
            g = [genres[j % 2]] + (["misc"] if j % 3 == 0 else []) + ([genres[1 - j % 2]] if j % 4 == 0 else [])
            items.append({
                "item_id": iid,
                "category": f" {cat} " if j % 5 == 0 else cat,  # prepare strips the whitespace
                "genres": "|".join(g) + ("| " if j % 6 == 0 else ""),  # a blank value: coded as prepare codes it
                "year": 1990 + j % 4,
                "title": None if j == 1 else f"{words} {j}",
            })
            topic_of[iid] = t
    pl.DataFrame(items).write_csv(d / "items.csv")
    ev = []
    for t in TOPICS:
        for u in range(USERS_PER_TOPIC):
            for k, j in enumerate(rng.choice(ITEMS_PER_TOPIC, size=PER_USER, replace=False)):
                ev.append({"user_id": f"{t}-u{u}", "item_id": f"{t}{j}", "timestamp": 1_600_000_000 + 3600 * k + u})
    pl.DataFrame(ev).write_csv(d / "events.csv")
    return str(d / "events.csv"), str(d / "items.csv"), topic_of


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """(the prepared dataset, items.csv path, item -> topic)."""
    d = tmp_path_factory.mktemp("catalogue")
    events, items, topic_of = _write_raw(d, np.random.default_rng(0))
    prepare(events, d / "prepared", items=items, config=CONFIG)
    return d / "prepared", items, topic_of


def _bundle(data, out, **model_over) -> Bundle:
    model = ModelConfig(dim=16, embedding_dim=16, history_len=8, **model_over)
    tr = TrainConfig(batch_size=64, lr=0.01, epochs=6, progress=False, tensorboard=False, patience=0, refit=False,
                     num_threads=1)
    train(data, out / "run", model_cfg=model, train_cfg=tr, loss_cfg=LossConfig(temperature=0.1), device="cpu")
    return Bundle.load(export(out / "run", out / "models", index_cfg=IndexConfig(num_threads=1),
                              evaluate_split=None))


@pytest.fixture(scope="module")
def world(raw, tmp_path_factory):
    """(bundle of a model with titles, items.csv path, item -> topic)."""
    data, items, topic_of = raw
    return _bundle(data, tmp_path_factory.mktemp("text"), use_text=True), items, topic_of


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def test_existing_items_encode_to_their_stored_codes(world):
    """Known answer: the items file's raw values of the bundle's items, encoded, are the codes prepare stored."""
    bundle, items, _ = world
    rows = [r for r in read_items(items, config=CONFIG) if bundle.item_row(r["item_id"]) is not None]
    assert len(rows) == bundle.n_items
    assert any(r["category"] != r["category"].strip() for r in rows) and all(isinstance(r["genres"], list) for r in rows)
    enc = encode_items(bundle, rows)
    assert enc.unknown == []
    model = bundle.model
    assert model.item_feature_names == ["category", "genres", "year"]
    item_rows = np.array([bundle.item_row(r["item_id"]) for r in rows])
    stored = np.concatenate([feature_codes(bundle.item_table.column(schema.FEAT_PREFIX + n)).reshape(bundle.n_items, -1)
                             for n in model.item_feature_names], axis=1)[item_rows]
    assert stored.shape[1] > 3  # genres take several columns
    np.testing.assert_array_equal(enc.codes, stored)
    np.testing.assert_array_equal(enc.codes, model.item_feats[torch.as_tensor(item_rows)].numpy())
    assert enc.titles == [bundle.item_table.column(schema.TITLE)[int(i)].as_py() for i in item_rows]

    # and the vectors: the features-only path on the stored codes + the title embeddings training used
    with torch.no_grad():
        want = model.encode_item_features(model.item_feats[torch.as_tensor(item_rows)],
                                          model.item_text[torch.as_tensor(item_rows)]).numpy()
    got = embed_new_items(bundle, enc)
    assert got.shape == (bundle.n_items, bundle.dim) and got.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_unknown_values_become_zero_and_are_listed(world):
    bundle, _, _ = world
    rows = [{"item_id": "new1", "category": "  Music", "genres": ["piano ", "opera", "piano"], "year": 1991},
            {"item_id": "new2", "category": "Cinema", "year": "1990"},
            {"item_id": "new3"}]
    enc = encode_items(bundle, rows)
    assert isinstance(enc, EncodedItems) and enc.item_ids == ["new1", "new2", "new3"]
    assert enc.unknown == [("new1", "genres", "opera"), ("new2", "category", "Cinema")]
    vocab = {(r["feature"], r["value"]): r["code"]
             for r in pl.read_parquet(bundle.path / schema.FEATURE_VOCAB).filter(pl.col("entity") == "item").to_dicts()}
    w = enc.codes.shape[1]
    assert enc.codes[0, 0] == vocab["category", "Music"]
    assert enc.codes[0, 1] == vocab["genres", "piano"] and enc.codes[0, 2:w - 1].sum() == 0  # opera dropped, piano once
    assert enc.codes[0, w - 1] == vocab["year", "1991"] and enc.codes[1, w - 1] == vocab["year", "1990"]  # 1990 == "1990"
    assert enc.codes[1, 0] == 0 and not enc.codes[2].any()
    assert enc.titles == [None, None, None]
    z = embed_new_items(bundle, enc)
    assert z.shape == (3, bundle.dim) and np.isfinite(z).all()


@pytest.mark.parametrize("rows, match", [
    ([{"item_id": "n", "colour": "red"}], r"unknown item feature 'colour'.*\['category', 'genres', 'year'\]"),
    ([{"item_id": "n", "genres": "piano|concert"}], r"row 0, field 'genres': a multi-valued feature takes a list"),
    ([{"item_id": "n", "category": ["Music"]}], r"row 0, field 'category': a single-valued"),
    ([{"item_id": "n"}, {"item_id": " "}], r"row 1, field 'item_id'.*got ' '"),
    ([{"item_id": "n"}, {"item_id": "n"}], r"row 1, field 'item_id': item 'n' is repeated"),
    ([{"item_id": "n", "year": {"y": 1}}], r"row 0, field 'year'.*got \{'y': 1\}"),
    ([{"item_id": "n", "title": 3}], r"row 0, field 'title'.*got 3"),
])
def test_bad_rows_are_refused_by_name(world, rows, match):
    with pytest.raises(ValueError, match=match):
        encode_items(world[0], rows)


def test_read_items_names_the_bad_row(tmp_path):
    f = tmp_path / "items.csv"
    f.write_text("item_id,genres,title\na,x|y,first\nb,z,second\na,x,again\n")
    with pytest.raises(ValueError, match=r"items.csv: row 3, column 'item_id': duplicate item ID 'a'"):
        read_items(f, config=CONFIG)
    f.write_text("item_id,genres,title\na,x| y|x,first\nb,,\n")
    assert read_items(f, config=CONFIG) == [{"item_id": "a", "genres": ["x", " y", "x"], "title": "first"},
                                             {"item_id": "b", "genres": None}]
    with pytest.raises(ValueError, match=r"`prepare.multi_valued` names column\(s\) \['tags'\]"):
        read_items(f, config=PrepareConfig(multi_valued={"tags": ","}))


def test_near_identical_titles_without_interactions_get_near_identical_vectors(world):
    bundle, _, _ = world
    rows = [{"item_id": "a", "title": "piano concert music tonight"},
            {"item_id": "b", "title": "piano concert music tonight!"},
            {"item_id": "c", "title": "football match goal highlights"}]
    z = embed_new_items(bundle, encode_items(bundle, rows))
    near, far = _cos(z[0], z[1]), _cos(z[0], z[2])
    assert near > 0.98, near
    assert far < near - 0.1, (near, far)


@pytest.mark.parametrize("topic", list(TOPICS))
def test_title_only_item_ranks_high_for_users_of_its_topic(world, topic):
    """An item upserted with only a title (no category, no genres, no events), scored against every user's stored
    embedding: the users of its topic put it above the other users (AUC), and on average above most trained items."""
    bundle, _, _ = world
    title = {"space": "astronaut rocket galaxy voyage", "food": "pasta recipe kitchen dinner",
             "sport": "stadium football goal final", "music": "orchestra piano concert evening"}[topic]
    z = embed_new_items(bundle, encode_items(bundle, [{"item_id": "new", "title": title}]))[0]
    scores = bundle.user_embeddings @ z  # [n_users]
    mine = np.array([u.split("-")[0] == topic for u in bundle.user_ids])
    pos, neg = scores[mine], scores[~mine]
    auc = (pos[:, None] > neg[None, :]).mean()
    assert auc >= 0.9, auc
    # within its users' rankings it sits among the topic's items: above every other topic's trained items for most
    item_scores = bundle.user_embeddings[mine] @ bundle.item_embeddings.T  # [n_mine, n_items]
    other = np.array([not t.startswith(topic) for t in bundle.item_ids])
    above = (pos[:, None] > item_scores[:, other]).mean()
    assert above >= 0.8, above


def test_new_items_get_the_prior_of_an_item_without_events(raw, tmp_path):
    """``model.time_prior``: the served vectors are ``[v, h, rest] / sqrt(1 + K P^2)`` (``TwoTower.served_items``),
    longer than the towers' ``dim``; a new item's ``h`` is that of an item without events, the same for every new
    item, whatever its features."""
    bundle = _bundle(raw[0], tmp_path, time_prior=True)
    model = bundle.model
    k, dim = model.cfg.time_prior_rank, model.dim
    assert bundle.dim == dim + k + 1 > bundle.tower_dim == dim
    z = embed_new_items(bundle, encode_items(bundle, [{"item_id": "n1", "category": "Music", "genres": ["piano"]},
                                                  {"item_id": "n2", "category": "Food", "year": 1993}]))
    assert z.shape == (2, bundle.dim)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    with torch.no_grad():
        h = model.item_prior(model.item_cold[None, :])[0].numpy()  # [K]
    c = np.sqrt(1.0 + k * PRIOR_BOUND**2)
    want = np.concatenate([h, [np.sqrt(k * PRIOR_BOUND**2 - h @ h)]]) / c
    np.testing.assert_allclose(z[:, dim:], np.stack([want, want]), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(z[:, :dim], axis=1), 1.0 / c, atol=1e-5)  # v: a unit vector / c
    assert not np.allclose(z[0, :dim], z[1, :dim], atol=1e-3)  # the features still tell them apart
