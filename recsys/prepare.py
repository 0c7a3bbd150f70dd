"""``recsys prepare``: raw interaction logs -> the prepared dataset described in :mod:`recsys.core.schema`.

The pipeline, in order (every input row ends in exactly one bucket of ``manifest["rows"]``)::

    read + validate      each file is scanned lazily and normalised (user, item, ts in epoch ms, weight, event);
                         a bad row is an error naming file / row / column / value, or with ``on_bad_rows="skip"``
                         it goes to rejects.parquet                                      -> rows.rejected[reason]
    implicit feedback    rating threshold, per-event-type weights, time window           -> rows.filtered[reason]
    dedupe               one row per (user, item): keep first / last, or sum the weights -> rows.deduplicated
    k-core               drop users with < kcore_users items and items with < kcore_items users, repeated
                         until nothing changes (one pass is not enough: dropping an item can push a user
                         under the threshold)                                             -> rows.filtered[kcore_*]
    temporal split       per-user last fraction / last N, or a global time cutoff; valid/test rows of users or
                         items with no train row go to the ``extra`` split (``drop_cold``): never scored, but
                         trained on by the final fit and part of the serving state        -> rows.extra[cold_*]
    vocabularies         users / items ordered by train frequency (ties by ID), features encoded with their own
                         vocabularies, logQ probabilities, histories, seen sets          -> rows.kept

Dedupe happens before the split, so a (user, item) pair appears exactly once in the whole dataset: a pair in
test is never in that user's train or valid. The split is by time order (ts, then the input position of the pair's
first row), so a user's test rows are never earlier than their train rows.

Reading, validation, filtering and ID coding run as lazy Polars queries on the streaming engine: each file is
normalised once into a scratch parquet (IDs already u32 codes of run-private Categorical categories, so no string
is hashed twice), the accounting and the dedupe group-by (on one u64 pair key, in user slices so its hash table
stays bounded) scan that. Only the deduplicated pairs ``(user, item, ts, weight)``, ~20 bytes each, are held in
memory, as numpy columns, for k-core, the split and the outputs (blocks of rows are moved, rows never sorted).
Measured on 2 shared cores (benchmarks/prepare_bench.py): 10M events in ~10 s CPU, peak RSS ~0.65-0.9 GiB.
"""

from __future__ import annotations

import errno
import glob
import gzip
import hashlib
import json
import logging
import math
import os
import re
import resource
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import numpy as np
import polars as pl
import pyarrow as pa

from recsys.core import schema
from recsys.core.config import to_dict
from recsys.core.io import atomic_dir, atomic_write_json, sha256_file
from recsys.core.vocab import Vocab
from recsys.data import history_and_seen, write_ragged

log = logging.getLogger(__name__)

# Epoch-number magnitude bands used by time_unit="auto": |t| < 1e11 is seconds (1e11 s is the year 5138, while
# 1e11 ms is only 1973-03), < 1e14 milliseconds, < 1e17 microseconds, else nanoseconds.
_AUTO_BANDS = (1e11, 1e14, 1e17)
# ISO-8601 layouts tried in turn; "%.f" also matches no fraction, "%#z" matches "Z", "+02:00" and "+0200".
_ISO_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f%#z",
    "%Y-%m-%d %H:%M:%S%.f%#z",
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
)
_FULL_HASH_MAX = 8 << 20  # inputs up to 8 MiB are hashed whole, bigger ones by their first MiB
_LOG_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".tab", ".ndjson", ".jsonl", ".json", ".inter", ".dat", ".data")

# reason codes -> the words used in error messages
REJECT_REASONS = {
    "null_user": "user ID is null",
    "empty_user": "user ID is empty",
    "null_item": "item ID is null",
    "empty_item": "item ID is empty",
    "null_time": "timestamp is null",
    "bad_time": "unparseable timestamp",
    "null_weight": "weight is null",
    "bad_weight": "weight is not a finite number",
    "null_event": "event type is null",
}
FILTER_REASONS = (
    "unlisted_event",  # event type not in `event_weights`
    "below_min_weight",  # weight column < `min_weight` (rating threshold)
    "before_start",  # earlier than the time window
    "after_end",  # at or after the end of the time window
    "nonpositive_weight",  # final weight <= 0 (e.g. an event type weighted 0)
    "kcore_users",  # user below `kcore_users` distinct items in the k-core iteration
    "kcore_items",  # item below `kcore_items` distinct users in the k-core iteration
)
EXTRA_REASONS = (
    "cold_user",  # valid/test row of a user with no train row (global-time split, `drop_cold`) -> extra split
    "cold_item",  # valid/test row of an item with no train row (`drop_cold`) -> extra split
)


@dataclass(frozen=True)
class PrepareConfig:
    """Section ``[prepare]``: how raw interaction logs become the prepared dataset (see :mod:`recsys.core.schema`)."""

    # --- reading ---------------------------------------------------------------------------------------------
    format: Literal["auto", "csv", "tsv", "parquet", "ndjson", "movielens"] = "auto"
    """Input format. "auto" goes by the file name (.csv/.tsv/.parquet/.ndjson/.jsonl, optionally .gz/.zst;
    u.data, *.dat, *.inter are MovieLens). "movielens" reads u.data (tab, no header), ratings.dat ("::") and
    RecBole .inter (typed header) and uses the columns user_id, item_id, rating (as weight), timestamp. MovieLens's
    CSV releases need no setting: a ratings.csv with userId / movieId (and the default column names) uses them and
    its rating as the weight. Item / user files: movies.csv, movies.dat, users.dat, u.item, u.user and RecBole
    .item / .user are recognised (genres, a year from the title, gender / age / occupation)."""
    separator: str = ""
    """CSV field separator; empty = "," for csv and tab for tsv."""
    user_col: str = "user_id"
    """Column holding the user ID (strings or integers; always stored as strings)."""
    item_col: str = "item_id"
    """Column holding the item ID (strings or integers; always stored as strings)."""
    time_col: str = "timestamp"
    """Column holding the event time: epoch s/ms/us/ns numbers, ISO-8601 strings, or a datetime column."""
    weight_col: str | None = None
    """Numeric column with a rating / count / strength per event. None = use a column named "weight" if the file
    has one, else every event weighs 1. A column named here that a file lacks is an error."""
    event_col: str | None = None
    """Column with the event type (view, click, ...). None = use a column named "event" if present."""
    time_unit: Literal["auto", "s", "ms", "us", "ns", "iso"] = "auto"
    """How to read numeric timestamps; "auto" decides per value by magnitude (< 1e11 seconds, < 1e14 ms,
    < 1e17 us, else ns) and parses strings that are not numbers as ISO-8601 (naive times are UTC)."""
    on_bad_rows: Literal["error", "skip"] = "error"
    """A row with a null/empty ID, an unparseable timestamp or a non-numeric weight: "error" stops with a message
    naming file, row and column; "skip" writes it with the reason to rejects.parquet."""

    # --- implicit feedback -----------------------------------------------------------------------------------
    min_weight: float | None = None
    """Rating threshold: drop events whose weight column is below this (e.g. 4.0 for 5-star ratings)."""
    binarize: bool = False
    """Ignore the weight column's value after the threshold (each event weighs 1 x its event-type weight);
    otherwise the value multiplies the weight (counts, dwell time)."""
    event_weights: dict[str, float] = field(default_factory=dict)
    """Weight per event type, e.g. {view = 1.0, click = 2.0, purchase = 5.0}. Empty = every event type weighs 1;
    non-empty = event types not listed are dropped ("unlisted_event"), a weight of 0 drops that type."""
    dedupe: Literal["first", "last", "sum"] = "sum"
    """Repeated (user, item) events become one row: "first"/"last" keep that event (its time and weight); "sum"
    keeps the first event's time (when the user found the item, which is what retrieval must predict) and the sum
    of the weights (repeat engagement = stronger preference)."""
    start: str = ""
    """Time window start (ISO-8601 or epoch seconds, inclusive); empty = no lower bound."""
    end: str = ""
    """Time window end (ISO-8601 or epoch seconds, exclusive); empty = no upper bound."""
    kcore_users: int = 5
    """Keep users with at least this many distinct items (iterated with kcore_items to a fixed point).
    5/5 is the usual core of published MovieLens/Amazon results; ML-100K users already have >= 20 ratings."""
    kcore_items: int = 1
    """Keep items with at least this many distinct users; 1 (the default) keeps every item, so every item of the
    logs is servable. Measured on the future of MovieLens-100K (benchmarks/future_bench.py, 3 seeds): 1 serves
    1,613 items instead of the 1,238 of a 5-core at the same Recall@20 / HitRate@10 (0.2485 / 0.810 vs 0.2487 /
    0.811) and NDCG@20 within 1.2% (0.2725 vs 0.2757); the item's features and its few interactions embed it."""

    # --- split -----------------------------------------------------------------------------------------------
    split: Literal["last_fraction", "last_n", "global_time"] = "last_fraction"
    """Temporal split. "last_fraction": each user's last test_frac (then valid_frac) of interactions, rounded up;
    "last_n": each user's last test_n (then valid_n); "global_time": one cutoff time for everybody."""
    valid_frac: float = 0.1
    """Validation share (last_fraction; and global_time when valid_start is empty: a time quantile)."""
    test_frac: float = 0.1
    """Test share (last_fraction; and global_time when test_start is empty: a time quantile)."""
    valid_n: int = 1
    """Validation interactions per user (last_n)."""
    test_n: int = 1
    """Test interactions per user (last_n)."""
    valid_start: str = ""
    """global_time: events at or after this time (and before test_start) are validation; empty = quantile."""
    test_start: str = ""
    """global_time: events at or after this time are test; empty = the (1 - test_frac) time quantile."""
    min_train: int = 1
    """Per-user splits never leave a user with fewer train interactions than this (valid/test shrink first)."""
    drop_cold: bool = True
    """Valid/test rows whose user or item has no train row cannot be scored by ID: true moves them to the
    ``extra`` split (counted as cold_user / cold_item), which no evaluation scores but the final fit
    (``train.final_fit = "all"``) trains on and the bundle serves from, so the newest users and items are known to
    the published model; false leaves them in valid / test."""

    # --- outputs ---------------------------------------------------------------------------------------------
    history_len: int = 50
    """N in history.parquet: the last N items of train+valid per user, oldest first."""
    prob_smoothing: float = 0.0
    """logQ probability: prob_i = max(n_train_i + prob_smoothing, 0.5) / sum. The 0.5 floor gives an item with no
    train row (only possible with drop_cold = false) half the weight of the rarest trained item, so log(prob) is
    finite; with the defaults prob is exactly the train frequency."""
    title_col: str = "title"
    """Text column of the items file kept as ``title`` (not encoded)."""
    user_features: tuple[str, ...] | None = None
    """Columns of the users file to encode as feat_<name>; None = every string/integer/boolean column."""
    item_features: tuple[str, ...] | None = None
    """Columns of the items file to encode as feat_<name>; None = every string/integer/boolean column but title."""
    multi_valued: dict[str, str] = field(default_factory=dict)
    """Columns of the items / users files that hold several values in one string, with their separator, e.g.
    {tags = ",", categories = "|"}: each value gets its own code and the tower averages their embeddings. MovieLens
    genres and RecBole ``token_seq`` columns are read as multi-valued without this."""
    max_values: int = 32
    """A multi-valued feature keeps at most this many values per row: the most frequent ones."""

    def validate(self) -> None:
        for col, sep in self.multi_valued.items():
            if not isinstance(sep, str) or not sep:
                raise ValueError(f"`prepare.multi_valued` separator of column {col!r} must be a non-empty string, "
                                 f"got {sep!r}")
        if self.max_values < 1:
            raise ValueError(f"`prepare.max_values` must be >= 1, got {self.max_values}")
        for name in ("kcore_users", "kcore_items", "min_train"):
            if getattr(self, name) < (0 if name == "min_train" else 1):
                raise ValueError(f"`prepare.{name}` must be >= {0 if name == 'min_train' else 1}, "
                                 f"got {getattr(self, name)}")
        for name in ("valid_n", "test_n"):
            if getattr(self, name) < 0:
                raise ValueError(f"`prepare.{name}` must be >= 0, got {getattr(self, name)}")
        for name in ("valid_frac", "test_frac"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"`prepare.{name}` must be in [0, 1), got {v}")
        if self.valid_frac + self.test_frac >= 1.0:
            raise ValueError(f"`prepare.valid_frac + prepare.test_frac` must be < 1, got "
                             f"{self.valid_frac} + {self.test_frac}")
        if self.history_len < 1:
            raise ValueError(f"`prepare.history_len` must be >= 1, got {self.history_len}")
        if self.prob_smoothing < 0:
            raise ValueError(f"`prepare.prob_smoothing` must be >= 0, got {self.prob_smoothing}")
        if len(self.separator) > 1:
            raise ValueError(f"`prepare.separator` must be one character, got {self.separator!r}")
        for k, v in self.event_weights.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"`prepare.event_weights.{k}` must be a number >= 0, got {v!r}")
        for name in ("start", "end", "valid_start", "test_start"):
            parse_time(getattr(self, name), name=f"prepare.{name}")
        start, end = parse_time(self.start, name="prepare.start"), parse_time(self.end, name="prepare.end")
        if start is not None and end is not None and end <= start:
            raise ValueError(f"`prepare.end` must be after `prepare.start`, got {self.start!r} .. {self.end!r}")


