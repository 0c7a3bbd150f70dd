"""The future, as users run it: raw past logs through the CLI and a running gRPC server, scored on what came next.

Two cuts of the logs into a past and a future (``--cut per_user|global|both``, default ``per_user``):

- **per-user** (#8): each user's timeline is cut in two (sorted by time, ties by input order): the last 20%
  (rounded up) of the user's distinct items, by the time of their first event, are **the future**; every event
  before the first of them is **the past**. Every user's future starts at a different time.
- **global** (#15, what a batch retrain sees): one time ``t``, the time of the event 20% (rounded up) of all events
  from the end (sorted by time, ties by input order); every event before ``t`` is the past, every event at or after
  it the future (ties at ``t`` go to the future). The future is scored only for **known users** (the past has an
  event of theirs), without their past items; users who first appear after ``t`` are not scored.

The past is written as a user would hand it over -- a CSV with string IDs and its own column names,
plus item / user feature files -- and goes through the CLI as subprocesses with the default config::

    recsys prepare --logs past.csv --items items.csv --users users.csv --user-col uid --item-col movie ...
    recsys train --data prepared --out run --set train.seed=S
    recsys export --run run --models models
    recsys serve --models models --port P

Then the running server is asked over gRPC, like any client would, for every past user (``BatchRecommend``, k=20,
seen items excluded by the server's default; a user the bundle does not know is asked for by ``Recommend`` with
the last 50 items of their past as history), and the answers are scored on the future: Recall@20, NDCG@20,
HitRate@10 over the full catalogue. Future items the catalogue lacks (k-core, never seen in the past) are misses for
every model.

Peers are fit in the same run on the same past (a binary user x item matrix; they rank every item of the past,
the user's past items excluded): popularity (all-time), recent popularity (users per item over the last W days
before the past ends -- the cut time ``t``, or the past's last event for the per-user cut; ties, e.g. every item
outside a short window, broken by all-time counts), EASE (``recsys.evaluate.baselines.EASE``) and implicit ALS
(``implicit.als.AlternatingLeastSquares`` on CPU, ``pip install -e '.[bench]'``). EASE's ``l2``, ALS's factors /
regularization / alpha and recent popularity's W (1, 3, 7, 14, 30, 60, 120, 365 days or all-time) are picked on a
validation cut of the past made by the benchmark's own cut rule (per-user: each user's last 20% of the past;
global: the past's last 20% of events by time, its known users), fit on the rest (NDCG@20), then refit on the
whole past (W then counts back from the end of the whole past). Stochastic models (two-tower, ALS) report the mean
of ``--seeds`` seeds and each seed's value.

Fresh events: each user's future is split in two halves by time; the first half is given as the user's fresh
events and the second half is scored (past + first half excluded for every model). Rows: the same bundle without
them (``exclude_item_ids`` = first half), the same bundle with them (``Recommend(user_id, history_item_ids=first
half)``), EASE scoring the extended row, ALS ``recalculate_user`` on the extended row, popularity and recent
popularity. It is made for both cuts; its target (#8) is reported for the per-user cut only.

Targets (``targets()``): two-tower Recall@20 and NDCG@20 over the best peer (recent popularity included), >= 1.10x
on the per-user cut (#8), >= 1.0x on the global cut (#15).

The benchmark passes no tuning to recsys: the only ``--set`` it adds is what a user must pass to read the files
(the genres column's separator) and ``train.seed``. ``--set KEY=VALUE`` (repeatable) forwards an override to
prepare or train (by its section) for experiments, and ``--variant NAME:KEY=VALUE[,KEY=VALUE]`` adds a two-tower
row with extra overrides (``--compare-holdout`` = ``--variant holdout:train.final_fit=train_valid``, the model
fit without prepare's test split; skipped when the installed recsys does not know the setting).

    .venv/bin/python benchmarks/future_bench.py --quick                 # 1 seed, small synth: a smoke run
    .venv/bin/python benchmarks/future_bench.py                         # both datasets, 3 seeds: 6 trainings
    .venv/bin/python benchmarks/future_bench.py --datasets ml100k --cut global \\
        --out benchmarks/results/future_bench_global.json
    .venv/bin/python benchmarks/future_bench.py --datasets ml100k --compare-holdout
    .venv/bin/python benchmarks/future_bench.py --datasets ml100k --skip-peers \\
        --variant kcore1:prepare.kcore_items=1 --variant kcore2:prepare.kcore_items=2 \\
        --out benchmarks/results/future_bench_kcore.json

Cost is the two-tower trainings: on the shared 2-core machine one ML-100K training took ~6 min next to one other
job and 15-25 min under heavy contention; the synthetic logs (200k events) train ~2x longer. Peers take about a
minute or two. With a kept ``--workdir`` a rerun reuses finished trainings (``done-*.json``), so an interrupted run
resumes where it stopped; each cut works in its own directory (``WORKDIR/NAME`` for the per-user cut, as before,
``WORKDIR/NAME-global`` for the global one) and its stamps name the cut, so the two never reuse each other's
models. Writes benchmarks/results/future_bench.json (unless --no-save; after each dataset and cut): machine, git
commit, config, per-seed numbers; ``datasets[NAME]`` is the per-user cut (as before ``--cut``) and
``datasets["NAME@global"]`` the global one, each with its ``cut`` and ``protocol``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ml100k import fetch_ml100k  # noqa: E402
from recsys.core import schema  # noqa: E402
from recsys.core.metrics import ranking_metrics  # noqa: E402

K = 20  # Recall@K / NDCG@K, and the k asked of every model
HIT_K = 10  # HitRate@HIT_K
FUTURE_FRAC = 0.2  # each user's last 20% (ceil) of distinct items is the future; the same rule cuts validation
HISTORY_N = 50  # items of the past sent as history for a user the bundle does not know (prepare's history_len)
BATCH_USERS = 1000  # users per BatchRecommend
EASE_GRID = (50, 100, 250, 500, 1000, 2000, 5000)
ALS_GRID = {"factors": (32, 64, 128, 256), "regularization": (0.01, 0.1, 1.0, 10.0), "alpha": (1.0, 10.0, 40.0)}
ALS_GRID_QUICK = {"factors": (32, 128), "regularization": (0.1, 1.0), "alpha": (1.0, 10.0)}
ALS_ITERATIONS = 15
RECENT_DAYS = (1, 3, 7, 14, 30, 60, 120, 365, None)  # recent popularity's windows (days; None = all time)
DAY_S = 86_400
CUTS = ("per_user", "global")
PY = sys.executable
_SERVE = ("past -> CLI (prepare/train/export, defaults) -> recsys serve -> BatchRecommend k=20 over gRPC; peers "
          "fit on the binary past matrix")
PROTOCOL = {  # one line per cut, into the JSON beside its numbers
    "per_user": (f"per-user cut: last {FUTURE_FRAC:.0%} (ceil) of each user's distinct items by first event = "
                 f"future, events before = past; {_SERVE}, tuned on the past's own last 20% (same rule); recent "
                 "popularity counts the last W days before the past's last event; full catalogue, past items "
                 "excluded; future items outside a model's catalogue are misses"),
    "global": (f"global cut: one time t, the last {FUTURE_FRAC:.0%} (ceil) of all events at or after it = future, "
               f"events before t = past; the future is scored only for users the past knows, their past items "
               f"excluded; {_SERVE}, tuned on a global cut of the past (its last 20% of events by time); recent "
               "popularity counts the last W days before t; full catalogue; future items outside a model's "
               "catalogue are misses"),
}
TARGET = {"per_user": 1.10, "global": 1.0}  # two-tower / best peer, Recall@20 and NDCG@20 (#8 and #15)
METRICS = (f"recall@{K}", f"ndcg@{K}", f"hit_rate@{HIT_K}")


# ------------------------------------------------------------------------------------------------------ raw data
@dataclass
class RawData:
    """A dataset as a user holds it: events in input order, item / user metadata, and how to write them."""

    name: str
    events: pl.DataFrame  # user (str), item (str), ts (int, epoch s), extra columns; input order
    items: pl.DataFrame  # item (str) + feature columns
    users: pl.DataFrame  # user (str) + feature columns
    columns: dict[str, str]  # our column -> the name in the user's files (user, item, ts, extra columns)
    cli: list[str]  # prepare flags a user needs to read those files
    time_format: str = "epoch"  # "epoch" (seconds) or "iso" (ISO-8601 strings in the CSV)
    info: dict = field(default_factory=dict)


def ml100k_raw(cache: Path) -> RawData:
    """MovieLens-100K with string IDs (u196, m242), ratings kept as the rating column, genres "|"-separated."""
    raw = fetch_ml100k(cache)
    inter = pl.read_csv(raw / "ml-100k.inter", separator="\t", quote_char=None)
    inter = inter.rename(lambda c: c.split(":", 1)[0])
    events = inter.select(
        ("u" + pl.col("user_id").cast(pl.String)).alias("user"),
        ("m" + pl.col("item_id").cast(pl.String)).alias("item"),
        pl.col("timestamp").cast(pl.Int64).alias("ts"),
        pl.col("rating").cast(pl.Int64).alias("rating"),
    )
    items = pl.read_csv(raw / "ml-100k.item", separator="\t", quote_char=None, infer_schema=False)
    items = items.rename(lambda c: c.split(":", 1)[0]).select(
        ("m" + pl.col("item_id")).alias("item"),
        pl.col("movie_title").alias("title"),
        pl.col("release_year").alias("year"),
        pl.col("class").str.replace_all(" ", "|").alias("genres"),
    )
    users = pl.read_csv(raw / "ml-100k.user", separator="\t", quote_char=None, infer_schema=False)
    users = users.rename(lambda c: c.split(":", 1)[0]).select(
        ("u" + pl.col("user_id")).alias("user"), "age", "gender", "occupation")  # zip codes: one per user, left out
    # The rating is the interaction weight (prepare's default once a weight column is named: no threshold, not
    # binarised); every rating is an interaction for the peers too (binary matrix).
    return RawData(
        "ml100k", events, items, users,
        columns={"user": "uid", "item": "movie", "ts": "ts", "rating": "rating"},
        cli=["--user-col", "uid", "--item-col", "movie", "--time-col", "ts", "--weight-col", "rating",
             "--set", 'prepare.multi_valued={genres="|"}'],
    )


def synth_raw(work: Path, *, events: int, users: int, items: int) -> RawData:
    """``recsys synth`` logs (view / click / purchase events), renamed and written with ISO-8601 times."""
    out = work / "synth-raw"
    subprocess.run([PY, "-m", "recsys", "synth", "--out", str(out), "--events", str(events), "--users", str(users),
                    "--items", str(items), "--overwrite"], check=True, capture_output=True)
    logs = pl.read_parquet(sorted((out / "logs").glob("*.parquet")))
    ev = logs.select(pl.col("user_id").alias("user"), pl.col("item_id").alias("item"),
                     pl.col("timestamp").cast(pl.Int64).alias("ts"), "event")
    it = pl.read_parquet(out / "items.parquet").rename({"item_id": "item"})
    us = pl.read_parquet(out / "users.parquet").rename({"user_id": "user"})
    return RawData(
        "synth", ev, it, us,
        columns={"user": "visitor", "item": "sku", "ts": "event_time", "event": "action"},
        cli=["--user-col", "visitor", "--item-col", "sku", "--time-col", "event_time", "--event-col", "action"],
        time_format="iso",
        info={"synth": {"events": events, "users": users, "items": items}},
    )


def cut_future(events: pl.DataFrame, frac: float = FUTURE_FRAC) -> tuple[pl.DataFrame, dict[str, list[str]]]:
    """Per-user cut: (the past, in input order; {user: future items, oldest first event first}).

    Sorted by (ts, input order), a user's distinct items are ranked by their first event; the last
    ``ceil(frac * n_distinct)`` are the future, and the past is every event before the first of them (repeats of
    past items after that point belong to neither). Users with one distinct item have no past.
    """
    ev = events.with_row_index("_row").sort(["user", "ts", "_row"])
    ev = ev.with_columns(pl.int_range(pl.len()).over("user").alias("_pos"),
                         pl.struct("user", "item").is_first_distinct().alias("_first"))
    firsts = ev.filter("_first").with_columns(
        pl.int_range(pl.len()).over("user").alias("_rank"), pl.len().over("user").alias("_n"))
    firsts = firsts.with_columns(
        (pl.col("_n") * frac - 1e-9).ceil().cast(pl.Int64).clip(1).alias("_n_future"))  # ceil, float-safe
    fut = firsts.filter(pl.col("_rank") >= pl.col("_n") - pl.col("_n_future"))
    cut_pos = fut.group_by("user").agg(pl.col("_pos").min().alias("_cut"))
    past = (ev.join(cut_pos, on="user").filter(pl.col("_pos") < pl.col("_cut"))
            .sort("_row").drop("_row", "_pos", "_first", "_cut"))
    future = {u: items for u, items in fut.sort(["user", "_pos"]).group_by("user", maintain_order=True)
              .agg("item").iter_rows()}
    past_users = set(past["user"].unique().to_list())
    return past, {u: v for u, v in future.items() if u in past_users}


def cut_global(events: pl.DataFrame, frac: float = FUTURE_FRAC) -> tuple[pl.DataFrame, dict[str, list[str]], int]:
    """Global cut: (the past, in input order; {known user: future items, oldest first event first}; the cut time).

    The cut time ``t`` is the time of the event ``ceil(frac * n)`` from the end, sorted by (ts, input order): every
    event before ``t`` is the past, every event at or after it the future (ties go to the future, so it can hold a
    few more than ``frac`` of the events). The future is scored only for users the past knows, and their past items
    are not in it (they are excluded from every model's answer); users left with no future item are dropped.
    """
    n_future = max(1, math.ceil(events.height * frac - 1e-9))
    if n_future >= events.height:
        raise ValueError(f"`frac` leaves no past: {frac} of {events.height} events")
    ev = events.with_row_index("_row")
    t_cut = int(ev.sort(["ts", "_row"])["ts"][events.height - n_future])
    past = ev.filter(pl.col("ts") < t_cut).drop("_row")
    seen = past.select("user", "item").unique()
    fut = (ev.filter(pl.col("ts") >= t_cut).sort(["ts", "_row"])
           .join(past.select("user").unique(), on="user", how="semi")  # known users only
           .join(seen, on=["user", "item"], how="anti")  # their past items are not in the future
           .unique(["user", "item"], keep="first", maintain_order=True))
    future = {u: items for u, items in fut.group_by("user", maintain_order=True).agg("item").iter_rows()}
    return past, future, t_cut


def cut_timeline(events: pl.DataFrame, cut: str) -> tuple[pl.DataFrame, dict[str, list[str]], int]:
    """(past, future, now) for ``cut`` (``per_user`` or ``global``); ``now`` is when the past ends: the cut time of
    a global cut, one second after the last past event of a per-user cut (what recent popularity counts back from)."""
    if cut == "global":
        return cut_global(events)
    if cut == "per_user":
        past, future = cut_future(events)
        return past, future, int(past["ts"].max()) + 1
    raise ValueError(f"`cut` must be per_user or global, got {cut!r}")


def write_user_files(d: RawData, past: pl.DataFrame, out: Path) -> list[str]:
    """Write past.csv / items.csv / users.csv with the user's own column names; the prepare flags to read them."""
    out.mkdir(parents=True, exist_ok=True)
    cols = d.columns
    logs = past.select([c for c in cols if c in past.columns])
    if d.time_format == "iso":
        logs = logs.with_columns(pl.from_epoch("ts", time_unit="s").dt.strftime("%Y-%m-%dT%H:%M:%SZ").alias("ts"))
    logs.rename(cols).write_csv(out / "past.csv")
    d.items.rename({"item": cols["item"]}).write_csv(out / "items.csv")
    d.users.rename({"user": cols["user"]}).write_csv(out / "users.csv")
    return ["--logs", str(out / "past.csv"), "--items", str(out / "items.csv"), "--users", str(out / "users.csv"),
            *d.cli]


# ------------------------------------------------------------------------------------------------------ scoring
class Space:
    """Every raw item ID of the dataset -> a dense int, so one relevance list serves every model."""

    def __init__(self, item_ids: list[str]) -> None:
        self.ids = sorted(set(item_ids))
        self.code = {x: i for i, x in enumerate(self.ids)}

    def encode_lists(self, lists: list[list[str]], width: int = K) -> np.ndarray:
        """``[n, width]`` codes, -1 padded (an ID outside the dataset would be a bug: KeyError)."""
        out = np.full((len(lists), width), -1, dtype=np.int64)
        for r, row in enumerate(lists):
            codes = [self.code[x] for x in row[:width]]
            out[r, : len(codes)] = codes
        return out


def score(topk: np.ndarray, relevant: list[np.ndarray]) -> dict[str, float]:
    m = ranking_metrics(topk, relevant, ks=(HIT_K, K))
    return {name: m[name] for name in METRICS}


def mean_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {m: float(np.mean([r[m] for r in runs])) for m in METRICS}


def spread_of(runs: list[dict[str, float]]) -> dict[str, float]:
    return {m: float(np.std([r[m] for r in runs])) for m in METRICS}


# ------------------------------------------------------------------------------------------------------ peers
class PastMatrix:
    """Binary user x item matrices over the past's users and items (the peers' whole world)."""

    def __init__(self, past: pl.DataFrame) -> None:
        from recsys.evaluate.baselines import interaction_matrix

        self._im = interaction_matrix
        self.users = sorted(set(past["user"].to_list()))
        self.items = sorted(set(past["item"].to_list()))
        self.urow = {u: i for i, u in enumerate(self.users)}
        self.icol = {x: i for i, x in enumerate(self.items)}
        self.x = self.matrix(past)

    def matrix(self, ev: pl.DataFrame, extra: dict[str, list[str]] | None = None):
        """CSR [n_users, n_items] of ``ev`` (+ ``extra`` items per user; items outside the past are dropped)."""
        u = [self.urow[x] for x in ev["user"].to_list()]
        i = [self.icol[x] for x in ev["item"].to_list()]
        for user, items in (extra or {}).items():
            for it in items:
                if it in self.icol:
                    u.append(self.urow[user])
                    i.append(self.icol[it])
        return self._im(np.asarray(u, dtype=np.int64), np.asarray(i, dtype=np.int64),
                        n_users=len(self.users), n_items=len(self.items))

    def to_space(self, ids: np.ndarray, space: Space) -> np.ndarray:
        lut = np.asarray([space.code[x] for x in self.items] + [-1], dtype=np.int64)  # -1 -> -1 (padding)
        return lut[np.where(ids < 0, len(self.items), ids)]


def _als(factors: int, regularization: float, alpha: float, seed: int):
    from implicit.cpu.als import AlternatingLeastSquares
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # the constructor checks the BLAS threads (and warns above 1)
        return AlternatingLeastSquares(factors=factors, regularization=regularization, alpha=alpha,
                                       iterations=ALS_ITERATIONS, random_state=seed)


def _als_fit(model, x):
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):  # implicit's advice: its own threads, single-threaded BLAS
        model.fit(x, show_progress=False)
    return model


