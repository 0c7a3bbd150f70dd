"""The model bundle: export layout + manifest, verified load, tamper refusal, atomic publish, keep-N, rollback, CLI.

One tiny clustered dataset (prepared-dataset layout of recsys/core/schema.py, written here) is trained once with
recsys.train.loop.train and exported; tests copy that bundle before changing anything.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.bundle import (
    BUNDLE_FILES,
    Bundle,
    BundleError,
    list_versions,
    new_version_name,
    prune,
    read_latest,
    resolve,
)
from recsys.core import schema
from recsys.core.io import sha256_file
from recsys.publish import export, rollback

torch.set_num_threads(1)

N_CLUSTERS = 4
ITEMS_PER_CLUSTER = 16  # the last one of each cluster only ever appears in test: a "new" item
USERS_PER_CLUSTER = 40
HISTORY_LEN = 8
T0 = 1_700_000_000_000  # epoch ms


def make_dataset(path: Path, *, seed: int = 0) -> Path:
    """A prepared dataset where user u of cluster c only touches items of cluster c.

    Item rows: cluster c owns rows [16c, 16c + 16); ``feat_category`` = c + 1. Each user sees distinct items of
    their cluster: 12 (8 train, 2 valid, 2 test) or, for every 4th user (u % 4 == 3, "cold"), 6 (2/2/2). Splits
    are global in time (train < valid < test). Every 4th user's last test item is item 16c + 15, which is never in
    train or valid (first_ts after the train cutoff).
    """
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    n_items = N_CLUSTERS * ITEMS_PER_CLUSTER
    n_users = N_CLUSTERS * USERS_PER_CLUSTER
    item_cluster = np.arange(n_items) // ITEMS_PER_CLUSTER
    user_cluster = np.arange(n_users) // USERS_PER_CLUSTER
    rows: dict[str, list[tuple[int, int, int]]] = {"train": [], "valid": [], "test": []}
    offsets = {"train": 0, "valid": 100_000, "test": 200_000}
    for u in range(n_users):
        c = user_cluster[u]
        n_train = 2 if u % 4 == 3 else 8
        items = c * ITEMS_PER_CLUSTER + rng.permutation(ITEMS_PER_CLUSTER - 1)[: n_train + 4]
        if u % 4 == 0:
            items[-1] = c * ITEMS_PER_CLUSTER + ITEMS_PER_CLUSTER - 1
        for t, i in enumerate(items):
            split = "train" if t < n_train else "valid" if t < n_train + 2 else "test"
            rows[split].append((u, int(i), T0 + offsets[split] + 100 * t + u % 7))
    arrays = {s: np.array(r, dtype=np.int64) for s, r in rows.items()}
    for split, a in arrays.items():
        pq.write_table(pa.table({
            schema.USER_IDX: pa.array(a[:, 0], pa.int32()), schema.ITEM_IDX: pa.array(a[:, 1], pa.int32()),
            schema.TS: pa.array(a[:, 2], pa.int64()), schema.WEIGHT: pa.array(np.ones(len(a)), pa.float32()),
        }), path / schema.SPLITS[split])  # fmt: skip
    counts = np.bincount(arrays["train"][:, 1], minlength=n_items)
    allr = np.concatenate(list(arrays.values()))
    first_ts = np.full(n_items, np.iinfo(np.int64).max)
    np.minimum.at(first_ts, allr[:, 1], allr[:, 2])
    pq.write_table(pa.table({
        schema.ITEM_ID: [f"i{i}" for i in range(n_items)],
        schema.ITEM_IDX: pa.array(np.arange(n_items), pa.int32()),
        "n_train": pa.array(counts, pa.int32()),
        "prob": pa.array(counts / counts.sum(), pa.float64()),
        "first_ts": pa.array(first_ts, pa.int64()),
        "feat_category": pa.array(item_cluster + 1, pa.int32()),
    }), path / schema.ITEMS)  # fmt: skip
    pq.write_table(pa.table({
        schema.USER_ID: [f"u{u}" for u in range(n_users)],
        schema.USER_IDX: pa.array(np.arange(n_users), pa.int32()),
        "n_train": pa.array(np.bincount(arrays["train"][:, 0], minlength=n_users), pa.int32()),
        "feat_region": pa.array(user_cluster + 1, pa.int32()),
    }), path / schema.USERS)  # fmt: skip
    names = ["space", "cooking", "football", "piano"]
    pq.write_table(pa.table({
        "entity": ["item"] * 4 + ["user"] * 4,
        "feature": ["category"] * 4 + ["region"] * 4,
        "value": names + [f"r{c}" for c in range(4)],
        "code": pa.array(list(range(1, 5)) * 2, pa.int32()),
    }), path / schema.FEATURE_VOCAB)  # fmt: skip
    before = np.concatenate([arrays["train"], arrays["valid"]])
    before = before[np.lexsort((before[:, 2], before[:, 0]))]
    hist, seen = [], []
    for u in range(n_users):
        its = before[before[:, 0] == u, 1]
        hist.append(its[-HISTORY_LEN:].tolist())
        seen.append(sorted(set(its.tolist())))
    for name, lists in ((schema.HISTORY, hist), (schema.SEEN, seen)):
        pq.write_table(pa.table({
            schema.USER_IDX: pa.array(np.arange(n_users), pa.int32()),
            "items": pa.array(lists, pa.list_(pa.int32())),
        }), path / name)  # fmt: skip
    (path / schema.MANIFEST).write_text(json.dumps({
        "schema_version": schema.SCHEMA_VERSION, "fingerprint": f"clustered-{seed}",
        "counts": {"n_users": n_users, "n_items": n_items, **{s: len(a) for s, a in arrays.items()}},
    }))  # fmt: skip
    return path


_CACHE: dict[str, Path] = {}


def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prepared dataset, training run), built once per test session."""
    if "run" not in _CACHE:
        from recsys.train.config import LossConfig, ModelConfig, TrainConfig
        from recsys.train.loop import train

        root = tmp_path_factory.mktemp("bundle_src")
        data = make_dataset(root / "data")
        # dim == n_items so test_evaluate can swap in one-hot (oracle) item embeddings
        model = ModelConfig(dim=N_CLUSTERS * ITEMS_PER_CLUSTER, embedding_dim=16, history_len=HISTORY_LEN)
        # test held out of the published fit: test_evaluate scores this bundle on it
        tr = TrainConfig(batch_size=64, lr=0.02, epochs=8, progress=False, tensorboard=False, patience=0,
                         num_threads=1, final_fit="train_valid")
        train(data, root / "run", model_cfg=model, train_cfg=tr, loss_cfg=LossConfig(temperature=0.1), device="cpu")
        _CACHE["data"], _CACHE["run"] = data, root / "run"
    return _CACHE["data"], _CACHE["run"]


