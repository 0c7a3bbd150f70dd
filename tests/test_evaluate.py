"""Offline evaluation: an oracle bundle scores 1, known-answer eval sets, ANN vs exact, baselines, A/B, report files.

Uses the tiny clustered dataset + trained run of test_bundle.py (built once per session).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from test_bundle import HISTORY_LEN, index_cfg, make_dataset, trained

from recsys.bundle import Bundle
from recsys.core import schema
from recsys.core.io import sha256_file
from recsys.evaluate import (
    InSampleError,
    evaluate,
    load_eval_set,
    popularity_percentile,
    popularity_segments,
    write_report,
)
from recsys.publish import export

torch.set_num_threads(1)
KS = (5, 10, 20)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data, run = trained(tmp_path_factory)
    models = tmp_path_factory.mktemp("eval_models")
    export(run, models, index_cfg=index_cfg(), evaluate_split=None)
    return data, run, models


@pytest.fixture(scope="module")
def full_report(setup):
    data, _, models = setup
    bundle = Bundle.load(models)
    # the bundle against itself as the A/B "compare": a known answer of zero difference
    return bundle, evaluate(bundle, data, ks=KS, compare=models, seed=0)


def _resign(path: Path) -> None:
    """Recompute the manifest's checksums after a deliberate rewrite (the oracle bundle is trusted here)."""
    m = json.loads((path / "manifest.json").read_text())
    for name in m["files"]:
        m["files"][name] = {"sha256": sha256_file(path / name), "size": (path / name).stat().st_size}
    (path / "manifest.json").write_text(json.dumps(m))


def test_oracle_bundle_scores_one(setup, tmp_path):
    """Item vectors one-hot, each user's vector = the normalised sum of their held-out items: perfect ranking."""
    from recsys.retrieval import HnswIndex

    data, _, models = setup
    src = Bundle.load(models)
    oracle = tmp_path / "oracle"
    shutil.copytree(src.path, oracle)
    n_items, dim = src.n_items, src.dim
    items = np.eye(n_items, dim, dtype=np.float32)  # dim == n_items: orthonormal
    test = pq.read_table(data / schema.TEST).to_pydict()
    users = np.zeros((src.n_users, dim), dtype=np.float32)
    for u, i in zip(test[schema.USER_IDX], test[schema.ITEM_IDX], strict=True):
        users[u] += items[i]
    users /= np.linalg.norm(users, axis=1, keepdims=True)
    np.save(oracle / schema.ITEM_EMBEDDINGS, items)
    np.save(oracle / schema.USER_EMBEDDINGS, users)
    HnswIndex(items, num_threads=1).save(oracle / schema.INDEX_FILE)
    _resign(oracle)

    r = evaluate(oracle, data, ks=(1, 2, 5), baselines=(), sweep=False)
    m = r["models"]["two_tower"]["metrics"]
    # every user has exactly 2 relevant items, both ranked first (order between them is a tie)
    assert r["users"]["users_evaluated"] == 160
    assert m["recall@2"] == pytest.approx(1.0) and m["recall@5"] == pytest.approx(1.0)
    assert m["recall@1"] == pytest.approx(0.5)  # 1 hit of 2 relevant
    assert m["ndcg@2"] == pytest.approx(1.0) and m["hit_rate@1"] == 1.0
    assert m["mrr"] == pytest.approx(1.0) and m["map@2"] == pytest.approx(1.0)
    assert r["bundles"]["two_tower"]["stored_user_embeddings"] is True
    assert 0.0 <= r["ann"]["two_tower"]["ann_recall@2"] <= 1.0