def _als_recommend(model, rows: np.ndarray, x, *, recalculate: bool = False) -> np.ndarray:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, "blas"):
        ids, _ = model.recommend(rows, x[rows], N=K, filter_already_liked_items=True, recalculate_user=recalculate)
    return np.asarray(ids, dtype=np.int64)


def recent_counts(pm: PastMatrix, ev: pl.DataFrame, *, now: int, days: int | None) -> np.ndarray:
    """``[n_items]`` users per item over the events of ``ev`` in the last ``days`` days before ``now`` (all of
    them for ``None``), in ``pm``'s item order."""
    if days is not None:
        ev = ev.filter((pl.col("ts") >= now - days * DAY_S) & (pl.col("ts") < now))
    return np.asarray(pm.matrix(ev).sum(axis=0), dtype=np.float64).ravel()


def recent_popularity(counts: np.ndarray, all_time: np.ndarray, rows: np.ndarray, x) -> np.ndarray:
    """Top-K item columns by ``counts`` for each of ``rows``, the row's items of ``x`` excluded: ``[n, K]``.

    Ties (every item outside a short window counts 0) are broken by the all-time counts, so a short window still
    fills its list with the all-time favourites rather than with arbitrary items."""
    from recsys.evaluate.baselines import topk_excluding

    s = counts + all_time / (all_time.max() + 1.0)  # [n_items]; the tie-break stays below one count
    ids, _ = topk_excluding(np.broadcast_to(s.astype(np.float32), (len(rows), s.size)), K, x[rows])
    return ids


