"""Known-answer tests of `recsys prepare`: each step on tiny hand-made logs, every input format, the errors."""

from __future__ import annotations

import gzip
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest

from recsys.cli import main
from recsys.core import schema
from recsys.core.vocab import Vocab
from recsys.prepare import (
    PrepareConfig,
    kcore_filter,
    load_vocabs,
    logq_prob,
    parse_time,
    prepare,
    read_tables,
)

# keep everything: the tiny logs below test single steps (most of their valid/test items are "cold")
LOOSE = PrepareConfig(kcore_users=1, kcore_items=1, drop_cold=False)
T0 = 1_700_000_000  # epoch seconds, 2023-11-14T22:13:20Z


def write_csv(path: Path, header: str, rows: list[str], *, compress: str = "") -> Path:
    text = "\n".join([header, *rows]) + "\n"
    if compress == "gz":
        with gzip.open(path, "wt") as f:
            f.write(text)
    elif compress == "zst":
        with pa.CompressedOutputStream(str(path), "zstd") as f:
            f.write(text.encode())
    else:
        path.write_text(text)
    return path


def triples(data: dict) -> set[tuple[str, str, int]]:
    """(user_id, item_id, ts) of every kept interaction, in external IDs."""
    users, items = data["users"][schema.USER_ID], data["items"][schema.ITEM_ID]
    out = set()
    for split in ("train", "valid", "test", "extra"):
        for u, i, t in data[split].select(schema.USER_IDX, schema.ITEM_IDX, schema.TS).iter_rows():
            out.add((users[u], items[i], t))
    return out


# --------------------------------------------------------------------------------------------------------------
# k-core
# --------------------------------------------------------------------------------------------------------------


def test_kcore_reaches_fixed_point_a_single_pass_misses():
    # users A,B,C,D = 0..3; items x,y,z = 0..2; k = 2 for both.
    # pass 1 drops D (1 item); then z has only C -> pass 2 drops (C,z); then C has only y -> pass 3 drops (C,y).
    # A single pass would keep C's two rows.
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (2, 2), (3, 2)]
    u = np.array([p[0] for p in pairs])
    i = np.array([p[1] for p in pairs])
    keep, why, iters = kcore_filter(u, i, min_user=2, min_item=2)
    assert keep.tolist() == [True, True, True, True, False, False, False]
    assert why.tolist() == [0, 0, 0, 0, 1, 2, 1]  # (C,y) user, (C,z) item, (D,z) user
    assert iters == 4  # three passes remove rows, the fourth finds nothing
    # a single simultaneous pass only removes D
    cu, ci = np.bincount(u), np.bincount(i)
    assert ((cu[u] >= 2) & (ci[i] >= 2)).sum() == 6


def test_kcore_in_prepare_is_accounted(tmp_path):
    names = "ABCD"
    rows = [f"{names[u]},{'xyz'[i]},{T0 + k}" for k, (u, i) in
            enumerate([(0, 0), (0, 1), (1, 0), (1, 1), (2, 1), (2, 2), (3, 2)])]
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp", rows)
    cfg = PrepareConfig(kcore_users=2, kcore_items=2, valid_frac=0.0, test_frac=0.0)
    man = prepare([log], tmp_path / "out", config=cfg)
    assert man["rows"]["filtered"]["kcore_users"] == 2
    assert man["rows"]["filtered"]["kcore_items"] == 1
    assert man["rows"]["kept"] == 4
    data = read_tables(tmp_path / "out")
    assert {(u, i) for u, i, _ in triples(data)} == {("A", "x"), ("A", "y"), ("B", "x"), ("B", "y")}


# --------------------------------------------------------------------------------------------------------------
# split
# --------------------------------------------------------------------------------------------------------------