def parse_time(value: str, *, name: str = "time") -> int | None:
    """A config time (ISO-8601, or an epoch number read by magnitude like the logs) -> epoch ms; "" -> None."""
    value = value.strip()
    if not value:
        return None
    try:
        num = float(value)
    except ValueError:
        num = None
    if num is not None and math.isfinite(num):
        scale = 1000.0 if abs(num) < _AUTO_BANDS[0] else 1.0 if abs(num) < _AUTO_BANDS[1] else 1e-3 if abs(
            num) < _AUTO_BANDS[2] else 1e-6
        return int(math.floor(num * scale))
    try:
        dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"`{name}` must be an ISO-8601 time or an epoch number, got {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp() * 1000)


def _iso(ms: int | None) -> str | None:
    if ms is None:
        return None
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat().replace("+00:00", "Z")


# ----------------------------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------------------------


def expand_inputs(patterns: Sequence[str | Path], *, what: str = "--logs") -> list[Path]:
    """Expand paths, globs and directories into a sorted, de-duplicated file list (order of the patterns kept)."""
    if isinstance(patterns, (str, Path)):
        patterns = [patterns]
    out: list[Path] = []
    for pat in patterns:
        text = os.path.expanduser(str(pat))
        if glob.has_magic(text):
            found = [Path(p) for p in sorted(glob.glob(text, recursive=True)) if Path(p).is_file()]
            if not found:
                raise FileNotFoundError(f"{what} pattern {text!r} matched no file")
        elif Path(text).is_dir():
            found = sorted(p for p in Path(text).rglob("*") if p.is_file() and not p.name.startswith(".")
                           and _strip_compression(p.name.lower()).endswith(_LOG_SUFFIXES))
            if not found:
                raise FileNotFoundError(f"{what} directory {text!r} holds no log file")
        elif Path(text).is_file():
            found = [Path(text)]
        else:
            raise FileNotFoundError(f"{what} file {text!r} does not exist")
        out.extend(found)
    seen: set[Path] = set()
    uniq = []
    for p in out:
        key = p.resolve()
        if key not in seen:  # a file named twice would count its rows twice
            seen.add(key)
            uniq.append(p)
    if not uniq:
        raise FileNotFoundError(f"{what} names no file")
    return uniq


def fingerprint_file(path: str | Path) -> dict[str, Any]:
    """path, size, mtime and a sha256 (whole file up to 8 MiB, else of the first MiB)."""
    p = Path(path)
    st = p.stat()
    fp: dict[str, Any] = {
        "path": str(p.resolve()),
        "size": st.st_size,
        "mtime": datetime.fromtimestamp(st.st_mtime, tz=timezone.utc).isoformat(),
    }
    if st.st_size <= _FULL_HASH_MAX:
        fp["sha256"] = sha256_file(p)
    else:
        with open(p, "rb") as f:
            fp["sha256_first_mib"] = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return fp