def tune_peers(past: pl.DataFrame, *, quick: bool, cut: str) -> dict:
    """EASE l2, ALS (factors, regularization, alpha) and recent popularity's window picked by NDCG@20 on a validation
    cut of the past, made by the same rule as the benchmark's own cut (``cut``): the past's own last 20%."""
    from recsys.evaluate.baselines import EASE

    fit_part, valid, now = cut_timeline(past, cut)
    pm = PastMatrix(past)  # the vocabulary of the whole past, so the refit ranks the same items
    x_fit = pm.matrix(fit_part)
    users = [u for u in valid if valid[u]]
    rows = np.asarray([pm.urow[u] for u in users], dtype=np.int64)
    rel = [np.asarray([pm.icol[x] for x in valid[u]], dtype=np.int64) for u in users]
    t0 = time.perf_counter()
    all_time = recent_counts(pm, fit_part, now=now, days=None)
    recent_scores = {}
    for days in RECENT_DAYS:
        counts = recent_counts(pm, fit_part, now=now, days=days)
        recent_scores[days] = score(recent_popularity(counts, all_time, rows, x_fit), rel)[f"ndcg@{K}"]
    best_days = max(recent_scores, key=recent_scores.get)  # ties: the first (shortest) window
    t_recent = time.perf_counter() - t0
    t0 = time.perf_counter()
    ease_scores = {}
    for l2 in EASE_GRID:
        ids, _ = EASE(l2=l2).fit(x_fit).recommend(rows, K, user_items=x_fit)
        ease_scores[l2] = score(ids, rel)[f"ndcg@{K}"]
    best_l2 = max(ease_scores, key=ease_scores.get)
    t_ease = time.perf_counter() - t0
    t0 = time.perf_counter()
    grid = ALS_GRID_QUICK if quick else ALS_GRID
    als_scores = {}
    for f in grid["factors"]:
        for r in grid["regularization"]:
            for a in grid["alpha"]:
                m = _als_fit(_als(f, r, a, 0), x_fit)
                als_scores[(f, r, a)] = score(_als_recommend(m, rows, x_fit), rel)[f"ndcg@{K}"]
    best = max(als_scores, key=als_scores.get)
    t_als = time.perf_counter() - t0
    print(f"  tuned on the past's last 20% ({cut} cut, {len(users)} users): EASE l2={best_l2:g} (ndcg@20 "
          f"{ease_scores[best_l2]:.4f}, {t_ease:.0f}s); ALS factors={best[0]} reg={best[1]:g} alpha={best[2]:g} "
          f"(ndcg@20 {als_scores[best]:.4f}, {len(als_scores)} fits, {t_als:.0f}s); recent popularity "
          f"W={_days(best_days)} (ndcg@20 {recent_scores[best_days]:.4f}; "
          + " ".join(f"{_days(d)}:{v:.4f}" for d, v in recent_scores.items()) + ")", flush=True)
    return {
        "ease": {"l2": best_l2, "valid_ndcg@20": {f"{k:g}": v for k, v in ease_scores.items()},
                 "seconds": round(t_ease, 1)},
        "als": {"factors": best[0], "regularization": best[1], "alpha": best[2], "iterations": ALS_ITERATIONS,
                "valid_ndcg@20": {f"f={k[0]},reg={k[1]:g},alpha={k[2]:g}": v for k, v in als_scores.items()},
                "seconds": round(t_als, 1)},
        "recent_popularity": {"days": best_days, "valid_ndcg@20": {_days(k): v for k, v in recent_scores.items()},
                              "seconds": round(t_recent, 1)},
        "valid_cut": cut, "valid_users": len(users), "valid_future_pairs": int(sum(len(r) for r in rel)),
        "valid_now": now,
    }


