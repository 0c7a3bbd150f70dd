"""The trainer: quality band on clustered data, resume == uninterrupted, NaN stop, determinism, config round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.core import schema
from recsys.core.config import ConfigError
from recsys.train.config import LossConfig, ModelConfig, TrainConfig
from recsys.train.loop import TrainingDiverged, load_configs, train
from recsys.train.model import TwoTower

torch.set_num_threads(1)

N_CLUSTERS = 4
ITEMS_PER_CLUSTER = 12
USERS_PER_CLUSTER = 24
SEQ_LEN = 12  # interactions per user; the last 2 go to valid


def make_clustered(path: Path, *, seed: int = 0, titles: bool = False) -> Path:
    """A prepared dataset (recsys/core/schema.py layout) where user u of cluster c only touches items of cluster c.

    Item rows: cluster c owns rows [c * 12, (c + 1) * 12); item feature ``category`` = c + 1. User feature
    ``region`` = c + 1. Each user sees 12 random items of their cluster in time order; the last 2 are validation.
    """
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    n_items = N_CLUSTERS * ITEMS_PER_CLUSTER
    n_users = N_CLUSTERS * USERS_PER_CLUSTER
    item_cluster = np.arange(n_items) // ITEMS_PER_CLUSTER
    user_cluster = np.arange(n_users) // USERS_PER_CLUSTER
    rows = {"train": [], "valid": []}
    for u in range(n_users):
        c = user_cluster[u]
        items = c * ITEMS_PER_CLUSTER + rng.choice(ITEMS_PER_CLUSTER, size=SEQ_LEN, replace=False)
        for t, i in enumerate(items):
            rows["valid" if t >= SEQ_LEN - 2 else "train"].append((u, int(i), 1_000_000 + 1000 * t))
    for split, rs in rows.items():
        a = np.array(rs, dtype=np.int64)
        pq.write_table(pa.table({
            schema.USER_IDX: pa.array(a[:, 0], pa.int32()), schema.ITEM_IDX: pa.array(a[:, 1], pa.int32()),
            schema.TS: pa.array(a[:, 2], pa.int64()), schema.WEIGHT: pa.array(np.ones(len(a)), pa.float32()),
        }), path / schema.SPLITS[split])  # fmt: skip
    counts = np.bincount(np.array(rows["train"])[:, 1], minlength=n_items)
    items_tbl = {
        schema.ITEM_ID: [f"i{i}" for i in range(n_items)],
        schema.ITEM_IDX: pa.array(np.arange(n_items), pa.int32()),
        "n_train": pa.array(counts, pa.int32()),
        "prob": pa.array(counts / counts.sum(), pa.float64()),
        "first_ts": pa.array(np.zeros(n_items), pa.int64()),
        "feat_category": pa.array(item_cluster + 1, pa.int32()),
    }
    if titles:
        names = ["space rocket galaxy", "cooking recipe pasta", "football match goal", "piano concert music"]
        items_tbl[schema.TITLE] = [f"{names[c]} {i}" for i, c in enumerate(item_cluster)]
    pq.write_table(pa.table(items_tbl), path / schema.ITEMS)
    pq.write_table(pa.table({
        schema.USER_ID: [f"u{u}" for u in range(n_users)],
        schema.USER_IDX: pa.array(np.arange(n_users), pa.int32()),
        "n_train": pa.array(np.full(n_users, SEQ_LEN - 2), pa.int32()),
        "feat_region": pa.array(user_cluster + 1, pa.int32()),
    }), path / schema.USERS)  # fmt: skip
    return path


def tiny_cfgs(**train_over) -> tuple[ModelConfig, TrainConfig, LossConfig]:
    model = ModelConfig(dim=16, embedding_dim=16, history_len=8)
    opts = {"batch_size": 64, "lr": 0.01, "epochs": 3, "progress": False, "tensorboard": False, "patience": 0,
            "refit": False}
    tr = TrainConfig(**{**opts, **train_over})
    return model, tr, LossConfig(temperature=0.1)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_clustered(tmp_path_factory.mktemp("clustered") / "prepared")


def _weights(run: Path, name: str = schema.MODEL_WEIGHTS) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / name))


def test_quality_band_on_clustered_data(data_dir, tmp_path):
    """Users of cluster c get cluster-c items at the top; validation recall@20 is far above chance."""
    m, t, lc = tiny_cfgs(epochs=8)
    summary = train(data_dir, tmp_path / "run", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    # 2 held-out items among the 10 unseen items of the user's cluster: a cluster-perfect top-20 holds both.
    # Chance (20 of the 38 unseen items) would be ~0.53.
    assert summary["best_metrics"]["recall@20"] >= 0.95
    assert summary["status"] == "done" and summary["metric"] == "cosine"

    model = TwoTower.from_run(tmp_path / "run")
    users = torch.arange(model.n_users)
    hist = torch.full((model.n_users, 1), -1)  # no history: ID + features only
    scores = model.encode_users(users, hist) @ model.encode_items(torch.arange(model.n_items)).T
    top = scores.topk(ITEMS_PER_CLUSTER, dim=1).indices // ITEMS_PER_CLUSTER  # cluster of each top item
    want = (users // USERS_PER_CLUSTER)[:, None]
    assert (top == want).float().mean() >= 0.9

    run = tmp_path / "run"
    for f in (schema.RUN_CONFIG, schema.MODEL_JSON, schema.MODEL_WEIGHTS, schema.METRICS_JSONL, schema.SUMMARY):
        assert (run / f).exists(), f
    events = [json.loads(line) for line in (run / schema.METRICS_JSONL).read_text().splitlines()]
    epochs = [e for e in events if e["event"] == "epoch" and e["phase"] == "fit"]
    assert [e["epoch"] for e in epochs] == list(range(1, 9))
    assert all("valid_ndcg@20" in e for e in epochs)
    meta = json.loads((run / schema.MODEL_JSON).read_text())
    assert meta["metric"] == "cosine" and meta["n_items"] == N_CLUSTERS * ITEMS_PER_CLUSTER
    cfg = json.loads((run / schema.RUN_CONFIG).read_text())
    assert cfg["train"]["epochs"] == 8 and cfg["model"]["dim"] == 16


def test_resume_equals_uninterrupted_and_is_deterministic(data_dir, tmp_path):
    # a constant rate: a run of 1 epoch extended to 2 equals 2 epochs (a decaying one spans ``epochs``)
    m, t2, lc = tiny_cfgs(epochs=2, lr_schedule="constant")
    lc = LossConfig(temperature=0.1, queue_size=32, n_uniform_negatives=8, logq_correction=True)
    _, t1, _ = tiny_cfgs(epochs=1, lr_schedule="constant")
    train(data_dir, tmp_path / "full", model_cfg=m, train_cfg=t2, loss_cfg=lc, device="cpu")
    train(data_dir, tmp_path / "again", model_cfg=m, train_cfg=t2, loss_cfg=lc, device="cpu")
    train(data_dir, tmp_path / "split", model_cfg=m, train_cfg=t1, loss_cfg=lc, device="cpu")
    train(data_dir, tmp_path / "split", model_cfg=m, train_cfg=t2, loss_cfg=lc, device="cpu", resume=True)

    def last(run):
        return _weights(run / schema.CHECKPOINT_DIR, "state.safetensors")

    full, again, split = last(tmp_path / "full"), last(tmp_path / "again"), last(tmp_path / "split")
    assert full.keys() == split.keys()
    for k in full:
        if k.startswith(("model.", "optim.", "queue.")):
            assert torch.equal(full[k], again[k]), f"not deterministic: {k}"
            assert torch.equal(full[k], split[k]), f"resume differs: {k}"
    s_full = json.loads((tmp_path / "full" / schema.SUMMARY).read_text())
    s_split = json.loads((tmp_path / "split" / schema.SUMMARY).read_text())
    assert s_full["best_metrics"] == s_split["best_metrics"] and s_full["best_epoch"] == s_split["best_epoch"]


def test_resume_refuses_changed_config_and_existing_dir(data_dir, tmp_path):
    m, t, lc = tiny_cfgs(epochs=1)
    train(data_dir, tmp_path / "run", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    with pytest.raises(FileExistsError, match="not empty"):
        train(data_dir, tmp_path / "run", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    with pytest.raises(ValueError, match=r"train\.lr: 0\.01 -> 0\.02"):
        train(data_dir, tmp_path / "run", model_cfg=m, train_cfg=TrainConfig(**{**t.__dict__, "lr": 0.02}),
              loss_cfg=lc, device="cpu", resume=True)
    with pytest.raises(FileNotFoundError, match="cannot resume"):
        train(data_dir, tmp_path / "other", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu", resume=True)


def test_big_dense_id_tables_get_a_sparse_hint(data_dir, tmp_path, monkeypatch, caplog):
    import recsys.train.loop

    monkeypatch.setattr(recsys.train.loop, "SPARSE_HINT_ROWS", 100)  # the clustered data: 48 items + 96 users
    m, t, lc = tiny_cfgs(epochs=1)
    train(data_dir, tmp_path / "dense", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    assert "train.sparse_embeddings is off: every step updates all of them" in caplog.text
    caplog.clear()
    t_sparse = TrainConfig(**{**t.__dict__, "sparse_embeddings": True})
    train(data_dir, tmp_path / "sparse", model_cfg=m, train_cfg=t_sparse, loss_cfg=lc, device="cpu")
    assert "sparse_embeddings is off" not in caplog.text


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    import recsys.train.losses

    m, t, lc = tiny_cfgs(epochs=3)
    real = recsys.train.losses.in_batch_softmax
    steps_per_epoch = (N_CLUSTERS * USERS_PER_CLUSTER * (SEQ_LEN - 2)) // 64
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # epoch 1 is fine; the 2nd batch of epoch 2 goes NaN
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * float("nan") if calls["n"] == steps_per_epoch + 2 else out

    monkeypatch.setattr(recsys.train.losses, "in_batch_softmax", poisoned)
    run = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match=r"loss became nan at fit epoch 2, batch 2/"):
        train(data_dir, run, model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    state = json.loads((run / schema.CHECKPOINT_DIR / "state.json").read_text())
    assert state["progress"]["epoch"] == 1  # the checkpoint of epoch 1 is intact
    weights = _weights(run)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    assert json.loads((run / schema.SUMMARY).read_text())["status"] == "diverged"
    # and the run can be resumed from that checkpoint once the cause is gone
    monkeypatch.setattr(recsys.train.losses, "in_batch_softmax", real)
    summary = train(data_dir, run, model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu", resume=True)
    assert summary["status"] == "done"
    assert json.loads((run / schema.CHECKPOINT_DIR / "state.json").read_text())["progress"]["epoch"] == 3


def test_refit_trains_on_train_plus_valid_for_best_epochs(data_dir, tmp_path):
    # Regression: after an early stop the refit phase used to run zero epochs and ship an untrained model.
    m, t, lc = tiny_cfgs(epochs=20, refit=True, patience=1, early_stop_metric="mrr")
    summary = train(data_dir, tmp_path / "run", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    assert summary["stopped_early"] and summary["refit_epochs"] == summary["best_epoch"] >= 1
    events = [json.loads(x) for x in (tmp_path / "run" / schema.METRICS_JSONL).read_text().splitlines()]
    refit = [e for e in events if e["event"] == "epoch" and e["phase"] == "refit"]
    assert len(refit) == summary["best_epoch"]
    assert "valid_recall@20" not in refit[0]
    # the shipped (refit) model is trained: each user's own cluster fills their top items
    model = TwoTower.from_run(tmp_path / "run")
    users = torch.arange(model.n_users)
    scores = model.encode_users(users, torch.full((model.n_users, 1), -1)) @ model.encode_items(
        torch.arange(model.n_items)).T
    top = scores.topk(5, dim=1).indices // ITEMS_PER_CLUSTER
    assert (top == (users // USERS_PER_CLUSTER)[:, None]).float().mean() >= 0.8


def test_config_toml_and_overrides_round_trip(tmp_path):
    root = Path(__file__).resolve().parents[1]
    defaults = load_configs(root / "recsys" / "configs" / "default.toml")
    assert defaults == (ModelConfig(), TrainConfig(), LossConfig()), "recsys/configs/default.toml drifted from the code"
    m, t, lc = load_configs(root / "recsys" / "configs" / "default.toml",
                            ["model.dim=32", "train.lr=0.001", "loss.learn_temperature=true",
                             "model.hidden=[64, 32]", "model.history_pooling=attention"])
    assert (m.dim, t.lr, lc.learn_temperature, m.hidden, m.history_pooling) == (32, 0.001, True, (64, 32),
                                                                                  "attention")
    with pytest.raises(ConfigError, match="unknown field"):
        load_configs(None, ["model.dimm=3"])
    with pytest.raises(ConfigError, match="must be one of"):
        load_configs(None, ["model.history_pooling=max"])
    with pytest.raises(ValueError, match=r"`loss.temperature` must be > 0, got -1.0"):
        load_configs(None, ["loss.temperature=-1.0"])
    with pytest.raises(ConfigError, match="not training sections"):
        load_configs(None, ["index.ef=3"])


def test_cli_train_writes_run_and_resolved_config(data_dir, tmp_path):
    from recsys.cli import main

    rc = main(["train", "--data", str(data_dir), "--out", str(tmp_path / "run"), "--device", "cpu",
               "--set", "train.epochs=1", "--set", "model.dim=8", "--set", "model.embedding_dim=8",
               "--set", "train.progress=false", "--set", "train.batch_size=64"])
    assert rc == 0
    cfg = json.loads((tmp_path / "run" / schema.RUN_CONFIG).read_text())
    assert cfg["model"]["dim"] == 8 and cfg["train"]["epochs"] == 1 and cfg["data_dir"] == str(data_dir.resolve())
    assert TwoTower.from_run(tmp_path / "run").dim == 8


@pytest.mark.parametrize(
    "loss_over, train_over",
    [
        ({"learn_temperature": True, "ssl_weight": 0.5, "n_uniform_negatives": 16}, {}),
        ({"queue_size": 128, "logq_correct_positive": False}, {"sparse_embeddings": True}),
    ],
    ids=["learned-temperature+ssl+uniform", "queue+sparse-adam"],
)
def test_loss_and_optimizer_options_still_learn_the_clusters(data_dir, tmp_path, loss_over, train_over):
    m, t, _ = tiny_cfgs(epochs=6, **train_over)
    lc = LossConfig(temperature=0.1, **loss_over)
    summary = train(data_dir, tmp_path / "run", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    assert summary["best_metrics"]["recall@20"] >= 0.9
    if lc.learn_temperature:
        assert summary["temperature"] != pytest.approx(0.1)  # it moved
        assert 0.01 <= summary["temperature"] <= 1.0


def test_batch_history_gap_ends_the_history_before_the_target(data_dir):
    """``target_window``: the history of a row skips ``gap`` of its most recent earlier items, never leaking
    the target and never crossing into the previous user's rows."""
    from recsys.core.data import Interactions, load_prepared
    from recsys.train.loop import Trainer

    m, t, lc = tiny_cfgs(target_window=3)
    trainer = Trainer(load_prepared(data_dir), model_cfg=ModelConfig(dim=8, embedding_dim=8, history_len=3),
                      train_cfg=t, loss_cfg=lc, device=torch.device("cpu"))
    # user 0: items 10, 11, 12, 13 (rows 0-3); user 1: items 20, 21 (rows 4-5)
    inter = Interactions(np.array([0, 0, 0, 0, 1, 1]), np.array([10, 11, 12, 13, 20, 21]), np.arange(6),
                         np.ones(6, np.float32))
    trainer.set_interactions(inter)
    rows = torch.tensor([3, 3, 3, 5, 5])
    got = trainer.batch_history(rows, torch.tensor([0, 1, 2, 0, 1]))
    assert got.tolist() == [[10, 11, 12], [-1, 10, 11], [-1, -1, 10], [-1, -1, 20], [-1, -1, -1]]
    assert trainer.batch_history(rows).tolist() == got[[0, 0, 0, 3, 3]].tolist()  # no gap = gap 0
    with pytest.raises(ValueError, match=r"`train.target_window` must be >= 1, got 0"):
        TrainConfig(target_window=0).validate()