def index_cfg():
    from recsys.retrieval import IndexConfig

    return IndexConfig(num_threads=1)


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """(data, run, models_dir, version dir) of one export, shared read-only by the tests below."""
    data, run = trained(tmp_path_factory)
    models = tmp_path_factory.mktemp("models")
    path = export(run, models, index_cfg=index_cfg(), keep=3)
    return data, run, models, path


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(path: Path, **changes) -> None:
    m = json.loads((path / "manifest.json").read_text())
    m.update(changes)
    (path / "manifest.json").write_text(json.dumps(m))


# ---------------------------------------------------------------------------------------------------------------


def test_export_layout_and_manifest(published):
    data, run, models, path = published
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", path.name)
    assert read_latest(models) == path.name
    assert sorted(p.name for p in path.iterdir()) == sorted([*BUNDLE_FILES, "manifest.json"])
    m = json.loads((path / "manifest.json").read_text())
    assert m["schema_version"] == schema.SCHEMA_VERSION and m["metric"] == "cosine"
    assert m["dim"] == 64 and m["counts"] == {"n_users": 160, "n_items": 64}
    assert m["data"]["fingerprint"] == "clustered-0"
    assert m["data"]["manifest_sha256"] == sha256_file(data / schema.MANIFEST)
    assert m["training"]["status"] == "done" and m["training"]["best_epoch"] >= 1  # run's summary.json
    assert m["model"]["dim"] == 64 and m["run"]["config"]["data_dir"] == str(data.resolve())
    for name in BUNDLE_FILES:
        assert m["files"][name] == {"sha256": sha256_file(path / name), "size": (path / name).stat().st_size}
    # ef auto-tuned against exact search on held-out users (all 160 here: fewer than 1000 exist)
    tune = m["index"]["tune"]
    assert tune["table"] and tune["table"][-1]["ef"] == m["index"]["ef"] and tune["queries"].startswith("test:")
    assert tune["table"][-1]["recall"] >= 0.99
    # ...and the width of excluding searches on the same users minus their seen items (at least ef)
    ft = tune["filtered_table"]
    if ft:  # tuned only on the native (in-search filter) path
        # the smallest width reaching the target (the ladder's last step may have been bisected below its top)
        reached = [r["ef"] for r in ft if r["recall"] >= 0.99]
        assert m["index"]["ef_filtered"] == min(reached) >= m["index"]["ef"]
    else:
        assert m["index"]["ef_filtered"] == m["index"]["ef"]
    assert {"torch", "numpy", "hnswlib", "polars", "recsys"} <= set(m["packages"])
    # the quick evaluation stored at export time (test split, exact + HNSW)
    ev = m["evaluation"]
    assert ev["split"] == "test" and ev["n_users"] == 160 and 0.0 <= ev["recall@10"] <= 1.0
    assert ev["ann_recall@10"] >= 0.99
    # data files are byte copies of the prepared dataset
    for name in (schema.USERS, schema.ITEMS, schema.HISTORY, schema.SEEN, schema.FEATURE_VOCAB):
        assert sha256_file(path / name) == sha256_file(data / name)


