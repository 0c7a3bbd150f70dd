"""Is the synthetic data realistic enough? Popularity must be a weak baseline next to ItemKNN and EASE.

Generates a synth dataset (timed), splits it per user (each user's last distinct item is the test item, the earlier
ones are train; repeats of an earlier item are dropped), fits Popularity / ItemKNN / EASE on train and reports
Recall/NDCG/HitRate@20 on the test items, excluding each user's train items.

    .venv/bin/python benchmarks/synth_realism.py                     # default synth size (~1M events)
    .venv/bin/python benchmarks/synth_realism.py --events 200000 --users 4000 --items 1500

Prints a table and writes benchmarks/results/synth_realism.json.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np


def last_item_split(logs_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray, int, int]:
    """(train_user, train_item, test_item per user or -1, n_users, n_items) from the synth logs, ids as rows."""
    import pyarrow.compute as pc
    import pyarrow.dataset as ds

    table = ds.dataset(logs_dir, format="parquet").to_table(columns=["user_id", "item_id", "timestamp"])
    u_codes = pc.dictionary_encode(table["user_id"]).combine_chunks()
    i_codes = pc.dictionary_encode(table["item_id"]).combine_chunks()
    user = u_codes.indices.to_numpy().astype(np.int64)
    item = i_codes.indices.to_numpy().astype(np.int64)
    ts = table["timestamp"].to_numpy()
    n_users, n_items = len(u_codes.dictionary), len(i_codes.dictionary)
    order = np.lexsort((np.arange(user.size), ts, user))  # chronological per user, file order breaks ties
    user, item = user[order], item[order]
    # first occurrence of each (user, item) only
    _, first = np.unique(user * n_items + item, return_index=True)
    keep = np.zeros(user.size, dtype=bool)
    keep[first] = True
    user, item = user[keep], item[keep]  # still chronological per user
    last = np.r_[user[1:] != user[:-1], True]
    n_per_user = np.bincount(user, minlength=n_users)
    is_test = last & (n_per_user[user] >= 2)
    test = np.full(n_users, -1, dtype=np.int64)
    test[user[is_test]] = item[is_test]
    return user[~is_test], item[~is_test], test, n_users, n_items


def evaluate(models: dict, train_user, train_item, test, n_users, n_items, k: int = 20) -> dict:
    from recsys.core.metrics import ranking_metrics
    from recsys.evaluate.baselines import interaction_matrix

    x = interaction_matrix(train_user, train_item, n_users=n_users, n_items=n_items)
    users = np.flatnonzero(test >= 0)
    out = {}
    for name, model in models.items():
        t0 = time.perf_counter()
        model.fit(x)
        fit_s = time.perf_counter() - t0
        ids, _ = model.recommend(users, k)
        m = ranking_metrics(ids, [test[u : u + 1] for u in users], ks=(k,))
        out[name] = {**{key: m[key] for key in (f"recall@{k}", f"ndcg@{k}", f"hit_rate@{k}")},
                     "mrr": m["mrr"], "fit_s": fit_s, "total_s": time.perf_counter() - t0}  # fmt: skip
    return out


def main() -> None:
    from recsys.evaluate.baselines import EASE, ItemKNN, Popularity
    from recsys.prepare.synth import SynthConfig, generate

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=SynthConfig.events)
    ap.add_argument("--users", type=int, default=SynthConfig.users)
    ap.add_argument("--items", type=int, default=SynthConfig.items)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--knn-k", type=int, default=100)
    ap.add_argument("--knn-shrink", type=float, default=10.0)
    ap.add_argument("--ease-l2", type=float, default=500.0)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "synth_realism.json")
    args = ap.parse_args()

    cfg = SynthConfig(events=args.events, users=args.users, items=args.items, seed=args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = generate(Path(tmp) / "synth", config=cfg)
        gen_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        train_user, train_item, test, n_users, n_items = last_item_split(Path(tmp) / "synth" / "logs")
        split_s = time.perf_counter() - t0
    models = {
        "popularity": Popularity(),
        "itemknn": ItemKNN(k=args.knn_k, shrink=args.knn_shrink),
        "ease": EASE(l2=args.ease_l2),
    }
    results = evaluate(models, train_user, train_item, test, n_users, n_items)
    print(f"synth: {cfg.events} events, {cfg.users} users, {cfg.items} items: generated in {gen_s:.1f}s "
          f"({cfg.events / gen_s / 1e6:.2f}M events/s), split in {split_s:.1f}s; "
          f"{int((test >= 0).sum())} test users, {train_user.size} distinct train pairs")  # fmt: skip
    print(f"{'model':<12}{'recall@20':>11}{'ndcg@20':>9}{'hit@20':>8}{'mrr':>8}{'fit s':>8}{'total s':>9}")
    for name, r in results.items():
        print(f"{name:<12}{r['recall@20']:>11.4f}{r['ndcg@20']:>9.4f}{r['hit_rate@20']:>8.4f}{r['mrr']:>8.4f}"
              f"{r['fit_s']:>8.2f}{r['total_s']:>9.2f}")  # fmt: skip
    pop = results["popularity"]["recall@20"]
    for name in ("itemknn", "ease"):
        print(f"{name} / popularity recall@20: {results[name]['recall@20'] / max(pop, 1e-12):.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from recsys.core.io import atomic_write_json

    atomic_write_json(args.out, {
        "config": summary["config"], "counts": summary["counts"], "generate_s": gen_s, "split_s": split_s,
        "test_users": int((test >= 0).sum()), "results": results,
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
    })  # fmt: skip


if __name__ == "__main__":
    main()