def test_lr_factor_hand_worked_schedules():
    from recsys.train.loop import lr_factor

    # 4 steps, p = 0, 1/4, 1/2, 3/4: cosine (1 + cos(pi p)) / 2 = 1, 0.853553, 0.5, 0.146447; linear 1 - p
    assert [lr_factor(s, 4, schedule="cosine") for s in range(4)] == pytest.approx([1, 0.8535534, 0.5, 0.1464466])
    assert [lr_factor(s, 4, schedule="linear") for s in range(4)] == pytest.approx([1, 0.75, 0.5, 0.25])
    assert [lr_factor(s, 4) for s in range(4)] == [1.0] * 4
    # 2 warm-up steps (1/2, 2/2), then linear over the other 4
    assert [lr_factor(s, 6, schedule="linear", warmup=2) for s in range(6)] == pytest.approx(
        [0.5, 1, 1, 0.75, 0.5, 0.25])
    with pytest.raises(ValueError, match=r"`step` must be in \[0, 3\], got 4"):
        lr_factor(4, 4, schedule="cosine")
    with pytest.raises(ValueError, match=r"`schedule` must be 'constant', 'cosine' or 'linear', got 'step'"):
        lr_factor(0, 4, schedule="step")
    with pytest.raises(ValueError, match=r"`train.lr_schedule` must be"):
        TrainConfig(lr_schedule="step").validate()  # type: ignore[arg-type]


