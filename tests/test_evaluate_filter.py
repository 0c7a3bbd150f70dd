"""`recsys evaluate --filter`: models retrieve only allowed items, users are judged on allowed held-out items.

Uses the tiny clustered dataset + trained run of test_bundle.py (items i0..i63, cluster c = rows [16c, 16c + 16),
attribute ``category`` = space / cooking / football / piano per cluster; every user's held-out items are in their
own cluster). The copy scored here gives user 0 (a space user) one extra held-out item from cooking, so a filter
cuts one user's relevance without dropping them.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_bundle import ITEMS_PER_CLUSTER, index_cfg, trained

import recsys.evaluate.run as run_mod
from recsys.bundle import Bundle
from recsys.catalogue.filters import UnknownAttribute, parse_filter
from recsys.core import schema
from recsys.evaluate import evaluate, load_eval_set
from recsys.evaluate.baselines import EASE, ItemKNN, Popularity, interaction_matrix
from recsys.evaluate.run import filter_terms
from recsys.publish import export
from recsys.retrieval import retrieve

torch.set_num_threads(1)
KS = (5, 10, 20)  # 20 > the 16 allowed items: the lists must end in padding
CATEGORY = {"space": 1, "cooking": 2, "football": 3, "piano": 4}  # the dataset's feature codes
EXTRA_ITEM = ITEMS_PER_CLUSTER + 3  # a cooking item, held out for user 0 (a space user) in the copy


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(dataset copy with user 0's extra cooking item, models dir)."""
    data, run = trained(tmp_path_factory)
    models = tmp_path_factory.mktemp("filter_models")
    export(run, models, index_cfg=index_cfg(), evaluate_split=None)
    d = tmp_path_factory.mktemp("filter_data") / "data"
    shutil.copytree(data, d)
    t = pq.read_table(d / schema.TEST)
    extra = pa.table({c: pa.array([v], t.schema.field(c).type) for c, v in zip(
        t.column_names, [0, EXTRA_ITEM, max(t.column(schema.TS).to_pylist()) + 1, 1.0], strict=True)})
    pq.write_table(pa.concat_tables([t, extra]), d / schema.TEST)
    return d, models