def test_last_fraction_split_counts_and_no_leakage(tmp_path):
    # users with 30, 10, 3, 2 and 1 interactions; 30 * 0.1 = 3.0000000000000004 must round to 3, not 4
    rows = []
    for u, n in (("u30", 30), ("u10", 10), ("u3", 3), ("u2", 2), ("u1", 1)):
        rows += [f"{u},i{k},{T0 + 60 * k}" for k in range(n)]
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp", rows)
    # drop_cold off: items i10..i29 belong to u30 alone, so its valid/test items are never in train
    prepare([log], tmp_path / "out", config=PrepareConfig(kcore_users=1, kcore_items=1, drop_cold=False))
    data = read_tables(tmp_path / "out")
    uv = Vocab(data["users"][schema.USER_ID])
    per = {s: data[s].group_by(schema.USER_IDX).len() for s in ("train", "valid", "test")}

    def count(split, user):
        row = per[split].filter(pl.col(schema.USER_IDX) == uv.number(user))
        return int(row["len"][0]) if row.height else 0

    expect = {"u30": (24, 3, 3), "u10": (8, 1, 1), "u3": (1, 1, 1), "u2": (1, 0, 1), "u1": (1, 0, 0)}
    for user, (tr, va, te) in expect.items():
        assert (count("train", user), count("valid", user), count("test", user)) == (tr, va, te), user
    # time order within each user: train < valid < test
    for u in range(len(uv)):
        ts = {s: data[s].filter(pl.col(schema.USER_IDX) == u)[schema.TS] for s in ("train", "valid", "test")}
        if len(ts["valid"]):
            assert ts["train"].max() < ts["valid"].min()
        if len(ts["test"]):
            assert max(ts["train"].max(), ts["valid"].max() or 0) < ts["test"].min()


def test_repeated_pair_is_deduped_before_split_so_test_never_in_train(tmp_path):
    # u re-watches item a at the very end: without dedupe-before-split (a) would be in both train and test
    rows = [f"u,{it},{T0 + k}" for k, it in enumerate(["a", "b", "c", "d", "e", "f", "g", "h", "i", "a"])]
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp", rows)
    man = prepare([log], tmp_path / "out", config=LOOSE)
    data = read_tables(tmp_path / "out")
    assert man["rows"]["deduplicated"] == 1
    pairs = {s: set(data[s].select(schema.USER_IDX, schema.ITEM_IDX).iter_rows()) for s in ("train", "valid",
                                                                                            "test")}
    assert not pairs["train"] & pairs["test"] and not pairs["train"] & pairs["valid"]
    items = data["items"][schema.ITEM_ID]
    # "sum" keeps the first time: (u, a) is u's first interaction, so it is in train with weight 2
    tr = data["train"].sort(schema.TS)
    assert items[tr[schema.ITEM_IDX][0]] == "a" and tr[schema.WEIGHT][0] == 2.0
    assert [items[k] for k in data["test"][schema.ITEM_IDX]] == ["i"]


def test_global_time_split_moves_cold_users_and_items_to_extra(tmp_path):
    rows = [
        "u1,a,2024-01-01T00:00:00Z", "u1,b,2024-01-02T00:00:00Z", "u1,c,2024-03-01T00:00:00Z",
        "u2,a,2024-01-05T00:00:00Z", "u2,c,2024-01-10 12:00:00", "u2,b,2024-02-20T00:00:00Z",
        "u3,a,2024-03-05T00:00:00Z",  # u3 only after the cutoff: cold user
        "u2,z,2024-03-02T00:00:00Z",  # z never in train: cold item
    ]
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp", rows)
    cfg = PrepareConfig(kcore_users=1, kcore_items=1, split="global_time", valid_start="2024-02-15",
                        test_start="2024-03-01T00:00:00Z")
    man = prepare([log], tmp_path / "out", config=cfg)
    assert man["rows"]["extra_reasons"] == {"cold_user": 1, "cold_item": 1} and "cold_user" not in man["rows"]["filtered"]
    assert (man["rows"]["train"], man["rows"]["valid"], man["rows"]["test"], man["rows"]["extra"]) == (4, 1, 1, 2)
    assert man["split"]["test_start"] == "2024-03-01T00:00:00Z"
    data = read_tables(tmp_path / "out")
    assert ("u1", "c", parse_time("2024-03-01")) in triples(data)
    # the cold rows are never scored (not in test) but kept for the final fit, their user and item in the vocab
    users, items = data["users"][schema.USER_ID].to_list(), data["items"][schema.ITEM_ID].to_list()
    assert sorted((users[u], items[i]) for u, i in data["extra"].select(schema.USER_IDX, schema.ITEM_IDX).iter_rows()) \
        == [("u2", "z"), ("u3", "a")]
    assert data["users"].filter(pl.col(schema.USER_ID) == "u3")["n_train"].to_list() == [0]
    # ...and the serving state of the prepared data (train + valid, for scoring test) leaves them out
    seen_u3 = data["seen"].filter(pl.col(schema.USER_IDX) == users.index("u3"))["items"].to_list()
    assert seen_u3 in ([], [[]])


# --------------------------------------------------------------------------------------------------------------
# vocabularies, frequencies, histories, features
# --------------------------------------------------------------------------------------------------------------