def test_lr_schedule_reaches_the_optimizer_and_resumes_exactly(data_dir, tmp_path, monkeypatch, caplog):
    """A cosine run's last step used base * factor(last step); a run stopped after epoch 1 and resumed equals the
    uninterrupted one bit for bit (the rate is a function of the phase's step, restored from the checkpoint)."""
    import recsys.train.loop as rt

    m, t, lc = tiny_cfgs(epochs=2, lr_schedule="cosine")
    train(data_dir, tmp_path / "full", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    save = rt._save_checkpoint

    def save_then_crash(run_dir, trainer, progress):
        save(run_dir, trainer, progress)
        raise KeyboardInterrupt  # killed right after the epoch-1 checkpoint

    monkeypatch.setattr(rt, "_save_checkpoint", save_then_crash)
    with pytest.raises(KeyboardInterrupt):
        train(data_dir, tmp_path / "split", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    monkeypatch.setattr(rt, "_save_checkpoint", save)
    train(data_dir, tmp_path / "split", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu", resume=True)
    full = _weights(tmp_path / "full" / schema.CHECKPOINT_DIR, "state.safetensors")
    split = _weights(tmp_path / "split" / schema.CHECKPOINT_DIR, "state.safetensors")
    for k in full:
        if k.startswith(("model.", "optim.")):
            assert torch.equal(full[k], split[k]), f"resume differs: {k}"
    state = json.loads((tmp_path / "full" / schema.CHECKPOINT_DIR / "state.json").read_text())
    steps = state["progress"]["step"]
    (group, *_) = state["optimizers"][0]["param_groups"]
    assert group["initial_lr"] == t.lr
    assert group["lr"] == pytest.approx(t.lr * rt.lr_factor(steps - 1, steps, schedule="cosine"))
    assert group["lr"] < 0.05 * t.lr  # decayed almost to 0 by the last step
    # extending a scheduled run is allowed, with a warning: the schedule is recomputed over the new length
    with caplog.at_level("WARNING", logger="recsys.train.loop"):
        s = train(data_dir, tmp_path / "split", model_cfg=m, train_cfg=TrainConfig(**{**t.__dict__, "epochs": 3}),
                  loss_cfg=lc, device="cpu", resume=True)
    assert s["status"] == "done" and "train.epochs 2 -> 3 under train.lr_schedule='cosine'" in caplog.text


def test_refit_logq_counts_the_validation_rows(data_dir, tmp_path, monkeypatch):
    """Regression (synth, issue #3): the refit trained on train + valid with train-only logQ probabilities, so an
    item that rose late (few train rows, many valid rows) was corrected as a rare negative and pushed down in the
    served model: test NDCG@20 0.147 -> 0.156 with the fix."""
    from recsys.core.data import load_prepared
    from recsys.train.loop import Trainer

    data = load_prepared(data_dir)
    m, t, lc = tiny_cfgs(refit=True)
    trainer = Trainer(data, model_cfg=m, train_cfg=t, loss_cfg=lc, device=torch.device("cpu"))
    np.testing.assert_allclose(trainer.log_p.exp().numpy(), data.item_prob, rtol=1e-6)
    trainer.count_in_sampling(data.valid)
    both = np.bincount(np.concatenate([data.train.item_idx, data.valid.item_idx]), minlength=data.n_items)
    np.testing.assert_allclose(trainer.log_p.exp().numpy(), both / both.sum(), rtol=1e-6)
    trainer.count_in_sampling(data.valid)  # idempotent: counted from the train probabilities each time
    np.testing.assert_allclose(trainer.log_p.exp().numpy(), both / both.sum(), rtol=1e-6)

    calls = []
    original = Trainer.count_in_sampling
    monkeypatch.setattr(Trainer, "count_in_sampling", lambda self, extra: (calls.append(len(extra)),
                                                                           original(self, extra)))
    train(data_dir, tmp_path / "run", model_cfg=m, train_cfg=TrainConfig(**{**t.__dict__, "epochs": 1}),
          loss_cfg=lc, device="cpu")
    assert calls == [len(data.valid)]
