"""The in-memory steps on the deduplicated pairs: k-core, the temporal split, logQ probabilities, orderings."""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from recsys.prepare.config import PrepareConfig, iso, parse_time


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
            raise ValueError(f"`prepare.valid_start` ({iso(valid_ms)}) must not be after `prepare.test_start` "
                             f"({iso(test_ms)})")
        if valid_ms is not None:
            out[ts >= valid_ms] = 1
        if test_ms is not None:
            out[ts >= test_ms] = 2
        desc = {"method": "global_time", "valid_start": iso(valid_ms), "test_start": iso(test_ms),
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


def user_time_order(df: pl.DataFrame) -> pl.DataFrame:
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


def take(cols: dict[str, np.ndarray], mask: np.ndarray) -> None:
    """Filter every column in place of the dict, one at a time (peak memory: the data + one column)."""
    for c in list(cols):
        cols[c] = cols[c][mask]


def decode(codes: np.ndarray, categories: pl.Categories) -> pl.Series:
    """u32 codes -> their ID strings."""
    return pl.Series(codes.astype(np.uint32)).cat.to(pl.Categorical(categories)).cast(pl.String)


def vocab_order(ids: pl.Series, n_train: np.ndarray) -> np.ndarray:
    """Permutation of the rows: most train interactions first, ties by ID string (deterministic)."""
    frame = pl.DataFrame({"id": ids, "n": n_train, "k": np.arange(len(ids))})
    return frame.sort(["n", "id"], descending=[True, False])["k"].to_numpy()