def test_vocab_round_trip_and_unknown_ids_are_explicit(tmp_path):
    v = Vocab(["b", 42, "a"])
    assert len(v) == 3 and v.number("b") == 0 and v.number(42) == 1 and v.number("42") == 1
    assert v.number("nope") is None
    with pytest.raises(KeyError, match="'nope'"):
        v.number("nope", missing="error")
    assert v.numbers(["a", "zz", 42]).tolist() == [2, -1, 1]
    with pytest.raises(KeyError, match="'zz'"):
        v.numbers(["a", "zz"], missing="error")
    assert [v.id(k) for k in range(3)] == ["b", "42", "a"]
    assert v.id_array([2, 0]).tolist() == ["a", "b"]
    with pytest.raises(IndexError, match=r"\[0, 2\], got 3"):
        v.id(3)
    with pytest.raises(ValueError, match="'b' twice"):
        Vocab(["b", "a", "b"])


def test_vocab_is_frequency_ordered_and_prob_sums_to_one(tmp_path):
    # train counts after the split (valid=test=0): item c 3, a 2, b 2 (tie -> by ID), d 1
    rows = [f"u{k},{it},{T0 + k}" for k, it in enumerate(["c", "a", "b", "c", "a", "b", "c", "d"])]
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp", rows)
    prepare([log], tmp_path / "out", config=PrepareConfig(kcore_users=1, kcore_items=1, valid_frac=0, test_frac=0))
    users, items = load_vocabs(tmp_path / "out")
    data = read_tables(tmp_path / "out")
    assert list(items.ids) == ["c", "a", "b", "d"]
    assert data["items"]["n_train"].to_list() == [3, 2, 2, 1]
    assert data["items"]["prob"].to_list() == pytest.approx([3 / 8, 2 / 8, 2 / 8, 1 / 8], rel=1e-12)
    assert data["items"]["prob"].sum() == pytest.approx(1.0, abs=1e-12)
    assert data["items"][schema.ITEM_IDX].to_list() == [0, 1, 2, 3]
    assert users.number("u0") is not None and users.number("ghost") is None
    # first_ts: item a first at T0 + 1 s
    assert data["items"]["first_ts"][1] == (T0 + 1) * 1000


def test_logq_prob_smoothing_of_zero_count_items():
    # zero-count item gets the 0.5 floor: masses [4, 0.5, 1] / 5.5
    assert logq_prob(np.array([4, 0, 1])).tolist() == pytest.approx([4 / 5.5, 0.5 / 5.5, 1 / 5.5])
    p = logq_prob(np.array([3, 1]), smoothing=1.0)
    assert p.tolist() == pytest.approx([4 / 6, 2 / 6]) and p.sum() == pytest.approx(1.0)


def test_history_is_last_n_oldest_first_and_seen_is_distinct(tmp_path):
    rows = [f"u,{it},{T0 + k}" for k, it in enumerate("abcdefghij")]
    rows += [f"v,{it},{T0 + k}" for k, it in enumerate("abcde")]
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp", rows)
    cfg = PrepareConfig(kcore_users=1, kcore_items=1, drop_cold=False, history_len=3)
    prepare([log], tmp_path / "out", config=cfg)
    data = read_tables(tmp_path / "out")
    users, items = load_vocabs(tmp_path / "out")
    hist = dict(data["history"].iter_rows())
    seen = dict(data["seen"].iter_rows())
    # u: 10 items -> 8 train + 1 valid (i) + 1 test (j): history = last 3 of train+valid = g, h, i
    assert [items.id(k) for k in hist[users.number("u")]] == ["g", "h", "i"]
    assert sorted(items.id(k) for k in seen[users.number("u")]) == list("abcdefghi")
    assert seen[users.number("u")] == sorted(seen[users.number("u")])
    assert data["history"][schema.USER_IDX].to_list() == list(range(len(users)))


def test_features_encoded_with_their_own_vocab_and_title_kept(tmp_path):
    rows = [f"u{k % 3},{it},{T0 + k}" for k, it in enumerate(["a", "b", "c", "a", "b", "a", "d"])]
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp", rows)
    items = write_csv(tmp_path / "items.csv", "item_id,category,title",
                      ["a,book,Dune", "b,film,Alien", "c,book,Emma", "d,,Zorro", "e,toy,Unused"])
    users = write_csv(tmp_path / "users.csv", "user_id,region", ["u0,north", "u1,south"])  # u2 missing
    cfg = PrepareConfig(kcore_users=1, kcore_items=1, valid_frac=0, test_frac=0)
    man = prepare([log], tmp_path / "out", items=items, users=users, config=cfg)
    data = read_tables(tmp_path / "out")
    it = data["items"]
    fv = data["feature_vocab"]
    cat = {r["value"]: r["code"] for r in fv.filter(pl.col("feature") == "category").iter_rows(named=True)}
    assert cat == {"book": 1, "film": 2}  # book on 2 vocabulary items, film on 1; "toy" only on an unused item
    by_id = {r[schema.ITEM_ID]: r for r in it.iter_rows(named=True)}
    assert by_id["a"]["feat_category"] == 1 and by_id["b"]["feat_category"] == 2
    assert by_id["d"]["feat_category"] == 0  # empty value -> code 0
    assert by_id["a"][schema.TITLE] == "Dune" and by_id["d"][schema.TITLE] == "Zorro"
    ur = {r[schema.USER_ID]: r["feat_region"] for r in data["users"].iter_rows(named=True)}
    assert ur["u2"] == 0 and {ur["u0"], ur["u1"]} == {1, 2}
    assert man["metadata"]["users_without_metadata"] == 1 and man["features"]["item"] == {"category": 2}
    assert set(fv["entity"]) == {"user", "item"} and fv["code"].min() >= 1


