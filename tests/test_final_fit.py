"""Serve what the logs say: the published model and its serving state cover every kept interaction.

Hand-built logs where each user's newest event is known: 4 taste clusters of 20 items, 12 users each, 10 events per
user in time order. ``prepare`` (defaults but a 1-core, so every row is kept) puts each user's last event in test
and the one before it in valid; the default ``train.final_fit = "all"`` must then train on, remember and exclude
those newest events. The newest event of three users is a brand-new item nobody had before: its rows are cold (the
extra split) and the published model must know it too. ``train_valid`` is the documented way back to the holdout
model, and shows the checks can fail.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from recsys.bundle import Bundle
from recsys.cli import main
from recsys.core import schema
from recsys.evaluate import InSampleError, evaluate, render_markdown
from recsys.prepare import PrepareConfig, prepare
from recsys.publish import export
from recsys.retrieval import IndexConfig
from recsys.train.config import LossConfig, ModelConfig, TrainConfig
from recsys.train.loop import train
from server.service import recommend

torch.set_num_threads(1)

N_CLUSTERS, ITEMS_PER_CLUSTER, USERS_PER_CLUSTER, EVENTS = 4, 20, 12, 10
NEW_ITEM, NEW_ITEM_USERS = "i_new", ("u0", "u1", "u2")  # the newest event of these users (cluster 0)
N_ITEMS = N_CLUSTERS * ITEMS_PER_CLUSTER + 1
TINY_MODEL = ModelConfig(dim=16, embedding_dim=16, history_len=8)


def write_logs(path: Path, *, seed: int = 0) -> dict[str, list[str]]:
    """A CSV of raw logs; returns each user's items in time order (the last one is their newest event)."""
    rng = np.random.default_rng(seed)
    events: dict[str, list[str]] = {}
    rows = []
    for u in range(N_CLUSTERS * USERS_PER_CLUSTER):
        c = u // USERS_PER_CLUSTER
        items = c * ITEMS_PER_CLUSTER + rng.choice(ITEMS_PER_CLUSTER, size=EVENTS, replace=False)
        events[f"u{u}"] = [f"i{i}" for i in items]
        if f"u{u}" in NEW_ITEM_USERS:
            events[f"u{u}"][-1] = NEW_ITEM
        rows += [(f"u{u}", i, 1_700_000_000 + 3600 * t + u) for t, i in enumerate(events[f"u{u}"])]
    rng.shuffle(rows)  # the logs' order is not time order
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(rows)
    return events


def tiny_train(**over) -> TrainConfig:
    return TrainConfig(**{"batch_size": 64, "lr": 0.01, "epochs": 3, "progress": False, "tensorboard": False,
                          "patience": 0, "num_threads": 1, **over})


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[str]]]:
    root = tmp_path_factory.mktemp("final_fit")
    events = write_logs(root / "logs.csv")
    prepare([root / "logs.csv"], root / "data", config=PrepareConfig(kcore_users=1, kcore_items=1))
    return root, events


def _publish(root: Path, name: str, **train_over) -> tuple[dict, Bundle]:
    summary = train(root / "data", root / f"run-{name}", model_cfg=TINY_MODEL, train_cfg=tiny_train(**train_over),
                    loss_cfg=LossConfig(), device="cpu")
    path = export(root / f"run-{name}", root / f"models-{name}", index_cfg=IndexConfig(num_threads=1))
    return summary, Bundle.load(path)


@pytest.fixture(scope="module")
def published(logs) -> tuple[dict, Bundle]:
    """The default path: prepare -> train -> export."""
    return _publish(logs[0], "all")


@pytest.fixture(scope="module")
def holdout(logs) -> tuple[dict, Bundle]:
    """The opt-out: the published model leaves test unseen."""
    return _publish(logs[0], "holdout", final_fit="train_valid")