def _days(days: int | None) -> str:
    return "all-time" if days is None else f"{days}d"


def run_peers(past: pl.DataFrame, eval_users: list[str], relevant: list[np.ndarray], fresh: dict, space: Space,
              *, tuned: dict, seeds: list[int], now: int) -> tuple[dict, dict]:
    """Popularity, recent popularity (the last W days before ``now``), EASE, ALS fit on the whole past: (future
    table rows, fresh-event table rows)."""
    from recsys.evaluate.baselines import EASE, Popularity

    pm = PastMatrix(past)
    x = pm.x
    rows = np.asarray([pm.urow[u] for u in eval_users], dtype=np.int64)
    f_users = fresh["users"]
    f_rows = np.asarray([pm.urow[u] for u in f_users], dtype=np.int64)
    x_ext = pm.matrix(past, extra=dict(zip(f_users, fresh["first"], strict=True)))  # past + first half
    table, fresh_rows = {}, {}

    def rec(model, r, xx):
        ids, _ = model.recommend(r, K, user_items=xx)
        return pm.to_space(ids, space)

    t0 = time.perf_counter()
    pop = Popularity().fit(x)
    table["popularity"] = {"mean": score(rec(pop, rows, x), relevant), "seconds": round(time.perf_counter() - t0, 1)}
    fresh_rows["popularity"] = score(rec(pop, f_rows, x_ext), fresh["second"])

    t0 = time.perf_counter()
    days = tuned["recent_popularity"]["days"]
    counts = recent_counts(pm, past, now=now, days=days)
    all_time = recent_counts(pm, past, now=now, days=None)
    table["recent_popularity"] = {
        "mean": score(pm.to_space(recent_popularity(counts, all_time, rows, x), space), relevant),
        "params": f"W={_days(days)}", "items_in_window": int((counts > 0).sum()),
        "seconds": round(time.perf_counter() - t0, 1)}
    fresh_rows["recent_popularity"] = score(pm.to_space(recent_popularity(counts, all_time, f_rows, x_ext), space),
                                            fresh["second"])

    t0 = time.perf_counter()
    ease = EASE(l2=tuned["ease"]["l2"]).fit(x)
    table["ease"] = {"mean": score(rec(ease, rows, x), relevant), "params": f"l2={tuned['ease']['l2']:g}",
                     "seconds": round(time.perf_counter() - t0, 1)}
    fresh_rows["ease (past only, first half excluded)"] = score(_exclude_after(rec, ease, f_rows, x, x_ext, pm, space),
                                                               fresh["second"])
    fresh_rows["ease (extended row)"] = score(rec(ease, f_rows, x_ext), fresh["second"])

    a = tuned["als"]
    per_seed, fresh_past, fresh_ext = [], [], []
    t0 = time.perf_counter()
    for s in seeds:
        m = _als_fit(_als(a["factors"], a["regularization"], a["alpha"], s), x)
        per_seed.append({"seed": s, **score(pm.to_space(_als_recommend(m, rows, x), space), relevant)})
        # Known users keep their fitted factors, the first half only filtered out ...
        ids = _als_recommend(m, f_rows, x_ext)
        fresh_past.append(score(pm.to_space(ids, space), fresh["second"]))
        # ... or are re-solved from the extended row (implicit's fold-in).
        ids = _als_recommend(m, f_rows, x_ext, recalculate=True)
        fresh_ext.append(score(pm.to_space(ids, space), fresh["second"]))
    table["als"] = {"mean": mean_of(per_seed), "spread": spread_of(per_seed), "per_seed": per_seed,
                    "params": f"factors={a['factors']} reg={a['regularization']:g} alpha={a['alpha']:g} "
                              f"iters={ALS_ITERATIONS}",
                    "seconds": round(time.perf_counter() - t0, 1)}
    fresh_rows["als (stored factors, first half excluded)"] = mean_of(fresh_past)
    fresh_rows["als (recalculate_user, extended row)"] = mean_of(fresh_ext)
    return table, fresh_rows


