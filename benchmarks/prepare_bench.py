"""Benchmark: `recsys prepare` (lazy Polars) vs the same preparation written idiomatically in pandas.

Both sides do the same work with the same semantics (so their outputs can be compared row for row): read the
parquet logs, dedupe (user, item) keeping the first time and summing weights, iterated 5/5 k-core, per-user
last-fraction split (valid 0.1, test 0.1, rounded up, >= 1 train row), drop valid/test rows of items without a train
row, frequency-ordered vocabularies, logQ probabilities, last-50 histories and seen sets, parquet outputs.

Each run is a fresh subprocess; the parent measures its wall time and peak RSS (``os.wait4`` rusage of that child)
and afterwards checks that both outputs hold the same rows (mapped back to external IDs).

    python benchmarks/prepare_bench.py --sizes 1000000 10000000          # both sides, medians of 3
    python benchmarks/prepare_bench.py --sizes 50000000 --repeat 1       # both sides (pandas needs ~12 GiB)
    python benchmarks/prepare_bench.py --sizes 100000000 --repeat 1      # Polars only (above --skip-pandas-above)

Synthetic logs: power-law item and user popularity (Zipf-like, exponent ~1), string IDs ("u123", "i45"), epoch-second
timestamps over half a year, an event column, parquet shards of 5M rows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "prepare_bench.json"
KCORE = 5
VALID, TEST = 0.1, 0.1
HISTORY = 50


# ----------------------------------------------------------------------------------------------------------------
# synthetic data
# ----------------------------------------------------------------------------------------------------------------


def generate(out: Path, n_events: int, *, seed: int = 0, shard: int = 5_000_000) -> list[Path]:
    """Parquet shards of user_id, item_id (str), timestamp (epoch s), event; power-law popularity."""
    import numpy as np
    import polars as pl

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_users = max(1000, n_events // 50)  # ~50 events per user
    n_items = max(500, n_events // 200)
    # inverse-CDF sampling of a truncated power law p(k) ~ 1 / (k + 10): a long tail, a few hot items
    def power_law(n: int, size: int) -> np.ndarray:
        w = 1.0 / (np.arange(n) + 10.0)
        cdf = np.cumsum(w) / w.sum()
        return np.searchsorted(cdf, rng.random(size)).astype(np.int64)

    paths = []
    t0 = 1_704_067_200  # 2024-01-01
    for k, start in enumerate(range(0, n_events, shard)):
        m = min(shard, n_events - start)
        users = rng.permutation(n_users)[power_law(n_users, m)]  # permute so popular IDs are not the small ones
        items = rng.permutation(n_items)[power_law(n_items, m)]
        df = pl.DataFrame({
            "user_id": users, "item_id": items,
            "timestamp": t0 + rng.integers(0, 180 * 86400, m),
            "event": rng.choice(np.array(["view", "click", "purchase"]), m, p=[0.8, 0.15, 0.05]),
        }).select(
            (pl.lit("u") + pl.col("user_id").cast(pl.String)).alias("user_id"),
            (pl.lit("i") + pl.col("item_id").cast(pl.String)).alias("item_id"),
            "timestamp", "event",
        )
        p = out / f"part-{k:05d}.parquet"
        df.write_parquet(p)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------------------------------
# workers (run in a fresh subprocess each)
# ----------------------------------------------------------------------------------------------------------------


def run_polars(data: Path, out: Path) -> None:
    """Exactly what a user runs: the `recsys prepare` command (defaults spelled out)."""
    import contextlib
    import io

    from recsys.cli import main as cli

    argv = ["prepare", "--logs", str(data / "*.parquet"), "--out", str(out), "--overwrite",
            "--kcore-users", str(KCORE), "--kcore-items", str(KCORE), "--history-len", str(HISTORY),
            "--dedupe", "sum", "--split", "last_fraction", "--set", f"prepare.valid_frac={VALID}",
            "--set", f"prepare.test_frac={TEST}", "--set", "prepare.drop_cold=true"]
    with contextlib.redirect_stdout(io.StringIO()):
        rc = cli(argv)
    if rc:
        raise SystemExit(rc)


def run_pandas(data: Path, out: Path) -> None:
    """What a user would write with pandas (pyarrow-backed strings, the pandas 3 default)."""
    import numpy as np
    import pandas as pd

    files = sorted(data.glob("*.parquet"))
    df = pd.concat([pd.read_parquet(f, columns=["user_id", "item_id", "timestamp"]) for f in files],
                   ignore_index=True)
    df = df.dropna()
    df["weight"] = 1.0
    df["ts"] = df["timestamp"].astype("int64") * 1000

    # dedupe: first time, summed weight; groups come out in order of the pair's first row in the input
    df = (df.groupby(["user_id", "item_id"], sort=False, observed=True)
          .agg(ts=("ts", "min"), weight=("weight", "sum")).reset_index())
    # `o`: time order of the pairs, ties by the input position of the pair's first row (as in the Polars pipeline)
    df = df.sort_values("ts", kind="stable").reset_index(drop=True)
    df["o"] = np.arange(len(df))

    # iterated k-core
    while True:
        uc = df.groupby("user_id", observed=True)["item_id"].transform("size")
        ic = df.groupby("item_id", observed=True)["user_id"].transform("size")
        keep = (uc >= KCORE) & (ic >= KCORE)
        if keep.all():
            break
        df = df[keep]

    # per-user last-fraction split
    df = df.sort_values(["user_id", "o"], kind="stable").reset_index(drop=True)
    pos = df.groupby("user_id", observed=True).cumcount().to_numpy()
    n = df.groupby("user_id", observed=True)["item_id"].transform("size").to_numpy()
    room = np.maximum(n - 1, 0)
    n_test = np.minimum(np.ceil(n * TEST - 1e-9).astype(np.int64), room)
    n_valid = np.minimum(np.ceil(n * VALID - 1e-9).astype(np.int64), room - n_test)
    split = np.zeros(len(df), dtype=np.int8)
    split[pos >= n - n_test - n_valid] = 1
    split[pos >= n - n_test] = 2
    df["split"] = split
    train_items = set(df.loc[df["split"] == 0, "item_id"].unique())
    df = df[(df["split"] == 0) | df["item_id"].isin(train_items)]

    # vocabularies: train frequency desc, ties by id
    train = df[df["split"] == 0]
    def vocab(col: str) -> pd.DataFrame:
        cnt = train[col].value_counts().rename("n_train")
        ids = pd.Index(df[col].unique())
        v = pd.DataFrame({col: ids}).merge(cnt, left_on=col, right_index=True, how="left").fillna({"n_train": 0})
        v = v.sort_values(["n_train", col], ascending=[False, True], kind="stable").reset_index(drop=True)
        v[col.replace("_id", "_idx")] = np.arange(len(v), dtype=np.int32)
        v["n_train"] = v["n_train"].astype(np.int32)
        return v
    users, items = vocab("user_id"), vocab("item_id")
    items["prob"] = items["n_train"] / items["n_train"].sum()
    items["first_ts"] = items["item_id"].map(df.groupby("item_id", observed=True)["ts"].min())
    df["user_idx"] = df["user_id"].map(pd.Series(users.index.to_numpy(np.int32), index=users["user_id"]))
    df["item_idx"] = df["item_id"].map(pd.Series(items.index.to_numpy(np.int32), index=items["item_id"]))
    df = df.sort_values(["user_idx", "o"], kind="stable")

    out.mkdir(parents=True, exist_ok=True)
    cols = ["user_idx", "item_idx", "ts", "weight"]
    for code, name in enumerate(("train", "valid", "test")):
        part = df.loc[df["split"] == code, cols].astype({"user_idx": "int32", "item_idx": "int32",
                                                         "weight": "float32"})
        part.to_parquet(out / f"{name}.parquet", index=False)
    seen = df[df["split"] < 2]
    hist = seen.groupby("user_idx")["item_idx"].apply(lambda s: s.to_numpy()[-HISTORY:])
    seen_sets = seen.groupby("user_idx")["item_idx"].apply(lambda s: np.sort(s.to_numpy()))
    pd.DataFrame({"user_idx": hist.index, "items": hist.to_numpy()}).to_parquet(out / "history.parquet")
    pd.DataFrame({"user_idx": seen_sets.index, "items": seen_sets.to_numpy()}).to_parquet(out / "seen.parquet")
    users.to_parquet(out / "users.parquet", index=False)
    items.to_parquet(out / "items.parquet", index=False)


# ----------------------------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------------------------


def measure_median(worker: str, data: Path, out: Path, *, repeat: int, nice: int, timeout: float) -> dict:
    """Median wall / CPU / peak RSS over ``repeat`` fresh-process runs (the machine is shared: single runs are noisy)."""
    import statistics

    runs = [measure(worker, data, out, nice=nice, timeout=timeout) for _ in range(repeat)]
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return runs[-1]
    med = {k: round(statistics.median(r[k] for r in ok), 2) for k in ("wall_s", "cpu_s", "peak_rss_mib",
                                                                        "load_avg_1m")}
    return {"worker": worker, "status": "ok", **med, "runs": runs}


def measure(worker: str, data: Path, out: Path, *, nice: int, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--data", str(data), "--out", str(out)]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd)
    deadline = t + timeout
    while True:
        pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, ru = os.wait4(proc.pid, 0)
            return {"worker": worker, "status": "timeout", "wall_s": timeout, "peak_rss_mib": ru.ru_maxrss / 1024}
        time.sleep(0.05)
    wall = time.perf_counter() - t
    ok = os.waitstatus_to_exitcode(status) == 0
    return {"worker": worker, "status": "ok" if ok else f"exit {os.waitstatus_to_exitcode(status)}",
            "wall_s": round(wall, 2), "cpu_s": round(ru.ru_utime + ru.ru_stime, 2),
            "peak_rss_mib": round(ru.ru_maxrss / 1024, 1),  # ru_maxrss is KiB on Linux
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def compare(a: Path, b: Path) -> dict:
    """Same kept rows, split counts and vocabularies? Compared in external IDs, order-independent."""
    import polars as pl

    res = {}
    for name in ("train", "valid", "test"):
        fa, fb = pl.read_parquet(a / f"{name}.parquet"), pl.read_parquet(b / f"{name}.parquet")
        res[f"{name}_rows"] = [fa.height, fb.height]
        key = ["user_idx", "item_idx", "ts"]
        res[f"{name}_equal"] = fa.select(key + ["weight"]).equals(fb.select(key + ["weight"]))
    for name, col in (("users", "user_id"), ("items", "item_id")):
        fa, fb = pl.read_parquet(a / f"{name}.parquet"), pl.read_parquet(b / f"{name}.parquet")
        res[f"{name}_equal"] = fa[col].equals(fb[col]) and fa["n_train"].equals(fb["n_train"])
    ha, hb = pl.read_parquet(a / "history.parquet"), pl.read_parquet(b / "history.parquet")
    res["history_equal"] = ha.filter(pl.col("items").list.len() > 0)["items"].cast(pl.List(pl.Int64)).equals(
        hb["items"].cast(pl.List(pl.Int64)))
    res["all_equal"] = all(v for k, v in res.items() if k.endswith("_equal"))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000], help="events per run")
    ap.add_argument("--skip-pandas-above", type=int, default=60_000_000,
                    help="run only Polars above this many events (pandas would take too long)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch dir (default: a temp dir, removed)")
    ap.add_argument("--nice", type=int, default=0, help="run the workers under `nice -n`")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per worker run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=3, help="runs per worker and size; medians are reported")
    ap.add_argument("--no-save", action="store_true", help="do not write benchmarks/results/prepare_bench.json")
    ap.add_argument("--worker", choices=["polars", "pandas"], help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        os.environ.setdefault("POLARS_MAX_THREADS", str(os.cpu_count() or 1))
        (run_polars if args.worker == "polars" else run_pandas)(args.data, args.out)
        return 0

    import polars as pl

    work = args.workdir or Path(tempfile.mkdtemp(prefix="prepare-bench-"))
    rows = []
    try:
        for n in args.sizes:
            data = work / f"logs-{n}"
            t = time.perf_counter()
            if not data.exists():
                generate(data, n, seed=args.seed)
            print(f"[{n:,} events] generated in {time.perf_counter() - t:.1f}s", flush=True)
            result = {"events": n, "cpus": os.cpu_count(), "polars": pl.__version__, "repeat": args.repeat}
            result["polars_run"] = measure_median("polars", data, work / f"polars-{n}", repeat=args.repeat,
                                                  nice=args.nice, timeout=args.timeout)
            print(f"  polars: {result['polars_run']}", flush=True)
            if n <= args.skip_pandas_above:
                result["pandas_run"] = measure_median("pandas", data, work / f"pandas-{n}", repeat=args.repeat,
                                                      nice=args.nice, timeout=args.timeout)
                print(f"  pandas: {result['pandas_run']}", flush=True)
                if result["pandas_run"]["status"] == "ok" and result["polars_run"]["status"] == "ok":
                    result["compare"] = compare(work / f"polars-{n}", work / f"pandas-{n}")
                    pr, pd_ = result["polars_run"], result["pandas_run"]
                    result["speedup"] = round(pd_["wall_s"] / pr["wall_s"], 2)
                    result["memory_ratio"] = round(pr["peak_rss_mib"] / pd_["peak_rss_mib"], 3)
                    result["cpu_ratio"] = round(pd_["cpu_s"] / pr["cpu_s"], 2)
            man = work / f"polars-{n}" / "manifest.json"
            if man.exists():
                m = json.loads(man.read_text())
                result["rows"] = m["rows"]
                result["polars_steps"] = m["steps"]
            rows.append(result)
            for d in (work / f"polars-{n}", work / f"pandas-{n}"):
                shutil.rmtree(d, ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'events':>12} {'polars s':>9} {'cpu s':>7} {'polars MiB':>11} {'pandas s':>9} {'cpu s':>7} "
          f"{'pandas MiB':>11} {'speedup':>8} {'cpu x':>6} {'mem ratio':>9} {'same output':>11}")
    for r in rows:
        pr, pd_ = r["polars_run"], r.get("pandas_run")
        print(f"{r['events']:>12,} {pr['wall_s']:>9.1f} {pr.get('cpu_s', math.nan):>7.1f} {pr['peak_rss_mib']:>11.0f} "
              f"{(pd_['wall_s'] if pd_ else math.nan):>9.1f} {(pd_['cpu_s'] if pd_ else math.nan):>7.1f} "
              f"{(pd_['peak_rss_mib'] if pd_ else math.nan):>11.0f} "
              f"{r.get('speedup', math.nan):>8.2f} {r.get('cpu_ratio', math.nan):>6.2f} {r.get('memory_ratio', math.nan):>9.3f} "
              f"{str(r.get('compare', {}).get('all_equal', '-')):>11}")
    if not args.no_save:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
        runs = {str(r["events"]): r for r in old.get("runs", [])}
        runs.update({str(r["events"]): r for r in rows})
        RESULTS.write_text(json.dumps({"benchmark": "prepare_bench", "runs": sorted(runs.values(),
                                                                                    key=lambda r: r["events"])},
                                      indent=2) + "\n")
        print(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
