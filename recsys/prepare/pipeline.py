"""``prepare``: the run (read -> dedupe -> k-core -> split -> vocabularies -> write), its manifest, and reading
a prepared dataset back."""

from __future__ import annotations

import errno
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
from typing import Any

import numpy as np
import polars as pl

from recsys.core import schema
from recsys.core.config import to_dict
from recsys.core.data import history_and_seen, write_ragged
from recsys.core.io import atomic_dir, atomic_write_json
from recsys.core.vocab import Vocab
from recsys.prepare.config import EXTRA_REASONS, FILTER_REASONS, REJECT_REASONS, PrepareConfig, iso
from recsys.prepare.features import encode_features, read_meta
from recsys.prepare.inputs import (
    DEDUPE_CHUNK_ROWS,
    SEQ_FILE_SHIFT,
    detect_format,
    expand_inputs,
    fingerprint_file,
    normalize,
    scan_file,
)
from recsys.prepare.steps import (
    decode,
    kcore_filter,
    logq_prob,
    split_codes,
    take,
    user_time_order,
    vocab_order,
)

log = logging.getLogger(__name__)


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


@dataclass
class _Meta:
    """The optional item / user metadata tables and the files they came from."""

    items_path: Path | None
    users_path: Path | None
    items: pl.DataFrame | None
    users: pl.DataFrame | None


@dataclass
class _Read:
    """What read+validate leaves for the later steps."""

    inputs: list[dict[str, Any]]  # per log file: its fingerprint, format and rows
    norm: pl.LazyFrame  # the normalised scratch copy (see `normalize`): u, i, ts, seq, weight, reason, freason
    n_input: int
    rejected: dict[str, int]  # reject reason -> rows
    filtered: dict[str, int]  # filter reason -> rows (before k-core)
    user_codes: pl.Categories  # the run-private categories behind the u32 codes u / i
    item_codes: pl.Categories
    # A `pl.Categories` is only a weak reference: polars drops the code -> ID mapping once no frame or series uses
    # it. These empty series hold the mappings until the vocabularies are decoded.
    keepalive: list[pl.Series] = field(default_factory=list)

    @property
    def n_rejected(self) -> int:
        return sum(self.rejected.values())


@dataclass
class _Pairs:
    """The deduplicated (user, item) pairs, each user's rows together and in time order.

    ``cols``: u, i (u32 codes), ts, weight, and "split" once split. The steps filter and reorder the columns in
    place, one at a time, and the last one pops them: this dict is their only owner, so peak memory stays at the
    data + one column.
    """

    cols: dict[str, np.ndarray]
    n_user_codes: int  # code bounds (max + 1) for the bincounts
    n_item_codes: int
    n_dedup: int  # rows merged into an earlier row of their pair


@dataclass
class _Vocabs:
    """The user / item vocabularies: the IDs in index order (train frequency, then ID) and code -> index maps."""

    user_ids: pl.Series
    item_ids: pl.Series
    u_ntrain: np.ndarray  # [n_users] train rows, in index order
    i_ntrain: np.ndarray
    u_map: np.ndarray  # [n_user_codes] int32 user code -> user_idx (-1: not kept)
    i_map: np.ndarray


@dataclass
class _Written:
    """What vocab+write reports for the manifest."""

    n_users: int
    n_items: int
    n_kept: int
    splits: dict[str, int]  # rows written per split name
    time_range: tuple[int, int]
    features: dict[str, Any]  # {"user": cards, "item": cards}
    has_title: bool
    metadata: dict[str, int | None]


def _run(files: list[Path], fmts: list[str], items_path: Path | None, users_path: Path | None,
         cfg: PrepareConfig, tmp: Path, work: Path, steps: _Steps) -> dict[str, Any]:
    """The steps in order (read -> rejects -> dedupe -> k-core -> split -> vocab+write); returns the manifest."""
    if not hasattr(pl, "Categories"):
        raise RuntimeError(f"recsys prepare needs polars >= 1.32 (pl.Categories), found {pl.__version__}")
    meta = _read_metadata(items_path, users_path, cfg)
    read = _read_validate(files, fmts, cfg, work, steps)
    details = _reject_details(files, fmts, cfg, read)
    if read.n_rejected and cfg.on_bad_rows == "error":
        raise _bad_row_error(files, details, read)
    if cfg.on_bad_rows == "skip":
        _write_rejects(files, details, read.n_rejected, tmp, steps)
    pairs = _dedupe(read, cfg, steps)
    kcore_dropped, before_kcore = _kcore(pairs, cfg, steps)
    split_desc, extra = _split(pairs, cfg, steps)
    written = _vocab_and_write(pairs, read, meta, cfg, tmp, steps)
    return _manifest(cfg, read, meta, {**read.filtered, **kcore_dropped}, pairs.n_dedup, before_kcore, split_desc,
                     extra, written, steps)