def test_report_models_metrics_and_quality_bands(full_report):
    _, r = full_report
    assert set(r["models"]) == {"two_tower", "two_tower_hnsw", "compare", "compare_hnsw", "popularity", "itemknn",
                                "ease"}
    for m in r["models"].values():
        for k in KS:
            for key in ("recall", "ndcg", "hit_rate", "map", "coverage", "pop_percentile"):
                assert 0.0 <= m["metrics"][f"{key}@{k}"] <= 1.0
        assert 0.0 <= m["metrics"]["mrr"] <= 1.0
    tt, pop = r["models"]["two_tower"]["metrics"], r["models"]["popularity"]["metrics"]
    # clustered data: 6 unseen items in the user's cluster, 2 of them relevant; cluster-blind popularity is weak
    assert tt["recall@10"] >= 0.8
    assert pop["recall@10"] <= 0.35
    assert r["models"]["itemknn"]["metrics"]["recall@10"] >= 0.6
    # popularity bias: the popularity baseline recommends the most popular items, by construction
    assert pop["pop_percentile@5"] > tt["pop_percentile@5"]
    assert pop["coverage@5"] < tt["coverage@5"]
    assert r["summary"]["recall@10"] == tt["recall@10"] and "ann_recall@10" in r["summary"]


def test_ann_against_exact_is_reported(full_report):
    _, r = full_report
    for k in KS:
        assert 0.95 <= r["ann"]["two_tower"][f"ann_recall@{k}"] <= 1.0
    assert r["models"]["two_tower_hnsw"]["retrieval"] == "hnsw"
    assert abs(r["models"]["two_tower_hnsw"]["metrics"]["recall@10"] - r["models"]["two_tower"]["metrics"]["recall@10"]) <= 0.05
    sweep = r["ann_sweep"]
    assert sweep["k"] == 5 and sweep["tuned_ef"] in [row["ef"] for row in sweep["rows"]]
    assert all(0.0 <= row["recall"] <= 1.0 and row["p50_ms"] > 0 for row in sweep["rows"])
    assert sweep["rows"][-1]["recall"] >= 0.99 and sweep["exact"]["recall"] == 1.0


def test_ab_of_a_bundle_with_itself_is_zero(full_report):
    _, r = full_report
    for k in KS:
        ab = r["ab"][f"recall@{k}"]
        assert ab["a"] == ab["b"] and ab["delta"] == 0.0 and ab["ci95"] == [0.0, 0.0]
        assert ab["a_better_users"] == ab["b_better_users"] == 0


def test_segments_known_counts(full_report):
    _, r = full_report
    seg = r["models"]["two_tower"]["segments"]
    # every 4th user (u % 4 == 3) has 4 prior items: cold; every 4th (u % 4 == 0) has a test-only ("new") item
    assert seg["users:cold"]["n_users"] == 40 and seg["users:warm"]["n_users"] == 120
    assert seg["items:new"]["n_users"] == 40 and seg["items:new"]["n_relevant"] == 40
    assert r["users"]["new_items"] == 4
    n_rel = sum(seg[s]["n_relevant"] for s in ("items:head", "items:torso", "items:tail"))
    assert n_rel == 320  # 160 users x 2 held-out items, each in exactly one popularity segment
    # the popularity baseline never reaches new items (no train interactions)
    assert r["models"]["popularity"]["segments"]["items:new"]["metrics"]["recall@20"] == 0.0


def test_report_files(full_report, tmp_path):
    bundle, r = full_report
    written = write_report(r, tmp_path / "rep", bundle=bundle, embedding_map="pca")
    for name in ("report.json", "report.md", "recall_at_k.png", "ann_tradeoff.png", "item_embeddings.png"):
        assert (tmp_path / "rep" / name).is_file(), name
    for png in ("recall_at_k", "ann_tradeoff", "item_embeddings"):
        assert written[png].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    back = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert {"models", "ann", "ann_sweep", "ab", "segments_definition", "users", "summary", "plots", "ks",
            "embedding_map"} <= set(back)
    assert back["embedding_map"] == {"method": "pca", "n_points": 64, "feature": "category"}
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| two_tower | exact |" in md and "| two_tower_hnsw | hnsw |" in md and "![recall_at_k]" in md
    assert "## A/B" in md