def test_items_file_duplicate_id_names_file_row_value(tmp_path):
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp", [f"u,a,{T0}"])
    items = write_csv(tmp_path / "items.csv", "item_id,category", ["a,x", "b,y", "a,z"])
    with pytest.raises(ValueError, match=r"items\.csv: row 3, column 'item_id': duplicate item ID 'a'"):
        prepare([log], tmp_path / "out", items=items, config=LOOSE)
    assert not (tmp_path / "out").exists()  # atomic: nothing published on failure


# --------------------------------------------------------------------------------------------------------------
# implicit feedback: dedupe policies, thresholds, event weights, window
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy, weight, ts", [("first", 1.0, T0), ("last", 3.0, T0 + 20), ("sum", 6.0, T0)])
def test_dedupe_policies(tmp_path, policy, weight, ts):
    rows = [f"u,a,{T0},1", f"u,a,{T0 + 10},2", f"u,a,{T0 + 20},3"]
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp,weight", rows)
    cfg = PrepareConfig(kcore_users=1, kcore_items=1, dedupe=policy)
    man = prepare([log], tmp_path / "out", config=cfg)
    tr = read_tables(tmp_path / "out")["train"]
    assert man["rows"]["deduplicated"] == 2
    assert tr.rows() == [(0, 0, ts * 1000, weight)]


def test_rating_threshold_event_weights_and_window(tmp_path):
    rows = [
        f"u,a,{T0},view,5",
        f"u,b,{T0 + 1},click,3",  # below min_weight 4
        f"u,c,{T0 + 2},purchase,4",
        f"u,d,{T0 + 3},share,5",  # event not weighted -> dropped
        f"u,e,{T0 + 4},hover,5",  # weight 0 -> dropped
        f"u,f,{T0 - 100},view,5",  # before the window
        f"u,g,{T0 + 1000},view,5",  # at the window end (exclusive)
    ]
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp,event,rating", rows)
    cfg = PrepareConfig(kcore_users=1, kcore_items=1, weight_col="rating", min_weight=4.0, binarize=True,
                        event_weights={"view": 1.0, "click": 2.0, "purchase": 5.0, "hover": 0.0},
                        start=str(T0), end=str(T0 + 1000), valid_frac=0, test_frac=0)
    man = prepare([log], tmp_path / "out", config=cfg)
    f = man["rows"]["filtered"]
    assert (f["below_min_weight"], f["unlisted_event"], f["nonpositive_weight"], f["before_start"],
            f["after_end"]) == (1, 1, 1, 1, 1)
    data = read_tables(tmp_path / "out")
    items = data["items"][schema.ITEM_ID]
    got = {items[i]: w for i, w in data["train"].select(schema.ITEM_IDX, schema.WEIGHT).iter_rows()}
    assert got == {"a": 1.0, "c": 5.0}


# --------------------------------------------------------------------------------------------------------------
# formats and timestamps
# --------------------------------------------------------------------------------------------------------------

EVENTS = [("1", "10", T0), ("1", "11", T0 + 60), ("2", "10", T0 + 120), ("2", "12", T0 + 180)]
EXPECTED = {(u, i, t * 1000) for u, i, t in EVENTS}


def _prep(tmp_path, logs, **cfg):
    out = tmp_path / "out"
    prepare(logs, out, config=PrepareConfig(kcore_users=1, kcore_items=1, drop_cold=False, **cfg), overwrite=True)
    return read_tables(out)