def test_load_matches_towers_and_data(published):
    from recsys.train.model import TwoTower

    data, run, models, path = published
    b = Bundle.load(models)  # follows LATEST
    assert b.path == path and b.version == path.name
    assert (b.dim, b.metric, b.n_users, b.n_items) == (64, "cosine", 160, 64)
    assert b.item_embeddings.shape == (64, 64) and b.item_embeddings.dtype == np.float32
    assert not b.item_embeddings.flags.writeable and not b.user_embeddings.flags.writeable
    np.testing.assert_allclose(np.linalg.norm(b.user_embeddings, axis=1), 1.0, atol=1e-5)
    assert b.user_row("u7") == 7 and b.user_row("nobody") is None
    assert b.item_row("i63") == 63 and b.item_row("x") is None
    rows, unknown = b.item_rows(["i3", "zz", "i0"])
    assert rows.tolist() == [3, 0] and unknown == ["zz"]
    seen = pq.read_table(data / schema.SEEN).column("items").to_pylist()
    hist = pq.read_table(data / schema.HISTORY).column("items").to_pylist()
    assert b.seen_items(5).tolist() == seen[5] and b.history(5).tolist() == hist[5]
    with pytest.raises(IndexError, match="user_row"):
        b.seen_items(160)
    # popularity: n_train descending; the four test-only items (n_train 0) come last
    n_train = pq.read_table(data / schema.ITEMS).column("n_train").to_numpy()
    assert np.all(np.diff(n_train[b.popular_items]) <= 0)
    assert set(b.popular_items[-4:].tolist()) == {15, 31, 47, 63}
    # embeddings are the towers' output: known users from their serving history
    model = TwoTower.from_run(run)
    with torch.no_grad():
        h = torch.full((1, HISTORY_LEN), -1, dtype=torch.long)
        h[0, HISTORY_LEN - len(hist[9]) :] = torch.tensor(hist[9])
        u9 = model.encode_users(torch.tensor([9]), h).numpy()
        items = model.encode_items(torch.arange(64)).numpy()
    np.testing.assert_allclose(b.user_embeddings[9], u9[0], atol=1e-5)
    np.testing.assert_allclose(b.item_embeddings, items, atol=1e-5)
    # unknown users from history alone == the tower with user_idx -1
    with torch.no_grad():
        anon = model.encode_users(torch.tensor([-1]), h).numpy()
    np.testing.assert_allclose(b.embed_history([np.array(hist[9])]), anon, atol=1e-5)
    # the HNSW index answers like the exact one at the tuned ef
    ids_a, _ = b.index.search(b.user_embeddings[:20], 5)
    ids_e, _ = b.exact.search(b.user_embeddings[:20], 5)
    assert np.mean([len(set(a) & set(e)) / 5 for a, e in zip(ids_a, ids_e, strict=True)]) >= 0.95
    m = json.loads((path / "manifest.json").read_text())
    assert b.index.ef == m["index"]["ef"] and b.index.ef_filtered == m["index"]["ef_filtered"]