def test_eval_set_known_answer(setup, tmp_path):
    """Relevant = held-out items minus those seen before; valid uses train-only histories/exclusions."""
    data, _, _ = setup
    d = tmp_path / "d"
    shutil.copytree(data, d)
    tr = pq.read_table(d / schema.TRAIN).to_pydict()
    va = pq.read_table(d / schema.VALID).to_pydict()
    te = pq.read_table(d / schema.TEST).to_pydict()

    def items_of(t, u):
        return [i for uu, i in zip(t[schema.USER_IDX], t[schema.ITEM_IDX], strict=True) if uu == u]

    # user 1 re-consumes a train item in test: it is not relevant (it is excluded from every list)
    reseen = items_of(tr, 1)[0]
    t = pq.read_table(d / schema.TEST)
    extra = pa.table({c: pa.array([v], t.schema.field(c).type) for c, v in
                      zip(t.column_names, [1, reseen, max(te[schema.TS]) + 1, 1.0], strict=True)})
    pq.write_table(pa.concat_tables([t, extra]), d / schema.TEST)
    es = load_eval_set(d, "test")
    assert es.counts["split_pairs_seen_before"] == 1 and es.counts["split_pairs"] == 321
    row = int(np.flatnonzero(es.users == 1)[0])
    assert sorted(es.relevant[row].tolist()) == sorted(items_of(te, 1))
    assert sorted(es.seen[row].tolist()) == sorted(items_of(tr, 1) + items_of(va, 1))

    ev = load_eval_set(d, "valid", history_len=HISTORY_LEN)
    row = int(np.flatnonzero(ev.users == 0)[0])
    assert sorted(ev.relevant[row].tolist()) == sorted(items_of(va, 0))
    assert sorted(ev.seen[row].tolist()) == sorted(items_of(tr, 0))
    assert ev.history[row].tolist() == items_of(tr, 0)[-HISTORY_LEN:]  # time order, oldest first
    assert ev.fit_matrix.nnz == len(tr[schema.USER_IDX])  # baselines fit on train only for valid
    with pytest.raises(ValueError, match="`split` must be 'valid' or 'test'"):
        load_eval_set(d, "train")


def test_valid_split_embeds_users_with_train_history(setup):
    data, _, models = setup
    # the bundle's refit trained on valid: refused unless marked in-sample
    with pytest.raises(InSampleError, match="'valid' split it trained on"):
        evaluate(models, data, split="valid", ks=KS, baselines=("popularity",), sweep=False)
    r = evaluate(models, data, split="valid", ks=KS, baselines=("popularity",), sweep=False, in_sample=True)
    assert set(r["in_sample"]) == {"two_tower"}
    info = r["bundles"]["two_tower"]
    assert info["stored_user_embeddings"] is False and info["users_unknown_to_bundle"] == 0
    assert r["models"]["two_tower"]["metrics"]["recall@10"] >= 0.6


def _permuted_copy(src: Path, dst: Path, *, rename_user: str | None = None) -> Path:
    """The same dataset with item and user rows reversed (external ids kept): another vocabulary order."""
    shutil.copytree(src, dst)
    items, users = pq.read_table(src / schema.ITEMS), pq.read_table(src / schema.USERS)
    ni, nu = items.num_rows, users.num_rows
    imap, umap = np.arange(ni)[::-1].copy(), np.arange(nu)[::-1].copy()  # old row -> new row

    def reorder(t, n, idx_col):
        t = t.take(pa.array(np.arange(n)[::-1].copy()))
        return t.set_column(t.column_names.index(idx_col), idx_col, pa.array(np.arange(n), pa.int32()))

    pq.write_table(reorder(items, ni, schema.ITEM_IDX), dst / schema.ITEMS)
    u = reorder(users, nu, schema.USER_IDX)
    if rename_user is not None:
        ids = [("new-" + x if x == rename_user else x) for x in u.column(schema.USER_ID).to_pylist()]
        u = u.set_column(u.column_names.index(schema.USER_ID), schema.USER_ID, pa.array(ids))
    pq.write_table(u, dst / schema.USERS)
    for split in ("train", "valid", "test"):
        t = pq.read_table(src / schema.SPLITS[split])
        t = t.set_column(0, schema.USER_IDX, pa.array(umap[t.column(schema.USER_IDX).to_numpy()], pa.int32()))
        t = t.set_column(1, schema.ITEM_IDX, pa.array(imap[t.column(schema.ITEM_IDX).to_numpy()], pa.int32()))
        pq.write_table(t, dst / schema.SPLITS[split])
    for name in (schema.HISTORY, schema.SEEN):
        t = pq.read_table(src / name).to_pydict()
        pq.write_table(pa.table({
            schema.USER_IDX: pa.array(umap[np.array(t[schema.USER_IDX])], pa.int32()),
            "items": pa.array([imap[np.array(x, dtype=np.int64)].tolist() for x in t["items"]], pa.list_(pa.int32())),
        }), dst / name)  # fmt: skip
    (dst / schema.MANIFEST).write_text(json.dumps({"schema_version": 1, "fingerprint": "permuted"}))
    return dst