@pytest.mark.parametrize("compress", ["", "gz", "zst"])
def test_csv_plain_and_compressed(tmp_path, compress):
    name = "log.csv" + (f".{compress}" if compress else "")
    log = write_csv(tmp_path / name, "user_id,item_id,timestamp", [f"{u},{i},{t}" for u, i, t in EVENTS],
                    compress=compress)
    assert triples(_prep(tmp_path, [log])) == EXPECTED


def test_tsv_and_ndjson_with_integer_ids(tmp_path):
    tsv = write_csv(tmp_path / "a.tsv", "user_id\titem_id\ttimestamp", [f"{u}\t{i}\t{t}" for u, i, t in EVENTS[:2]])
    nd = tmp_path / "b.ndjson.gz"
    with gzip.open(nd, "wt") as f:
        for u, i, t in EVENTS[2:]:
            f.write(json.dumps({"user_id": int(u), "item_id": int(i), "timestamp": t}) + "\n")
    data = _prep(tmp_path, [tsv, nd])
    assert triples(data) == EXPECTED
    assert data["users"][schema.USER_ID].dtype == pl.String


def test_parquet_glob_with_datetime_column(tmp_path):
    (tmp_path / "logs").mkdir()
    for k, (u, i, t) in enumerate(EVENTS):
        pl.DataFrame({"user_id": [u], "item_id": [i],
                      "timestamp": [datetime.fromtimestamp(t, tz=timezone.utc)]}).write_parquet(
            tmp_path / "logs" / f"part-{k}.parquet")
    assert triples(_prep(tmp_path, [str(tmp_path / "logs" / "*.parquet")])) == EXPECTED


def test_movielens_u_data_ratings_dat_and_recbole_inter(tmp_path):
    udata = tmp_path / "u.data"
    udata.write_text("".join(f"{u}\t{i}\t4\t{t}\n" for u, i, t in EVENTS))
    dat = tmp_path / "ratings.dat"
    dat.write_text("".join(f"{u}::{i}::4::{t}\n" for u, i, t in EVENTS))
    inter = write_csv(tmp_path / "ml.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float",
                      [f"{u}\t{i}\t4.0\t{float(t)}" for u, i, t in EVENTS])
    for path in (udata, dat, inter):
        data = _prep(tmp_path, [path], format="movielens")
        assert triples(data) == EXPECTED, path.name
        assert set(data["train"][schema.WEIGHT].to_list()) == {4.0}  # the rating is the weight


def test_movielens_csv_release_needs_no_column_flags(tmp_path):
    """ML-latest / 20M / 25M / 32M: ratings.csv (userId, movieId, rating, timestamp) and movies.csv (movieId, title
    with the year, |-joined genres) are read with the default settings: rating as the weight, year from the title."""
    ratings = write_csv(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp",
                        [f"{u},{i},{3.5 + k},{t}" for k, (u, i, t) in enumerate(EVENTS)])
    movies = write_csv(tmp_path / "movies.csv", "movieId,title,genres",
                       ['10,"American President, The (1995)",Comedy|Drama|Romance', "11,Heat (1995),Action|Crime",
                        "12,Untitled,(no genres listed)"])  # fmt: skip
    out = tmp_path / "out"
    prepare([ratings], out, items=movies, config=PrepareConfig(kcore_users=1, kcore_items=1, drop_cold=False))
    data = read_tables(out)
    assert triples(data) == EXPECTED
    assert sorted(data["train"][schema.WEIGHT].to_list() + data["valid"][schema.WEIGHT].to_list()
                  + data["test"][schema.WEIGHT].to_list()) == [3.5, 4.5, 5.5, 6.5]  # fmt: skip
    by_id = {r[schema.ITEM_ID]: r for r in data["items"].iter_rows(named=True)}
    assert by_id["10"][schema.TITLE] == "American President, The (1995)"
    assert by_id["10"]["feat_year"] == by_id["11"]["feat_year"] == 1 and by_id["12"]["feat_year"] == 0  # no year
    # genres are multi-valued: one code per genre, by frequency (Action 1 of 3, Comedy, Crime, Drama, Romance ...)
    genres = dict(data["feature_vocab"].filter(pl.col("feature") == "genres").select("value", "code").iter_rows())
    assert by_id["10"]["feat_genres"] == sorted(genres[g] for g in ("Comedy", "Drama", "Romance"))
    assert by_id["11"]["feat_genres"] == sorted(genres[g] for g in ("Action", "Crime"))
    assert by_id["12"]["feat_genres"] == [genres["(no genres listed)"]]
    # named columns still win: --user-col picks the column, and a file without it is an error naming the flag
    with pytest.raises(ValueError, match=r"missing column 'uid' \(--user-col\)"):
        _prep(tmp_path, [ratings], user_col="uid")