def _strip_compression(name: str) -> str:
    for suf in (".gz", ".gzip", ".zst", ".zstd"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def detect_format(path: str | Path) -> str:
    """The reader for a file from its name: csv / tsv / parquet / ndjson / movielens."""
    name = _strip_compression(Path(path).name.lower())
    if name.endswith((".parquet", ".pq")):
        return "parquet"
    if name.endswith((".ndjson", ".jsonl", ".json")):
        return "ndjson"
    if name.endswith((".tsv", ".tab")):
        return "tsv"
    if name.endswith(".csv"):
        return "csv"
    if name.endswith((".inter", ".dat", ".data", ".item", ".user")):  # .item / .user: u.item, u.user, RecBole's
        return "movielens"
    raise ValueError(f"cannot tell the format of {str(path)!r} from its name; pass --format")


def _open_bytes(path: Path):  # noqa: ANN202 - a binary file object
    """``path`` opened for binary reading, gzip / zstd decompressed by its name."""
    name = path.name.lower()
    if name.endswith((".gz", ".gzip")):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        return pa.CompressedInputStream(pa.OSFile(str(path)), "zstd")
    return open(path, "rb")


def _first_line(path: Path) -> str:
    with _open_bytes(path) as f:
        return f.read(1 << 16).decode("utf-8", errors="replace").split("\n", 1)[0]


_ML_COLUMNS = ("user_id", "item_id", "rating", "timestamp")


def scan_file(path: str | Path, fmt: str, *, separator: str = "") -> pl.LazyFrame:
    """A lazy scan of one file with its raw columns. CSV-like files are read all-String: we parse and validate
    each column ourselves so a bad value is reported with its row instead of failing the whole scan."""
    path = Path(path)
    if fmt == "parquet":
        return pl.scan_parquet(path)
    if fmt == "ndjson":
        return pl.scan_ndjson(path, infer_schema_length=10_000)
    if fmt in ("csv", "tsv"):
        sep = separator or ("\t" if fmt == "tsv" else ",")
        return pl.scan_csv(path, separator=sep, infer_schema=False)
    if fmt == "movielens":
        line = _first_line(path)
        if "::" in line:  # ratings.dat: user::item::rating::ts; ':' as the separator leaves empty columns between
            lf = pl.scan_csv(path, separator=":", has_header=False, infer_schema=False, quote_char=None)
            return lf.select(pl.nth(2 * j).alias(c) for j, c in enumerate(_ML_COLUMNS))
        if re.search(r":(token|float|token_seq|float_seq)\b", line):  # RecBole .inter: typed header
            lf = pl.scan_csv(path, separator="\t", infer_schema=False, quote_char=None)
            return lf.rename(lambda c: c.split(":", 1)[0])
        lf = pl.scan_csv(path, separator="\t", has_header=False, infer_schema=False, quote_char=None)
        return lf.select(pl.nth(j).alias(c) for j, c in enumerate(_ML_COLUMNS))
    raise ValueError(f"`format` must be one of csv, tsv, parquet, ndjson, movielens, got {fmt!r}")


@dataclass(frozen=True)
class _Columns:
    user: str
    item: str
    time: str
    weight: str | None
    event: str | None


_ML_CSV_IDS = {"user": "userId", "item": "movieId"}  # the ID columns of MovieLens's CSV releases


def _movielens_csv(cfg: PrepareConfig, names: Sequence[str]) -> bool:
    """A MovieLens CSV ratings file read with the default column names: its userId / movieId stand in for them."""
    return (cfg.user_col, cfg.item_col) == ("user_id", "item_id") and not {"user_id", "item_id"} & set(names) \
        and set(_ML_CSV_IDS.values()) <= set(names)


def _resolve_columns(cfg: PrepareConfig, fmt: str, names: Sequence[str], path: Path) -> _Columns:
    if fmt == "movielens":
        user, item, tcol, weight = "user_id", "item_id", "timestamp", "rating"
        weight = weight if weight in names else None
    else:
        user, item, tcol = cfg.user_col, cfg.item_col, cfg.time_col
        weight = cfg.weight_col if cfg.weight_col is not None else ("weight" if "weight" in names else None)
        if _movielens_csv(cfg, names):  # ratings.csv of ML-latest / 20M / 25M / 32M: userId,movieId,rating,timestamp
            user, item = _ML_CSV_IDS["user"], _ML_CSV_IDS["item"]
            if cfg.weight_col is None and "rating" in names:
                weight = "rating"
    event = cfg.event_col if cfg.event_col is not None else ("event" if "event" in names else None)
    need = {"--user-col": user, "--item-col": item, "--time-col": tcol}
    if cfg.weight_col is not None and fmt != "movielens":
        need["--weight-col"] = cfg.weight_col
    if cfg.event_col is not None:
        need["--event-col"] = cfg.event_col
    missing = [(flag, c) for flag, c in need.items() if c not in names]
    if missing:
        what = ", ".join(f"{c!r} ({flag})" for flag, c in missing)
        raise ValueError(f"{path}: missing column {what}; the file has columns {list(names)}")
    if cfg.event_weights and event is None:
        raise ValueError(f"{path}: `prepare.event_weights` is set but the file has no event column "
                         f"(looked for {'event' if cfg.event_col is None else cfg.event_col!r}); columns {list(names)}")
    return _Columns(user, item, tcol, weight, event)


def _first_value(lf: pl.LazyFrame, col: str) -> Any:
    head = lf.select(pl.col(col)).head(1).collect()
    return head.item() if head.height else None


def _id_expr(lf: pl.LazyFrame, col: str, dtype: pl.DataType, path: Path) -> pl.Expr:
    if dtype == pl.String:
        return pl.col(col)
    if dtype.is_integer() or isinstance(dtype, (pl.Categorical, pl.Enum)):
        return pl.col(col).cast(pl.String)
    raise ValueError(f"{path}: row 1, column {col!r}: IDs must be strings or integers, got {dtype} "
                     f"(value {_first_value(lf, col)!r})")


def _num_to_ms(v: pl.Expr, unit: str, *, integer: bool) -> pl.Expr:
    """Epoch number -> epoch ms (Int64); integers stay exact, floats are floored."""
    scale = {"s": 1000.0, "ms": 1.0, "us": 1e-3, "ns": 1e-6}
    if integer:
        v = v.cast(pl.Int64)

        def conv(u: str) -> pl.Expr:
            return v * 1000 if u == "s" else v if u == "ms" else v // 1000 if u == "us" else v // 1_000_000
    else:
        v = pl.when(v.is_finite()).then(v)

        def conv(u: str) -> pl.Expr:
            return (v * scale[u]).floor().cast(pl.Int64)
    if unit != "auto":
        return conv(unit)
    a = v.abs()
    return (pl.when(a < _AUTO_BANDS[0]).then(conv("s")).when(a < _AUTO_BANDS[1]).then(conv("ms"))
            .when(a < _AUTO_BANDS[2]).then(conv("us")).otherwise(conv("ns")))


def _time_expr(lf: pl.LazyFrame, col: str, dtype: pl.DataType, unit: str, path: Path) -> pl.Expr:
    c = pl.col(col)
    if isinstance(dtype, pl.Datetime):
        if dtype.time_zone is not None:
            c = c.dt.convert_time_zone("UTC")
        return c.dt.epoch("ms")
    if dtype == pl.Date:
        return c.cast(pl.Datetime("ms")).dt.epoch("ms")
    if dtype.is_integer() or dtype.is_float():
        if unit == "iso":
            raise ValueError(f"{path}: row 1, column {col!r}: `time_unit` is iso but the column is {dtype} "
                             f"(value {_first_value(lf, col)!r})")
        return _num_to_ms(c, unit, integer=dtype.is_integer())
    if dtype == pl.String:
        s = c.str.strip_chars()
        iso = pl.coalesce([s.str.to_datetime(f, strict=False, time_unit="ms", time_zone="UTC").dt.epoch("ms")
                           for f in _ISO_FORMATS])
        if unit == "iso":
            return iso
        num = _num_to_ms(s.cast(pl.Float64, strict=False), unit, integer=False)
        return pl.coalesce([num, iso]) if unit == "auto" else num
    raise ValueError(f"{path}: row 1, column {col!r}: timestamps must be numbers, ISO-8601 strings or datetimes, "
                     f"got {dtype} (value {_first_value(lf, col)!r})")


def _weight_expr(lf: pl.LazyFrame, col: str, dtype: pl.DataType, path: Path) -> pl.Expr:
    if dtype.is_numeric() or dtype == pl.Boolean:
        w = pl.col(col).cast(pl.Float64)
    elif dtype == pl.String:
        w = pl.col(col).str.strip_chars().cast(pl.Float64, strict=False)
    else:
        raise ValueError(f"{path}: row 1, column {col!r}: weights must be numbers, got {dtype} "
                         f"(value {_first_value(lf, col)!r})")
    return pl.when(w.is_finite()).then(w)


# valid rows per dedupe group-by: bounds its hash table (~90 bytes a row) and the sort after it, see step 2; at 10M
# events 3M (4 chunks) peaks ~600 MiB vs ~740 MiB with 6M, for ~0.1 s more CPU (one more scan of the scratch file)
_DEDUPE_CHUNK_ROWS = 3_000_000
_BLANK = r"^\s*$"  # an empty or whitespace-only ID (a regex test: no stripped copy of every ID)
_SEQ_FILE_SHIFT = 1 << 40  # seq = file_idx * 2**40 + row: input order across files, and the way back to (file, row)


_REASON = pl.Enum(list(REJECT_REASONS))
_FREASON = pl.Enum(list(FILTER_REASONS))


def normalize(lf: pl.LazyFrame, *, path: Path, file_idx: int, fmt: str, cfg: PrepareConfig,
              user_codes: pl.Categories, item_codes: pl.Categories, details: bool = True) -> pl.LazyFrame:
    """Raw scan -> one normalised row per input row (everything that can be decided row by row).

    Columns: ``seq`` i64 (``file_idx * 2**40 + row``, row 1-based in the file), ``u`` / ``i`` u32 (codes of the
    user / item ID strings in ``user_codes`` / ``item_codes``), ``ts`` i64 epoch ms UTC, ``weight`` f64 (weight
    column value, or 1, times the event-type weight), ``reason`` (reject reason, an Enum of ``REJECT_REASONS``,
    null = valid row), ``freason`` (implicit-feedback filter reason of a valid row, an Enum of ``FILTER_REASONS``,
    null = kept), and with ``details`` the String columns ``bad_col``, ``bad_value``, ``user_raw``,
    ``item_raw`` (null except on rejected rows). Without ``details`` a row is ~34 bytes: the scratch copy of the
    whole log stays small and cheap to write; the details are recomputed only when there are rejected rows.
    """
    schema_ = lf.collect_schema()
    cols = _resolve_columns(cfg, fmt, schema_.names(), path)
    user = _id_expr(lf, cols.user, schema_[cols.user], path)
    item = _id_expr(lf, cols.item, schema_[cols.item], path)
    ts = _time_expr(lf, cols.time, schema_[cols.time], cfg.time_unit, path)
    w = _weight_expr(lf, cols.weight, schema_[cols.weight], path) if cols.weight else pl.lit(1.0)
    event = _id_expr(lf, cols.event, schema_[cols.event], path) if cols.event else pl.lit(None, pl.String)

    lf = lf.with_row_index("_row", offset=1).with_columns(_u=user, _i=item, _t=ts, _w=w, _e=event)
    raw = {c: pl.col(c).cast(pl.String) for c in {cols.user, cols.item, cols.time, cols.weight} if c}
    checks: list[tuple[pl.Expr, str, str]] = [
        (pl.col("_u").is_null(), "null_user", cols.user),
        (pl.col("_u").str.contains(_BLANK), "empty_user", cols.user),
        (pl.col("_i").is_null(), "null_item", cols.item),
        (pl.col("_i").str.contains(_BLANK), "empty_item", cols.item),
        (pl.col(cols.time).is_null(), "null_time", cols.time),
        (pl.col("_t").is_null(), "bad_time", cols.time),
    ]
    if cols.weight:
        checks += [(pl.col(cols.weight).is_null(), "null_weight", cols.weight),
                   (pl.col("_w").is_null(), "bad_weight", cols.weight)]
    if cfg.event_weights and cols.event:
        checks.append((pl.col("_e").is_null(), "null_event", cols.event))
        raw[cols.event] = pl.col(cols.event).cast(pl.String)

    # the checks run once (the reason); the column and the offending value are looked up from the reason, which
    # is null on almost every row
    reason_expr: Any = None
    for cond, reason, _col in checks:
        reason_expr = (pl.when(cond) if reason_expr is None else reason_expr.when(cond)).then(pl.lit(reason, _REASON))
    reason_expr = reason_expr.otherwise(pl.lit(None, _REASON))
    col_of = {reason: col for _cond, reason, col in checks}
    reason_str = pl.col("reason").cast(pl.String)
    bad_col = reason_str.replace_strict(col_of, default=None, return_dtype=pl.String)
    bad_value: Any = None
    for col in dict.fromkeys(col_of.values()):
        cond = reason_str.is_in([r for r, c in col_of.items() if c == col])
        bad_value = (pl.when(cond) if bad_value is None else bad_value.when(cond)).then(raw[col])
    bad_value = bad_value.otherwise(pl.lit(None, pl.String))

    # implicit feedback, decided per row: event-type weight, threshold, window, final weight
    if cfg.event_weights:
        ew = {str(k): float(v) for k, v in cfg.event_weights.items()}
        ev_w = pl.col("_e").replace_strict(ew, default=None, return_dtype=pl.Float64)
    else:
        ev_w = pl.lit(1.0)
    weight = (pl.lit(1.0) if cfg.binarize else pl.col("_w")) * ev_w
    start_ms, end_ms = parse_time(cfg.start, name="prepare.start"), parse_time(cfg.end, name="prepare.end")
    filt: list[tuple[pl.Expr, str]] = []
    if cfg.event_weights:
        filt.append((ev_w.is_null(), "unlisted_event"))
    if cfg.min_weight is not None:
        filt.append((pl.col("_w") < cfg.min_weight, "below_min_weight"))
    if start_ms is not None:
        filt.append((pl.col("_t") < start_ms, "before_start"))
    if end_ms is not None:
        filt.append((pl.col("_t") >= end_ms, "after_end"))
    filt.append((weight <= 0, "nonpositive_weight"))
    freason: Any = pl.when(pl.col("reason").is_not_null()).then(pl.lit(None, _FREASON))
    for cond, name in filt:
        freason = freason.when(cond).then(pl.lit(name, _FREASON))
    bad = pl.col("reason").is_not_null()
    detail_cols = [
        bad_col.alias("bad_col"),
        bad_value.alias("bad_value"),
        pl.when(bad).then(pl.col("_u")).alias("user_raw"),
        pl.when(bad).then(pl.col("_i")).alias("item_raw"),
    ] if details else []
    return lf.with_columns(reason=reason_expr).select(
        (pl.lit(file_idx * _SEQ_FILE_SHIFT, pl.Int64) + pl.col("_row").cast(pl.Int64)).alias("seq"),
        pl.col("_u").cast(pl.Categorical(user_codes)).to_physical().alias("u"),
        pl.col("_i").cast(pl.Categorical(item_codes)).to_physical().alias("i"),
        pl.col("_t").cast(pl.Int64).alias("ts"),
        weight.cast(pl.Float64).alias("weight"),
        "reason",
        freason.otherwise(pl.lit(None, _FREASON)).alias("freason"),
        *detail_cols,
    )


# ----------------------------------------------------------------------------------------------------------------
# the in-memory steps on integer codes (public for tests and reuse)
# ----------------------------------------------------------------------------------------------------------------


def kcore_filter(user: np.ndarray, item: np.ndarray, *, min_user: int, min_item: int
                 ) -> tuple[np.ndarray, np.ndarray, int]:
    """Iterated k-core of a bipartite interaction list, to the fixed point.

    ``user``, ``item``: ``[n]`` non-negative int codes of distinct (user, item) pairs. Returns ``(keep, reason,
    iterations)``: ``keep`` ``[n]`` bool; ``reason`` ``[n]`` int8, 0 = kept, 1 = dropped because its user fell
    below ``min_user``, 2 = because its item fell below ``min_item`` (a row failing both counts as a user drop).
    The result is the unique maximal sub-log in which every user has >= min_user items and every item has
    >= min_item users; the order of removals does not change it.
    """
    n = len(user)
    reason = np.zeros(n, dtype=np.int8)
    idx = np.arange(n, dtype=np.int32 if n < 2**31 else np.int64)
    n_users = int(user.max()) + 1 if n else 0
    n_items = int(item.max()) + 1 if n else 0
    iterations = 0
    while idx.size:
        u, i = (user, item) if idx.size == n else (user[idx], item[idx])
        # int32 counts: the per-row gathers below are then 4 bytes a row, not 8
        bad_u = np.bincount(u, minlength=n_users).astype(np.int32)[u] < min_user
        bad_i = np.bincount(i, minlength=n_items).astype(np.int32)[i] < min_item
        del u, i
        bad = bad_u | bad_i
        iterations += 1
        if not bad.any():
            break
        reason[idx[bad_u]] = 1
        reason[idx[bad_i & ~bad_u]] = 2
        idx = idx[~bad]
    keep = np.zeros(n, dtype=bool)
    keep[idx] = True
    return keep, reason, iterations


def split_codes(user: np.ndarray, ts: np.ndarray, *, cfg: PrepareConfig) -> tuple[np.ndarray, dict[str, Any]]:
    """Assign each row to train (0), valid (1) or test (2).

    ``user``: ``[n]`` user codes, each user's rows contiguous and in time order (the codes need not be sorted);
    ``ts``: ``[n]`` epoch ms. Per-user splits take the last rows of each user; ``global_time`` compares ``ts`` with
    the cutoffs. Returns ``(split [n] int8, description)``.
    """
    n = len(user)
    if cfg.split == "global_time":
        out = np.zeros(n, dtype=np.int8)
        test_ms = parse_time(cfg.test_start, name="prepare.test_start")
        valid_ms = parse_time(cfg.valid_start, name="prepare.valid_start")
        if n and test_ms is None and cfg.test_frac > 0:
            test_ms = int(np.quantile(ts, 1.0 - cfg.test_frac, method="lower"))
        if n and valid_ms is None and cfg.valid_frac > 0:
            valid_ms = int(np.quantile(ts, 1.0 - cfg.test_frac - cfg.valid_frac, method="lower"))
        if valid_ms is not None and test_ms is not None and valid_ms > test_ms:
            raise ValueError(f"`prepare.valid_start` ({_iso(valid_ms)}) must not be after `prepare.test_start` "
                             f"({_iso(test_ms)})")
        if valid_ms is not None:
            out[ts >= valid_ms] = 1
        if test_ms is not None:
            out[ts >= test_ms] = 2
        desc = {"method": "global_time", "valid_start": _iso(valid_ms), "test_start": _iso(test_ms),
                "valid_start_ms": valid_ms, "test_start_ms": test_ms,
                "rule": "valid: valid_start <= ts < test_start; test: ts >= test_start"}
        return out, desc
    if n == 0:
        return np.zeros(0, dtype=np.int8), {"method": cfg.split}
    # per-user arithmetic on run lengths ([n_users] arrays), then one np.repeat: no per-row int64 temporaries
    run_start = np.flatnonzero(np.concatenate([[True], user[1:] != user[:-1]]))
    cnt = np.diff(np.append(run_start, n))  # [n_users] rows per user, in row order
    room = np.maximum(cnt - cfg.min_train, 0)
    if cfg.split == "last_fraction":
        # ceil, with a tolerance so 30 * 0.1 = 3.0000000000000004 gives 3, not 4
        want_test = np.ceil(cnt * cfg.test_frac - 1e-9).astype(np.int64)
        want_valid = np.ceil(cnt * cfg.valid_frac - 1e-9).astype(np.int64)
        desc = {"method": "last_fraction", "valid_frac": cfg.valid_frac, "test_frac": cfg.test_frac,
                "rule": "per user, ordered by (ts, input order): the last ceil(n*test_frac) rows are test, the "
                        "ceil(n*valid_frac) before them valid, keeping >= min_train train rows"}
    else:
        want_test = np.full(len(cnt), cfg.test_n, dtype=np.int64)
        want_valid = np.full(len(cnt), cfg.valid_n, dtype=np.int64)
        desc = {"method": "last_n", "valid_n": cfg.valid_n, "test_n": cfg.test_n,
                "rule": "per user, ordered by (ts, input order): the last test_n rows are test, the valid_n before "
                        "them valid, keeping >= min_train train rows"}
    n_test = np.minimum(want_test, room)
    n_valid = np.minimum(want_valid, room - n_test)
    n_train = cnt - n_test - n_valid
    # each user's rows: n_train zeros, n_valid ones, n_test twos
    out = np.repeat(np.tile(np.array([0, 1, 2], dtype=np.int8), len(cnt)),
                    np.stack([n_train, n_valid, n_test], axis=1).ravel())
    desc["min_train"] = cfg.min_train
    return out, desc


def logq_prob(n_train: np.ndarray, *, smoothing: float = 0.0) -> np.ndarray:
    """``[n_items]`` float64 sampling probabilities for logQ: ``max(n_train + smoothing, 0.5)``, normalised."""
    mass = np.maximum(n_train.astype(np.float64) + smoothing, 0.5)
    return mass / mass.sum()


def _user_time_order(df: pl.DataFrame) -> pl.DataFrame:
    """Rows sorted by (u, ts, seq): each user's pairs together, in time order, for the split.

    A three-column sort goes through Polars' row encoding (~3x slower than two primitive keys here); when the user
    code and the time span fit in 64 bits together (e.g. 2**24 user codes over 2**40 ms = 35 years), (u, ts - min)
    is packed into one u64 and the sort is on [packed, seq]; otherwise the plain three-column sort.
    """
    if df.height < 2:
        return df
    t_lo, t_hi, u_hi = df["ts"].min(), df["ts"].max(), df["u"].max()
    t_bits = int(t_hi - t_lo).bit_length()
    if int(u_hi).bit_length() + t_bits > 64:
        return df.sort(["u", "ts", "seq"])
    packed = pl.col("u").cast(pl.UInt64) * (1 << t_bits) + (pl.col("ts") - t_lo).cast(pl.UInt64)
    return df.sort([packed, pl.col("seq")])


def _take(cols: dict[str, np.ndarray], mask: np.ndarray) -> None:
    """Filter every column in place of the dict, one at a time (peak memory: the data + one column)."""
    for c in list(cols):
        cols[c] = cols[c][mask]


def _decode(codes: np.ndarray, categories: pl.Categories) -> pl.Series:
    """u32 codes -> their ID strings."""
    return pl.Series(codes.astype(np.uint32)).cat.to(pl.Categorical(categories)).cast(pl.String)


def _vocab_order(ids: pl.Series, n_train: np.ndarray) -> np.ndarray:
    """Permutation of the rows: most train interactions first, ties by ID string (deterministic)."""
    frame = pl.DataFrame({"id": ids, "n": n_train, "k": np.arange(len(ids))})
    return frame.sort(["n", "id"], descending=[True, False])["k"].to_numpy()


# ----------------------------------------------------------------------------------------------------------------
# feature tables
# ----------------------------------------------------------------------------------------------------------------


_ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                  "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                  "War", "Western")  # fmt: skip
_ML_YEAR = r"\((\d{4})\)\s*$"  # "Toy Story (1995)"


def _read_text(path: Path) -> str:
    """A whole (optionally compressed) text file; MovieLens's older releases are Latin-1, not UTF-8."""
    with _open_bytes(path) as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _read_movielens_meta(path: Path, *, id_col: str, entity: str, title_col: str) -> pl.DataFrame:
    """MovieLens metadata as a table: movies.dat (``id::title::genres``, ML-1M / 10M), users.dat
    (``id::gender::age::occupation::zip``), ML-100K's u.item (``id|title|release date|video release date|IMDb URL|``
    19 genre flags) and u.user (``id|age|gender|occupation|zip``). Items get ``title``, ``genres`` (a list: a
    multi-valued feature) and ``year`` (from the title); zip codes are left out (nearly one per user: a second user
    ID, not a feature)."""
    lines = [ln for ln in _read_text(path).splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: the {entity}s file is empty")
    sep = "::" if "::" in lines[0] else "|"
    layouts = {  # (separator, entity, field count) -> column names (None = not kept)
        ("::", "item", 3): (id_col, title_col, "genres"),
        ("::", "user", 5): (id_col, "gender", "age", "occupation", None),
        ("|", "item", 5 + len(_ML100K_GENRES)): (id_col, title_col, None, None, None) + _ML100K_GENRES,
        ("|", "user", 5): (id_col, "age", "gender", "occupation", None),
    }
    n_fields = len(lines[0].split(sep))
    names = layouts.get((sep, entity, n_fields))
    if names is None:
        known = ", ".join(f"{n} fields separated by {s!r}" for (s, e, n) in layouts if e == entity)
        raise ValueError(f"{path}: row 1 has {n_fields} fields separated by {sep!r}; a MovieLens {entity}s file has "
                         f"{known}")
    rows = []
    for k, line in enumerate(lines, start=1):
        fields = line.split(sep, n_fields - 1) if sep == "::" else line.split(sep)
        if len(fields) != n_fields:
            raise ValueError(f"{path}: row {k} has {len(fields)} fields, row 1 has {n_fields} (value {line[:120]!r})")
        rows.append(fields)
    df = pl.DataFrame(rows, schema=[f"c{j}" for j in range(n_fields)], orient="row")
    df = df.rename({f"c{j}": c for j, c in enumerate(names) if c is not None})
    df = df.select([c for c in names if c is not None])
    if sep == "|" and entity == "item":  # 19 0/1 genre flags -> ["Action", "Comedy"]
        flags = [pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in _ML100K_GENRES]
        df = df.with_columns(pl.concat_list(flags).list.drop_nulls().alias("genres")).drop(_ML100K_GENRES)
    elif entity == "item":
        df = df.with_columns(pl.col("genres").str.split("|"))
    if entity == "item":
        df = _with_movielens_year(df, title_col)
    return df


def _with_movielens_year(df: pl.DataFrame, title_col: str) -> pl.DataFrame:
    """Add ``year`` from MovieLens titles ("Toy Story (1995)"), a categorical feature; no year = missing."""
    return df.with_columns(pl.col(title_col).str.extract(_ML_YEAR, 1).alias("year"))


def _read_meta(path: Path, *, id_col: str, cfg: PrepareConfig, entity: str) -> pl.DataFrame:
    name = _strip_compression(path.name.lower())
    typed = name.endswith((".item", ".user")) and re.search(r":(token|float|token_seq|float_seq)\b",
                                                             _first_line(path))
    fmt = "recbole" if typed else detect_format(path) if cfg.format in ("auto", "movielens") else cfg.format
    try:
        if fmt == "movielens":
            df = _read_movielens_meta(path, id_col=id_col, entity=entity, title_col=cfg.title_col)
        elif fmt == "recbole":  # RecBole .item / .user: tab-separated with a typed header ("item_id:token")
            lf = pl.scan_csv(path, separator="\t", infer_schema=False, quote_char=None)
            seqs = [c.split(":", 1)[0] for c in lf.collect_schema().names() if c.endswith(":token_seq")]
            df = lf.rename(lambda c: c.split(":", 1)[0]).collect()
            # token_seq: space-separated values (a multi-valued feature), except the title's words
            df = df.with_columns(pl.col(c).str.split(" ") for c in seqs if c != cfg.title_col)
        else:
            df = scan_file(path, fmt, separator=cfg.separator).collect()
        df = df.with_columns(pl.col(c).str.split(sep) for c, sep in cfg.multi_valued.items()
                             if df.schema.get(c) == pl.String)  # fmt: skip
    except pl.exceptions.PolarsError as e:
        raise ValueError(f"{path}: cannot read the {entity}s file: {e}") from None
    ml_id = _ML_CSV_IDS[entity]
    if id_col == f"{entity}_id" and id_col not in df.columns and ml_id in df.columns:  # MovieLens CSV: movies.csv
        df = df.rename({ml_id: id_col})
        if entity == "item" and cfg.title_col in df.columns and "year" not in df.columns:
            df = _with_movielens_year(df, cfg.title_col)
        if entity == "item" and df.schema.get("genres") == pl.String:
            df = df.with_columns(pl.col("genres").str.split("|"))
    if id_col not in df.columns:
        raise ValueError(f"{path}: missing column {id_col!r} (the {entity} ID); the file has columns {df.columns}")
    df = df.with_columns(pl.col(id_col).cast(pl.String))  # IDs are strings everywhere
    null_rows = df.with_row_index("_row", offset=1).filter(
        pl.col(id_col).is_null() | (pl.col(id_col).str.strip_chars() == ""))
    if null_rows.height:
        r = null_rows.row(0, named=True)
        raise ValueError(f"{path}: row {r['_row']}, column {id_col!r}: {entity} ID is null or empty "
                         f"(value {r[id_col]!r})")
    dup = df.with_row_index("_row", offset=1).filter(~pl.col(id_col).is_first_distinct())
    if dup.height:
        r = dup.row(0, named=True)
        raise ValueError(f"{path}: row {r['_row']}, column {id_col!r}: duplicate {entity} ID {r[id_col]!r}")
    return df


def _value_codes(present: pl.Series, name: str) -> pl.DataFrame:
    """A feature's vocabulary from its present values (one per row, or per row and value): value, code >= 1, codes
    by frequency, ties by value."""
    return (present.value_counts(name="n").sort(["n", name], descending=[True, False])
            .with_row_index("code", offset=1).select(pl.col(name).alias("value"), pl.col("code").cast(pl.Int32)))


def _encode_multi(col: pl.Series, name: str, max_values: int) -> tuple[pl.DataFrame, pl.Series]:
    """A multi-valued column (lists of strings) -> (its vocabulary: value, code >= 1 by frequency then value; the
    rows' codes: sorted distinct codes, at most ``max_values``, so the most frequent values are kept)."""
    vals = col.cast(pl.List(pl.String)).list.eval(pl.element().str.strip_chars().filter(pl.element() != ""))
    vals = vals.list.unique(maintain_order=True)  # a value repeated within one row counts once
    table = _value_codes(vals.explode().drop_nulls(), name)
    mapping = dict(zip(table["value"].to_list(), table["code"].to_list(), strict=True))
    coded = vals.list.eval(pl.element().replace_strict(mapping, return_dtype=pl.Int32)).list.sort()
    return table, coded.list.head(max_values).fill_null([])


def encode_features(vocab_ids: pl.Series, meta: pl.DataFrame | None, *, id_col: str, entity: str,
                    features: Sequence[str] | None, exclude: Sequence[str] = (), path: Path | None = None,
                    max_values: int = 32) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:  # fmt: skip
    """Encode categorical metadata columns with their own vocabularies.

    A list-of-strings column (a multi-valued feature: genres, tags) becomes a ``list[i32]`` column of its values'
    codes (at most ``max_values`` per row, the most frequent; empty = missing).

    ``vocab_ids``: ``[n]`` external IDs in vocabulary order. Returns ``(codes, feature_vocab, cardinality)``:
    ``codes`` has one ``feat_<name>`` Int32 column per feature, ``[n]`` rows in vocabulary order (0 = missing or
    unknown; an entity absent from ``meta`` is all 0); ``feature_vocab`` rows (entity, feature, value, code >= 1),
    codes ordered by frequency among the vocabulary's entities, ties by value.
    """
    base = pl.DataFrame({id_col: vocab_ids}).with_row_index("_k")
    vocab_rows = []
    cards: dict[str, int] = {}
    if meta is None:
        return pl.DataFrame(), _empty_feature_vocab(), cards
    if features is None:
        features = [c for c in meta.columns if c != id_col and c not in exclude and (
            meta.schema[c] in (pl.String, pl.Boolean, pl.List(pl.String)) or meta.schema[c].is_integer()
            or isinstance(meta.schema[c], (pl.Categorical, pl.Enum)))]
        skipped = [c for c in meta.columns if c != id_col and c not in exclude and c not in features]
        if skipped:
            log.info("%s features: not encoding non-categorical column(s) %s of %s", entity, skipped, path)
    else:
        missing = [c for c in features if c not in meta.columns]
        if missing:
            raise ValueError(f"{path}: missing {entity} feature column(s) {missing}; the file has {meta.columns}")
    joined = base.join(meta, on=id_col, how="left").sort("_k")
    codes = joined.select("_k")
    for name in features:
        if isinstance(joined.schema[name], pl.List):
            table, coded = _encode_multi(joined[name], name, max_values)
        else:
            val = pl.Series(name, joined[name].cast(pl.String)).str.strip_chars()
            table = _value_codes(val.filter(val.is_not_null() & (val != "")), name)
            coded = pl.DataFrame({"value": val}).join(table, on="value", how="left", maintain_order="left")["code"]
            coded = coded.fill_null(0).cast(pl.Int32)
        cards[name] = table.height
        vocab_rows.append(table.select(pl.lit(entity).alias("entity"), pl.lit(name).alias("feature"), "value", "code"))
        codes = codes.with_columns(coded.alias(f"{schema.FEAT_PREFIX}{name}"))
    fv = pl.concat(vocab_rows) if vocab_rows else _empty_feature_vocab()
    return codes.drop("_k"), fv, cards


def _empty_feature_vocab() -> pl.DataFrame:
    return pl.DataFrame(schema={"entity": pl.String, "feature": pl.String, "value": pl.String, "code": pl.Int32})


# ----------------------------------------------------------------------------------------------------------------
# the pipeline
# ----------------------------------------------------------------------------------------------------------------


class _Steps:
    """Logged steps with row counts and timings (kept in the manifest)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.t0 = time.perf_counter()

    @contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        rec: dict[str, Any] = {"step": name}
        t, c = time.perf_counter(), time.process_time()
        yield rec
        rec["seconds"] = round(time.perf_counter() - t, 3)
        # CPU seconds of all threads: on a shared machine wall time mostly measures the neighbours
        rec["cpu_seconds"] = round(time.process_time() - c, 3)
        # the process's peak resident memory so far (Linux reports KiB): which step sets the peak
        rec["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        self.rows.append(rec)
        extra = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in rec.items()
                          if k not in ("step", "seconds", "cpu_seconds", "peak_rss_mib"))
        log.info("prepare: %-18s %8.2fs (cpu %.2fs, peak %4.0f MiB)  %s", name, rec["seconds"], rec["cpu_seconds"],
                 rec["peak_rss_mib"], extra)


def prepare(
    logs: Sequence[str | Path] | str | Path,
    out: str | Path,
    *,
    items: str | Path | None = None,
    users: str | Path | None = None,
    config: PrepareConfig | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Prepare interaction logs into ``out`` (written atomically); returns the manifest.

    ``out`` is built in a hidden temp dir beside it, fsynced and renamed into place: a run that is killed or runs
    out of disk leaves ``out`` absent, or with ``overwrite`` the previous complete output (the error names ``out``);
    the next run removes the dead run's temp dir. Modes follow the umask (see ``recsys.core.io``).

    ``logs``: files, globs or directories (csv/tsv/parquet/ndjson/MovieLens, optionally .gz/.zst).
    ``items`` / ``users``: optional metadata tables keyed by the item / user ID column.
    """
    cfg = config or PrepareConfig()
    cfg.validate()
    files = expand_inputs(logs)
    items_path = expand_inputs([items], what="--items")[0] if items is not None else None
    users_path = expand_inputs([users], what="--users")[0] if users is not None else None
    fmts = [cfg.format if cfg.format != "auto" else detect_format(p) for p in files]
    steps = _Steps()
    t_start = time.perf_counter()

    with atomic_dir(out, overwrite=overwrite) as tmp:
        work = tmp / "_work"
        (work / "norm").mkdir(parents=True)
        manifest = _run(files, fmts, items_path, users_path, cfg, tmp, work, steps)
        shutil.rmtree(work)
        manifest["seconds"] = round(time.perf_counter() - t_start, 3)
        atomic_write_json(tmp / schema.MANIFEST, manifest)
    log.info("prepare: wrote %s in %.1fs", out, manifest["seconds"])
    return manifest


# errnos only a write can raise: a read+convert step failing with one of them is a full disk, not a bad input file
_WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS})