def test_other_vocabulary_is_matched_by_external_id(setup, full_report, tmp_path):
    """A dataset with another row order gives the same two-tower metrics (users re-embedded by the towers)."""
    data, _, models = setup
    _, ref = full_report
    perm = _permuted_copy(data, tmp_path / "perm")
    r = evaluate(models, perm, ks=KS, baselines=(), sweep=False)
    assert r["bundles"]["two_tower"]["same_vocabulary"] is False
    assert r["bundles"]["two_tower"]["stored_user_embeddings"] is False
    for key, v in ref["models"]["two_tower"]["metrics"].items():
        assert r["models"]["two_tower"]["metrics"][key] == pytest.approx(v, abs=1e-9), key
    # a user the bundle never saw is embedded from history alone
    perm2 = _permuted_copy(data, tmp_path / "perm2", rename_user="u8")
    r2 = evaluate(models, perm2, ks=KS, baselines=(), sweep=False)
    assert r2["bundles"]["two_tower"]["users_unknown_to_bundle"] == 1
    assert abs(r2["models"]["two_tower"]["metrics"]["recall@10"] - ref["models"]["two_tower"]["metrics"]["recall@10"]) <= 1 / 160 + 1e-9


def test_popularity_segments_hand_worked():
    # shares before each item (ranked): 0, .5, .8, .9 -> head, torso, tail, tail
    assert popularity_segments(np.array([5, 3, 1, 1])).tolist() == [0, 1, 2, 2]
    assert popularity_segments(np.array([1, 5, 1, 3])).tolist() == [2, 0, 2, 1]
    np.testing.assert_allclose(popularity_percentile(np.array([5, 3, 1, 1])), [1.0, 0.75, 0.375, 0.375])


def test_bad_arguments_name_the_parameter(setup):
    data, _, models = setup
    with pytest.raises(ValueError, match="`ks` must be at most the catalogue size 64, got 100"):
        evaluate(models, data, ks=(10, 100), baselines=(), sweep=False)
    with pytest.raises(ValueError, match="unknown baseline 'svd'"):
        evaluate(models, data, ks=KS, baselines=("svd",))
    with pytest.raises(ValueError, match="`ks` values must be integers >= 1, got 0"):
        evaluate(models, data, ks=(0,))


def test_cli_evaluate(setup, tmp_path, capsys):
    from recsys.cli import main

    data, _, models = setup
    out = tmp_path / "rep"
    rc = main(["evaluate", "--bundle", str(models / schema.LATEST), "--data", str(data), "--report", str(out),
               "--k", "5,10", "--baselines", "popularity", "--no-sweep", "--embedding-map", "pca"])
    assert rc == 0
    rep = json.loads((out / "report.json").read_text())
    assert rep["ks"] == [5, 10] and set(rep["models"]) == {"two_tower", "two_tower_hnsw", "popularity"}
    assert "two_tower" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # argparse rejects the flag before anything runs
        main(["evaluate", "--bundle", str(models), "--data", str(data), "--report", str(out), "--k", "5,x"])
    assert e.value.code == 2 and "--k must be comma-separated integers, got '5,x'" in capsys.readouterr().err


def test_dataset_helper_is_deterministic(tmp_path):
    a, b = make_dataset(tmp_path / "a"), make_dataset(tmp_path / "b")
    for name in (schema.TRAIN, schema.TEST, schema.SEEN):
        assert pq.read_table(a / name).equals(pq.read_table(b / name))