def test_movielens_metadata_files(tmp_path):
    """movies.dat / users.dat (ML-1M: '::', Latin-1) and ML-100K's u.item / u.user ('|', 19 genre flags)."""
    ratings = tmp_path / "ratings.dat"
    ratings.write_text("".join(f"{u}::{i}::4::{t}\n" for u, i, t in EVENTS))
    movies = tmp_path / "movies.dat"
    movies.write_bytes("10::Star Wars: Episode IV - A New Hope (1977)::Action|Sci-Fi\n11::Heat (1995)::Action\n"
                       "12::Cit\u00e9 des enfants perdus, La (1995)::Adventure|Sci-Fi\n".encode("latin-1"))
    users = tmp_path / "users.dat"
    users.write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    cfg = PrepareConfig(format="movielens", kcore_users=1, kcore_items=1, drop_cold=False)
    prepare([ratings], tmp_path / "out1", items=movies, users=users, config=cfg)
    data = read_tables(tmp_path / "out1")
    by_id = {r[schema.ITEM_ID]: r for r in data["items"].iter_rows(named=True)}
    assert by_id["10"][schema.TITLE] == "Star Wars: Episode IV - A New Hope (1977)"
    assert by_id["12"][schema.TITLE] == "Cit\u00e9 des enfants perdus, La (1995)"
    assert by_id["11"]["feat_year"] == by_id["12"]["feat_year"] != by_id["10"]["feat_year"]
    assert {c for c in data["users"].columns if c.startswith("feat_")} == {"feat_gender", "feat_age",
                                                                          "feat_occupation"}  # no zip code
    uby = {r[schema.USER_ID]: r for r in data["users"].iter_rows(named=True)}
    assert uby["1"]["feat_gender"] != uby["2"]["feat_gender"]

    flags = ["0"] * 19
    action_scifi = flags.copy()
    action_scifi[1] = action_scifi[15] = "1"  # Action, Sci-Fi
    action = flags.copy()
    action[1] = "1"
    u_item = tmp_path / "u.item"
    u_item.write_bytes("".join(f"{i}|{t}|01-Jan-1995||http://x|{'|'.join(f)}\n" for i, t, f in (
        ("10", "Star Wars (1977)", action_scifi), ("11", "Heat (1995)", action),
        ("12", "Cit\u00e9 (1995)", action_scifi))).encode("latin-1"))  # fmt: skip
    u_user = tmp_path / "u.user"
    u_user.write_text("1|24|M|technician|85711\n2|53|F|other|94043\n")
    prepare([ratings], tmp_path / "out2", items=u_item, users=u_user, config=cfg)
    data2 = read_tables(tmp_path / "out2")
    by_id2 = {r[schema.ITEM_ID]: r for r in data2["items"].iter_rows(named=True)}
    assert by_id2["12"][schema.TITLE] == "Cit\u00e9 (1995)"
    vocab = dict(data2["feature_vocab"].filter(pl.col("feature") == "genres").select("value", "code").iter_rows())
    assert vocab == {"Action": 1, "Sci-Fi": 2}  # Action on all three movies, Sci-Fi on two
    assert by_id2["10"]["feat_genres"] == by_id2["12"]["feat_genres"] == [1, 2] and by_id2["11"]["feat_genres"] == [1]

    bad = tmp_path / "bad.dat"
    bad.write_text("10::Heat (1995)::Action::extra\n")
    with pytest.raises(ValueError, match=r"bad.dat: row 1 has 4 fields separated by '::'; a MovieLens items file has "
                                         r"3 fields"):  # fmt: skip
        prepare([ratings], tmp_path / "out3", items=bad, config=cfg)