def _write_error(e: Exception, target: Path) -> OSError | None:
    """An ``OSError`` naming ``target`` when polars' error ``e`` wraps a write-only errno (``(os error 28)``)."""
    m = re.search(r"os error (\d+)", str(e))
    if m is None or int(m.group(1)) not in _WRITE_ERRNOS:
        return None
    n = int(m.group(1))
    return OSError(n, f"{os.strerror(n)} (writing the prepared output)", str(target))


def _run(files: list[Path], fmts: list[str], items_path: Path | None, users_path: Path | None,
         cfg: PrepareConfig, tmp: Path, work: Path, steps: _Steps) -> dict[str, Any]:
    # -- 1. read + validate: one streaming sink per file, so a read error names its file -------------------------
    # IDs become u32 codes right here (Categorical with run-private categories): the later steps never hash a
    # string again, and the scratch file stays small.
    if not hasattr(pl, "Categories"):
        raise RuntimeError(f"recsys prepare needs polars >= 1.32 (pl.Categories), found {pl.__version__}")
    # -- 0. the item / user metadata files (small next to the logs): read first, so their errors come at once ------
    item_meta = _read_meta(items_path, id_col=cfg.item_col, cfg=cfg, entity="item") if items_path else None
    user_meta = _read_meta(users_path, id_col=cfg.user_col, cfg=cfg, entity="user") if users_path else None
    missing = [c for c in cfg.multi_valued
               if not any(m is not None and c in m.columns for m in (item_meta, user_meta))]  # fmt: skip
    if missing:
        raise ValueError(f"`prepare.multi_valued` names column(s) {missing} that neither the items file "
                         f"({items_path}) nor the users file ({users_path}) has")
    tag = os.urandom(6).hex()
    user_codes, item_codes = pl.Categories(f"recsys-prepare-users-{tag}"), pl.Categories(f"recsys-prepare-items-{tag}")
    with steps.step("read+validate") as rec:
        inputs = []
        for k, (path, fmt) in enumerate(zip(files, fmts, strict=True)):
            inputs.append({**fingerprint_file(path), "format": fmt})
            lf = normalize(scan_file(path, fmt, separator=cfg.separator), path=path, file_idx=k, fmt=fmt, cfg=cfg,
                           user_codes=user_codes, item_codes=item_codes, details=False)
            try:  # uncompressed: ~34 bytes a row of fixed-width columns, lz4 would cost more time than it saves
                lf.sink_parquet(work / "norm" / f"part-{k:05d}.parquet", compression="uncompressed",
                                engine="streaming")
            except pl.exceptions.PolarsError as e:
                if (w := _write_error(e, work / "norm")) is not None:
                    raise w from e  # the disk, not the input: the scratch copy could not be written
                raise ValueError(f"{path}: cannot read as {fmt}: {e}") from None
        norm = pl.scan_parquet(work / "norm" / "*.parquet")
        acct = (norm.group_by((pl.col("seq") // _SEQ_FILE_SHIFT).alias("file"), "reason", "freason")
                .agg(pl.len().alias("n")).collect(engine="streaming"))
        per_file = acct.group_by("file").agg(pl.col("n").sum()).sort("file")
        for k, n in per_file.iter_rows():
            inputs[k]["rows"] = int(n)
        for rec_in in inputs:
            rec_in.setdefault("rows", 0)
        n_input = int(acct["n"].sum())
        acct = acct.with_columns(pl.col("reason", "freason").cast(pl.String))
        rejected = {r: int(n) for r, n in acct.filter(pl.col("reason").is_not_null())
                    .group_by("reason").agg(pl.col("n").sum()).sort("reason").iter_rows()}
        filtered = {r: int(n) for r, n in acct.filter(pl.col("freason").is_not_null())
                    .group_by("freason").agg(pl.col("n").sum()).sort("freason").iter_rows()}
        rec.update(files=len(files), rows=n_input, rejected=sum(rejected.values()),
                   filtered=sum(filtered.values()))
    if n_input == 0:
        raise ValueError(f"the logs hold no rows: {[str(p) for p in files]}")

    n_rejected = sum(rejected.values())
    file_of = pl.col("seq") // _SEQ_FILE_SHIFT
    row_of = pl.col("seq") % _SEQ_FILE_SHIFT
    # the rejected rows' details (column, raw values): a second pass over the inputs, run only when there are any
    details = pl.concat([
        normalize(scan_file(path, fmt, separator=cfg.separator), path=path, file_idx=k, fmt=fmt, cfg=cfg,
                  user_codes=user_codes, item_codes=item_codes).filter(pl.col("reason").is_not_null())
        for k, (path, fmt) in enumerate(zip(files, fmts, strict=True))])
    if n_rejected and cfg.on_bad_rows == "error":
        first = (details.sort("seq").head(1)
                 .select(file_of.alias("file"), row_of.alias("row"), pl.col("reason").cast(pl.String), "bad_col",
                         "bad_value")
                 .collect(engine="streaming").row(0, named=True))
        raise ValueError(
            f"{files[first['file']]}: row {first['row']}, column {first['bad_col']!r}: "
            f"{REJECT_REASONS[first['reason']]} (value {first['bad_value']!r}); {n_rejected:,} bad row(s) in all "
            f"({', '.join(f'{k}: {v}' for k, v in rejected.items())}); pass --on-bad-rows skip to write them to "
            f"{schema.REJECTS} instead")
    if cfg.on_bad_rows == "skip":
        with steps.step("rejects") as rec:
            paths = {k: str(p) for k, p in enumerate(files)}
            ((details if n_rejected else details.head(0))
             .select(file_of.replace_strict(paths, return_dtype=pl.String).alias("file"), row_of.alias("row"),
                     pl.col("bad_col").alias("column"), pl.col("reason").cast(pl.String),
                     pl.col("bad_value").alias("value"),
                     pl.col("user_raw").alias("user_id"), pl.col("item_raw").alias("item_id"))
             .sink_parquet(tmp / schema.REJECTS, engine="streaming"))
            rec.update(rows=n_rejected)

    # -- 2. dedupe: one row per (user, item), a streaming hash group-by on one u64 pair key ----------------------
    # A pair keeps the time of its first (for "last": its last) event; `seq` becomes the input position of the
    # pair's first row, which breaks ties in time. first/last pick their event by (ts, seq), never by arrival.
    with steps.step("dedupe") as rec:
        ts_c, seq_c, w_c = pl.col("ts"), pl.col("seq"), pl.col("weight")
        if cfg.dedupe == "last":
            agg = [ts_c.max(), seq_c.min(), w_c.sort_by([ts_c, seq_c]).last()]
        elif cfg.dedupe == "first":
            agg = [ts_c.min(), seq_c.min(), w_c.sort_by([ts_c, seq_c]).first()]
        else:  # simple aggregations only: the fast path of the group-by
            agg = [ts_c.min(), seq_c.min(), w_c.sum()]
        good = norm.filter(pl.col("reason").is_null() & pl.col("freason").is_null())
        n_before = n_input - n_rejected - sum(filtered.values())
        pair = (pl.col("u").cast(pl.UInt64) * (1 << 32) + pl.col("i").cast(pl.UInt64)).alias("pair")
        # The group-by's hash table costs ~100 bytes per pair: run it on slices of the users (u % n_chunks, a
        # re-scan of the scratch file each) so peak memory stays flat as the log grows.
        n_chunks = max(1, math.ceil(n_before / _DEDUPE_CHUNK_ROWS))
        # Each chunk's pairs go straight into numpy columns sized for the worst case (no pair deduplicated; pages
        # are only touched as rows land) and the chunk is dropped before the next group-by, which then reuses its
        # memory: the peak is the columns + one chunk, never all chunks + their numpy copy.
        cols_np = {"u": np.empty(n_before, np.uint32), "i": np.empty(n_before, np.uint32),
                   "ts": np.empty(n_before, np.int64), "weight": np.empty(n_before, np.float32)}
        n_pairs = 0
        for c in range(n_chunks):
            part = good if n_chunks == 1 else good.filter(pl.col("u") % n_chunks == c)
            chunk = _user_time_order(
                part.group_by(pair).agg(agg)
                .select((pl.col("pair") // (1 << 32)).cast(pl.UInt32).alias("u"),
                        (pl.col("pair") % (1 << 32)).cast(pl.UInt32).alias("i"), "ts", "seq",
                        pl.col("weight").cast(pl.Float32))
                .collect(engine="streaming"))
            m = chunk.height
            for name, col in cols_np.items():  # seq has done its job: the rows are in order
                col[n_pairs:n_pairs + m] = chunk[name].to_numpy()
            n_pairs += m
            del chunk
        cols_np = {name: col[:n_pairs] for name, col in cols_np.items()}  # each user's rows together, in time order
        n_dedup = n_before - n_pairs
        rec.update(rows=n_pairs, deduplicated=n_dedup, chunks=n_chunks)
    if n_pairs == 0:
        raise ValueError(f"no interaction is left after validation and filters (filtered: {filtered}, "
                         f"rejected: {rejected})")

    n_user_codes = int(cols_np["u"].max()) + 1
    n_item_codes = int(cols_np["i"].max()) + 1

    # -- 4. k-core to a fixed point --------------------------------------------------------------------------------
    # the catalogue before k-core (what prepare.kcore_items may cut from it)
    items_before_kcore = int(np.count_nonzero(np.bincount(cols_np["i"], minlength=n_item_codes)))
    users_before_kcore = int(np.count_nonzero(np.bincount(cols_np["u"], minlength=n_user_codes)))
    with steps.step("kcore") as rec:
        keep, why, iters = kcore_filter(cols_np["u"], cols_np["i"], min_user=cfg.kcore_users,
                                        min_item=cfg.kcore_items)
        filtered["kcore_users"] = int((why == 1).sum())
        filtered["kcore_items"] = int((why == 2).sum())
        del why
        if not keep.all():
            _take(cols_np, keep)  # keeps each user's rows together and in time order
        del keep
        rec.update(rows=len(cols_np["u"]), iterations=iters)
    if len(cols_np["u"]) == 0:
        raise ValueError(f"k-core filtering (kcore_users={cfg.kcore_users}, kcore_items={cfg.kcore_items}) left no "
                         f"interaction; lower `prepare.kcore_users` / `prepare.kcore_items`")

    # -- 5. temporal split ------------------------------------------------------------------------------------------
    with steps.step("split") as rec:
        cols_np["split"], split_desc = split_codes(cols_np["u"], cols_np["ts"], cfg=cfg)
        extra: dict[str, int] = {}
        if cfg.drop_cold:
            u, i, train = cols_np["u"], cols_np["i"], cols_np["split"] == 0
            has_u = np.bincount(u[train], minlength=n_user_codes) > 0
            has_i = np.bincount(i[train], minlength=n_item_codes) > 0
            cold_u = ~train & ~has_u[u]
            cold_i = ~train & ~cold_u & ~has_i[i]
            extra = {"cold_user": int(cold_u.sum()), "cold_item": int(cold_i.sum())}
            cols_np["split"][cold_u | cold_i] = 3  # rows stay where they are: each user's block keeps its order
            del u, i, train, cold_u, cold_i
        u, i, ts, w, split = (cols_np[c] for c in ("u", "i", "ts", "weight", "split"))
        del cols_np
        if cfg.drop_cold and not (split == 0).any():
            raise ValueError(f"no interaction is left in train after the {cfg.split} split: every valid/test row is "
                             f"cold ({extra.get('cold_user', 0)} cold-user and {extra.get('cold_item', 0)} cold-item "
                             f"rows) and no row is in train; set `prepare.drop_cold=false` or move the cutoff")
        rec.update(train=int((split == 0).sum()), valid=int((split == 1).sum()), test=int((split == 2).sum()),
                   extra=int((split == 3).sum()))

    # -- 6. vocabularies (train frequency order), outputs --------------------------------------------------------
    with steps.step("vocab+write") as rec:
        train = split == 0
        ucodes = np.flatnonzero(np.bincount(u, minlength=n_user_codes) > 0)
        icodes = np.flatnonzero(np.bincount(i, minlength=n_item_codes) > 0)
        u_ntrain = np.bincount(u[train], minlength=n_user_codes)[ucodes]
        i_ntrain = np.bincount(i[train], minlength=n_item_codes)[icodes]
        user_strs = _decode(ucodes, user_codes)
        item_strs = _decode(icodes, item_codes)
        uperm = _vocab_order(user_strs, u_ntrain)
        iperm = _vocab_order(item_strs, i_ntrain)
        ucodes, u_ntrain = ucodes[uperm], u_ntrain[uperm]
        icodes, i_ntrain = icodes[iperm], i_ntrain[iperm]
        u_map = np.full(n_user_codes, -1, dtype=np.int32)
        u_map[ucodes] = np.arange(len(ucodes), dtype=np.int32)
        i_map = np.full(n_item_codes, -1, dtype=np.int32)
        i_map[icodes] = np.arange(len(icodes), dtype=np.int32)
        n_users, n_items = len(ucodes), len(icodes)
        user_ids = user_strs.gather(uperm).alias(schema.USER_ID)
        item_ids = item_strs.gather(iperm).alias(schema.ITEM_ID)
        del user_strs, item_strs, train

        # Each user's rows are one contiguous block in (ts, seq) order: moving whole blocks into user_idx order
        # gives the (user_idx, ts, seq) order of the contract without sorting rows.
        run_start = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]]))
        if len(run_start) != n_users:  # an internal invariant (one block per user), never a data problem
            raise AssertionError(f"{len(run_start)} row blocks for {n_users} users")
        run_len = np.diff(np.append(run_start, len(u)))
        by_idx = np.argsort(u_map[u[run_start]])  # [n_users] blocks in user_idx order
        lens = run_len[by_idx]
        order = np.repeat(run_start[by_idx] - (np.cumsum(lens) - lens), lens) + np.arange(len(u))  # [n] rows
        del u, run_start, run_len, by_idx
        rows_np = {schema.ITEM_IDX: i, schema.TS: ts, schema.WEIGHT: w, "split": split}
        del i, ts, w, split
        for c in list(rows_np):  # one column at a time: peak is the data + one column
            rows_np[c] = rows_np[c][order]
        del order
        rows_np[schema.ITEM_IDX] = i_map[rows_np[schema.ITEM_IDX]]
        rows_np[schema.USER_IDX] = np.repeat(np.arange(n_users, dtype=np.int32), lens)
        split = rows_np["split"]
        for code, (name, fname) in enumerate(schema.SPLITS.items()):
            m = split == code
            # Polars' writer encodes the columns in parallel (pyarrow's takes ~1.5x the time here)
            frame = pl.DataFrame({c: rows_np[c][m] for c in (schema.USER_IDX, schema.ITEM_IDX, schema.TS,
                                                              schema.WEIGHT)})
            frame.write_parquet(tmp / fname, compression="zstd")
            rec[name] = frame.height
            del frame, m

        # serving state, one row per user in user_idx order: the last N items of train+valid (oldest first) and
        # the distinct items of train+valid (ascending)
        m = split < 2
        (h_off, h_vals), (s_off, s_vals) = history_and_seen(
            rows_np[schema.USER_IDX][m], rows_np[schema.ITEM_IDX][m], n_users=n_users, n_items=n_items,
            history_len=cfg.history_len)
        del m
        write_ragged(tmp / schema.HISTORY, h_off, h_vals)
        write_ragged(tmp / schema.SEEN, s_off, s_vals)
        del h_vals, s_vals
        first_ts = (pl.DataFrame({"i": rows_np[schema.ITEM_IDX], "ts": rows_np[schema.TS]})
                    .group_by("i").agg(pl.col("ts").min()).sort("i")["ts"].to_numpy())
        n_kept = len(split)
        time_range = (int(rows_np[schema.TS].min()), int(rows_np[schema.TS].max()))
        del rows_np, split

        # vocabularies + feature tables
        i_codes, i_fv, i_cards = encode_features(item_ids.rename(cfg.item_col), item_meta, id_col=cfg.item_col,
                                                 entity="item", features=cfg.item_features,
                                                 exclude=(cfg.title_col,), path=items_path,
                                                 max_values=cfg.max_values)  # fmt: skip
        u_codes, u_fv, u_cards = encode_features(user_ids.rename(cfg.user_col), user_meta, id_col=cfg.user_col,
                                                 entity="user", features=cfg.user_features, path=users_path,
                                                 max_values=cfg.max_values)  # fmt: skip
        items_df = pl.DataFrame({
            schema.ITEM_ID: item_ids,
            schema.ITEM_IDX: np.arange(n_items, dtype=np.int32),
            "n_train": i_ntrain.astype(np.int32),
            "prob": logq_prob(i_ntrain, smoothing=cfg.prob_smoothing),
            "first_ts": first_ts.astype(np.int64),
        }).hstack(i_codes)
        has_title = item_meta is not None and cfg.title_col in item_meta.columns
        if has_title:
            titles = (pl.DataFrame({cfg.item_col: item_ids}).join(
                item_meta.select(cfg.item_col, pl.col(cfg.title_col).cast(pl.String).alias(schema.TITLE)),
                on=cfg.item_col, how="left", maintain_order="left")[schema.TITLE])
            items_df = items_df.with_columns(titles)
        users_df = pl.DataFrame({
            schema.USER_ID: user_ids,
            schema.USER_IDX: np.arange(n_users, dtype=np.int32),
            "n_train": u_ntrain.astype(np.int32),
        }).hstack(u_codes)
        items_df.write_parquet(tmp / schema.ITEMS)
        users_df.write_parquet(tmp / schema.USERS)
        pl.concat([u_fv, i_fv]).write_parquet(tmp / schema.FEATURE_VOCAB)
        meta_missing = {
            "items_without_metadata": _count_missing(item_ids, item_meta, cfg.item_col),
            "users_without_metadata": _count_missing(user_ids, user_meta, cfg.user_col),
        }
        rec.update(users=n_users, items=n_items)

    filtered = {k: filtered.get(k, 0) for k in FILTER_REASONS if k in filtered}
    rows = {
        "input": n_input,
        "rejected": rejected,
        "filtered": filtered,
        "deduplicated": n_dedup,
        "kept": n_kept,
        "train": rec["train"],
        "valid": rec["valid"],
        "test": rec["test"],
        "extra": rec["extra"],
        "extra_reasons": {k: extra[k] for k in EXTRA_REASONS if k in extra},
    }
    accounted = n_kept + n_dedup + sum(filtered.values()) + sum(rejected.values())
    if accounted != n_input:  # an internal invariant; failing it is a bug, never a data problem
        raise AssertionError(f"row accounting broke: input {n_input} != accounted {accounted} ({rows})")
    config_dict = to_dict(cfg)
    fp_src = json.dumps({"inputs": inputs, "items": items_path and fingerprint_file(items_path),
                         "users": users_path and fingerprint_file(users_path), "config": config_dict},
                        sort_keys=True, default=str)
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "kind": "prepared_dataset",
        "created_at": datetime.now(timezone.utc).isoformat(),
        "fingerprint": hashlib.sha256(fp_src.encode()).hexdigest(),
        "config": config_dict,
        "inputs": inputs,
        "items_file": fingerprint_file(items_path) if items_path else None,
        "users_file": fingerprint_file(users_path) if users_path else None,
        "rows": rows,
        "counts": {"n_users": n_users, "n_items": n_items, "train": rows["train"], "valid": rows["valid"],
                   "test": rows["test"], "extra": rows["extra"], "items_before_kcore": items_before_kcore,
                   "users_before_kcore": users_before_kcore},
        "split": split_desc,
        "dedupe": {"policy": cfg.dedupe, "note": "dedupe happens before the split: each (user, item) pair appears "
                                                 "once in the whole dataset"},
        "time_range": {"min": _iso(time_range[0]), "max": _iso(time_range[1])},
        "features": {"user": u_cards, "item": i_cards},
        "title": has_title,
        "metadata": meta_missing,
        "prob": "prob_i = max(n_train_i + prob_smoothing, 0.5) / sum_j max(n_train_j + prob_smoothing, 0.5)",
        "history_len": cfg.history_len,
        "steps": steps.rows,
    }


