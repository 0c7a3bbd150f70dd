"""The step functions of ``recsys.prepare.pipeline._run``, one at a time, on tiny hand-made inputs with known
answers (the end-to-end behaviour is in test_prepare.py / test_prepare_property.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.core import schema
from recsys.prepare import PrepareConfig
from recsys.prepare import pipeline as P
from recsys.prepare.steps import decode

T0 = 1_700_000_000  # epoch seconds


def write_csv(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def hand_read(rows: list[tuple], *, filtered: dict[str, int] | None = None) -> P._Read:
    """A ``_Read`` over hand-made normalised rows (u, i, ts, seq, weight, freason); no rejected rows."""
    u, i, ts, seq, w, fr = (list(c) for c in zip(*rows, strict=True))
    norm = pl.LazyFrame({"u": pl.Series(u, dtype=pl.UInt32), "i": pl.Series(i, dtype=pl.UInt32),
                         "ts": pl.Series(ts, dtype=pl.Int64), "seq": pl.Series(seq, dtype=pl.Int64),
                         "weight": pl.Series(w, dtype=pl.Float64),
                         "reason": pl.Series([None] * len(u), dtype=pl.String),
                         "freason": pl.Series(fr, dtype=pl.String)})
    return P._Read(inputs=[], norm=norm, n_input=len(u), rejected={}, filtered=filtered or {},
                   user_codes=pl.Categories.random(), item_codes=pl.Categories.random())


def hand_pairs(u: list[int], i: list[int], ts: list[int], split: list[int] | None = None) -> P._Pairs:
    cols = {"u": np.array(u, np.uint32), "i": np.array(i, np.uint32), "ts": np.array(ts, np.int64),
            "weight": np.arange(1, len(u) + 1, dtype=np.float32)}
    if split is not None:
        cols["split"] = np.array(split, np.int8)
    return P._Pairs(cols, n_user_codes=max(u) + 1, n_item_codes=max(i) + 1, n_dedup=0)


def test_read_metadata_reads_tables_and_checks_multi_valued(tmp_path):
    items = write_csv(tmp_path / "items.csv", ["item_id,genre", "x,a", "y,b"])
    meta = P._read_metadata(items, None, PrepareConfig())
    assert meta.items is not None and meta.items["item_id"].to_list() == ["x", "y"]
    assert meta.users is None and meta.items_path == items
    with pytest.raises(ValueError, match=r"names column\(s\) \['tags'\] that neither the items file"):
        P._read_metadata(items, None, PrepareConfig(multi_valued={"tags": ","}))


def test_read_validate_counts_rows_rejects_and_filters_per_file(tmp_path):
    a = write_csv(tmp_path / "a.csv", ["user_id,item_id,timestamp,weight",
                                       f"A,x,{T0},5", f",y,{T0 + 1},5", f"B,x,{T0 + 2},1"])
    b = write_csv(tmp_path / "b.csv", ["user_id,item_id,timestamp,weight", f"B,y,{T0 + 3},4", "C,z,bad,4"])
    (tmp_path / "work" / "norm").mkdir(parents=True)
    steps = P._Steps()
    read = P._read_validate([a, b], ["csv", "csv"], PrepareConfig(min_weight=2.0), tmp_path / "work", steps)
    assert read.n_input == 5
    assert [r["rows"] for r in read.inputs] == [3, 2]
    assert read.rejected == {"bad_time": 1, "null_user": 1}
    assert read.filtered == {"below_min_weight": 1}
    assert steps.rows[0]["step"] == "read+validate"
    assert {k: steps.rows[0][k] for k in ("files", "rows", "rejected", "filtered")} == {
        "files": 2, "rows": 5, "rejected": 2, "filtered": 1}
    good = read.norm.filter(pl.col("reason").is_null() & pl.col("freason").is_null()).collect().sort("seq")
    users = decode(good["u"].to_numpy(), read.user_codes).to_list()
    items = decode(good["i"].to_numpy(), read.item_codes).to_list()
    assert list(zip(users, items, good["ts"].to_list(), strict=True)) == [
        ("A", "x", T0 * 1000), ("B", "y", (T0 + 3) * 1000)]
    with pytest.raises(ValueError, match="the logs hold no rows"):
        empty = write_csv(tmp_path / "e.csv", ["user_id,item_id,timestamp"])
        (tmp_path / "work2" / "norm").mkdir(parents=True)
        P._read_validate([empty], ["csv"], PrepareConfig(), tmp_path / "work2", P._Steps())


@pytest.fixture
def bad_log(tmp_path):
    log = write_csv(tmp_path / "log.csv", ["user_id,item_id,timestamp,weight",
                                           f"A,x,{T0},1", f",y,{T0},1", "B,x,notatime,1", f"B,z,{T0},abc"])
    (tmp_path / "work" / "norm").mkdir(parents=True)
    cfg = PrepareConfig(on_bad_rows="skip")
    read = P._read_validate([log], ["csv"], cfg, tmp_path / "work", P._Steps())
    return log, read, P._reject_details([log], ["csv"], cfg, read)


def test_write_rejects_writes_each_rejected_row_with_its_reason(tmp_path, bad_log):
    log, read, details = bad_log
    steps = P._Steps()
    P._write_rejects([log], details, read.n_rejected, tmp_path, steps)
    rej = pl.read_parquet(tmp_path / schema.REJECTS).sort("row")
    assert rej.rows() == [
        (str(log), 2, "user_id", "null_user", None, None, "y"),
        (str(log), 3, "timestamp", "bad_time", "notatime", "B", "x"),
        (str(log), 4, "weight", "bad_weight", "abc", "B", "z"),
    ]
    assert rej.columns == ["file", "row", "column", "reason", "value", "user_id", "item_id"]
    assert steps.rows[0]["step"] == "rejects" and steps.rows[0]["rows"] == 3


def test_bad_row_error_names_the_first_bad_row(bad_log):
    log, read, details = bad_log
    err = P._bad_row_error([log], details, read)
    assert str(err) == (f"{log}: row 2, column 'user_id': user ID is null (value None); 3 bad row(s) in all "
                        f"(bad_time: 1, bad_weight: 1, null_user: 1); pass --on-bad-rows skip to write them to "
                        f"{schema.REJECTS} instead")


# (u, i, ts, seq, weight, freason): pair (0, 0) three times out of time order, (0, 1) twice at the same time,
# and a filtered row that must not count
DEDUPE_ROWS = [(0, 0, 10, 1, 1.0, None), (0, 0, 5, 2, 2.0, None), (0, 1, 7, 3, 4.0, None), (0, 0, 20, 4, 8.0, None),
               (1, 0, 3, 5, 16.0, None), (1, 1, 1, 6, 32.0, "below_min_weight"), (0, 1, 7, 7, 64.0, None)]


@pytest.mark.parametrize("chunk_rows", [None, 2])
@pytest.mark.parametrize(("policy", "expect"), [
    # (u, i, ts, weight) rows, each user's in time order
    ("first", [(0, 0, 5, 2.0), (0, 1, 7, 4.0), (1, 0, 3, 16.0)]),  # earliest (ts, seq) event of each pair
    ("last", [(0, 1, 7, 64.0), (0, 0, 20, 8.0), (1, 0, 3, 16.0)]),  # latest (ts, seq) event
    ("sum", [(0, 0, 5, 11.0), (0, 1, 7, 68.0), (1, 0, 3, 16.0)]),  # first time, summed weights
])
def test_dedupe_keeps_one_row_per_pair(policy, expect, chunk_rows, monkeypatch):
    if chunk_rows is not None:  # the chunked group-by (u % n_chunks) gives the same rows
        monkeypatch.setattr(P, "DEDUPE_CHUNK_ROWS", chunk_rows)
    steps = P._Steps()
    pairs = P._dedupe(hand_read(DEDUPE_ROWS, filtered={"below_min_weight": 1}), PrepareConfig(dedupe=policy), steps)
    c = pairs.cols
    got = list(zip(c["u"].tolist(), c["i"].tolist(), c["ts"].tolist(), c["weight"].tolist(), strict=True))
    assert got == expect
    assert (pairs.n_dedup, pairs.n_user_codes, pairs.n_item_codes) == (3, 2, 2)
    assert steps.rows[0]["step"] == "dedupe"
    assert (steps.rows[0]["rows"], steps.rows[0]["deduplicated"]) == (3, 3)
    assert steps.rows[0]["chunks"] == (1 if chunk_rows is None else 3)


def test_dedupe_with_nothing_left_raises():
    with pytest.raises(ValueError, match="no interaction is left after validation and filters"):
        P._dedupe(hand_read([(0, 0, 1, 1, 1.0, "before_start")], filtered={"before_start": 1}), PrepareConfig(),
                  P._Steps())


def test_kcore_removes_the_rows_worked_out_by_hand():
    # users A..D = 0..3, items x, y, z = 0, 1, 2; with min 2 / 2: D (1 item) goes, then z (1 user left), then C
    pairs = hand_pairs([0, 0, 1, 1, 2, 2, 3], [0, 1, 0, 1, 0, 2, 2], [1, 2, 3, 4, 5, 6, 7])
    steps = P._Steps()
    dropped, before = P._kcore(pairs, PrepareConfig(kcore_users=2, kcore_items=2), steps)
    assert dropped == {"kcore_users": 2, "kcore_items": 1}  # (D, z) and (C, x) by user, (C, z) by item
    assert before == {"items_before_kcore": 3, "users_before_kcore": 4}
    c = pairs.cols
    assert list(zip(c["u"].tolist(), c["i"].tolist(), strict=True)) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert c["ts"].tolist() == [1, 2, 3, 4] and c["weight"].tolist() == [1, 2, 3, 4]  # filtered along
    assert steps.rows[0]["step"] == "kcore"
    assert (steps.rows[0]["rows"], steps.rows[0]["iterations"]) == (4, 4)
    with pytest.raises(ValueError, match=r"k-core filtering \(kcore_users=9, kcore_items=1\) left no interaction"):
        P._kcore(hand_pairs([0, 0], [0, 1], [1, 2]), PrepareConfig(kcore_users=9), P._Steps())


def test_split_last_n_moves_cold_items_to_extra():
    # user 0: items 0 1 2 3; user 1: items 2 3 0 4 (4 is in no train row); user 2: one row, kept in train
    pairs = hand_pairs([0, 0, 0, 0, 1, 1, 1, 1, 2], [0, 1, 2, 3, 2, 3, 0, 4, 1], [1, 2, 3, 4, 1, 2, 3, 4, 5])
    steps = P._Steps()
    desc, extra = P._split(pairs, PrepareConfig(split="last_n", valid_n=1, test_n=1, kcore_users=1), steps)
    assert pairs.cols["split"].tolist() == [0, 0, 1, 2, 0, 0, 1, 3, 0]
    assert extra == {"cold_user": 0, "cold_item": 1}
    assert desc["method"] == "last_n"
    assert {k: steps.rows[0][k] for k in ("step", "train", "valid", "test", "extra")} == {
        "step": "split", "train": 5, "valid": 2, "test": 1, "extra": 1}


def test_split_global_time_moves_cold_users_and_items_to_extra():
    # cutoff at 3,000 s: user 1's only row is after it (cold user); user 2's item 2 is only after it (cold item)
    pairs = hand_pairs([0, 0, 1, 2, 2], [0, 1, 0, 1, 2], [1_000_000, 4_000_000, 5_000_000, 2_000_000, 6_000_000])
    cfg = PrepareConfig(split="global_time", test_start="3000", valid_frac=0.0)
    desc, extra = P._split(pairs, cfg, P._Steps())
    assert pairs.cols["split"].tolist() == [0, 2, 3, 0, 3]
    assert extra == {"cold_user": 1, "cold_item": 1}
    assert desc["test_start_ms"] == 3_000_000
    with pytest.raises(ValueError, match="no interaction is left in train after the global_time split"):
        P._split(hand_pairs([0], [0], [5_000_000]), cfg, P._Steps())


@pytest.fixture
def coded():
    """Codes of hand-picked IDs in run-private categories: users c a b = 0 1 2, items z y x = 0 1 2."""
    ucat, icat = pl.Categories.random(), pl.Categories.random()
    keep = [pl.Series(["c", "a", "b"]).cast(pl.Categorical(ucat)),
            pl.Series(["z", "y", "x"]).cast(pl.Categorical(icat))]
    assert keep[0].to_physical().to_list() == [0, 1, 2] and keep[1].to_physical().to_list() == [0, 1, 2]
    read = P._Read(inputs=[], norm=pl.LazyFrame(), n_input=6, rejected={}, filtered={}, user_codes=ucat,
                   item_codes=icat, keepalive=keep)
    # rows as dedupe leaves them (user blocks in code order, time order inside): c: x; a: x, y(valid);
    # b: y, x, z(test). Train rows: users b 2, a 1, c 1; items x 3, y 1, z 0.
    pairs = hand_pairs([0, 1, 1, 2, 2, 2], [2, 2, 1, 1, 2, 0], [6, 4, 5, 1, 2, 3], split=[0, 0, 1, 0, 0, 2])
    return read, pairs


def test_vocabs_order_by_train_count_then_id(coded):
    read, pairs = coded
    v = P._vocabs(pairs, read.user_codes, read.item_codes)
    assert v.user_ids.to_list() == ["b", "a", "c"] and v.u_ntrain.tolist() == [2, 1, 1]
    assert v.item_ids.to_list() == ["x", "y", "z"] and v.i_ntrain.tolist() == [3, 1, 0]
    assert v.u_map.tolist() == [2, 1, 0] and v.i_map.tolist() == [2, 1, 0]  # code -> index


def test_user_idx_order_moves_user_blocks_and_maps_items(coded):
    read, pairs = coded
    v = P._vocabs(pairs, read.user_codes, read.item_codes)
    rows = P._user_idx_order(pairs.cols, v, 3)
    assert pairs.cols == {}  # popped: the reordered copies are the only ones
    assert rows[schema.USER_IDX].tolist() == [0, 0, 0, 1, 1, 2]
    assert rows[schema.ITEM_IDX].tolist() == [1, 0, 2, 0, 1, 0]
    assert rows[schema.TS].tolist() == [1, 2, 3, 4, 5, 6]
    assert rows["split"].tolist() == [0, 0, 2, 0, 1, 0]
    assert rows[schema.WEIGHT].tolist() == [4, 5, 6, 2, 3, 1]


def test_write_splits_and_serving_state(tmp_path):
    rows = {schema.USER_IDX: np.array([0, 0, 0, 1, 1, 2], np.int32), schema.ITEM_IDX: np.array([1, 0, 2, 0, 1, 0]),
            schema.TS: np.arange(1, 7, dtype=np.int64), schema.WEIGHT: np.ones(6, np.float32),
            "split": np.array([0, 0, 2, 0, 1, 3], np.int8)}
    counts = P._write_splits(rows, tmp_path)
    assert counts == {"train": 3, "valid": 1, "test": 1, "extra": 1}
    train = pl.read_parquet(tmp_path / schema.SPLITS["train"])
    assert train.select(schema.USER_IDX, schema.ITEM_IDX, schema.TS).rows() == [(0, 1, 1), (0, 0, 2), (1, 0, 4)]
    assert pl.read_parquet(tmp_path / schema.SPLITS["extra"])[schema.USER_IDX].to_list() == [2]
    P._write_serving_state(rows, 3, 3, 1, tmp_path)  # history_len 1: the last train+valid item
    assert pl.read_parquet(tmp_path / schema.HISTORY)["items"].to_list() == [[0], [1], []]
    assert pl.read_parquet(tmp_path / schema.SEEN)["items"].to_list() == [[0, 1], [0, 1], []]


def test_vocab_and_write_writes_tables_in_index_order(tmp_path, coded):
    read, pairs = coded
    meta = P._Meta(items_path=None, users_path=None, items=None, users=None)
    steps = P._Steps()
    w = P._vocab_and_write(pairs, read, meta, PrepareConfig(), tmp_path, steps)
    assert (w.n_users, w.n_items, w.n_kept, w.time_range) == (3, 3, 6, (1, 6))
    assert w.splits == {"train": 4, "valid": 1, "test": 1, "extra": 0}
    assert w.metadata == {"items_without_metadata": None, "users_without_metadata": None} and not w.has_title
    items = pl.read_parquet(tmp_path / schema.ITEMS)
    assert items.select(schema.ITEM_ID, "n_train", "first_ts").rows() == [("x", 3, 2), ("y", 1, 1), ("z", 0, 3)]
    users = pl.read_parquet(tmp_path / schema.USERS)
    assert users.select(schema.USER_ID, "n_train").rows() == [("b", 2), ("a", 1), ("c", 1)]
    train = pl.read_parquet(tmp_path / schema.SPLITS["train"])
    assert train.select(schema.USER_IDX, schema.ITEM_IDX, schema.TS).rows() == [(0, 1, 1), (0, 0, 2), (1, 0, 4),
                                                                                (2, 0, 6)]
    assert (tmp_path / schema.FEATURE_VOCAB).exists()
    assert {k: steps.rows[0][k] for k in ("step", "train", "valid", "test", "extra", "users", "items")} == {
        "step": "vocab+write", "train": 4, "valid": 1, "test": 1, "extra": 0, "users": 3, "items": 3}