def test_multi_valued_features(tmp_path):
    """`prepare.multi_valued`: one code per value (by how many items carry it), a value repeated in one row counted
    once, at most `max_values` codes per row (the most frequent), empty or absent rows = no code; the data loader
    pads them into [n, K] columns."""
    ratings = write_csv(tmp_path / "r.csv", "user_id,item_id,timestamp", [f"{u},{i},{t}" for u, i, t in EVENTS])
    # item 12's blank second tag is dropped, not coded as a value "" (regression: it was, before strip-then-filter)
    items = write_csv(tmp_path / "items.csv", "item_id,tags,brand", ['10,"b,a,b, c",x', "11,,y", '12,"c, ",x'])
    out = tmp_path / "out"
    cfg = PrepareConfig(kcore_users=1, kcore_items=1, drop_cold=False, multi_valued={"tags": ","}, max_values=2)
    prepare([ratings], out, items=items, config=cfg)
    data = read_tables(out)
    vocab = dict(data["feature_vocab"].filter(pl.col("feature") == "tags").select("value", "code").iter_rows())
    assert vocab == {"c": 1, "a": 2, "b": 3}  # c on two items; a and b on one (b twice in item 10: counted once)
    by_id = {r[schema.ITEM_ID]: r for r in data["items"].iter_rows(named=True)}
    assert by_id["10"]["feat_tags"] == [1, 2]  # c, a: b is the least frequent of its three, over max_values
    assert by_id["11"]["feat_tags"] == [] and by_id["12"]["feat_tags"] == [1]
    assert isinstance(by_id["10"]["feat_brand"], int)  # single-valued columns stay as they were

    from recsys.core.data import feature_widths
    from recsys.core.data import load_prepared as load_for_training

    pd_ = load_for_training(out)
    rows = {i: k for k, i in enumerate(data["items"][schema.ITEM_ID].to_list())}
    tags = pd_.item_features["tags"]
    assert tags.shape == (3, 2) and tags[rows["10"]].tolist() == [1, 2] and tags[rows["11"]].tolist() == [0, 0]
    assert feature_widths(pd_.item_features) == {"tags": 2, "brand": 1}
    m = pd_.item_feature_matrix()
    assert m.shape == (3, 3) and m[rows["12"]].tolist() == [1, 0, pd_.item_features["brand"][rows["12"]]]

    with pytest.raises(ValueError, match=r"`prepare.multi_valued` names column\(s\) \['genre'\] that neither"):
        prepare([ratings], tmp_path / "o2", items=items, config=PrepareConfig(multi_valued={"genre": "|"}))
    with pytest.raises(ValueError, match="`prepare.multi_valued` separator of column 'tags' must be a non-empty"):
        PrepareConfig(multi_valued={"tags": ""}).validate()


def test_iso_epoch_seconds_and_epoch_ms_give_the_same_times(tmp_path):
    def iso(t):
        return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")

    forms = {
        "s": [f"{u},{i},{t}" for u, i, t in EVENTS],
        "ms": [f"{u},{i},{t * 1000}" for u, i, t in EVENTS],
        "iso": [f"{u},{i},{iso(t)}" for u, i, t in EVENTS],
        "mixed": [f"{u},{i},{v}" for (u, i, t), v in zip(EVENTS, [iso(EVENTS[0][2]), EVENTS[1][2] * 1000,
                                                                   EVENTS[2][2], iso(EVENTS[3][2])[:-1]],
                                                      strict=True)],
    }
    for name, rows in forms.items():
        log = write_csv(tmp_path / f"{name}.csv", "user_id,item_id,timestamp", rows)
        assert triples(_prep(tmp_path, [log])) == EXPECTED, name
    # an explicit unit overrides the magnitude rule: 1_700_000_000 read as ms is 1970-01-20
    log = write_csv(tmp_path / "ms.csv", "user_id,item_id,timestamp", forms["s"])
    assert {t for _, _, t in triples(_prep(tmp_path, [log], time_unit="ms"))} == {t for _, _, t in EVENTS}


# --------------------------------------------------------------------------------------------------------------
# validation errors and rejects
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rows, match", [
    (["u1,a,5", ",b,6"], r"log\.csv: row 2, column 'user_id': user ID is null \(value None\)"),
    (["u1,a,5", "u1,  ,6"], r"log\.csv: row 2, column 'item_id': item ID is empty \(value '  '\)"),
    (["u1,a,5", "u1,b,6", "u2,c,yesterday"], r"row 3, column 'timestamp': unparseable timestamp \(value 'yesterday'\)"),
])
def test_bad_rows_error_names_file_row_column_value(tmp_path, rows, match):
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp", rows)
    with pytest.raises(ValueError, match=match):
        prepare([log], tmp_path / "out", config=LOOSE)
    assert not (tmp_path / "out").exists()


def test_wrong_type_weight_and_missing_column(tmp_path):
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp,weight", ["u,a,5,1", "u,b,6,lots"])
    with pytest.raises(ValueError, match=r"row 2, column 'weight': weight is not a finite number \(value 'lots'\)"):
        prepare([log], tmp_path / "out", config=LOOSE)
    log2 = write_csv(tmp_path / "log2.csv", "user,item_id,timestamp", ["u,a,5"])
    with pytest.raises(ValueError, match=r"log2\.csv: missing column 'user_id' \(--user-col\); the file has "
                                         r"columns \['user', 'item_id', 'timestamp'\]"):
        prepare([log2], tmp_path / "out", config=LOOSE)
    pq = tmp_path / "f.parquet"
    pl.DataFrame({"user_id": [1.5], "item_id": ["a"], "timestamp": [5]}).write_parquet(pq)
    with pytest.raises(ValueError, match=r"f\.parquet: row 1, column 'user_id': IDs must be strings or integers, "
                                         r"got Float64 \(value 1\.5\)"):
        prepare([pq], tmp_path / "out", config=LOOSE)