def test_final_fit_trains_on_every_kept_row(logs, published) -> None:
    root, _ = logs
    summary, bundle = published
    counts = json.loads((root / "data" / schema.MANIFEST).read_text())["counts"]
    kept = counts["train"] + counts["valid"] + counts["test"] + counts["extra"]
    # one newest event per user in test, but the new item's: no train row, so not scorable -> extra
    assert (counts["test"], counts["extra"]) == (N_CLUSTERS * USERS_PER_CLUSTER - 3, 3)
    assert summary["final_fit"]["splits"] == ["train", "valid", "test", "extra"]
    assert summary["final_fit"]["rows"] == kept == N_CLUSTERS * USERS_PER_CLUSTER * EVENTS
    assert bundle.manifest["trained_on"] == summary["final_fit"]
    # the popularity counts of the bundle count every kept row too
    assert int(bundle.item_popularity.sum()) == kept
    # the held-out estimate is the fit's validation metrics, labelled as such (test is in-sample)
    ev = bundle.manifest["evaluation"]
    assert ev["split"] == "valid" and ev["source"].startswith("holdout run") and "ndcg@20" in ev


def test_serving_state_holds_and_excludes_the_newest_event(logs, published) -> None:
    _, events = logs
    _, bundle = published
    for user, items in events.items():
        row = bundle.user_row(user)
        newest = bundle.item_row(items[-1])
        assert newest in bundle.seen_items(row).tolist()
        assert bundle.history(row)[-1] == newest  # oldest first: the newest event ends the history
        assert sorted(bundle.item_ids[bundle.seen_items(row)].tolist()) == sorted(items)
        rec = recommend(bundle, user_id=user, k=bundle.n_items)
        assert items[-1] not in rec.item_ids and not set(items) & set(rec.item_ids)
        assert len(rec.item_ids) == bundle.n_items - EVENTS == N_ITEMS - EVENTS


def test_holdout_setting_keeps_test_out_of_model_and_state(logs, holdout) -> None:
    _, events = logs
    summary, bundle = holdout
    assert summary["final_fit"]["splits"] == ["train", "valid"]
    assert bundle.manifest["trained_on"]["splits"] == ["train", "valid"]
    newest = [bundle.item_row(items[-1]) for items in events.values()]
    assert all(n not in bundle.seen_items(bundle.user_row(u)).tolist() for u, n in zip(events, newest, strict=True))
    # the new item is in the vocabulary but nobody's seen set: the holdout fit never trained on its rows
    assert bundle.item_popularity[bundle.item_row(NEW_ITEM)] == 0
    assert bundle.manifest["evaluation"]["split"] == "test"  # a real held-out evaluation at export


def test_evaluate_refuses_a_bundle_fit_on_the_split(logs, published, holdout) -> None:
    root, _ = logs
    _, bundle = published
    with pytest.raises(InSampleError, match=rf"bundle '{bundle.version}' was trained on these interactions.*"
                                            r"'test' split it trained on"):
        evaluate(bundle, root / "data", split="test", baselines=(), sweep=False, ks=(10, 20))
    with pytest.raises(InSampleError, match="'valid' split"):
        evaluate(bundle, root / "data", split="valid", baselines=(), sweep=False, ks=(10, 20))
    marked = evaluate(bundle, root / "data", split="test", baselines=(), sweep=False, ks=(10, 20), in_sample=True)
    assert set(marked["in_sample"]) == {"two_tower"} and "IN-SAMPLE" in render_markdown(marked)
    # the holdout bundle is scored on test without a flag, and nothing is marked
    report = evaluate(holdout[1], root / "data", split="test", baselines=(), sweep=False, ks=(10, 20))
    assert report["in_sample"] is None and "IN-SAMPLE" not in render_markdown(report)
    # ...but an A/B against the fit-on-everything bundle is refused again
    with pytest.raises(InSampleError):
        evaluate(holdout[1], root / "data", split="test", baselines=(), sweep=False, ks=(10, 20), compare=bundle)