def _exclude_after(rec, model, rows, x, x_ext, pm, space) -> np.ndarray:
    """Score from the past rows but exclude the extended rows' items: top-K of ``x`` scores minus ``x_ext``."""
    from recsys.evaluate.baselines import topk_excluding

    s = model._scores(x[rows])
    ids, _ = topk_excluding(np.asarray(s, dtype=np.float32), K, x_ext[rows])
    return pm.to_space(ids, space)


# ------------------------------------------------------------------------------------------------------ the CLI
class StageFailed(RuntimeError):
    def __init__(self, stage: str, log: Path, tail: str) -> None:
        super().__init__(f"{stage} failed (log {log}):\n{tail}")
        self.stage, self.log, self.tail = stage, log, tail


def cli(stage: str, args: list[str], log: Path, *, retries: int = 2, wait_s: float = 150.0) -> float:
    """Run ``python -m recsys STAGE ARGS`` (output to ``log``); seconds taken. Retries a failure that is not a
    config error (the tree is edited by others while this runs: a half-done edit heals in a few minutes)."""
    cmd = [PY, "-m", "recsys", stage, *args]
    for attempt in range(retries + 1):
        t0 = time.perf_counter()
        with open(log, "w") as fh:
            fh.write(" ".join(cmd) + "\n")
            fh.flush()
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT).returncode
        if rc == 0:
            return time.perf_counter() - t0
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        if "unknown field" in tail or attempt == retries:
            raise StageFailed(stage, log, tail)
        print(f"  !! {stage} failed (attempt {attempt + 1}), retrying in {wait_s:.0f}s:\n{tail}", flush=True)
        time.sleep(wait_s)
    raise AssertionError("unreachable")