def test_skip_writes_rejects_with_reason_and_accounts_for_them(tmp_path):
    rows = ["u1,a,5", ",b,6", "u1,c,never", "u2,a,7", "u2,d,"]
    log = write_csv(tmp_path / "log.csv", "user_id,item_id,timestamp", rows)
    cfg = PrepareConfig(kcore_users=1, kcore_items=1, on_bad_rows="skip")
    man = prepare([log], tmp_path / "out", config=cfg)
    assert man["rows"]["rejected"] == {"bad_time": 1, "null_time": 1, "null_user": 1}
    rej = read_tables(tmp_path / "out")["rejects"].sort("row")
    assert rej.select("row", "column", "reason", "value").rows() == [
        (2, "user_id", "null_user", None), (3, "timestamp", "bad_time", "never"), (5, "timestamp", "null_time", None)]
    assert rej["file"].to_list() == [str(log)] * 3
    assert man["rows"]["kept"] + man["rows"]["deduplicated"] + 3 == 5


# --------------------------------------------------------------------------------------------------------------
# manifest + CLI
# --------------------------------------------------------------------------------------------------------------


def test_manifest_and_cli(tmp_path, capsys):
    log = write_csv(tmp_path / "log.csv", "uid,iid,when", [f"{u},{i},{t}" for u, i, t in EVENTS])
    out = tmp_path / "out"
    argv = ["prepare", "--logs", str(tmp_path / "*.csv"), "--out", str(out), "--user-col", "uid", "--item-col",
            "iid", "--time-col", "when", "--set", "prepare.kcore_users=1", "--kcore-items", "1",
            "--set", "prepare.drop_cold=false"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and "read+validate" in printed
    man = json.loads((out / schema.MANIFEST).read_text())
    assert man["schema_version"] == schema.SCHEMA_VERSION
    assert man["config"]["user_col"] == "uid" and man["config"]["kcore_items"] == 1
    assert man["inputs"][0]["path"] == str(log.resolve()) and man["inputs"][0]["rows"] == 4
    assert man["inputs"][0]["size"] == log.stat().st_size and len(man["inputs"][0]["sha256"]) == 64
    assert man["counts"] == {"n_users": 2, "n_items": 3, "train": 2, "valid": 0, "test": 2, "extra": 0, "items_before_kcore": 3,
                             "users_before_kcore": 2}
    assert isinstance(man["fingerprint"], str) and [s["step"] for s in man["steps"]][0] == "read+validate"
    # existing output: refused without --overwrite, replaced with it
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--split", "last_n"]) == 0
    assert json.loads((out / schema.MANIFEST).read_text())["split"]["method"] == "last_n"


def test_config_validation_names_field():
    with pytest.raises(ValueError, match=r"`prepare.valid_frac \+ prepare.test_frac` must be < 1"):
        PrepareConfig(valid_frac=0.5, test_frac=0.5).validate()
    with pytest.raises(ValueError, match=r"`prepare.start` must be an ISO-8601 time or an epoch number, got 'soon'"):
        PrepareConfig(start="soon").validate()
    assert parse_time("1700000000") == parse_time("1700000000000") == parse_time("2023-11-14T22:13:20Z")


def test_recbole_item_file_with_typed_header(tmp_path):
    inter = write_csv(tmp_path / "ml.inter", "user_id:token\titem_id:token\trating:float\ttimestamp:float",
                      [f"{u}\t{i}\t4.0\t{float(t)}" for u, i, t in EVENTS])
    item = write_csv(tmp_path / "ml.item", "item_id:token\tmovie_title:token_seq\tclass:token_seq",
                     ["10\tToy Story\tAnimation", "11\tHeat\tAction", "12\tJumanji\tAnimation"])
    cfg = PrepareConfig(format="movielens", kcore_users=1, kcore_items=1, drop_cold=False, title_col="movie_title")
    prepare([inter], tmp_path / "out", items=item, config=cfg)
    it = read_tables(tmp_path / "out")["items"]
    by_id = {r[schema.ITEM_ID]: r for r in it.iter_rows(named=True)}
    # class is a token_seq: space-separated values, a multi-valued feature
    assert by_id["11"][schema.TITLE] == "Heat" and by_id["10"]["feat_class"] == by_id["12"]["feat_class"] == [1]