def _read_metadata(items_path: Path | None, users_path: Path | None, cfg: PrepareConfig) -> _Meta:
    """The item / user metadata files (small next to the logs): read first, so their errors come at once."""
    item_meta = read_meta(items_path, id_col=cfg.item_col, cfg=cfg, entity="item") if items_path else None
    user_meta = read_meta(users_path, id_col=cfg.user_col, cfg=cfg, entity="user") if users_path else None
    missing = [c for c in cfg.multi_valued
               if not any(m is not None and c in m.columns for m in (item_meta, user_meta))]  # fmt: skip
    if missing:
        raise ValueError(f"`prepare.multi_valued` names column(s) {missing} that neither the items file "
                         f"({items_path}) nor the users file ({users_path}) has")
    return _Meta(items_path, users_path, item_meta, user_meta)


def _read_validate(files: list[Path], fmts: list[str], cfg: PrepareConfig, work: Path, steps: _Steps) -> _Read:
    """Read + validate: one streaming sink per file into ``work/norm``, so a read error names its file.

    IDs become u32 codes right here (Categorical with run-private categories): the later steps never hash a string
    again, and the scratch file stays small.
    """
    tag = os.urandom(6).hex()
    user_codes, item_codes = pl.Categories(f"recsys-prepare-users-{tag}"), pl.Categories(f"recsys-prepare-items-{tag}")
    keepalive = [pl.Series([], dtype=pl.Categorical(c)) for c in (user_codes, item_codes)]
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
        acct = (norm.group_by((pl.col("seq") // SEQ_FILE_SHIFT).alias("file"), "reason", "freason")
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
    return _Read(inputs, norm, n_input, rejected, filtered, user_codes, item_codes, keepalive)


_FILE_OF = pl.col("seq") // SEQ_FILE_SHIFT
_ROW_OF = pl.col("seq") % SEQ_FILE_SHIFT


def _reject_details(files: list[Path], fmts: list[str], cfg: PrepareConfig, read: _Read) -> pl.LazyFrame:
    """The rejected rows' details (column, raw values): a second pass over the inputs, run only when there are any
    (the frame is lazy)."""
    return pl.concat([
        normalize(scan_file(path, fmt, separator=cfg.separator), path=path, file_idx=k, fmt=fmt, cfg=cfg,
                  user_codes=read.user_codes, item_codes=read.item_codes).filter(pl.col("reason").is_not_null())
        for k, (path, fmt) in enumerate(zip(files, fmts, strict=True))])


def _bad_row_error(files: list[Path], details: pl.LazyFrame, read: _Read) -> ValueError:
    """on_bad_rows="error": the error naming the first rejected row (file, row, column, value) and the counts."""
    first = (details.sort("seq").head(1)
             .select(_FILE_OF.alias("file"), _ROW_OF.alias("row"), pl.col("reason").cast(pl.String), "bad_col",
                     "bad_value")
             .collect(engine="streaming").row(0, named=True))
    return ValueError(
        f"{files[first['file']]}: row {first['row']}, column {first['bad_col']!r}: "
        f"{REJECT_REASONS[first['reason']]} (value {first['bad_value']!r}); {read.n_rejected:,} bad row(s) in all "
        f"({', '.join(f'{k}: {v}' for k, v in read.rejected.items())}); pass --on-bad-rows skip to write them to "
        f"{schema.REJECTS} instead")


def _write_rejects(files: list[Path], details: pl.LazyFrame, n_rejected: int, tmp: Path, steps: _Steps) -> None:
    """on_bad_rows="skip": the rejected rows with their reasons -> rejects.parquet (empty when there are none)."""
    with steps.step("rejects") as rec:
        paths = {k: str(p) for k, p in enumerate(files)}
        ((details if n_rejected else details.head(0))
         .select(_FILE_OF.replace_strict(paths, return_dtype=pl.String).alias("file"), _ROW_OF.alias("row"),
                 pl.col("bad_col").alias("column"), pl.col("reason").cast(pl.String),
                 pl.col("bad_value").alias("value"),
                 pl.col("user_raw").alias("user_id"), pl.col("item_raw").alias("item_id"))
         .sink_parquet(tmp / schema.REJECTS, engine="streaming"))
        rec.update(rows=n_rejected)


def _dedupe(read: _Read, cfg: PrepareConfig, steps: _Steps) -> _Pairs:
    """Dedupe: one row per (user, item), a streaming hash group-by on one u64 pair key.

    A pair keeps the time of its first (for "last": its last) event; `seq` becomes the input position of the pair's
    first row, which breaks ties in time. first/last pick their event by (ts, seq), never by arrival.
    """
    with steps.step("dedupe") as rec:
        ts_c, seq_c, w_c = pl.col("ts"), pl.col("seq"), pl.col("weight")
        if cfg.dedupe == "last":
            agg = [ts_c.max(), seq_c.min(), w_c.sort_by([ts_c, seq_c]).last()]
        elif cfg.dedupe == "first":
            agg = [ts_c.min(), seq_c.min(), w_c.sort_by([ts_c, seq_c]).first()]
        else:  # simple aggregations only: the fast path of the group-by
            agg = [ts_c.min(), seq_c.min(), w_c.sum()]
        good = read.norm.filter(pl.col("reason").is_null() & pl.col("freason").is_null())
        n_before = read.n_input - read.n_rejected - sum(read.filtered.values())
        pair = (pl.col("u").cast(pl.UInt64) * (1 << 32) + pl.col("i").cast(pl.UInt64)).alias("pair")
        # The group-by's hash table costs ~100 bytes per pair: run it on slices of the users (u % n_chunks, a
        # re-scan of the scratch file each) so peak memory stays flat as the log grows.
        n_chunks = max(1, math.ceil(n_before / DEDUPE_CHUNK_ROWS))
        # Each chunk's pairs go straight into numpy columns sized for the worst case (no pair deduplicated; pages
        # are only touched as rows land) and the chunk is dropped before the next group-by, which then reuses its
        # memory: the peak is the columns + one chunk, never all chunks + their numpy copy.
        cols_np = {"u": np.empty(n_before, np.uint32), "i": np.empty(n_before, np.uint32),
                   "ts": np.empty(n_before, np.int64), "weight": np.empty(n_before, np.float32)}
        n_pairs = 0
        for c in range(n_chunks):
            part = good if n_chunks == 1 else good.filter(pl.col("u") % n_chunks == c)
            chunk = user_time_order(
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
        raise ValueError(f"no interaction is left after validation and filters (filtered: {read.filtered}, "
                         f"rejected: {read.rejected})")
    return _Pairs(cols_np, int(cols_np["u"].max()) + 1, int(cols_np["i"].max()) + 1, n_dedup)


def _kcore(pairs: _Pairs, cfg: PrepareConfig, steps: _Steps) -> tuple[dict[str, int], dict[str, int]]:
    """K-core to a fixed point, filtering ``pairs.cols`` in place.

    Returns (rows dropped per filter reason: kcore_users / kcore_items, the catalogue before k-core: what
    prepare.kcore_items may cut from it, as items_before_kcore / users_before_kcore).
    """
    cols_np = pairs.cols
    before = {
        "items_before_kcore": int(np.count_nonzero(np.bincount(cols_np["i"], minlength=pairs.n_item_codes))),
        "users_before_kcore": int(np.count_nonzero(np.bincount(cols_np["u"], minlength=pairs.n_user_codes))),
    }
    with steps.step("kcore") as rec:
        keep, why, iters = kcore_filter(cols_np["u"], cols_np["i"], min_user=cfg.kcore_users,
                                        min_item=cfg.kcore_items)
        dropped = {"kcore_users": int((why == 1).sum()), "kcore_items": int((why == 2).sum())}
        del why
        if not keep.all():
            take(cols_np, keep)  # keeps each user's rows together and in time order
        del keep
        rec.update(rows=len(cols_np["u"]), iterations=iters)
    if len(cols_np["u"]) == 0:
        raise ValueError(f"k-core filtering (kcore_users={cfg.kcore_users}, kcore_items={cfg.kcore_items}) left no "
                         f"interaction; lower `prepare.kcore_users` / `prepare.kcore_items`")
    return dropped, before


def _split(pairs: _Pairs, cfg: PrepareConfig, steps: _Steps) -> tuple[dict[str, Any], dict[str, int]]:
    """Temporal split: adds ``pairs.cols["split"]`` (0 train, 1 valid, 2 test, 3 extra = cold rows moved
    out by drop_cold). Returns (the split's description, the extra rows per reason)."""
    cols_np = pairs.cols
    with steps.step("split") as rec:
        cols_np["split"], split_desc = split_codes(cols_np["u"], cols_np["ts"], cfg=cfg)
        extra: dict[str, int] = {}
        if cfg.drop_cold:
            u, i, train = cols_np["u"], cols_np["i"], cols_np["split"] == 0
            has_u = np.bincount(u[train], minlength=pairs.n_user_codes) > 0
            has_i = np.bincount(i[train], minlength=pairs.n_item_codes) > 0
            cold_u = ~train & ~has_u[u]
            cold_i = ~train & ~cold_u & ~has_i[i]
            extra = {"cold_user": int(cold_u.sum()), "cold_item": int(cold_i.sum())}
            cols_np["split"][cold_u | cold_i] = 3  # rows stay where they are: each user's block keeps its order
            del u, i, train, cold_u, cold_i
        split = cols_np["split"]
        if cfg.drop_cold and not (split == 0).any():
            raise ValueError(f"no interaction is left in train after the {cfg.split} split: every valid/test row is "
                             f"cold ({extra.get('cold_user', 0)} cold-user and {extra.get('cold_item', 0)} cold-item "
                             f"rows) and no row is in train; set `prepare.drop_cold=false` or move the cutoff")
        rec.update(train=int((split == 0).sum()), valid=int((split == 1).sum()), test=int((split == 2).sum()),
                   extra=int((split == 3).sum()))
    return split_desc, extra


def _vocab_and_write(pairs: _Pairs, read: _Read, meta: _Meta, cfg: PrepareConfig, tmp: Path,
                     steps: _Steps) -> _Written:
    """Vocabularies (train frequency order) and the outputs. Consumes ``pairs.cols``."""
    with steps.step("vocab+write") as rec:
        vocabs = _vocabs(pairs, read.user_codes, read.item_codes)
        n_users, n_items = len(vocabs.user_ids), len(vocabs.item_ids)
        rows_np = _user_idx_order(pairs.cols, vocabs, n_users)
        splits = _write_splits(rows_np, tmp)
        rec.update(splits)
        _write_serving_state(rows_np, n_users, n_items, cfg.history_len, tmp)
        first_ts = (pl.DataFrame({"i": rows_np[schema.ITEM_IDX], "ts": rows_np[schema.TS]})
                    .group_by("i").agg(pl.col("ts").min()).sort("i")["ts"].to_numpy())
        n_kept = len(rows_np["split"])
        time_range = (int(rows_np[schema.TS].min()), int(rows_np[schema.TS].max()))
        del rows_np
        features, has_title, metadata = _write_vocab_tables(vocabs, first_ts, meta, cfg, tmp)
        rec.update(users=n_users, items=n_items)
    return _Written(n_users, n_items, n_kept, splits, time_range, features, has_title, metadata)


def _vocabs(pairs: _Pairs, user_codes: pl.Categories, item_codes: pl.Categories) -> _Vocabs:
    """The users / items that are left, most train rows first (ties by ID string), with code -> index maps."""
    u, i, split = pairs.cols["u"], pairs.cols["i"], pairs.cols["split"]
    n_user_codes, n_item_codes = pairs.n_user_codes, pairs.n_item_codes
    train = split == 0
    ucodes = np.flatnonzero(np.bincount(u, minlength=n_user_codes) > 0)
    icodes = np.flatnonzero(np.bincount(i, minlength=n_item_codes) > 0)
    u_ntrain = np.bincount(u[train], minlength=n_user_codes)[ucodes]
    i_ntrain = np.bincount(i[train], minlength=n_item_codes)[icodes]
    del train
    user_strs = decode(ucodes, user_codes)
    item_strs = decode(icodes, item_codes)
    uperm = vocab_order(user_strs, u_ntrain)
    iperm = vocab_order(item_strs, i_ntrain)
    ucodes, u_ntrain = ucodes[uperm], u_ntrain[uperm]
    icodes, i_ntrain = icodes[iperm], i_ntrain[iperm]
    u_map = np.full(n_user_codes, -1, dtype=np.int32)
    u_map[ucodes] = np.arange(len(ucodes), dtype=np.int32)
    i_map = np.full(n_item_codes, -1, dtype=np.int32)
    i_map[icodes] = np.arange(len(icodes), dtype=np.int32)
    user_ids = user_strs.gather(uperm).alias(schema.USER_ID)
    item_ids = item_strs.gather(iperm).alias(schema.ITEM_ID)
    return _Vocabs(user_ids, item_ids, u_ntrain, i_ntrain, u_map, i_map)


def _user_idx_order(cols: dict[str, np.ndarray], vocabs: _Vocabs, n_users: int) -> dict[str, np.ndarray]:
    """The rows in (user_idx, ts, seq) order with item_idx / user_idx columns (plus ts, weight, split); pops the
    columns out of ``cols`` so each old column is freed as soon as its reordered copy exists.

    Each user's rows are one contiguous block in (ts, seq) order: moving whole blocks into user_idx order gives
    the (user_idx, ts, seq) order of the contract without sorting rows.
    """
    u = cols.pop("u")
    run_start = np.flatnonzero(np.concatenate([[True], u[1:] != u[:-1]]))
    if len(run_start) != n_users:  # an internal invariant (one block per user), never a data problem
        raise AssertionError(f"{len(run_start)} row blocks for {n_users} users")
    run_len = np.diff(np.append(run_start, len(u)))
    by_idx = np.argsort(vocabs.u_map[u[run_start]])  # [n_users] blocks in user_idx order
    lens = run_len[by_idx]
    order = np.repeat(run_start[by_idx] - (np.cumsum(lens) - lens), lens) + np.arange(len(u))  # [n] rows
    del u, run_start, run_len, by_idx
    rows_np = {schema.ITEM_IDX: cols.pop("i"), schema.TS: cols.pop("ts"), schema.WEIGHT: cols.pop("weight"),
               "split": cols.pop("split")}
    for c in list(rows_np):  # one column at a time: peak is the data + one column
        rows_np[c] = rows_np[c][order]
    del order
    rows_np[schema.ITEM_IDX] = vocabs.i_map[rows_np[schema.ITEM_IDX]]
    rows_np[schema.USER_IDX] = np.repeat(np.arange(n_users, dtype=np.int32), lens)
    return rows_np


def _write_splits(rows_np: dict[str, np.ndarray], tmp: Path) -> dict[str, int]:
    """train / valid / test / extra .parquet (user_idx, item_idx, ts, weight); returns the rows of each."""
    split = rows_np["split"]
    counts: dict[str, int] = {}
    for code, (name, fname) in enumerate(schema.SPLITS.items()):
        m = split == code
        # Polars' writer encodes the columns in parallel (pyarrow's takes ~1.5x the time here)
        frame = pl.DataFrame({c: rows_np[c][m] for c in (schema.USER_IDX, schema.ITEM_IDX, schema.TS,
                                                          schema.WEIGHT)})
        frame.write_parquet(tmp / fname, compression="zstd")
        counts[name] = frame.height
        del frame, m
    return counts


def _write_serving_state(rows_np: dict[str, np.ndarray], n_users: int, n_items: int, history_len: int,
                         tmp: Path) -> None:
    """Serving state, one row per user in user_idx order: the last ``history_len`` items of train+valid (oldest
    first) -> history.parquet and the distinct items of train+valid (ascending) -> seen.parquet."""
    m = rows_np["split"] < 2
    (h_off, h_vals), (s_off, s_vals) = history_and_seen(
        rows_np[schema.USER_IDX][m], rows_np[schema.ITEM_IDX][m], n_users=n_users, n_items=n_items,
        history_len=history_len)
    del m
    write_ragged(tmp / schema.HISTORY, h_off, h_vals)
    write_ragged(tmp / schema.SEEN, s_off, s_vals)


def _write_vocab_tables(vocabs: _Vocabs, first_ts: np.ndarray, meta: _Meta, cfg: PrepareConfig,
                        tmp: Path) -> tuple[dict[str, Any], bool, dict[str, int | None]]:
    """Vocabularies + feature tables: items.parquet, users.parquet, feature_vocab.parquet. Returns (the feature
    cardinalities {"user": .., "item": ..}, whether items carry a title, the IDs without metadata)."""
    item_ids, user_ids, item_meta, user_meta = vocabs.item_ids, vocabs.user_ids, meta.items, meta.users
    n_items, n_users = len(item_ids), len(user_ids)
    i_codes, i_fv, i_cards = encode_features(item_ids.rename(cfg.item_col), item_meta, id_col=cfg.item_col,
                                             entity="item", features=cfg.item_features,
                                             exclude=(cfg.title_col,), path=meta.items_path,
                                             max_values=cfg.max_values)  # fmt: skip
    u_codes, u_fv, u_cards = encode_features(user_ids.rename(cfg.user_col), user_meta, id_col=cfg.user_col,
                                             entity="user", features=cfg.user_features, path=meta.users_path,
                                             max_values=cfg.max_values)  # fmt: skip
    items_df = pl.DataFrame({
        schema.ITEM_ID: item_ids,
        schema.ITEM_IDX: np.arange(n_items, dtype=np.int32),
        "n_train": vocabs.i_ntrain.astype(np.int32),
        "prob": logq_prob(vocabs.i_ntrain, smoothing=cfg.prob_smoothing),
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
        "n_train": vocabs.u_ntrain.astype(np.int32),
    }).hstack(u_codes)
    items_df.write_parquet(tmp / schema.ITEMS)
    users_df.write_parquet(tmp / schema.USERS)
    pl.concat([u_fv, i_fv]).write_parquet(tmp / schema.FEATURE_VOCAB)
    meta_missing = {
        "items_without_metadata": _count_missing(item_ids, item_meta, cfg.item_col),
        "users_without_metadata": _count_missing(user_ids, user_meta, cfg.user_col),
    }
    return {"user": u_cards, "item": i_cards}, has_title, meta_missing


def _manifest(cfg: PrepareConfig, read: _Read, meta: _Meta, filtered: dict[str, int], n_dedup: int,
              before_kcore: dict[str, int], split_desc: dict[str, Any], extra: dict[str, int], written: _Written,
              steps: _Steps) -> dict[str, Any]:
    """The manifest: row accounting (checked: every input row is kept, merged, filtered or rejected), counts,
    fingerprint of inputs + config, and the steps."""
    n_input, rejected, n_kept = read.n_input, read.rejected, written.n_kept
    filtered = {k: filtered.get(k, 0) for k in FILTER_REASONS if k in filtered}
    rows = {
        "input": n_input,
        "rejected": rejected,
        "filtered": filtered,
        "deduplicated": n_dedup,
        "kept": n_kept,
        "train": written.splits["train"],
        "valid": written.splits["valid"],
        "test": written.splits["test"],
        "extra": written.splits["extra"],
        "extra_reasons": {k: extra[k] for k in EXTRA_REASONS if k in extra},
    }
    accounted = n_kept + n_dedup + sum(filtered.values()) + sum(rejected.values())
    if accounted != n_input:  # an internal invariant; failing it is a bug, never a data problem
        raise AssertionError(f"row accounting broke: input {n_input} != accounted {accounted} ({rows})")
    items_path, users_path = meta.items_path, meta.users_path
    config_dict = to_dict(cfg)
    fp_src = json.dumps({"inputs": read.inputs, "items": items_path and fingerprint_file(items_path),
                         "users": users_path and fingerprint_file(users_path), "config": config_dict},
                        sort_keys=True, default=str)
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "kind": "prepared_dataset",
        "created_at": datetime.now(timezone.utc).isoformat(),
        "fingerprint": hashlib.sha256(fp_src.encode()).hexdigest(),
        "config": config_dict,
        "inputs": read.inputs,
        "items_file": fingerprint_file(items_path) if items_path else None,
        "users_file": fingerprint_file(users_path) if users_path else None,
        "rows": rows,
        "counts": {"n_users": written.n_users, "n_items": written.n_items, "train": rows["train"],
                   "valid": rows["valid"], "test": rows["test"], "extra": rows["extra"], **before_kcore},
        "split": split_desc,
        "dedupe": {"policy": cfg.dedupe, "note": "dedupe happens before the split: each (user, item) pair appears "
                                                 "once in the whole dataset"},
        "time_range": {"min": iso(written.time_range[0]), "max": iso(written.time_range[1])},
        "features": written.features,
        "title": written.has_title,
        "metadata": written.metadata,
        "prob": "prob_i = max(n_train_i + prob_smoothing, 0.5) / sum_j max(n_train_j + prob_smoothing, 0.5)",
        "history_len": cfg.history_len,
        "steps": steps.rows,
    }


def _count_missing(ids: pl.Series, meta: pl.DataFrame | None, id_col: str) -> int | None:
    if meta is None:
        return None
    return int((~ids.is_in(meta[id_col].implode())).sum())


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
    ``recsys.core.data.load_prepared``) keyed by name ("train", "valid", "test", "users",
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