def _wait_for_other_run(log: Path, done: Path, *, idle_s: float = 300.0) -> None:
    """Another benchmark process sharing ``--workdir`` is training this run (its log is fresh): wait for it."""
    while not done.exists() and log.exists() and time.time() - log.stat().st_mtime < idle_s:
        time.sleep(20)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``recsys serve --models DIR --port P`` as a subprocess, up once its health check says SERVING."""

    def __init__(self, models: Path, log: Path, *, timeout_s: float = 180.0) -> None:
        from recsys.client import RecommenderClient, RecommenderError

        self.port = _free_port()
        self.log = log
        self._fh = open(log, "w")  # noqa: SIM115 - closed in stop()
        t0 = time.perf_counter()
        self.proc = subprocess.Popen([PY, "-m", "recsys", "serve", "--models", str(models), "--port", str(self.port),
                                      "--host", "127.0.0.1", "--log-format", "text"],
                                     stdout=self._fh, stderr=subprocess.STDOUT, cwd=ROOT)
        self.client = RecommenderClient(f"127.0.0.1:{self.port}", timeout=120.0)
        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise StageFailed("serve", log, log.read_text()[-3000:])
            try:
                if self.client.health(timeout=2.0) == "SERVING":
                    break
            except RecommenderError:
                pass
            if time.perf_counter() - t0 > timeout_s:
                self.stop()
                raise StageFailed("serve", log, f"not SERVING after {timeout_s:.0f}s\n" + log.read_text()[-3000:])
            time.sleep(0.5)
        self.startup_s = time.perf_counter() - t0

    def stop(self) -> None:
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._fh.close()


def query_future(client, eval_users: list[str], past_tail: dict[str, list[str]]) -> tuple[list[list[str]], dict]:
    """Top-K for every user: BatchRecommend by user_id; users the bundle lacks by Recommend(history=past tail)."""
    from recsys.client import RecommenderError

    out: list[list[str]] = []
    missing: list[int] = []
    for start in range(0, len(eval_users), BATCH_USERS):
        chunk = eval_users[start: start + BATCH_USERS]
        for j, r in enumerate(client.batch_recommend(chunk, k=K)):
            out.append(list(r.item_ids))
            if not r.found:
                missing.append(start + j)
    unknown_history = 0
    for j in missing:
        try:
            out[j] = list(client.recommend(history=past_tail[eval_users[j]], k=K).item_ids)
        except RecommenderError:
            unknown_history += 1  # not one known item in their past: a miss
    return out, {"users": len(eval_users), "not_in_bundle": len(missing), "no_known_history": unknown_history}


def query_fresh(client, fresh: dict, past_tail: dict[str, list[str]], known: set[str]) -> dict:
    """The fresh-event rows of the bundle: without the first half (excluded only) and with it (as history)."""
    from recsys.client import RecommenderError

    def one(args):
        u, first, with_fresh = args
        try:
            if u in known:
                r = client.recommend(user_id=u, history=first if with_fresh else (), k=K, exclude=first)
            else:  # a user the bundle lacks: their past tail (+ the first half) as history
                r = client.recommend(history=(past_tail[u] + (first if with_fresh else []))[-1000:], k=K,
                                     exclude=first)
            return list(r.item_ids), r.source or "(source not mapped by the client)"
        except RecommenderError as e:
            return [], f"error:{e.code.name}"

    rows = {}
    with ThreadPoolExecutor(4) as pool:
        for with_fresh in (False, True):
            res = list(pool.map(one, [(u, f, with_fresh) for u, f in zip(fresh["users"], fresh["first"],
                                                                        strict=True)]))
            sources: dict[str, int] = {}
            for _, s in res:
                sources[s] = sources.get(s, 0) + 1
            rows[with_fresh] = ([r for r, _ in res], sources)
    return rows


# ------------------------------------------------------------------------------------------------------ two-tower
@dataclass
class Variant:
    name: str
    prepare: list[str]  # --set values for prepare
    train: list[str]  # --set values for train


def split_overrides(sets: list[str]) -> tuple[list[str], list[str]]:
    prep = [s for s in sets if s.startswith("prepare.")]
    train = [s for s in sets if not s.startswith("prepare.")]
    return prep, train


def _stamp(path: Path) -> dict | None:
    """A kept --workdir's stamp of a finished stage; the ones written before the cut was part of it (a bare list)
    were all per-user runs."""
    if not path.exists():
        return None
    got = json.loads(path.read_text())
    if isinstance(got, list):  # prepare: the --set values; done: [train_s, export_s]
        key = "sets" if path.name.endswith(".args.json") else "seconds"
        return {"cut": "per_user", key: got}
    return got


def run_two_tower(v: Variant, d: RawData, files_args: list[str], work: Path, *, cut: str, seeds: list[int],
                  eval_users: list[str], relevant: list[np.ndarray], fresh: dict, past_tail: dict, space: Space,
                  prepared_cache: dict) -> dict:
    """prepare (once per prepare overrides) -> per seed: train -> export -> serve -> gRPC queries -> scores.

    ``work`` is the cut's own directory; the cut is also written into every stamp a rerun trusts, so a per-user
    and a global run never reuse each other's prepared data or models."""
    key = tuple(v.prepare)
    timings: dict[str, float | list[float]] = {}
    if key not in prepared_cache:
        digest = hashlib.sha256(json.dumps(v.prepare).encode()).hexdigest()[:8]  # one dir per prepare overrides
        pdir = work / f"prepared-{digest}"
        log = work / f"prepare-{digest}.log"
        sets = [x for s in v.prepare for x in ("--set", s)]
        stamp = pdir.with_suffix(".args.json")
        if (pdir / "manifest.json").exists() and _stamp(stamp) == {"cut": cut, "sets": sets}:
            secs = 0.0  # reused from a kept --workdir (the past files are rewritten identically)
        else:
            secs = cli("prepare", [*files_args, *sets, "--out", str(pdir), "--overwrite"], log)
            stamp.write_text(json.dumps({"cut": cut, "sets": sets}))
        manifest = json.loads((pdir / "manifest.json").read_text())
        prepared_cache[key] = (pdir, manifest, secs)
        print(f"  prepare {v.prepare or '(defaults)'}: {manifest['counts']} ({secs:.0f}s)", flush=True)
    pdir, manifest, prep_s = prepared_cache[key]
    timings["prepare_s"] = round(prep_s, 1)
    per_seed, fresh_without, fresh_with, info, sources = [], [], [], {}, []
    train_s, export_s, serve_s, query_s = [], [], [], []
    for s in seeds:
        tag = f"{v.name}-s{s}"
        run, models = work / f"run-{tag}", work / f"models-{tag}"
        sets = [x for o in [f"train.seed={s}", *v.train] for x in ("--set", o)]
        done = work / f"done-{tag}.json"  # a finished train + export in a kept --workdir is reused on a rerun
        _wait_for_other_run(work / f"train-{tag}.log", done)
        stamp = _stamp(done)
        if stamp is not None and stamp["cut"] == cut and (models / schema.LATEST).exists():
            t_train, t_export = stamp["seconds"]
        else:
            shutil.rmtree(run, ignore_errors=True)
            shutil.rmtree(models, ignore_errors=True)
            try:
                t_train = cli("train", ["--data", str(pdir), "--out", str(run), *sets], work / f"train-{tag}.log")
            except StageFailed as e:
                if "unknown field" in e.tail:
                    print(f"  {v.name}: skipped, recsys does not know one of {v.train}: {e.tail.strip()[-300:]}",
                          flush=True)
                    return {"skipped": f"unknown setting in {v.train}", "error": e.tail.strip()[-1000:]}
                raise
            t_export = cli("export", ["--run", str(run), "--models", str(models)], work / f"export-{tag}.log")
            done.write_text(json.dumps({"cut": cut, "seconds": [t_train, t_export]}))
        train_s.append(t_train)
        export_s.append(t_export)
        summary = json.loads((run / "summary.json").read_text())
        server = Server(models, work / f"serve-{tag}.log")
        try:
            serve_s.append(server.startup_s)
            t0 = time.perf_counter()
            info = server.client.model_info()
            lists, counts = query_future(server.client, eval_users, past_tail)
            fr = query_fresh(server.client, fresh, past_tail, set(_bundle_ids(models, "user")))
            query_s.append(time.perf_counter() - t0)
        finally:
            server.stop()
        m = score(space.encode_lists(lists), relevant)
        per_seed.append({"seed": s, **m, "best_epoch": summary.get("best_epoch"),
                         "refit_epochs": summary.get("refit_epochs"), "n_items": info["n_items"],
                         "n_users": info["n_users"], "version": info["version"], **counts})
        fresh_without.append(score(space.encode_lists(fr[False][0]), fresh["second"]))
        fresh_with.append(score(space.encode_lists(fr[True][0]), fresh["second"]))
        sources.append({"without": fr[False][1], "with": fr[True][1]})
        print(f"  two-tower {v.name} seed {s} ({cut} cut): " + " ".join(f"{k}={m[k]:.4f}" for k in METRICS)
              + f" (n_items {info['n_items']}, not in bundle {counts['not_in_bundle']}, train {train_s[-1]:.0f}s, "
              f"best epoch {summary.get('best_epoch')}); fresh without/with recall@20 "
              f"{fresh_without[-1][f'recall@{K}']:.4f}/{fresh_with[-1][f'recall@{K}']:.4f} sources {sources[-1]}",
              flush=True)
    cat = set(_bundle_ids(models, "item"))
    fut_pairs = sum(len(r) for r in relevant)
    in_cat = sum(1 for r in relevant for c in r if space.ids[c] in cat)
    timings.update(train_s=[round(x, 1) for x in train_s], export_s=[round(x, 1) for x in export_s],
                   serve_startup_s=[round(x, 1) for x in serve_s], query_s=[round(x, 1) for x in query_s])
    return {
        "overrides": {"prepare": v.prepare, "train": v.train},
        "prepared": {"counts": manifest["counts"]},
        "catalogue": {"n_items": info["n_items"], "n_items_in_dataset": len(space.ids),
                      "future_pairs_in_catalogue": in_cat / max(fut_pairs, 1)},
        "mean": mean_of(per_seed), "spread": spread_of(per_seed), "per_seed": per_seed,
        "fresh": {"without": {"mean": mean_of(fresh_without), "per_seed": fresh_without},
                  "with": {"mean": mean_of(fresh_with), "per_seed": fresh_with}, "sources": sources},
        "timings": timings,
    }


def _bundle_ids(models: Path, entity: str) -> list[str]:
    """The item (catalogue) or user IDs of the bundle LATEST points to."""
    bundle = models / (models / schema.LATEST).read_text().strip()
    path, col = (bundle / schema.ITEMS, schema.ITEM_ID) if entity == "item" else (bundle / schema.USERS, schema.USER_ID)
    return pl.read_parquet(path, columns=[col]).get_column(col).to_list()


# ------------------------------------------------------------------------------------------------------ report
def _machine() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()}


def _git() -> dict:
    def run(*a: str) -> str:
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout

    # Not stripped before the split: porcelain lines start with a status column that may be a space (" M path").
    dirty = [line[3:] for line in run("status", "--porcelain").splitlines()]
    return {"commit": run("rev-parse", "HEAD").strip(), "dirty_files": dirty}