def test_trained_bundle_retrieves_own_cluster(published):
    """Known answer: a user's top items (seen excluded) are from their own cluster."""
    _, _, models, _ = published
    b = Bundle.load(models)
    users = np.arange(0, 160, 5)
    ids, _ = b.exact.search(b.user_embeddings[users], 4, exclude=[b.seen_items(u) for u in users])
    same = (ids // ITEMS_PER_CLUSTER) == (users[:, None] // USERS_PER_CLUSTER)
    assert same.mean() >= 0.8


@pytest.mark.parametrize(
    "tamper, match",
    [
        ("flip_byte", r"item_embeddings\.npy: sha256"),
        ("flip_index_byte", r"index\.hnsw: sha256"),
        ("truncate_index", r"index\.hnsw: size"),
        ("wrong_dim", r"item_embeddings\.npy: got float32 \(64, 64\), manifest says float32 \(64, 32\)"),
        ("wrong_metric", r"manifest\.json.*metric is 'dot'"),
        ("missing_file", r"seen\.parquet: missing"),
        ("unlisted_file", r"manifest\.json.*no checksum for \['history\.parquet'\]"),
        ("wrong_schema", r"manifest\.json.*schema_version is 99"),
        ("swapped_embeddings", r"user_embeddings\.npy: sha256"),
        ("escaping_name", r"invalid file name '\.\./x'"),
        ("bad_entry", r"files\['model\.json'\] must be \{sha256: str, size: int\}, got 'abc'"),
    ],
)
def test_tampered_bundle_is_refused(published, tmp_path, tamper, match):
    _, _, _, path = published
    b = copy_bundle(path, tmp_path / "b")
    if tamper == "flip_byte":
        raw = bytearray((b / schema.ITEM_EMBEDDINGS).read_bytes())
        raw[-3] ^= 0x01
        (b / schema.ITEM_EMBEDDINGS).write_bytes(bytes(raw))
    elif tamper == "flip_index_byte":
        raw = bytearray((b / schema.INDEX_FILE).read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (b / schema.INDEX_FILE).write_bytes(bytes(raw))
    elif tamper == "truncate_index":
        raw = (b / schema.INDEX_FILE).read_bytes()
        (b / schema.INDEX_FILE).write_bytes(raw[: len(raw) // 2])
    elif tamper == "wrong_dim":
        rewrite_manifest(b, dim=32)
    elif tamper == "wrong_metric":
        rewrite_manifest(b, metric="dot")
    elif tamper == "missing_file":
        (b / schema.SEEN).unlink()
    elif tamper == "unlisted_file":
        m = json.loads((b / "manifest.json").read_text())
        del m["files"][schema.HISTORY]
        rewrite_manifest(b, files=m["files"])
    elif tamper == "wrong_schema":
        rewrite_manifest(b, schema_version=99)
    elif tamper == "swapped_embeddings":
        # same shape and size, different content: only the checksum can tell
        e = np.load(b / schema.USER_EMBEDDINGS)
        np.save(b / schema.USER_EMBEDDINGS, e[::-1].copy())
    elif tamper == "escaping_name":
        m = json.loads((b / "manifest.json").read_text())
        m["files"]["../x"] = {"sha256": "0" * 64, "size": 1}
        rewrite_manifest(b, files=m["files"])
    elif tamper == "bad_entry":
        m = json.loads((b / "manifest.json").read_text())
        m["files"][schema.MODEL_JSON] = "abc"
        rewrite_manifest(b, files=m["files"])
    with pytest.raises(BundleError, match=match):
        Bundle.load(b)


def test_index_is_not_opened_before_checksums(published, tmp_path, monkeypatch):
    """hnswlib files are unsafe to parse untrusted: a bad checksum must stop load before HnswIndex.load runs."""
    import recsys.retrieval

    _, _, _, path = published
    b = copy_bundle(path, tmp_path / "b")
    raw = bytearray((b / schema.INDEX_FILE).read_bytes())
    raw[100] ^= 0x10
    (b / schema.INDEX_FILE).write_bytes(bytes(raw))
    calls = []
    monkeypatch.setattr(recsys.retrieval.HnswIndex, "load", classmethod(lambda cls, *a, **k: calls.append(a)))
    with pytest.raises(BundleError, match="index.hnsw: sha256"):
        Bundle.load(b)
    assert calls == []


def test_crash_mid_export_leaves_latest_and_no_half_version(published, tmp_path, monkeypatch):
    import recsys.retrieval

    data, run, models_src, path = published
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(path, models / path.name)
    (models / schema.LATEST).write_text(path.name + "\n")
    before = sorted(p.name for p in models.iterdir())

    def listing() -> list[str]:
        return sorted(p.name for p in models.iterdir() if p.name != ".lock")  # the publish lock file may stay

    def boom(self, p):  # the index is written after the embeddings: the temp dir is half full here
        assert (Path(p).parent / schema.ITEM_EMBEDDINGS).exists()
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(recsys.retrieval.HnswIndex, "save", boom)
    with pytest.raises(OSError, match="simulated"):
        export(run, models, index_cfg=index_cfg(), evaluate_split=None)
    assert read_latest(models) == path.name
    assert listing() == before  # no new version, no temp dir left behind
    assert [v["version"] for v in list_versions(models)] == [path.name]
    Bundle.load(models)


def test_crash_between_publish_and_pointer_keeps_old_latest(published, tmp_path, monkeypatch):
    """If LATEST cannot be moved, the new version dir is complete but LATEST still names the old one."""
    import recsys.publish

    data, run, _, path = published
    models = tmp_path / "models"
    models.mkdir()
    shutil.copytree(path, models / path.name)
    (models / schema.LATEST).write_text(path.name + "\n")
    real = recsys.publish.atomic_write_text

    def fail_latest(p, text):
        if Path(p).name == schema.LATEST:
            raise OSError("crash before pointer move (simulated)")
        real(p, text)

    monkeypatch.setattr(recsys.publish, "atomic_write_text", fail_latest)
    with pytest.raises(OSError, match="simulated"):
        export(run, models, index_cfg=index_cfg(), evaluate_split=None)
    assert read_latest(models) == path.name
    assert Bundle.load(models).version == path.name


def test_keep_n_rollback_and_monotonic_versions(published, tmp_path):
    data, run, _, _ = published
    models = tmp_path / "models"
    made = [export(run, models, index_cfg=index_cfg(), keep=2, evaluate_split=None).name for _ in range(3)]
    assert made == sorted(made) and len(set(made)) == 3  # same second -> +1 s each, still ordered
    assert [v["version"] for v in list_versions(models)] == made[1:]
    assert read_latest(models) == made[2]
    # rollback to the older one; pruning never deletes what LATEST points to
    assert rollback(models, made[1]) == models / made[1]
    assert read_latest(models) == made[1] and Bundle.load(models).version == made[1]
    assert prune(models, keep=1) == []  # made[2] is newest, made[1] is LATEST: both stay
    assert [v["version"] for v in list_versions(models)] == made[1:]
    assert resolve(models / schema.LATEST) == models / made[1]
    assert resolve(models, made[2]) == models / made[2]
    with pytest.raises(BundleError, match="not found"):
        rollback(models, "20000101T000000Z-abcdef")
    with pytest.raises(ValueError, match="`keep` must be >= 1"):
        export(run, models, keep=0)


def test_prune_keeps_latest_even_when_oldest(published, tmp_path):
    _, _, _, path = published
    models = tmp_path / "models"
    names = ["20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb", "20260103T000000Z-cccccc"]
    for i, n in enumerate(names):
        shutil.copytree(path, models / n)
        rewrite_manifest(models / n, version=n, created_at=f"2026-01-0{i + 1}T00:00:00Z")
    (models / schema.LATEST).write_text(names[0])
    # leftovers of a killed export / prune go; other hidden dirs (the retrain job dir) stay
    for leftover in (".20260104T000000Z-dddddd.tmp-k2j4", f".{names[1]}.deleting-4242", ".retrain"):
        (models / leftover).mkdir()
    assert prune(models, keep=1) == [names[1]]
    assert sorted(p.name for p in models.iterdir() if p.name != ".lock") == [
        ".retrain", names[0], names[2], "LATEST"
    ]


def test_rollback_refuses_a_tampered_version(published, tmp_path):
    _, _, _, path = published
    models = tmp_path / "models"
    good, bad = "20260101T000000Z-aaaaaa", "20260102T000000Z-bbbbbb"
    shutil.copytree(path, models / good)
    shutil.copytree(path, models / bad)
    (models / bad / schema.SEEN).write_bytes(b"garbage")
    (models / schema.LATEST).write_text(good)
    with pytest.raises(BundleError, match="seen.parquet"):
        rollback(models, bad)
    assert read_latest(models) == good


def test_version_names_are_monotonic(tmp_path):
    import datetime as dt

    now = dt.datetime(2026, 11, 27, 20, 15, 0, tzinfo=dt.timezone.utc)
    assert new_version_name(tmp_path, "3fa2c1deadbeef", now=now) == "20261127T201500Z-3fa2c1"
    (tmp_path / "20261127T201500Z-3fa2c1").mkdir()
    # same second, or a clock that stepped back: one second after the newest existing version
    assert new_version_name(tmp_path, "0000aa", now=now) == "20261127T201501Z-0000aa"
    assert new_version_name(tmp_path, "0000aa", now=now - dt.timedelta(hours=1)) == "20261127T201501Z-0000aa"


def test_resolve_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve(tmp_path / "nope")
    with pytest.raises(BundleError, match="neither a bundle"):
        resolve(tmp_path)
    (tmp_path / schema.LATEST).write_text("../../etc")
    with pytest.raises(BundleError, match="not a version name"):
        resolve(tmp_path)


def test_export_refuses_mismatched_data(published, tmp_path):
    _, run, _, _ = published
    other = make_dataset(tmp_path / "other")
    t = pq.read_table(other / schema.ITEMS).slice(0, 60)
    pq.write_table(t, other / schema.ITEMS)
    with pytest.raises(BundleError, match="60"):
        export(run, tmp_path / "models", data_dir=other, index_cfg=index_cfg())
    assert not (tmp_path / "models").exists() or list_versions(tmp_path / "models") == []


@pytest.mark.parametrize("name, match", [
    ("catalogue", "reserved in the models directory"),  # would be the live catalogue's change-log directory
    ("LATEST", "reserved in the models directory"),  # would be the pointer file
    ("../v1", "must match"),
])
def test_export_refuses_a_version_name_the_models_directory_uses(published, tmp_path, name, match):
    _, run, _, _ = published
    with pytest.raises(ValueError, match=match) as err:
        export(run, tmp_path / "models", index_cfg=index_cfg(), version=name)
    assert repr(name) in str(err.value)
    assert not (tmp_path / "models").exists() or list_versions(tmp_path / "models") == []


def test_cli_export_list_rollback(published, tmp_path, capsys):
    from recsys.cli import main

    data, run, _, _ = published
    models = tmp_path / "models"
    args = ["export", "--run", str(run), "--models", str(models), "--keep", "3", "--no-eval",
            "--set", "index.num_threads=1"]
    assert main(args) == 0
    first = json.loads(capsys.readouterr().out)["version"]
    assert main(args + ["--data", str(data)]) == 0
    second = json.loads(capsys.readouterr().out)["version"]
    assert main(["models", "list", "--models", str(models)]) == 0
    out = capsys.readouterr().out
    assert f"* {second}" in out and first in out
    assert main(["models", "rollback", first, "--models", str(models)]) == 0
    assert read_latest(models) == first
    capsys.readouterr()
    assert main(["models", "rollback", "nope", "--models", str(models)]) == 2
    assert "version 'nope' not found" in capsys.readouterr().err
    assert read_latest(models) == first
    assert main(["export", "--run", str(run), "--models", str(models), "--set", "index.M=0"]) == 2


def test_a_run_moved_with_its_data_exports_without_data_and_a_moved_dataset_is_named(published, tmp_path):
    data, run, _, _ = published
    # the run and its prepared dataset moved together (same relative layout): found through data_dir_relative
    moved = tmp_path / "moved"
    shutil.copytree(data, moved / data.name)
    shutil.copytree(run, moved / run.name)
    cfg = json.loads((moved / run.name / schema.RUN_CONFIG).read_text())
    assert cfg["data_dir_relative"] == f"../{data.name}" and cfg["data_fingerprint"]
    cfg["data_dir"] = str(tmp_path / "gone")  # the absolute path no longer exists
    (moved / run.name / schema.RUN_CONFIG).write_text(json.dumps(cfg))
    path = export(moved / run.name, tmp_path / "models", index_cfg=index_cfg(), keep=3)
    assert Bundle.load(path).n_items == pq.read_metadata(data / schema.ITEMS).num_rows
    # the run alone: neither path holds its data -> the error names both places and the way out
    alone = tmp_path / "alone" / "run"
    shutil.copytree(moved / run.name, alone)
    with pytest.raises(ValueError, match=r"is not at '.*' or '.*gone': it was moved or rebuilt; pass `data_dir` "
                                         r"\(recsys export --data DIR\)"):
        export(alone, tmp_path / "models2", index_cfg=index_cfg())
    # a dataset at the relative path with another fingerprint is not taken for it
    other = make_dataset(tmp_path / "alone" / data.name, seed=1)
    man = json.loads((other / schema.MANIFEST).read_text())
    man["fingerprint"] = "something-else"
    (other / schema.MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ValueError, match="moved or rebuilt"):
        export(alone, tmp_path / "models3", index_cfg=index_cfg())
