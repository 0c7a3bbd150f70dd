"""MovieLens as downloaded, through the CLI: ML-1M-style ratings.dat / movies.dat (Latin-1, multi-valued genres) /
users.dat -> prepare -> train -> export -> evaluate (the report colours the item map by genre)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys.cli import main
from recsys.core import schema

GENRES = ("Action|Adventure", "Comedy", "Comedy|Romance", "Drama", "Children's|Comedy|Animation")


@pytest.fixture(scope="module")
def ml1m(tmp_path_factory):
    d = tmp_path_factory.mktemp("ml-1m")
    rng = np.random.default_rng(0)
    n_users, n_items = 60, 50
    # two taste groups: even users rate the first half of the catalogue, odd users the second
    rows = []
    for u in range(1, n_users + 1):
        lo = 1 if u % 2 == 0 else n_items // 2 + 1
        for k, i in enumerate(rng.choice(np.arange(lo, lo + n_items // 2), size=15, replace=False)):
            rows.append(f"{u}::{i}::{rng.integers(1, 6)}::{978300000 + 1000 * u + k}\n")
    (d / "ratings.dat").write_text("".join(rows))
    (d / "movies.dat").write_bytes("".join(
        f"{i}::Film {i} \u00e0 la carte ({1980 + i % 20})::{GENRES[i % len(GENRES)]}\n" for i in range(1, n_items + 1)
    ).encode("latin-1"))  # fmt: skip
    (d / "users.dat").write_text("".join(f"{u}::{'MF'[u % 2]}::{(1, 18, 25)[u % 3]}::{u % 21}::{10000 + u}\n"
                                         for u in range(1, n_users + 1)))  # fmt: skip
    return d


def test_movielens_1m_files_end_to_end(ml1m, tmp_path, capsys):
    data, run, models, report = (tmp_path / n for n in ("data", "run", "models", "report"))
    assert main(["prepare", "--logs", str(ml1m / "ratings.dat"), "--items", str(ml1m / "movies.dat"),
                 "--users", str(ml1m / "users.dat"), "--out", str(data)]) == 0  # fmt: skip
    items = pq.read_table(data / schema.ITEMS)
    assert str(items.schema.field("feat_genres").type).startswith(("list", "large_list"))
    # test held out of the published fit, so the evaluation below scores unseen interactions
    assert main(["train", "--data", str(data), "--out", str(run), "--set", "train.epochs=2",
                 "--set", "train.progress=false", "--set", "train.batch_size=64",
                 "--set", "train.final_fit=train_valid"]) == 0  # fmt: skip
    meta = json.loads((run / schema.MODEL_JSON).read_text())
    assert ["genres", 8, 3] in meta["item_features"]  # 7 genres + code 0 (missing), up to 3 per film
    assert main(["export", "--run", str(run), "--models", str(models)]) == 0
    capsys.readouterr()
    assert main(["evaluate", "--bundle", str(models / schema.LATEST), "--data", str(data), "--report", str(report),
                 "--k", "5,10"]) == 0  # fmt: skip
    rep = json.loads((report / "report.json").read_text())
    assert (report / "item_embeddings.png").stat().st_size > 0
    assert rep["embedding_map"]["feature"] == "genres"  # the map is coloured by the multi-valued genre feature