def _iso(ts: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def print_tables(name: str, ds: dict) -> None:
    rows, cut = ds["results"], ds.get("cut", "per_user")
    where = f"cut at {ds['data']['past_ends']}, known users only" if cut == "global" else "each user's last 20%"
    print(f"\n== {name} [{cut} cut: {where}]: the future ({ds['data']['eval_users']} users, "
          f"{ds['data']['future_pairs']} future items; Recall@{K} / NDCG@{K} / HitRate@{HIT_K}, mean over seeds, "
          "± std)")
    print(f"{'model':<28} {'recall@20':>15} {'ndcg@20':>15} {'hit@10':>15}  {'n_items':>7}  per seed (recall/ndcg)")
    for model, r in rows.items():
        if "skipped" in r:
            print(f"{model:<28} skipped: {r['skipped']}")
            continue
        mu, sd = r["mean"], r.get("spread")
        cells = " ".join((f"{mu[m]:.4f} ± {sd[m]:.4f}" if sd else f"{mu[m]:.4f}").rjust(15) for m in METRICS)
        n_items = r.get("catalogue", {}).get("n_items", ds["data"].get("past_items", ""))
        seeds = " ".join(f"{p[f'recall@{K}']:.4f}/{p[f'ndcg@{K}']:.4f}" for p in r.get("per_seed", []))
        print(f"{model:<28} {cells}  {n_items!s:>7}  {seeds}")
    params = [f"{m} {r['params']}" for m, r in rows.items() if r.get("params")]
    if params:
        print(f"peers ({cut} cut, tuned on the past's own last 20%): " + "; ".join(params))
    print(f"\n== {name} [{cut} cut]: fresh events ({ds['fresh']['users']} users; first half of the future given, "
          f"second half scored; past + first half excluded)")
    print(f"{'model':<44} {'recall@20':>10} {'ndcg@20':>10} {'hit@10':>10}")
    for model, m in ds["fresh"]["rows"].items():
        print(f"{model:<44} " + " ".join(f"{m[k]:>10.4f}" for k in METRICS))
    for line in ds.get("targets", {}).get("lines", []):
        print(line)


def targets(ds: dict) -> dict:
    """The issues' targets, by cut: two-tower >= 1.10x the best peer on the per-user cut (#8) and >= 1.0x on the
    global cut (#15), Recall@20 and NDCG@20, recent popularity among the peers; fresh events ahead (per-user cut)."""
    res, rows, cut = ds["results"], ds["fresh"]["rows"], ds.get("cut", "per_user")
    tt = res.get("two_tower")
    if not tt or "mean" not in tt:
        return {}
    goal = TARGET[cut]
    out: dict = {"cut": cut, "lines": []}
    for m in (f"recall@{K}", f"ndcg@{K}"):
        peers = {p: res[p]["mean"][m] for p in ("popularity", "recent_popularity", "ease", "als") if p in res}
        if not peers:
            continue
        best = max(peers, key=peers.get)
        ratio = tt["mean"][m] / peers[best] if peers[best] else float("inf")
        out[m] = {"two_tower": tt["mean"][m], "best_peer": best, "best_peer_value": peers[best],
                  "ratio": ratio, "goal": goal, "met": ratio >= goal}
        out["lines"].append(f"target {m} ({cut} cut): two-tower {tt['mean'][m]:.4f} vs best peer {best} "
                            f"{peers[best]:.4f} = {ratio:.3f}x (>= {goal:.2f}x: "
                            f"{'MET' if ratio >= goal else 'not met'})")
    if cut != "per_user":  # the fresh-event target is #8's, set on the per-user cut
        return out
    w, wo = rows.get("two_tower with fresh events"), rows.get("two_tower without fresh events")
    folds = {k: v for k, v in rows.items() if k in ("ease (extended row)", "als (recalculate_user, extended row)")}
    if w and wo:
        for m in (f"recall@{K}", f"ndcg@{K}"):
            best = max(folds, key=lambda k: folds[k][m]) if folds else None
            ahead_self = w[m] > wo[m]
            ahead_peer = best is None or w[m] > folds[best][m]
            out[f"fresh {m}"] = {"with": w[m], "without": wo[m], "best_peer_fold_in": best,
                                 "best_peer_fold_in_value": folds[best][m] if best else None,
                                 "met": ahead_self and ahead_peer}
            out["lines"].append(
                f"target fresh {m}: with {w[m]:.4f} vs without {wo[m]:.4f} ({'ahead' if ahead_self else 'NOT ahead'})"
                + (f", vs {best} {folds[best][m]:.4f} ({'ahead' if ahead_peer else 'NOT ahead'})" if best else ""))
    return out


# ------------------------------------------------------------------------------------------------------ main
def run_dataset(d: RawData, work: Path, *, cut: str, seeds: list[int], variants: list[Variant], quick: bool,
                skip_peers: bool) -> dict:
    """One dataset, one cut: the past through the CLI and the server, the peers on the same past, both scored."""
    t_all = time.perf_counter()
    past, future, now = cut_timeline(d.events, cut)
    eval_users = sorted(u for u in future if future[u])
    space = Space(d.events["item"].to_list())
    relevant = [np.asarray([space.code[x] for x in future[u]], dtype=np.int64) for u in eval_users]
    tails = past.group_by("user", maintain_order=True).agg(pl.col("item").unique(maintain_order=True))
    past_items = {u: items for u, items in tails.iter_rows()}
    # Recommend(history=...) for users the bundle lacks: their last HISTORY_N distinct past items, oldest first.
    by_time = past.with_row_index("_row").sort(["user", "ts", "_row"]).group_by("user", maintain_order=True).agg(
        pl.col("item"))
    past_tail = {u: list(dict.fromkeys(reversed(items)))[:HISTORY_N][::-1] for u, items in by_time.iter_rows()}
    f_users = [u for u in eval_users if len(future[u]) >= 2]
    fresh = {"users": f_users, "first": [future[u][: len(future[u]) // 2] for u in f_users]}
    fresh["second"] = [np.asarray([space.code[x] for x in future[u][len(future[u]) // 2:]], dtype=np.int64)
                       for u in f_users]
    files_args = write_user_files(d, past, work / "user-files")
    data = {"cut": cut, "past_ends": _iso(now),
            "events": d.events.height, "users": d.events["user"].n_unique(), "items": len(space.ids),
            "past_events": past.height, "past_users": len(past_items),
            "past_items": past["item"].n_unique(), "eval_users": len(eval_users),
            "future_pairs": int(sum(len(r) for r in relevant)),
            "prepare_cli": ["recsys", "prepare", *[a if not a.startswith(str(work)) else Path(a).name
                                                   for a in files_args]],
            **d.info}
    past_item_set = set(past["item"].unique().to_list())
    data["future_pairs_outside_past_items"] = int(sum(1 for u in eval_users for x in future[u]
                                                      if x not in past_item_set))
    if cut == "global":
        fut_ev = d.events.filter(pl.col("ts") >= now)
        data.update(future_events=fut_ev.height, future_users=fut_ev["user"].n_unique(),
                    future_users_unknown=fut_ev["user"].n_unique() - fut_ev.filter(
                        pl.col("user").is_in(list(past_items)))["user"].n_unique())
        print(f"  global cut at {data['past_ends']}: {fut_ev.height} future events of {data['future_users']} users "
              f"({data['future_users_unknown']} unknown to the past: not scored)", flush=True)
    print(f"  {data['events']} events -> past {past.height} events of {len(past_items)} users / "
          f"{data['past_items']} items; {len(eval_users)} users scored on {data['future_pairs']} future items "
          f"({data['future_pairs_outside_past_items']} never seen in the past); fresh table: {len(f_users)} users",
          flush=True)
    results: dict[str, dict] = {"two_tower": {}}  # the default row first in the tables
    fresh_rows: dict[str, dict] = {}
    timings: dict = {}
    prepared_cache: dict = {}
    # With variants, the default runs last: a second process sharing --workdir (e.g. the k-core sweep next to the
    # main run) then reuses the main run's default models instead of training them again.
    order = [v for v in variants if v.name != "default"] + [v for v in variants if v.name == "default"]
    for v in order:
        name = "two_tower" if v.name == "default" else f"two_tower[{v.name}]"
        results[name] = run_two_tower(v, d, files_args, work, cut=cut, seeds=seeds, eval_users=eval_users,
                                      relevant=relevant, fresh=fresh, past_tail=past_tail, space=space,
                                      prepared_cache=prepared_cache)
        if "fresh" in results[name]:
            label = "two_tower" if v.name == "default" else f"two_tower[{v.name}]"
            fresh_rows[f"{label} without fresh events"] = results[name]["fresh"]["without"]["mean"]
            fresh_rows[f"{label} with fresh events"] = results[name]["fresh"]["with"]["mean"]
    if not skip_peers:
        t0 = time.perf_counter()
        tuned = tune_peers(past, quick=quick, cut=cut)
        timings["peer_tuning_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        table, peer_fresh = run_peers(past, eval_users, relevant, fresh, space, tuned=tuned, seeds=seeds, now=now)
        timings["peer_fit_s"] = round(time.perf_counter() - t0, 1)
        results.update(table)
        fresh_rows.update(peer_fresh)
        results["tuning"] = tuned  # popped below into its own key
    tuning = results.pop("tuning", None)
    timings["total_s"] = round(time.perf_counter() - t_all, 1)
    ds = {"cut": cut, "protocol": PROTOCOL[cut], "data": data, "results": results,
          "fresh": {"users": len(f_users), "rows": fresh_rows},
          "peer_tuning": tuning, "timings": timings}
    ds["targets"] = targets(ds)
    return ds


def _key(name: str, cut: str) -> str:
    """The report's key of a dataset under a cut: the bare name for the per-user cut (as before --cut)."""
    return name if cut == "per_user" else f"{name}@{cut}"


def save(report: dict, out: str | Path) -> None:
    from recsys.core.io import atomic_write_json

    atomic_write_json(out, report)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="ml100k,synth", help="comma list of ml100k, synth")
    p.add_argument("--cut", choices=(*CUTS, "both"), default="per_user",
                   help="per_user: each user's last 20%% of distinct items; global: one time, the last 20%% of the "
                        "events after it, known users only; both: one after the other")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the stochastic models (two-tower, ALS)")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "recsys"), help="where the recbole wheel lives")
    p.add_argument("--workdir", default=None, help="keep the work files here (default: a temporary directory)")
    p.add_argument("--synth-events", type=int, default=200_000)
    p.add_argument("--synth-users", type=int, default=4_000)
    p.add_argument("--synth-items", type=int, default=2_000)
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="SECTION.FIELD=VALUE forwarded to prepare (prepare.*) or train (experiments only)")
    p.add_argument("--variant", action="append", default=[],
                   help="NAME:KEY=VALUE[,KEY=VALUE...]: an extra two-tower row with these overrides")
    p.add_argument("--compare-holdout", action="store_true",
                   help="add the two-tower fit without prepare's test split (train.final_fit=train_valid)")
    p.add_argument("--skip-peers", action="store_true")
    p.add_argument("--quick", action="store_true", help="1 seed, small synth, small ALS grid: a smoke run")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "future_bench.json"))
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    if args.quick:
        args.seeds = 1
        args.synth_events, args.synth_users, args.synth_items = 30_000, 600, 300
    seeds = list(range(args.seeds))
    base_prep, base_train = split_overrides(args.overrides)
    variants = [Variant("default", base_prep, base_train)]
    specs = list(args.variant) + (["holdout:train.final_fit=train_valid"] if args.compare_holdout else [])
    for spec in specs:
        name, _, sets = spec.partition(":")
        vp, vt = split_overrides([s for s in sets.split(",") if s])
        variants.append(Variant(name, base_prep + vp, base_train + vt))

    import implicit
    import torch

    cuts = list(CUTS) if args.cut == "both" else [args.cut]
    report: dict = {
        "k": K, "hit_k": HIT_K, "cut": args.cut,
        # datasets[NAME] is the per-user cut (as before --cut), datasets["NAME@global"] the global cut
        "protocol": {c: PROTOCOL[c] for c in cuts},
        "machine": _machine(), "git": _git(), "torch": torch.__version__, "implicit": implicit.__version__,
        "config": {"datasets": args.datasets, "cut": args.cut, "seeds": seeds, "overrides": args.overrides,
                   "variants": [v.__dict__ for v in variants], "quick": args.quick,
                   "synth": {"events": args.synth_events, "users": args.synth_users, "items": args.synth_items},
                   "ease_grid": EASE_GRID, "als_grid": ALS_GRID_QUICK if args.quick else ALS_GRID,
                   "recent_days": RECENT_DAYS},
        "datasets": {},
    }
    tmp = None
    if args.workdir:
        work_root = Path(args.workdir)
        work_root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="future_bench-")
        work_root = Path(tmp)
    t0 = time.perf_counter()
    try:
        for name in args.datasets.split(","):
            print(f"== {name}", flush=True)
            data_dir = work_root / name
            data_dir.mkdir(parents=True, exist_ok=True)
            if name == "ml100k":
                d = ml100k_raw(Path(args.cache))
            elif name == "synth":
                d = synth_raw(data_dir, events=args.synth_events, users=args.synth_users, items=args.synth_items)
            else:
                raise SystemExit(f"unknown dataset {name!r} (choose ml100k, synth)")
            for cut in cuts:
                # Each cut has its own directory (the per-user one where it always was, so kept workdirs resume).
                work = data_dir if cut == "per_user" else work_root / f"{name}-{cut}"
                work.mkdir(parents=True, exist_ok=True)
                print(f"== {name}: {cut} cut", flush=True)
                report["datasets"][_key(name, cut)] = run_dataset(
                    d, work, cut=cut, seeds=seeds, variants=variants, quick=args.quick, skip_peers=args.skip_peers)
                if not args.no_save:  # after each dataset and cut, so a long run leaves its finished part
                    save(report, args.out)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    for name, ds in report["datasets"].items():
        print_tables(name, ds)
        print(f"timings (s) {name} [{ds['cut']} cut]: {json.dumps(ds['timings'])}; two-tower: "
              + "; ".join(f"{m}: {json.dumps(r['timings'])}" for m, r in ds["results"].items() if "timings" in r))
    print(f"total {report['seconds']:.0f}s")
    if not args.no_save:
        save(report, args.out)
        print(f"wrote {args.out}")
    finite = all(math.isfinite(r["mean"][m]) for ds in report["datasets"].values()
                 for r in ds["results"].values() if "mean" in r for m in METRICS)
    return 0 if finite else 1


if __name__ == "__main__":
    raise SystemExit(main())