@pytest.fixture(scope="module")
def space(setup):
    """The `category=space` report (A/B against itself, every baseline, the ef sweep), with each model's top-k
    lists captured where evaluate scores them."""
    data, models = setup
    captured: list[np.ndarray] = []
    real = run_mod.score_topk

    def spy(topk, *args, **kwargs):
        captured.append(np.array(topk))
        return real(topk, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(run_mod, "score_topk", spy)
        report = evaluate(models, data, ks=KS, compare=models, seed=0, item_filter=parse_filter(["category=space"]))
    assert len(captured) == len(report["models"])  # one scoring per model, in the report's order
    return report, dict(zip(report["models"], captured, strict=True))


def _hand_counts(data, codes: set[int]) -> tuple[int, int]:
    """(users with a held-out, not-seen-before item whose category is in ``codes``, users with any), from the
    raw files."""
    cat = dict(zip(*(pq.read_table(data / schema.ITEMS).column(c).to_pylist()
                     for c in (schema.ITEM_IDX, "feat_category")), strict=True))
    seen = dict(zip(*(pq.read_table(data / schema.SEEN).column(c).to_pylist() for c in (schema.USER_IDX, "items")),
                    strict=True))
    te = pq.read_table(data / schema.TEST).to_pydict()
    fresh = [(u, i) for u, i in zip(te[schema.USER_IDX], te[schema.ITEM_IDX], strict=True) if i not in seen[u]]
    return len({u for u, i in fresh if cat[i] in codes}), len({u for u, _ in fresh})


def test_every_recommendation_is_allowed_and_lists_pad(space, setup):
    report, topk = space
    data, _ = setup
    es = load_eval_set(data, "test")
    kept = np.array([u for u, r in zip(es.users, es.relevant, strict=True) if (r < ITEMS_PER_CLUSTER).any()])
    assert set(topk) == {"two_tower", "two_tower_hnsw", "compare", "compare_hnsw", "popularity", "itemknn", "ease"}
    for name, ids in topk.items():
        assert ids.shape == (len(kept), max(KS)), name
        got = ids[ids >= 0]
        assert got.size and (got < ITEMS_PER_CLUSTER).all(), f"{name} recommended a non-space item"
        # nothing else is a candidate: each list holds exactly the user's unseen space items, then padding
        for row, u in enumerate(kept):
            s = es.seen[int(np.flatnonzero(es.users == u)[0])]
            n_unseen = ITEMS_PER_CLUSTER - int((s < ITEMS_PER_CLUSTER).sum())
            assert (ids[row] >= 0).sum() == n_unseen, (name, u)
            assert not set(ids[row].tolist()) & set(s.tolist())
    assert report["ann_sweep"]["rows"] and report["ab"]["recall@10"]["delta"] == pytest.approx(0.0)
    for k in KS:  # coverage is over the 16 allowed items
        assert 0 < report["models"]["popularity"]["metrics"][f"coverage@{k}"] <= 1.0


def test_filter_section_counts_equal_the_hand_count(space, setup):
    report, _ = space
    data, models = setup
    kept, with_any = _hand_counts(data, {CATEGORY["space"]})
    assert (kept, with_any) == (40, 160)  # the 40 space users; the others hold no space item
    assert report["filter"] == {"terms": ["category=space"], "allowed_items": 16, "users_kept": kept,
                                "users_dropped": with_any - kept}
    assert report["users"]["users_evaluated"] == kept
    # cooking: its 40 users and user 0, whose one cooking held-out item is all they are judged on
    r = evaluate(models, data, ks=KS, baselines=(), sweep=False, item_filter=parse_filter(["category=cooking"]))
    kept, with_any = _hand_counts(data, {CATEGORY["cooking"]})
    assert kept == 41
    assert r["filter"] == {"terms": ["category=cooking"], "allowed_items": 16, "users_kept": kept,
                           "users_dropped": with_any - kept}


def test_filtered_two_tower_recall_equals_the_unfiltered_ranking_restricted_by_hand(space, setup):
    """Exact top-k among allowed items = the unfiltered full ranking with disallowed items struck out; recall is
    then over each kept user's allowed held-out items (user 0: 2 space items, not the cooking one)."""
    report, topk = space
    data, models = setup
    bundle = Bundle.load(models)
    assert report["bundles"]["two_tower"]["stored_user_embeddings"] is True  # so these are the queries it used
    es = load_eval_set(data, "test", history_len=bundle.max_history)
    full = retrieve(bundle.exact, bundle.user_embeddings[es.users], bundle.n_items, seen=es.seen)[0]  # [m, 64]
    allowed = np.arange(bundle.n_items) < ITEMS_PER_CLUSTER
    lists, rels = [], []
    for ranking, rel in zip(full, es.relevant, strict=True):
        rel = rel[allowed[rel]]
        if len(rel):
            lists.append([i for i in ranking if i >= 0 and allowed[i]])
            rels.append(rel)
    assert len(es.relevant[int(np.flatnonzero(es.users == 0)[0])]) == 3 and len(rels[0]) == 2  # user 0 is cut
    for k in KS:
        want = np.mean([len(set(lst[:k]) & set(r.tolist())) / len(r) for lst, r in zip(lists, rels, strict=True)])
        assert report["models"]["two_tower"]["metrics"][f"recall@{k}"] == pytest.approx(want, rel=1e-6)
    assert [row[row >= 0].tolist() for row in topk["two_tower"]] == [lst[: max(KS)] for lst in lists]


def test_unknown_attribute_is_an_error_naming_it(setup):
    data, models = setup
    with pytest.raises(UnknownAttribute, match="unknown attribute 'colour'.*'category'"):
        evaluate(models, data, ks=KS, baselines=(), sweep=False, item_filter=parse_filter(["colour=red"]))
    with pytest.raises(ValueError, match=r"leaves no user with a relevant item: it allows 0 of 64 items"):
        evaluate(models, data, ks=KS, baselines=(), sweep=False, item_filter=parse_filter(["category=jazz"]))


def test_filter_terms_read_back():
    terms = ["genre=Comedy,Drama", "genre!=Horror", "year>=1990", "year<=1999.5", "year=1990..1999"]
    assert filter_terms(parse_filter(terms)) == terms


def test_baselines_rank_only_allowed_items_by_hand():
    # item counts: 0 -> 3, 1 -> 2, 2 -> 1, 3 -> 0; allowed {1, 3}
    train = interaction_matrix(np.array([0, 1, 2, 0, 1, 0]), np.array([0, 0, 0, 1, 1, 2]), n_users=4, n_items=4)
    allowed = np.array([False, True, False, True])
    ids, scores = Popularity().fit(train).recommend(np.array([3, 0, 2]), k=3, allowed=allowed)
    np.testing.assert_array_equal(ids, [[1, 3, -1], [3, -1, -1], [1, 3, -1]])  # user 0 saw 0, 1, 2
    np.testing.assert_array_equal(scores[0], np.array([2, 0, -np.inf], dtype=np.float32))
    # block data: users of items {0, 1} and {2, 3}; allowing only {2, 3} hands block-0 users those (score 0)
    blocks = interaction_matrix(np.array([0, 0, 1, 2, 2, 3]), np.array([0, 1, 0, 2, 3, 2]), n_users=4, n_items=4)
    for model in (ItemKNN(k=3, shrink=0.0), EASE(l2=1.0)):
        ids, _ = model.fit(blocks).recommend(np.arange(4), k=2, allowed=np.array([False, False, True, True]))
        np.testing.assert_array_equal(ids[3], [3, -1])  # user 3 saw 2: item 3 is the only one left
        np.testing.assert_array_equal(ids[2], [-1, -1])  # user 2 saw both allowed items: nothing left
        assert sorted(ids[0]) == sorted(ids[1]) == [2, 3]  # block-0 users: the allowed items, scored 0
    with pytest.raises(ValueError, match=r"`allowed` must be a bool mask of shape \(4,\)"):
        Popularity().fit(train).recommend(np.array([0]), k=1, allowed=np.array([1, 0, 1, 0]))


def test_cli_filter_writes_the_filter_section(setup, tmp_path, capsys):
    from recsys.cli import main

    data, models = setup
    out = tmp_path / "rep"
    rc = main(["evaluate", "--bundle", str(models / schema.LATEST), "--data", str(data), "--report", str(out),
               "--k", "5,10", "--baselines", "popularity", "--no-sweep", "--no-plots",
               "--filter", "category=space,cooking", "--filter", "category!=cooking"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["filter"] == {"terms": ["category=space,cooking", "category!=cooking"], "allowed_items": 16,
                             "users_kept": 40, "users_dropped": 120}
    assert "16 items allowed, 40 users evaluated, 120 dropped" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "`category=space,cooking AND category!=cooking` allows 16 items" in md and "(filtered catalogue" in md
    with pytest.raises(SystemExit) as e:  # bad syntax: argparse names the flag before anything runs
        main(["evaluate", "--bundle", str(models), "--data", str(data), "--report", str(out), "--filter", "category"])
    assert e.value.code == 2 and "--filter: filter 'category': expected NAME=V1,V2" in capsys.readouterr().err
    rc = main(["evaluate", "--bundle", str(models), "--data", str(data), "--report", str(out), "--k", "5",
               "--no-plots", "--no-sweep", "--baselines", "", "--filter", "colour=red"])
    assert rc == 2 and "unknown attribute 'colour'" in capsys.readouterr().err