def _count_missing(ids: pl.Series, meta: pl.DataFrame | None, id_col: str) -> int | None:
    if meta is None:
        return None
    return int((~ids.is_in(meta[id_col].implode())).sum())


# ----------------------------------------------------------------------------------------------------------------
# reading a prepared dataset back
# ----------------------------------------------------------------------------------------------------------------


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a prepared dataset, checked for the schema version this code writes."""
    path = Path(data_dir) / schema.MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist (is {str(data_dir)!r} the output of `recsys prepare`?)")
    man = json.loads(path.read_text())
    if man.get("schema_version") != schema.SCHEMA_VERSION:
        raise ValueError(f"{path}: schema_version {man.get('schema_version')!r} is not the supported "
                         f"{schema.SCHEMA_VERSION}")
    return man


def read_tables(data_dir: str | Path, *, lazy: bool = False) -> dict[str, Any]:
    """Every table of a prepared dataset as Polars frames (for inspection; training loads with
    ``recsys.data.load_prepared``) keyed by name ("train", "valid", "test", "users",
    "items", "feature_vocab", "history", "seen", and "rejects" when present) plus "manifest"."""
    d = Path(data_dir)
    out: dict[str, Any] = {"manifest": read_manifest(d)}
    names = {**{k: v for k, v in schema.SPLITS.items()}, "users": schema.USERS, "items": schema.ITEMS,
             "feature_vocab": schema.FEATURE_VOCAB, "history": schema.HISTORY, "seen": schema.SEEN,
             "rejects": schema.REJECTS}
    for key, fname in names.items():
        p = d / fname
        if p.exists():
            out[key] = pl.scan_parquet(p) if lazy else pl.read_parquet(p)
        elif key != "rejects":
            raise FileNotFoundError(f"{str(p)!r} does not exist")
    return out


def load_vocabs(data_dir: str | Path) -> tuple[Vocab, Vocab]:
    """``(users, items)`` vocabularies of a prepared dataset (or bundle), row == user_idx / item_idx."""
    d = Path(data_dir)
    return (Vocab.from_parquet(d / schema.USERS, schema.USER_ID),
            Vocab.from_parquet(d / schema.ITEMS, schema.ITEM_ID))


def format_summary(manifest: Mapping[str, Any]) -> str:
    """A plain-text table of the steps (rows, seconds) and the row accounting of a manifest."""
    lines = [f"{'step':<18} {'seconds':>9}  details"]
    for s in manifest.get("steps", []):
        extra = ", ".join(f"{k}={v:,}" if isinstance(v, int) else f"{k}={v}" for k, v in s.items()
                          if k not in ("step", "seconds"))
        lines.append(f"{s['step']:<18} {s['seconds']:>9.2f}  {extra}")
    r = manifest["rows"]
    lines.append("")
    lines.append(f"{'rows':<30} {'count':>12}")
    lines.append(f"{'input':<30} {r['input']:>12,}")
    for k, v in r["rejected"].items():
        lines.append(f"{'  rejected: ' + k:<30} {v:>12,}")
    for k, v in r["filtered"].items():
        lines.append(f"{'  filtered: ' + k:<30} {v:>12,}")
    lines.append(f"{'  deduplicated':<30} {r['deduplicated']:>12,}")
    lines.append(f"{'  kept':<30} {r['kept']:>12,}")
    for k in ("train", "valid", "test", "extra"):
        if k in r:
            lines.append(f"{'    ' + k:<30} {r[k]:>12,}")
    for k, v in (r.get("extra_reasons") or {}).items():
        lines.append(f"{'      extra: ' + k:<30} {v:>12,}")
    c = manifest["counts"]
    lines.append(f"{'users':<30} {c['n_users']:>12,}")
    lines.append(f"{'items':<30} {c['n_items']:>12,}")
    if "seconds" in manifest:
        lines.append(f"{'total seconds':<30} {manifest['seconds']:>12.2f}")
    return "\n".join(lines)
