"""Batch retraining: warm start by external IDs, the quality gate, the lock, crash/resume, publish-once.

One small synthetic log (recsys.prepare.synth) is cut into an older and a newer slice; tiny models keep it fast.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys import bundle as bundle_mod
from recsys import publish
from recsys.prepare.synth import SynthConfig, generate
from recsys.retrain import RetrainLocked, retrain, retrain_lock

torch.set_num_threads(1)

TINY = [
    "model.dim=16", "model.embedding_dim=16", "model.history_len=10", "train.epochs=3", "train.batch_size=256",
    "train.progress=false", "train.tensorboard=false", "train.patience=0", "prepare.kcore_users=3",
    "prepare.kcore_items=3", "index.autotune_queries=200", "retrain.max_eval_users=2000",
    # 3 epochs at a constant rate: the default cosine decay spends a third of so short a run near lr 0
    "train.lr_schedule=constant",
]


@pytest.fixture(scope="module")
def logs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("retrain_logs")
    synth = root / "synth"
    generate(synth, config=SynthConfig(events=40_000, users=1_000, items=300, seed=3))
    all_logs = pl.read_parquet(synth / "logs" / "*.parquet")
    lo, hi = all_logs["timestamp"].min(), all_logs["timestamp"].max()
    old = root / "old"
    old.mkdir()
    all_logs.filter(pl.col("timestamp") < lo + (hi - lo) * 0.7).write_parquet(old / "part-0.parquet")
    return {"old": old / "part-0.parquet", "all": synth / "logs" / "*.parquet", "items": synth / "items.parquet",
            "users": synth / "users.parquet"}


def _retrain(logs: dict[str, Path], which: str, models: Path, *extra: str) -> dict:
    return retrain([logs[which]], models, items=logs["items"], users=logs["users"], overrides=[*TINY, *extra])


@pytest.fixture(scope="module")
def first(logs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """A models dir whose first version came from the older slice (no serving model: always published)."""
    models = tmp_path_factory.mktemp("models")
    report = _retrain(logs, "old", models)
    return models, report


def test_first_retrain_publishes_without_a_serving_model(first: tuple[Path, dict]) -> None:
    models, report = first
    assert report["published"] is not None
    assert report["gate"]["serving"] is None and report["gate"]["passed"]
    assert bundle_mod.read_latest(models) == report["published"]
    # the candidate is far better than chance on the newest slice (300 items: chance Recall@20 ~ 0.07)
    assert report["gate"]["candidate"]["recall@20"] > 0.15
    # a batch retrain scores with the time prior by default (RETRAIN_DEFAULTS): the bundle carries its dimensions
    model = json.loads((models / report["published"] / "model.json").read_text())
    assert model["config"]["time_prior"] is True and model["served_dim"] == model["dim"] + 4 + 1


def test_retrain_defaults_yield_to_the_config_file_and_overrides(tmp_path: Path) -> None:
    from recsys.retrain import with_retrain_defaults

    assert with_retrain_defaults(None, ["train.epochs=3"]) == ["model.time_prior=true", "train.epochs=3"]
    assert with_retrain_defaults(None, ["model.time_prior=false"]) == ["model.time_prior=false"]
    cfg = tmp_path / "recsys.toml"
    cfg.write_text("[model]\ntime_prior = false\n")
    assert with_retrain_defaults(cfg, ["model.dim=16"]) == ["model.dim=16"]
    cfg.write_text("[model]\ndim = 16\n")
    assert with_retrain_defaults(cfg, []) == ["model.time_prior=true"]


def test_gate_rejects_a_worse_model_and_latest_stays(first: tuple[Path, dict], logs: dict, tmp_path: Path) -> None:
    models, report = first
    models_copy = tmp_path / "models"
    import shutil

    shutil.copytree(models, models_copy)
    before = bundle_mod.read_latest(models_copy)
    # a deliberately broken candidate: cold start, almost no learning
    bad = _retrain(logs, "all", models_copy, "retrain.warm_start=false", "train.epochs=1", "train.lr=1e-6",
                   "retrain.tolerance=0.0")
    gate = bad["gate"]
    assert not gate["passed"] and bad["published"] is None
    assert gate["candidate"]["recall@20"] < gate["serving"]["recall@20"]
    assert bundle_mod.read_latest(models_copy) == before
    # the report is written either way
    assert json.loads((Path(bad["job_dir"]) / "report.json").read_text())["published"] is None


def test_warm_started_retrain_publishes_and_resumes_once(first: tuple[Path, dict], logs: dict, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    models, first_report = first
    import shutil

    models = shutil.copytree(models, tmp_path / "models")
    before = bundle_mod.read_latest(models)
    real_export = publish.export

    def crash(*a, **kw):
        raise KeyboardInterrupt("killed mid-way")

    monkeypatch.setattr(publish, "export", crash)
    with pytest.raises(KeyboardInterrupt):
        _retrain(logs, "all", models, "retrain.tolerance=0.05")
    assert bundle_mod.read_latest(models) == before  # nothing published by the killed job
    job_dirs = [d for d in (models / ".retrain").iterdir() if d.name != first_report["job"]]
    assert len(job_dirs) == 1
    state = json.loads((job_dirs[0] / "state.json").read_text())
    assert set(state["stages"]) == {"prepare", "train", "gate", "final_fit"}
    assert state["stages"]["train"]["warm_start"].endswith(before)
    # the gated candidate never saw the newest slice; the model to publish is a refit that did
    prepared = json.loads((job_dirs[0] / "prepared" / "manifest.json").read_text())["counts"]
    cand, final = state["stages"]["train"]["final_fit"], state["stages"]["final_fit"]["trained_on"]
    assert cand["splits"] == ["train", "valid"] and cand["rows"] == prepared["train"] + prepared["valid"]
    # ...and the newest period's new users / items (the extra split: cold, never scored by the gate)
    assert final["splits"] == ["train", "valid", "test", "extra"] and prepared["extra"] > 0
    assert final["rows"] == prepared["train"] + prepared["valid"] + prepared["test"] + prepared["extra"]

    monkeypatch.setattr(publish, "export", real_export)
    resumed = _retrain(logs, "all", models, "retrain.tolerance=0.05")
    assert resumed["published"] and resumed["published"] != before
    manifest = json.loads((models / resumed["published"] / "manifest.json").read_text())
    assert manifest["trained_on"] == final  # the published version's final fit includes the newest slice
    assert resumed["published_fit"]["trained_on"] == final and resumed["candidate"]["trained_on"] == cand
    assert bundle_mod.read_latest(models) == resumed["published"]
    n_versions = len(bundle_mod.list_versions(models))
    again = _retrain(logs, "all", models, "retrain.tolerance=0.05")  # same job: publishes once
    assert again["published"] == resumed["published"]
    assert len(bundle_mod.list_versions(models)) == n_versions


def test_lock_prevents_concurrent_retrains(tmp_path: Path, logs: dict) -> None:
    models = tmp_path / "models"
    held = threading.Event()
    release = threading.Event()

    def holder() -> None:
        with retrain_lock(models):
            held.set()
            release.wait(30)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert held.wait(10)
        # flock is per open file description: a second open in this process conflicts like another process would
        with pytest.raises(RetrainLocked, match="another retrain holds"):
            _retrain(logs, "old", models)
    finally:
        release.set()
        t.join()
    assert not (models / ".retrain").exists()  # nothing started while locked


def test_warm_start_copies_rows_by_external_id(first: tuple[Path, dict], logs: dict, tmp_path: Path) -> None:
    """A new vocabulary (other order, new IDs) gets the old rows of the IDs it shares with the serving model."""
    import pyarrow.parquet as pq

    from recsys.core.data import load_prepared
    from recsys.prepare import PrepareConfig, prepare
    from recsys.train.config import LossConfig, TrainConfig
    from recsys.train.loop import Trainer
    from recsys.train.model import TwoTower
    from recsys.train.warmstart import warm_start

    models, _ = first
    old_dir = models / bundle_mod.read_latest(models)
    old = TwoTower.from_run(old_dir)
    data = tmp_path / "prepared"
    prepare([logs["all"]], data, items=logs["items"], users=logs["users"],
            config=PrepareConfig(kcore_users=3, kcore_items=3))
    trainer = Trainer(load_prepared(data), model_cfg=old.cfg, train_cfg=TrainConfig(), loss_cfg=LossConfig(),
                      device=torch.device("cpu"))
    fresh = trainer.model
    stats = warm_start(fresh, old_dir, data)
    assert stats["items_matched"] > 0.8 * stats["n_items"] and "item_id.weight" in stats["copied"]
    new_items = pq.read_table(data / "items.parquet").column("item_id").to_pylist()
    old_items = pq.read_table(old_dir / "items.parquet").column("item_id").to_pylist()
    old_pos = {v: i for i, v in enumerate(old_items)}
    shared = [(i, old_pos[v]) for i, v in enumerate(new_items) if v in old_pos]
    new_rows, old_rows = map(np.asarray, zip(*shared, strict=True))
    assert (new_rows != old_rows).any(), "vocab order should differ between the two datasets for this test"
    torch.testing.assert_close(fresh.item_id.weight[new_rows], old.item_id.weight[old_rows])
    # same-shaped dense weights are copied verbatim; feature-code buffers come from the new data
    torch.testing.assert_close(fresh.item_mlp[-1].weight, old.item_mlp[-1].weight)
    assert fresh.item_feats.shape[0] == len(new_items)


def test_warm_start_across_user_tower_kinds_keeps_the_history_layers_fresh(first: tuple[Path, dict], logs: dict,
                                                                          tmp_path: Path) -> None:
    """A model of the other user-tower kind warm-starts this one: the ID tables and the item tower carry over, the
    layers reading the history (and the MLP over their output) do not, even where every shape matches."""
    import shutil

    from recsys.core.data import load_prepared
    from recsys.prepare import PrepareConfig, prepare
    from recsys.train.config import LossConfig, TrainConfig
    from recsys.train.loop import Trainer
    from recsys.train.model import TwoTower
    from recsys.train.warmstart import warm_start

    models, _ = first
    old_dir = tmp_path / "old"
    shutil.copytree(models / bundle_mod.read_latest(models), old_dir)
    old = TwoTower.from_run(old_dir)
    data = tmp_path / "prepared"
    prepare([logs["all"]], data, items=logs["items"], users=logs["users"],
            config=PrepareConfig(kcore_users=3, kcore_items=3))
    fresh = Trainer(load_prepared(data), model_cfg=old.cfg, train_cfg=TrainConfig(), loss_cfg=LossConfig(),
                    device=torch.device("cpu")).model
    same = warm_start(fresh, old_dir, data)  # the same kind: the pool and its MLP carry over
    assert "user_mlp.0.weight" in same["copied"] and "pool.query" in same["copied"]

    # the old model.json now names the other kind (its weights are the pool's: every shape still matches)
    meta = json.loads((old_dir / "model.json").read_text())
    meta["config"]["user_tower"] = "transformer"
    (old_dir / "model.json").write_text(json.dumps(meta))
    fresh = Trainer(load_prepared(data), model_cfg=old.cfg, train_cfg=TrainConfig(), loss_cfg=LossConfig(),
                    device=torch.device("cpu")).model
    before = fresh.user_mlp[-1].weight.detach().clone()
    stats = warm_start(fresh, old_dir, data)
    assert "item_id.weight" in stats["copied"] and "user_id.weight" in stats["copied"]
    assert not [n for n in stats["copied"] if n.startswith(("user_mlp.", "encoder.", "pool."))]
    assert {"user_mlp.0.weight", "pool.query"} <= set(stats["skipped"])
    torch.testing.assert_close(fresh.user_mlp[-1].weight, before)  # untouched
    torch.testing.assert_close(fresh.item_mlp[-1].weight, old.item_mlp[-1].weight)  # the item tower carries over