def test_cli_evaluate_refusal_names_both_and_in_sample_flag(logs, published, capsys) -> None:
    root, _ = logs
    _, bundle = published
    args = ["evaluate", "--bundle", str(bundle.path), "--data", str(root / "data"), "--baselines", "",
            "--no-plots", "--no-sweep", "--k", "10,20", "--report", str(root / "report-cli")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert bundle.version in err and str(root / "data" / "test.parquet") in err and "--in-sample" in err
    assert main([*args, "--in-sample"]) == 0
    assert json.loads((root / "report-cli" / "report.json").read_text())["in_sample"]


def test_empty_test_split_through_every_command(tmp_path: Path, capsys) -> None:
    events = write_logs(tmp_path / "logs.csv", seed=1)
    data, run, models = tmp_path / "data", tmp_path / "run", tmp_path / "models"
    assert main(["prepare", "--logs", str(tmp_path / "logs.csv"), "--out", str(data), "--set",
                 "prepare.test_frac=0", "--set", "prepare.kcore_items=1"]) == 0
    assert json.loads((data / schema.MANIFEST).read_text())["counts"]["test"] == 0
    assert main(["train", "--data", str(data), "--out", str(run), "--set", "train.epochs=2", "--set",
                 "train.progress=false", "--set", "model.dim=16", "--set", "model.embedding_dim=16"]) == 0
    summary = json.loads((run / schema.SUMMARY).read_text())
    # nothing from test (empty); the new item's rows, cold, are in extra
    assert summary["final_fit"]["splits"] == ["train", "valid", "extra"]
    assert main(["export", "--run", str(run), "--models", str(models)]) == 0
    bundle = Bundle.load(models)
    newest = events["u4"][-1]  # in valid now, so seen
    assert newest in bundle.item_ids[bundle.seen_items(bundle.user_row("u4"))].tolist()
    capsys.readouterr()
    assert main(["evaluate", "--bundle", str(models), "--data", str(data), "--report", str(tmp_path / "r"),
                 "--baselines", "", "--no-plots", "--no-sweep", "--k", "10,20"]) == 2
    assert "test.parquet' holds no interactions" in capsys.readouterr().err


def test_model_info_says_what_the_model_knows(logs, published, holdout) -> None:
    from recsys.v1 import recommender_pb2 as pb
    from server import service

    root, _ = logs
    summary, bundle = published
    info = service.model_info(bundle)
    pb.ModelInfo(**info)  # every key is a ModelInfo field
    assert info["trained_interactions"] == summary["final_fit"]["rows"] == N_CLUSTERS * USERS_PER_CLUSTER * EVENTS
    assert info["items_in_logs"] == info["n_items"] == N_ITEMS  # a 1-core keeps them all
    # the newest event of the logs: the last user's last event (ts = start + 3600 * 9 + u, in seconds)
    newest_s = 1_700_000_000 + 3600 * (EVENTS - 1) + N_CLUSTERS * USERS_PER_CLUSTER - 1
    assert info["trained_until"] == f"{np.datetime64(newest_s, 's')}Z"
    assert "valid.ndcg@20" in info["evaluation"] and not any(k.startswith("test.") for k in info["evaluation"])
    held = service.model_info(holdout[1])
    assert "test.recall@20" in held["evaluation"] and held["trained_interactions"] < info["trained_interactions"]


def test_a_brand_new_item_is_learned_and_served(published, holdout) -> None:
    """Its rows are all in the newest period: the final fit trains on them, so it is counted, seen and embedded
    near its cluster; the holdout model only has the untrained row of the vocabulary."""
    _, bundle = published
    row = bundle.item_row(NEW_ITEM)
    assert bundle.item_popularity[row] == len(NEW_ITEM_USERS)
    for u in NEW_ITEM_USERS:
        assert row in bundle.seen_items(bundle.user_row(u)).tolist()
        assert bundle.history(bundle.user_row(u))[-1] == row

    def scores(b: Bundle) -> np.ndarray:
        """The new item's score for each user [n_users], users in cluster order."""
        rows = [b.user_row(f"u{u}") for u in range(N_CLUSTERS * USERS_PER_CLUSTER)]
        return b.user_embeddings[rows] @ b.item_embeddings[b.item_row(NEW_ITEM)]

    # trained with cluster-0 users, the new item scores higher for the other cluster-0 users than for the rest of
    # the users, and higher for them than its untrained row in the holdout model did
    s_all, s_holdout = scores(bundle), scores(holdout[1])
    others = slice(len(NEW_ITEM_USERS), USERS_PER_CLUSTER)  # cluster 0 without the three
    assert s_all[others].mean() > s_all[USERS_PER_CLUSTER:].mean()
    assert s_all[others].mean() > s_holdout[others].mean()
