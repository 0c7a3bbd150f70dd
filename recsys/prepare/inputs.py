"""Reading the logs: file globs, format detection, lazy scans, MovieLens layouts, and the per-file normalisation
(validate, code the IDs, implicit-feedback filters) into scratch parquet."""

from __future__ import annotations

import glob
import gzip
import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from recsys.core.io import sha256_file
from recsys.prepare.config import (
    AUTO_BANDS,
    FILTER_REASONS,
    ISO_FORMATS,
    REJECT_REASONS,
    PrepareConfig,
    parse_time,
)


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
                           and strip_compression(p.name.lower()).endswith(LOG_SUFFIXES))
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
    if st.st_size <= FULL_HASH_MAX:
        fp["sha256"] = sha256_file(p)
    else:
        with open(p, "rb") as f:
            fp["sha256_first_mib"] = hashlib.sha256(f.read(1 << 20)).hexdigest()
    return fp


def strip_compression(name: str) -> str:
    for suf in (".gz", ".gzip", ".zst", ".zstd"):
        if name.endswith(suf):
            return name[: -len(suf)]
    return name


def detect_format(path: str | Path) -> str:
    """The reader for a file from its name: csv / tsv / parquet / ndjson / movielens."""
    name = strip_compression(Path(path).name.lower())
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


def open_bytes(path: Path):  # noqa: ANN202 - a binary file object
    """``path`` opened for binary reading, gzip / zstd decompressed by its name."""
    name = path.name.lower()
    if name.endswith((".gz", ".gzip")):
        return gzip.open(path, "rb")
    if name.endswith((".zst", ".zstd")):
        return pa.CompressedInputStream(pa.OSFile(str(path)), "zstd")
    return open(path, "rb")


def first_line(path: Path) -> str:
    with open_bytes(path) as f:
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
        line = first_line(path)
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


ML_CSV_IDS = {"user": "userId", "item": "movieId"}  # the ID columns of MovieLens's CSV releases


def _movielens_csv(cfg: PrepareConfig, names: Sequence[str]) -> bool:
    """A MovieLens CSV ratings file read with the default column names: its userId / movieId stand in for them."""
    return (cfg.user_col, cfg.item_col) == ("user_id", "item_id") and not {"user_id", "item_id"} & set(names) \
        and set(ML_CSV_IDS.values()) <= set(names)


def _resolve_columns(cfg: PrepareConfig, fmt: str, names: Sequence[str], path: Path) -> _Columns:
    if fmt == "movielens":
        user, item, tcol, weight = "user_id", "item_id", "timestamp", "rating"
        weight = weight if weight in names else None
    else:
        user, item, tcol = cfg.user_col, cfg.item_col, cfg.time_col
        weight = cfg.weight_col if cfg.weight_col is not None else ("weight" if "weight" in names else None)
        if _movielens_csv(cfg, names):  # ratings.csv of ML-latest / 20M / 25M / 32M: userId,movieId,rating,timestamp
            user, item = ML_CSV_IDS["user"], ML_CSV_IDS["item"]
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
    return (pl.when(a < AUTO_BANDS[0]).then(conv("s")).when(a < AUTO_BANDS[1]).then(conv("ms"))
            .when(a < AUTO_BANDS[2]).then(conv("us")).otherwise(conv("ns")))


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
                           for f in ISO_FORMATS])
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
DEDUPE_CHUNK_ROWS = 3_000_000


_BLANK = r"^\s*$"  # an empty or whitespace-only ID (a regex test: no stripped copy of every ID)


SEQ_FILE_SHIFT = 1 << 40  # seq = file_idx * 2**40 + row: input order across files, and the way back to (file, row)


_REASON = pl.Enum(list(REJECT_REASONS))


_FREASON = pl.Enum(list(FILTER_REASONS))


# ~90 lines: one lazy Polars query per input file (validate, code, filter), built as one expression chain.
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
        (pl.lit(file_idx * SEQ_FILE_SHIFT, pl.Int64) + pl.col("_row").cast(pl.Int64)).alias("seq"),
        pl.col("_u").cast(pl.Categorical(user_codes)).to_physical().alias("u"),
        pl.col("_i").cast(pl.Categorical(item_codes)).to_physical().alias("i"),
        pl.col("_t").cast(pl.Int64).alias("ts"),
        weight.cast(pl.Float64).alias("weight"),
        "reason",
        freason.otherwise(pl.lit(None, _FREASON)).alias("freason"),
        *detail_cols,
    )


FULL_HASH_MAX = 8 << 20  # inputs up to 8 MiB are hashed whole, bigger ones by their first MiB


LOG_SUFFIXES = (".parquet", ".pq", ".csv", ".tsv", ".tab", ".ndjson", ".jsonl", ".json", ".inter", ".dat", ".data")
