"""Cold items (#18): items the model never trained on, embedded from their metadata alone, scored on the future.

MovieLens-100K (benchmarks/ml100k.py: titles, "|"-separated genres, release year; users' age / gender /
occupation), per seed:

1. **Held-out items**: 10% of the items file's items (``round(0.1 * n)``), drawn at random with ``numpy``'s
   ``default_rng(seed)``, lose every interaction before anything else happens: no model ever sees an event of them.
2. **Time cut** (``future_bench.cut_global``'s rule, on the full logs): ``t`` = the time of the event 20% (rounded up)
   of all events from the end. The past = every event before ``t`` of the other items. The future = the held-out
   items' events at or after ``t`` by users the past knows (distinct (user, item) pairs); the held-out items' events
   before ``t`` are dropped.
3. The past goes through the CLI with the default config, as a user would run it (past.csv / items.csv / users.csv,
   the genres separator the only flag): ``recsys prepare``, then ``recsys train --set train.seed=S`` twice --
   ``model.use_text=false`` (the default) and ``model.use_text=true`` (titles through the packaged MiniLM) -- and
   ``recsys export``.
4. The held-out items are read back from items.csv with ``recsys.catalogue.encode.read_items`` and embedded with
   ``encode_items`` / ``embed_new_items`` (the item tower's features-only path, + the title for the text model).
5. Every user with a future held-out item is scored with their **stored** embedding (``user_embeddings.npy``):

   - **all items**: rank the bundle's catalogue + the cold items, the user's past items excluded; Recall@20 = the
     share of the user's future held-out items in the top 20 (mean over users);
   - **cold only**: rank the cold items alone (the easier view: nothing trained competes).

Baselines, same users, same candidates, same exclusions:

- **popularity within genre** (content only, no model): with ``P`` the past's distinct (user, item) pairs,
  ``a_u(g) = |{i in P_u : g in G_i}| / |P_u|`` (the user's genre affinity: the share of their past items having genre
  ``g``) and ``p(g) = |{(u, i) in P : g in G_i}| / |P|`` (the genre's popularity in the past),
  ``score(u, i) = mean over g in G_i of a_u(g) * p(g)`` (0 for an item without genres); ties (items with the same
  genres) broken by one fixed random order per seed. Every candidate, trained or cold, is scored by this formula.
- **newest release year** (a reference, not asked for): the items by release year, newest first (no year = oldest),
  ties by the same fixed random order; the global cut's future is mostly the newest films.
- **random**: one random order per seed (the chance level).

Cost: the two trainings, run side by side (~5-7 min each on an idle 2-core machine; far more when it is shared:
``--set train.num_threads=1 --set train.epochs=10`` keeps a contended run to ~20 min, and the JSON records
``train_overrides``); ``--seeds N`` runs N seeds (default 1).
``--workdir`` keeps the work files and reuses finished trainings on a rerun.

    nice -n 10 .venv/bin/python benchmarks/cold_bench.py                  # 1 seed
    nice -n 10 .venv/bin/python benchmarks/cold_bench.py --seeds 3 --workdir /tmp/cold

Writes benchmarks/results/cold_items.json (unless --no-save): machine, git commit, protocol, per-seed numbers, means.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.future_bench import _git, _machine, cli, cut_global, ml100k_raw, write_user_files  # noqa: E402
from recsys.core import schema  # noqa: E402
from recsys.core.metrics import ranking_metrics  # noqa: E402

K = 20
HOLDOUT_FRAC = 0.1
FUTURE_FRAC = 0.2
MODELS = {"two-tower + title": ["model.use_text=true"], "two-tower": []}  # name -> train --set
TAGS = {"two-tower + title": "text", "two-tower": "plain"}
VIEWS = ("all_items", "cold_only")


# ------------------------------------------------------------------------------------------------------ data
def split(events: pl.DataFrame, item_ids: list[str], seed: int) -> tuple[pl.DataFrame, dict[str, list[str]], list[str], int]:
    """(the past without the held-out items; {known user: future held-out items}; the held-out items; the cut t)."""
    rng = np.random.default_rng(seed)
    held = sorted(rng.choice(sorted(item_ids), size=round(HOLDOUT_FRAC * len(item_ids)), replace=False).tolist())
    _, _, t = cut_global(events, FUTURE_FRAC)
    is_held = pl.col("item").is_in(held)
    past = events.filter((pl.col("ts") < t) & ~is_held)
    fut = (events.with_row_index("_row").filter((pl.col("ts") >= t) & is_held)
           .join(past.select("user").unique(), on="user", how="semi")
           .sort(["ts", "_row"]).unique(["user", "item"], keep="first", maintain_order=True))
    future = {u: items for u, items in fut.group_by("user", maintain_order=True).agg("item").iter_rows()}
    return past, future, held, t


# ------------------------------------------------------------------------------------------------------ scoring
def topk_excluding(scores: np.ndarray, exclude: list[np.ndarray], k: int = K) -> np.ndarray:
    """``scores`` [n, C] (modified: excluded cells -> -inf) -> top-``k`` columns per row, best first."""
    for r, ex in enumerate(exclude):
        scores[r, ex] = -np.inf
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1, kind="stable")
    return np.take_along_axis(part, order, axis=1)


def recall(scores: np.ndarray, exclude: list[np.ndarray], relevant: list[np.ndarray], n_cold: int) -> dict:
    """Recall@K over every candidate column, and over the last ``n_cold`` columns (the cold items) alone."""
    n_all = scores.shape[1]
    full = ranking_metrics(topk_excluding(scores.copy(), exclude), relevant, ks=(K,))[f"recall@{K}"]
    cold = scores[:, n_all - n_cold :].copy()
    cold_rel = [r - (n_all - n_cold) for r in relevant]
    only = ranking_metrics(topk_excluding(cold, [e[e >= n_all - n_cold] - (n_all - n_cold) for e in exclude]),
                           cold_rel, ks=(K,))[f"recall@{K}"]
    return {"all_items": full, "cold_only": only}


def genre_popularity_scores(past: pl.DataFrame, genres: dict[str, list[str]], users: list[str],
                            candidates: list[str], seed: int) -> np.ndarray:
    """Popularity within genre, ``[len(users), len(candidates)]`` (the formula in the module docstring), plus a tie
    breaker below the smallest score gap."""
    names = sorted({g for gs in genres.values() for g in gs})
    gcol = {g: j for j, g in enumerate(names)}
    pairs = past.select("user", "item").unique()
    items = sorted(set(pairs["item"].to_list()) | set(candidates))
    irow = {x: i for i, x in enumerate(items)}
    G = np.zeros((len(items), len(names)))  # [items, genres] 0/1
    for x in items:
        for g in genres.get(x, []):
            G[irow[x], gcol[g]] = 1.0
    urow = {u: r for r, u in enumerate(users)}
    pu = pairs.filter(pl.col("user").is_in(users))
    X = np.zeros((len(users), len(items)))  # the users' past items, 0/1
    X[[urow[u] for u in pu["user"]], [irow[x] for x in pu["item"]]] = 1.0
    affinity = (X @ G) / np.maximum(X.sum(1, keepdims=True), 1.0)  # a_u(g)
    all_pairs = np.array([irow[x] for x in pairs["item"]])
    pop = G[all_pairs].sum(0) / len(all_pairs)  # p(g)
    cand = np.array([irow[x] for x in candidates])
    Gc = G[cand] / np.maximum(G[cand].sum(1, keepdims=True), 1.0)  # mean over the item's genres
    s = (affinity * pop) @ Gc.T
    tie = np.random.default_rng(seed).permutation(len(candidates)) / len(candidates)  # in [0, 1)
    return s + 1e-9 * tie


# ------------------------------------------------------------------------------------------------------ run
def run_seed(d, seed: int, work: Path, overrides: list[str]) -> dict:
    from recsys.bundle import Bundle
    from recsys.catalogue.encode import embed_new_items, encode_items, read_items
    from recsys.prepare import PrepareConfig

    t0 = time.perf_counter()
    item_ids = d.items["item"].to_list()
    past, future, held, t_cut = split(d.events, item_ids, seed)
    wdir = work / f"seed{seed}"
    files = write_user_files(d, past, wdir / "files")
    pdir = wdir / "prepared"
    if not (pdir / schema.MANIFEST).exists():
        cli("prepare", [*files, "--out", str(pdir), "--overwrite"], wdir / "prepare.log")
    timings = {"prepare_s": round(time.perf_counter() - t0, 1)}

    # the cold items, read back from the items file the user handed to prepare
    cfg = PrepareConfig(item_col=d.columns["item"], multi_valued={"genres": "|"})
    held_set = set(held)
    cold_rows = [r for r in read_items(wdir / "files" / "items.csv", config=cfg) if r["item_id"] in held_set]
    cold_ids = [r["item_id"] for r in cold_rows]

    def fit(name: str) -> None:
        """train + export one model (skipped when a kept --workdir already holds it)."""
        tag = TAGS[name]
        run, models, done = wdir / f"run-{tag}", wdir / f"models-{tag}", wdir / f"done-{tag}.json"
        if done.exists() and (models / schema.LATEST).exists():
            return
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(models, ignore_errors=True)
        args = [x for o in [f"train.seed={seed}", *MODELS[name], *overrides] for x in ("--set", o)]
        t_train = cli("train", ["--data", str(pdir), "--out", str(run), *args], wdir / f"train-{tag}.log")
        t_export = cli("export", ["--run", str(run), "--models", str(models), "--no-eval"], wdir / f"export-{tag}.log")
        done.write_text(json.dumps({"train_s": round(t_train, 1), "export_s": round(t_export, 1)}))

    with ThreadPoolExecutor(len(MODELS)) as pool:  # the trainings side by side (subprocesses)
        list(pool.map(fit, MODELS))

    results, info = {}, {}
    bundle = None
    for name in MODELS:
        tag = TAGS[name]
        run, models = wdir / f"run-{tag}", wdir / f"models-{tag}"
        timings[tag] = json.loads((wdir / f"done-{tag}.json").read_text())
        bundle = Bundle.load(models)
        t1 = time.perf_counter()
        enc = encode_items(bundle, cold_rows)
        cold_vecs = embed_new_items(bundle, enc)
        timings[tag]["embed_cold_s"] = round(time.perf_counter() - t1, 2)
        users = [u for u in future if bundle.user_row(u) is not None]
        urows = np.array([bundle.user_row(u) for u in users])
        cand = np.concatenate([bundle.item_embeddings, cold_vecs])  # [n_items + n_cold, dim]
        scores = bundle.user_embeddings[urows] @ cand.T
        col = {x: bundle.n_items + j for j, x in enumerate(cold_ids)}
        relevant = [np.array([col[x] for x in future[u]]) for u in users]
        exclude = [np.asarray(bundle.seen_items(r), dtype=np.int64) for r in urows]
        results[name] = recall(scores, exclude, relevant, len(cold_ids))
        summary = json.loads((run / schema.SUMMARY).read_text())
        info[name] = {"best_epoch": summary.get("best_epoch"), "unknown_values": len(enc.unknown),
                      "unknown_examples": enc.unknown[:5]}
        print(f"  seed {seed} {name}: " + " ".join(f"{v}={results[name][v]:.4f}" for v in VIEWS)
              + f" (best epoch {summary.get('best_epoch')}, {len(enc.unknown)} unknown values)", flush=True)

    # the baselines over the same users / candidates / exclusions (the last bundle's catalogue: both are the same)
    candidates = list(bundle.item_ids) + cold_ids
    genres = {r["item"]: [g for g in (r["genres"] or "").split("|") if g] for r in d.items.iter_rows(named=True)}
    s = genre_popularity_scores(past, genres, users, candidates, seed)
    results["popularity within genre"] = recall(s, exclude, relevant, len(cold_ids))
    year = {r["item"]: r["year"] for r in d.items.iter_rows(named=True)}
    newest = np.array([float(year[x]) if str(year.get(x) or "").isdigit() else 0.0 for x in candidates])
    tie = np.random.default_rng(seed).permutation(len(candidates)) / len(candidates)
    results["newest release year"] = recall(np.tile(newest + 1e-3 * tie, (len(users), 1)), exclude, relevant,
                                            len(cold_ids))
    rnd = np.random.default_rng(seed + 1000).random(s.shape)
    results["random"] = recall(rnd, exclude, relevant, len(cold_ids))
    for name in ("popularity within genre", "newest release year", "random"):
        print(f"  seed {seed} {name}: " + " ".join(f"{v}={results[name][v]:.4f}" for v in VIEWS), flush=True)

    return {
        "seed": seed,
        "cut_t": t_cut,
        "n_held_out": len(held), "n_cold_embedded": len(cold_ids),
        "n_catalogue": bundle.n_items, "n_eval_users": len(users),
        "future_pairs": int(sum(len(r) for r in relevant)),
        "past_events": past.height,
        "results": results, "models": info, "timings": timings,
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def print_table(per_seed: list[dict], means: dict) -> None:
    s0 = per_seed[0]
    print(f"\n== MovieLens-100K cold items: {s0['n_held_out']} held-out items (10%), {s0['n_eval_users']} users, "
          f"{s0['future_pairs']} future pairs (seed {s0['seed']}); Recall@{K}, mean over {len(per_seed)} seed(s)")
    print(f"{'model':<26} {'all items':>10} {'cold only':>10}  per seed (all/cold)")
    for name, m in means.items():
        seeds = " ".join(f"{p['results'][name]['all_items']:.4f}/{p['results'][name]['cold_only']:.4f}"
                         for p in per_seed)
        print(f"{name:<26} {m['all_items']:>10.4f} {m['cold_only']:>10.4f}  {seeds}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=1, help="seeds (held-out draw and train.seed); each trains twice")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "recsys"), help="where the recbole wheel lives")
    p.add_argument("--workdir", default=None, help="keep the work files here (default: a temporary directory)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cold_items.json"))
    p.add_argument("--no-save", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="SECTION.FIELD=VALUE forwarded to train (smoke runs / experiments only)")
    args = p.parse_args(argv)

    import torch

    d = ml100k_raw(Path(args.cache))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="cold_bench-"))
    work.mkdir(parents=True, exist_ok=True)
    per_seed = []
    try:
        for seed in range(args.seeds):
            per_seed.append(run_seed(d, seed, work, args.overrides))
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    names = list(per_seed[0]["results"])
    means = {n: {v: float(np.mean([p["results"][n][v] for p in per_seed])) for v in VIEWS} for n in names}
    print_table(per_seed, means)
    report = {
        "dataset": "ml100k", "k": K, "holdout_frac": HOLDOUT_FRAC, "future_frac": FUTURE_FRAC,
        "protocol": __doc__.split("Cost:")[0].strip(),
        "baseline_formula": ("score(u, i) = mean_{g in G_i} a_u(g) * p(g); a_u(g) = |{i in P_u: g in G_i}| / |P_u|, "
                             "p(g) = |{(u, i) in P: g in G_i}| / |P|, P = the past's distinct (user, item) pairs; "
                             "ties by a fixed random order"),
        "seeds": [p["seed"] for p in per_seed], "train_overrides": args.overrides, "mean": means, "per_seed": per_seed,
        "machine": _machine(), "git": _git(), "torch": torch.__version__,
    }
    if not args.no_save:
        from recsys.core.io import atomic_write_json

        atomic_write_json(args.out, report)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
