"""Offline evaluation of a model bundle on one split of a prepared dataset.

Protocol, stated once:

* Every user with at least one held-out item in the split is a query (optionally a seeded sample of them). Their
  *relevant* items are the distinct split items they had not interacted with before; items seen before (train for
  ``valid``, train + valid for ``test``) are excluded from every model's list, so they are left out of
  ``relevant`` too (a re-consumed item can never be retrieved and would only add noise).
* Retrieval is over the full catalogue, through the same exclusion rule as serving (``recsys.retrieval.retrieve``),
  both exact and HNSW (with the bundle's tuned ``ef``); ANN recall is measured against the exact answer.
* Users are embedded as serving would: a known user of the bundle from their history with their ID; a user the
  bundle does not know from history alone. The dataset and the bundle may have different vocabularies: everything
  is matched by external ID and scored in the dataset's row space (items the bundle does not know can never be
  retrieved and count as misses).
* Baselines (Popularity, ItemKNN, EASE) are fitted on the interactions before the split and scored the same way.
* Metrics come from ``recsys.core.metrics.ranking_metrics`` (recall@K = hits / |relevant|), plus catalogue coverage@K
  and popularity bias (mean train-popularity percentile of the recommended items, 1 = most popular).
* A bundle is never silently scored on interactions it was trained on: the manifest's ``trained_on`` (what the
  final fit saw: splits and the sha256 of each split file) is checked against the split, and a match is refused
  (:class:`InSampleError`) unless ``in_sample=True``, which reports the numbers marked as in-sample.
* Segments: users ``cold`` (at most ``cold_threshold`` prior items) / ``warm``; items ``head`` / ``torso`` /
  ``tail`` (train popularity ranks covering the first 50% / next 30% / last 20% of train interactions) and
  ``new`` (``first_ts`` after the last train interaction). An item segment restricts ``relevant`` to its items
  and drops users left without any.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.core import schema

log = logging.getLogger(__name__)

DEFAULT_KS = (10, 20, 50, 100)
BASELINES = ("popularity", "itemknn", "ease")
REPORT_SCHEMA = 1
# item popularity segments: cumulative share of train interactions covered by the items ranked above
HEAD_SHARE, TORSO_SHARE = 0.5, 0.8
# ef values swept for the ANN recall / latency curve (the tuned ef is added)
SWEEP_EFS = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
_SEARCH_BATCH = 1024


class InSampleError(ValueError):
    """The bundle's final fit trained on the interactions the evaluation would score."""


def in_sample_reason(bundle: Any, data_dir: str | Path, split: str) -> str | None:
    """Why scoring ``bundle`` on ``split`` of ``data_dir`` would score interactions its final fit trained on, or
    None. Matched by content (the split file's sha256 against each split the fit saw), so a copied or renamed
    dataset is caught too; bundles from before ``trained_on`` was recorded were fit on train + valid at most."""
    from recsys.core.io import sha256_file

    trained = bundle.manifest.get("trained_on") or {}
    path = Path(data_dir) / schema.SPLITS[split]
    sha = sha256_file(path)
    for name, h in (trained.get("split_sha256") or {}).items():
        if h == sha:
            return (f"bundle {bundle.version!r} was trained on these interactions: its final fit saw splits "
                    f"{trained.get('splits')} ({trained.get('rows')} rows) and {str(path)!r} is identical to the "
                    f"{name!r} split it trained on (sha256 {sha[:16]})")
    return None


# --------------------------------------------------------------------------------------------------------------
# the evaluation set


@dataclass
class EvalSet:
    """One split of a prepared dataset, ready to score; every row index is in the dataset's own row space.

    ``users [m]`` data user rows evaluated; ``relevant`` / ``seen`` / ``history`` hold one item-row array per
    evaluated user (history oldest first). ``fit_matrix [n_users, n_items]`` binary CSR of the interactions
    before the split (baselines are fitted on it); ``seen_matrix`` the same rows as ``seen``.
    """

    data_dir: Path
    split: str
    manifest_sha256: str
    n_users: int
    n_items: int
    user_ids: np.ndarray
    item_ids: np.ndarray
    users: np.ndarray
    relevant: list[np.ndarray]
    seen: list[np.ndarray]
    history: list[np.ndarray]
    fit_matrix: Any
    seen_matrix: Any
    item_popularity: np.ndarray  # [n_items] train interaction counts
    item_segment: np.ndarray  # [n_items] 0 head, 1 torso, 2 tail
    new_items: np.ndarray  # [n_items] bool: first_ts after the train cutoff
    counts: dict[str, int]


def _str_ids(table: Any, col: str) -> np.ndarray:
    return np.asarray(table.column(col).to_pylist(), dtype=object)


def _group(user: np.ndarray, item: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs sorted by user -> CSR (offsets [n_users + 1], items)."""
    order = np.argsort(user, kind="stable")
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=n_users), out=offsets[1:])
    return offsets, item[order]


def load_eval_set(
    data_dir: str | Path,
    split: str = "test",
    *,
    max_users: int | None = None,
    seed: int = 0,
    history_len: int | None = None,
) -> EvalSet:
    """Read a prepared dataset's split with its exclusion sets and histories (see the module docstring)."""
    import pyarrow.parquet as pq

    from recsys.baselines import interaction_matrix
    from recsys.bundle import read_ragged
    from recsys.core.io import sha256_file
    from recsys.data import Interactions, history_and_seen, read_interactions

    if split not in ("valid", "test"):
        raise ValueError(f"`split` must be 'valid' or 'test', got {split!r}")
    d = Path(data_dir)
    for name in (schema.USERS, schema.ITEMS, schema.TRAIN, schema.SPLITS[split]):
        if not (d / name).is_file():
            raise FileNotFoundError(f"prepared dataset {str(d)!r} has no {name}")
    users_t, items_t = pq.read_table(d / schema.USERS), pq.read_table(d / schema.ITEMS)
    n_users, n_items = users_t.num_rows, items_t.num_rows
    train = read_interactions(d / schema.TRAIN, n_users=n_users, n_items=n_items)
    target = read_interactions(d / schema.SPLITS[split], n_users=n_users, n_items=n_items)
    if len(target) == 0:
        raise ValueError(f"{str(d / schema.SPLITS[split])!r} holds no interactions: nothing to evaluate (was the "
                         f"dataset prepared with `prepare.{split}_frac = 0`?)")
    if split == "test":
        before = train
        if (d / schema.VALID).is_file():
            before = Interactions.concat(train, read_interactions(d / schema.VALID, n_users=n_users, n_items=n_items))
    else:
        before = train

    # Exclusion sets and histories: the prepared serving files for test (exactly what the bundle serves from),
    # rebuilt from train alone for valid (the prepared ones already contain the valid items).
    if split == "test" and (d / schema.SEEN).is_file() and (d / schema.HISTORY).is_file():
        seen_off, seen_val = read_ragged(d / schema.SEEN, n_rows=n_users, what=f"{d / schema.SEEN}")
        hist_off, hist_val = read_ragged(d / schema.HISTORY, n_rows=n_users, what=f"{d / schema.HISTORY}")
    else:
        # `before` is sorted by (user, ts): the same rule as the prepared files, over these rows
        (hist_off, hist_val), (seen_off, seen_val) = history_and_seen(
            before.user_idx, before.item_idx, n_users=n_users, n_items=n_items,
            history_len=max(len(before), 1) if history_len is None else history_len)
        hist_val, seen_val = hist_val.astype(np.int64), seen_val.astype(np.int64)
    seen_matrix = interaction_matrix(
        np.repeat(np.arange(n_users), np.diff(seen_off)), seen_val, n_users=n_users, n_items=n_items
    )

    # relevant = distinct split items not seen before
    pair = np.unique(target.user_idx * n_items + target.item_idx)
    pu, pi = pair // n_items, pair % n_items
    was_seen = np.asarray(seen_matrix[pu, pi]).ravel() > 0
    n_pairs, n_reseen = int(pair.size), int(was_seen.sum())
    pu, pi = pu[~was_seen], pi[~was_seen]
    rel_off, rel_val = _group(pu, pi, n_users)
    users = np.flatnonzero(np.diff(rel_off) > 0)
    n_split_users = int(np.unique(target.user_idx).size)
    if users.size == 0:
        raise ValueError(
            f"{str(d / schema.SPLITS[split])!r}: no user has a held-out item they had not seen before "
            f"({n_pairs} pairs, {n_reseen} re-consumed)"
        )
    if max_users is not None and users.size > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))

    pop = (
        items_t.column("n_train").to_numpy().astype(np.int64)
        if "n_train" in items_t.column_names
        else np.bincount(train.item_idx, minlength=n_items)
    )
    cutoff = int(train.ts.max()) if len(train) else 0
    if "first_ts" in items_t.column_names:
        first_ts = items_t.column("first_ts").fill_null(0).to_numpy().astype(np.int64)
        new_items = first_ts > cutoff
    else:
        new_items = np.zeros(n_items, dtype=bool)

    return EvalSet(
        data_dir=d,
        split=split,
        manifest_sha256=sha256_file(d / schema.MANIFEST) if (d / schema.MANIFEST).is_file() else "",
        n_users=n_users,
        n_items=n_items,
        user_ids=_str_ids(users_t, schema.USER_ID),
        item_ids=_str_ids(items_t, schema.ITEM_ID),
        users=users,
        relevant=[rel_val[rel_off[u] : rel_off[u + 1]] for u in users],
        seen=[seen_val[seen_off[u] : seen_off[u + 1]] for u in users],
        history=[hist_val[hist_off[u] : hist_off[u + 1]] for u in users],
        fit_matrix=interaction_matrix(before.user_idx, before.item_idx, n_users=n_users, n_items=n_items),
        seen_matrix=seen_matrix,
        item_popularity=pop,
        item_segment=popularity_segments(pop),
        new_items=new_items,
        counts={
            "split_users": n_split_users,
            "users_with_relevant": int(np.count_nonzero(np.diff(rel_off))),
            "users_evaluated": int(users.size),
            "split_pairs": n_pairs,
            "split_pairs_seen_before": n_reseen,
            "train_cutoff_ts": cutoff,
            "new_items": int(new_items.sum()),
        },
    )


def popularity_segments(pop: np.ndarray, *, head: float = HEAD_SHARE, torso: float = TORSO_SHARE) -> np.ndarray:
    """``[n_items]`` segment per item: 0 head, 1 torso, 2 tail, by share of train interactions.

    Items are ranked by popularity; an item is head while the interactions of the items ranked above it cover
    less than ``head`` of the total, torso below ``torso``, tail after. ``[5, 3, 1, 1]`` -> head, torso, tail, tail.
    """
    pop = np.asarray(pop, dtype=np.float64)
    order = np.argsort(-pop, kind="stable")
    total = pop.sum()
    before = (np.cumsum(pop[order]) - pop[order]) / total if total > 0 else np.ones(pop.size)
    seg = np.where(before < head, 0, np.where(before < torso, 1, 2))
    out = np.empty(pop.size, dtype=np.int64)
    out[order] = seg
    return out


def popularity_percentile(pop: np.ndarray) -> np.ndarray:
    """``[n_items]`` in (0, 1]: share of items at most as popular (ties share the mean rank); 1 = most popular."""
    from scipy.stats import rankdata

    return rankdata(np.asarray(pop), method="average") / max(1, len(pop))


# --------------------------------------------------------------------------------------------------------------
# scoring


def _batched(
    fn: Callable[[slice], np.ndarray], n: int, k: int, *, desc: str, progress: bool | None
) -> np.ndarray:
    """``fn`` over ``n`` users in batches. ``progress``: True = a tqdm bar, False = log lines, None = silent."""
    from tqdm.auto import tqdm

    from recsys.core.logs import Throttle

    out = np.full((n, k), -1, dtype=np.int64)
    # without a bar (no terminal): one line when done, and one every `recsys --progress-every` seconds on the way
    throttle, t0 = Throttle(enabled=progress is False), time.perf_counter()
    with tqdm(total=n, desc=desc, unit="user", disable=progress is not True, leave=False) as bar:
        for s in range(0, n, _SEARCH_BATCH):
            sl = slice(s, min(s + _SEARCH_BATCH, n))
            out[sl] = fn(sl)
            bar.update(sl.stop - sl.start)
            if sl.stop < n and throttle.due():
                log.info("evaluate: %s: %d/%d users", desc, sl.stop, n)
    if progress is False:
        log.info("evaluate: %s: %d users in %.1fs", desc, n, time.perf_counter() - t0)
    return out


def search_all(
    index: Any, queries: np.ndarray, k: int, *, seen: Sequence[np.ndarray], desc: str = "search",
    progress: bool | None = None,
) -> np.ndarray:
    """Top-``k`` item ids ``[n, k]`` for ``queries [n, dim]`` minus each query's seen items (serving's rule).
    ``progress``: True = a tqdm bar, False = log lines (a progress line every `--progress-every` s), None = silent."""
    from recsys.retrieval import retrieve

    return _batched(lambda sl: retrieve(index, queries[sl], k, seen=seen[sl])[0], len(queries), k, desc=desc,
                    progress=progress)


def score_topk(
    topk: np.ndarray,
    es: EvalSet,
    ks: Sequence[int],
    *,
    cold_threshold: int = 5,
    pop_pct: np.ndarray | None = None,
) -> dict[str, Any]:
    """Metrics, coverage, popularity bias and segments of ``topk [m, K]`` (dataset item rows, -1 = none)."""
    from recsys.core.metrics import ranking_metrics

    metrics = ranking_metrics(topk, es.relevant, ks)
    pop_pct = popularity_percentile(es.item_popularity) if pop_pct is None else pop_pct
    for k in ks:
        rec = topk[:, :k]
        rec = rec[rec >= 0]
        metrics[f"coverage@{k}"] = float(np.unique(rec).size / es.n_items)
        metrics[f"pop_percentile@{k}"] = float(pop_pct[rec].mean()) if rec.size else float("nan")

    segments: dict[str, Any] = {}
    n_prior = np.array([len(s) for s in es.seen])
    for name, mask in (("users:cold", n_prior <= cold_threshold), ("users:warm", n_prior > cold_threshold)):
        segments[name] = _segment(topk[mask], [r for r, m in zip(es.relevant, mask, strict=True) if m], ks)
    for name, item_mask in (
        ("items:head", es.item_segment == 0),
        ("items:torso", es.item_segment == 1),
        ("items:tail", es.item_segment == 2),
        ("items:new", es.new_items),
    ):
        rel = [r[item_mask[r]] for r in es.relevant]
        segments[name] = _segment(topk, rel, ks)
    return {"metrics": metrics, "segments": segments}


def _segment(topk: np.ndarray, relevant: list[np.ndarray], ks: Sequence[int]) -> dict[str, Any]:
    from recsys.core.metrics import ranking_metrics

    keep = np.array([len(r) > 0 for r in relevant], dtype=bool)
    n = int(keep.sum())
    out: dict[str, Any] = {"n_users": n, "n_relevant": int(sum(len(r) for r in relevant))}
    if n:
        out["metrics"] = ranking_metrics(topk[keep], [r for r, k in zip(relevant, keep, strict=True) if k], ks)
    return out


def ann_recall(ann: np.ndarray, exact: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """``ann_recall@k`` = mean |ANN top-k ∩ exact top-k| / |exact top-k| for each k."""
    from recsys.retrieval import recall_vs_exact

    return {f"ann_recall@{k}": float(recall_vs_exact(ann[:, :k], exact[:, :k])) for k in ks}


@dataclass
class _BundleRun:
    exact: np.ndarray  # [m, K] dataset item rows
    ann: np.ndarray
    ann_recall: dict[str, float]
    info: dict[str, Any]
    queries: np.ndarray  # [m, dim]
    seen_b: list[np.ndarray]  # bundle item rows


def _run_bundle(bundle: Any, es: EvalSet, big_k: int, ks: Sequence[int], *, progress: bool, name: str) -> _BundleRun:
    """Embed the evaluation users with the bundle's towers and retrieve exact + ANN top-``big_k``."""
    same_vocab = (
        bundle.n_users == es.n_users
        and bundle.n_items == es.n_items
        and np.array_equal(bundle.user_ids, es.user_ids)
        and np.array_equal(bundle.item_ids, es.item_ids)
    )
    if same_vocab:
        d2b_item = np.arange(es.n_items, dtype=np.int64)
        b2d_item = d2b_item
        rows = es.users.astype(np.int64)
    else:
        d2b_item = np.array([bundle.item_row(t) if bundle.item_row(t) is not None else -1 for t in es.item_ids],
                            dtype=np.int64)
        b2d_item = np.full(bundle.n_items, -1, dtype=np.int64)
        b2d_item[d2b_item[d2b_item >= 0]] = np.flatnonzero(d2b_item >= 0)
        rows = np.array([-1 if (r := bundle.user_row(u)) is None else r for u in es.user_ids[es.users]],
                        dtype=np.int64)

    def to_b(items: np.ndarray) -> np.ndarray:
        b = d2b_item[items]
        return b[b >= 0]

    seen_b = [to_b(s) for s in es.seen]
    t0 = time.perf_counter()
    # The bundle's stored embeddings were computed from this very dataset's serving history: reuse them for test.
    stored = (same_vocab and es.split == "test"
              and "test" not in (bundle.manifest.get("trained_on") or {}).get("splits", ())
              and bundle.manifest.get("data", {}).get("manifest_sha256") == es.manifest_sha256)
    if stored:
        queries = np.asarray(bundle.user_embeddings[rows])
    else:
        queries = np.empty((len(rows), bundle.dim), dtype=np.float32)
        for s in range(0, len(rows), 4096):
            queries[s : s + 4096] = bundle.embed_users(rows[s : s + 4096], [to_b(h) for h in es.history[s : s + 4096]])
    embed_s = time.perf_counter() - t0

    big_k = min(big_k, bundle.n_items)
    t0 = time.perf_counter()
    exact_b = search_all(bundle.exact, queries, big_k, seen=seen_b, desc=f"{name} exact", progress=progress)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ann_b = search_all(bundle.index, queries, big_k, seen=seen_b, desc=f"{name} hnsw", progress=progress)
    ann_s = time.perf_counter() - t0

    def to_d(ids: np.ndarray) -> np.ndarray:
        return np.where(ids >= 0, b2d_item[np.maximum(ids, 0)], -1)

    n_rel = sum(len(r) for r in es.relevant)
    n_rel_unknown = sum(int((d2b_item[r] < 0).sum()) for r in es.relevant)
    info = {
        "path": str(bundle.path),
        "version": bundle.version,
        "ef": int(bundle.index.ef),
        "same_vocabulary": bool(same_vocab),
        "stored_user_embeddings": bool(stored),
        "users_unknown_to_bundle": int((rows < 0).sum()),
        "relevant_unknown_to_bundle": f"{n_rel_unknown}/{n_rel}",
        "seconds": {"embed": round(embed_s, 3), "exact": round(exact_s, 3), "hnsw": round(ann_s, 3)},
    }
    return _BundleRun(to_d(exact_b), to_d(ann_b), ann_recall(ann_b, exact_b, ks), info, queries, seen_b)


def _pad_k(topk: np.ndarray, big_k: int) -> np.ndarray:
    if topk.shape[1] >= big_k:
        return topk
    return np.concatenate([topk, np.full((topk.shape[0], big_k - topk.shape[1]), -1, dtype=np.int64)], axis=1)


def make_baseline(name: str, *, n_items: int, ease_max_items: int = 10_000) -> Any:
    """Popularity / ItemKNN / EASE with their default hyper-parameters; ``ValueError`` if EASE would not fit."""
    from recsys.baselines import EASE, ItemKNN, Popularity

    if name == "popularity":
        return Popularity()
    if name == "itemknn":
        return ItemKNN()
    if name == "ease":
        if n_items > ease_max_items:
            raise ValueError(f"EASE skipped: n_items={n_items} > ease_max_items={ease_max_items}")
        return EASE()
    raise ValueError(f"unknown baseline {name!r}; known: {list(BASELINES)}")


def ann_sweep(
    bundle: Any,
    queries: np.ndarray,
    seen: Sequence[np.ndarray],
    *,
    k: int = 10,
    efs: Sequence[int] = SWEEP_EFS,
    max_queries: int = 1000,
    latency_queries: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """ANN recall vs exact and single-query latency for each ``ef`` (on a private copy of the bundle's index).

    Returns ``{"k", "n_queries", "tuned_ef", "exact": {p50_ms, ...}, "rows": [{ef, recall, p50_ms, p95_ms,
    batch_ms_per_query}]}``; queries are searched with their seen items excluded, as served.
    """
    from recsys.retrieval import HnswIndex, recall_vs_exact, retrieve

    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(queries), size=min(max_queries, len(queries)), replace=False))
    q, s = queries[pick], [seen[i] for i in pick]
    k = min(k, bundle.n_items)
    # a private copy: changing ef on the bundle's own index would affect anyone sharing the bundle
    index = HnswIndex.load(
        bundle.path / schema.INDEX_FILE, dim=bundle.dim, metric=bundle.metric, size=bundle.n_items
    )
    truth = retrieve(bundle.exact, q, k, seen=s)[0]

    def timed(idx: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        got = retrieve(idx, q, k, seen=s)[0]
        batch = (time.perf_counter() - t0) / len(q)
        n_lat = min(latency_queries, len(q))
        lat = np.empty(n_lat)
        for j in range(n_lat):
            t0 = time.perf_counter()
            retrieve(idx, q[j : j + 1], k, seen=s[j : j + 1])
            lat[j] = time.perf_counter() - t0
        return {
            "recall": float(recall_vs_exact(got, truth)),
            "p50_ms": float(np.median(lat) * 1e3),
            "p95_ms": float(np.percentile(lat, 95) * 1e3),
            "batch_ms_per_query": float(batch * 1e3),
        }

    rows = []
    for ef in sorted({*efs, int(bundle.index.ef)}):
        index.set_ef(int(ef))
        rows.append({"ef": int(ef), **timed(index)})
    return {
        "k": k,
        "n_queries": len(q),
        "tuned_ef": int(bundle.index.ef),
        "exact": timed(bundle.exact),
        "rows": rows,
    }


# --------------------------------------------------------------------------------------------------------------
# the library entry point


def evaluate(
    bundle: Any,
    data_dir: str | Path,
    *,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    baselines: Sequence[str] = BASELINES,
    compare: Any = None,
    max_users: int | None = None,
    cold_threshold: int = 5,
    ease_max_items: int = 10_000,
    sweep: bool = True,
    seed: int = 0,
    progress: bool = False,
    in_sample: bool = False,
) -> dict[str, Any]:
    """Evaluate a bundle (a ``Bundle`` or a path for ``Bundle.load``) on ``split`` of ``data_dir``.

    A bundle whose final fit trained on ``split`` (see :func:`in_sample_reason`) raises :class:`InSampleError`;
    with ``in_sample=True`` it is scored and the report says so (``report["in_sample"]``).

    ``compare``: a second bundle for an A/B. ``baselines``: any of ``popularity``, ``itemknn``, ``ease`` (EASE is
    skipped with a note above ``ease_max_items`` items). ``max_users``: evaluate a seeded sample of users.

    Returns the report dict (JSON-ready). The keys a quality gate reads: ``report["models"]["two_tower"]
    ["metrics"]["recall@20"]`` (exact retrieval), ``"two_tower_hnsw"`` for the served ANN path, and
    ``report["summary"]`` (a flat copy of the two-tower metrics + ANN recall).
    """
    from recsys.bundle import Bundle

    ks = sorted({_check_k(k) for k in ks})
    if not ks:
        raise ValueError("`ks` must hold at least one cut-off")
    if isinstance(baselines, str):
        baselines = [b for b in baselines.split(",") if b]
    for b in baselines:
        if b not in BASELINES:
            raise ValueError(f"unknown baseline {b!r}; known: {list(BASELINES)}")
    a = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle)
    b = None if compare is None else (compare if isinstance(compare, Bundle) else Bundle.load(compare))
    history_len = a.max_history
    es = load_eval_set(data_dir, split, max_users=max_users, seed=seed, history_len=history_len)
    leaks = {name: why for name, bun in (("two_tower", a), ("compare", b))
             if bun is not None and (why := in_sample_reason(bun, data_dir, split)) is not None}
    if leaks and not in_sample:
        raise InSampleError(
            f"refusing to score on split {split!r} of {str(data_dir)!r}: {'; '.join(dict.fromkeys(leaks.values()))}. "
            f"Its numbers "
            f"would measure memorisation, not the future. Evaluate a bundle trained with `train.final_fit = "
            f"\"train_valid\"` (test held out), or pass --in-sample (in_sample=True) to report them marked as "
            f"in-sample; the bundle's holdout estimate is in its manifest (`evaluation`).")
    big_k = ks[-1]
    if big_k > es.n_items:
        raise ValueError(f"`ks` must be at most the catalogue size {es.n_items}, got {big_k}")
    pop_pct = popularity_percentile(es.item_popularity)
    t_start = time.perf_counter()

    models: dict[str, Any] = {}
    ann: dict[str, Any] = {}
    bundles: dict[str, Any] = {}
    runs: dict[str, _BundleRun] = {}
    for name, bun in (("two_tower", a), ("compare", b)):
        if bun is None:
            continue
        run = _run_bundle(bun, es, big_k, ks, progress=progress, name=name)
        runs[name] = run
        bundles[name] = run.info
        for suffix, topk, retrieval in (("", run.exact, "exact"), ("_hnsw", run.ann, "hnsw")):
            entry = score_topk(_pad_k(topk, big_k), es, ks, cold_threshold=cold_threshold, pop_pct=pop_pct)
            models[name + suffix] = {"kind": "two_tower", "retrieval": retrieval, "bundle": bun.version, **entry}
        ann[name] = {"ef": run.info["ef"], **run.ann_recall}

    notes: list[str] = []
    for name in baselines:
        try:
            model = make_baseline(name, n_items=es.n_items, ease_max_items=ease_max_items)
        except ValueError as e:
            notes.append(str(e))
            continue
        t0 = time.perf_counter()
        model.fit(es.fit_matrix)
        ids = _batched(
            lambda sl, model=model: model.recommend(es.users[sl], big_k, user_items=es.seen_matrix)[0],
            len(es.users), big_k, desc=name, progress=progress,
        )
        entry = score_topk(ids, es, ks, cold_threshold=cold_threshold, pop_pct=pop_pct)
        models[name] = {"kind": "baseline", "retrieval": "exact", "seconds": round(time.perf_counter() - t0, 3),
                        **entry}

    report: dict[str, Any] = {
        "report_schema": REPORT_SCHEMA,
        "created_at": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z"),
        "split": split,
        "ks": ks,
        "data": {"path": str(es.data_dir), "manifest_sha256": es.manifest_sha256, "n_users": es.n_users,
                 "n_items": es.n_items},
        "users": es.counts,
        "bundles": bundles,
        "models": models,
        "ann": ann,
        "segments_definition": {
            "users:cold": f"at most {cold_threshold} distinct items before the split",
            "users:warm": f"more than {cold_threshold} distinct items before the split",
            "items:head": f"popularity ranks covering the first {HEAD_SHARE:.0%} of train interactions",
            "items:torso": f"the next {TORSO_SHARE - HEAD_SHARE:.0%}",
            "items:tail": "the rest",
            "items:new": "first_ts after the last train interaction",
        },
        "notes": notes,
        "in_sample": leaks or None,
        "summary": {**models["two_tower"]["metrics"], **ann["two_tower"]},
    }
    if b is not None:
        report["ab"] = ab_test(runs["two_tower"].exact, runs["compare"].exact, es, ks)
    if sweep:
        report["ann_sweep"] = ann_sweep(a, runs["two_tower"].queries, runs["two_tower"].seen_b,
                                        k=ks[0], seed=seed)
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    return _finite(report)


def _check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`ks` values must be integers >= 1, got {k!r}")
    return int(k)


def _finite(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def per_user_recall(topk: np.ndarray, relevant: Sequence[np.ndarray], k: int) -> np.ndarray:
    """``[m]`` recall@k of each user (hits in the first k / |relevant|)."""
    out = np.empty(len(relevant))
    for i, r in enumerate(relevant):
        out[i] = np.isin(topk[i, :k], r).sum() / len(r)
    return out


def ab_test(a: np.ndarray, b: np.ndarray, es: EvalSet, ks: Sequence[int]) -> dict[str, Any]:
    """Paired comparison of two top-k lists on the same users: mean recall@k of each, B - A, and a 95% CI.

    The CI is the normal approximation of the paired per-user differences (users are the independent units):
    ``mean(d) +- 1.96 * std(d, ddof=1) / sqrt(n)``; deterministic, nothing is resampled (NaN for one user).
    """
    out: dict[str, Any] = {}
    for k in ks:
        ra, rb = per_user_recall(a, es.relevant, k), per_user_recall(b, es.relevant, k)
        diff = rb - ra
        se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else float("nan")
        out[f"recall@{k}"] = {
            "a": float(ra.mean()),
            "b": float(rb.mean()),
            "delta": float(diff.mean()),
            "ci95": [float(diff.mean() - 1.96 * se), float(diff.mean() + 1.96 * se)],
            "b_better_users": int((diff > 0).sum()),
            "a_better_users": int((diff < 0).sum()),
        }
    return out


def quick_evaluation(
    *,
    user_emb: np.ndarray,
    exact: Any,
    ann: Any,
    data_dir: str | Path,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    max_users: int = 5000,
    seed: int = 0,
) -> dict[str, Any]:
    """The evaluation summary stored in a bundle's manifest at export: two-tower exact + HNSW metrics on ``split``.

    ``user_emb [n_users, dim]`` are the exported known-user embeddings (same vocabulary as ``data_dir``).
    """
    es = load_eval_set(data_dir, split, max_users=max_users, seed=seed)
    ks = sorted({min(_check_k(k), es.n_items) for k in ks})
    q = user_emb[es.users]
    from recsys.core.metrics import ranking_metrics

    ex = search_all(exact, q, ks[-1], seen=es.seen)
    an = search_all(ann, q, ks[-1], seen=es.seen)
    m_ex = ranking_metrics(ex, es.relevant, ks)
    m_an = ranking_metrics(an, es.relevant, ks)
    return _finite({
        "split": split,
        "n_users": int(len(es.users)),
        **m_ex,
        "hnsw": m_an,
        **ann_recall(an, ex, ks),
    })


# --------------------------------------------------------------------------------------------------------------
# report files


def write_report(report: Mapping[str, Any], out_dir: str | Path, *, bundle: Any = None, plots: bool = True,
                 embedding_map: str = "auto") -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (with matplotlib) the PNG plots into ``out_dir`` atomically.

    ``bundle`` (the evaluated one) feeds the 2-D map of item embeddings. Returns name -> path of what was written.
    """
    import json

    from recsys.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    written: dict[str, Path] = {}
    plot_files: dict[str, str] = {}
    if plots:
        from recsys import plots as P

        try:
            pngs = {
                "recall_at_k": P.recall_curves_png(report),
                **({"ann_tradeoff": P.ann_tradeoff_png(report["ann_sweep"])} if "ann_sweep" in report else {}),
            }
            if bundle is not None:
                png, meta = P.embedding_map_png(bundle, method=embedding_map)
                pngs["item_embeddings"] = png
                report["embedding_map"] = meta
        except ImportError as e:
            log.warning("plots skipped: %s (pip install matplotlib)", e)
            pngs = {}
            report.setdefault("notes", []).append(f"plots skipped: {e}")
        for name, data in pngs.items():
            atomic_write_bytes(out / f"{name}.png", data)
            written[name] = out / f"{name}.png"
            plot_files[name] = f"{name}.png"
    report["plots"] = plot_files
    atomic_write_json(out / "report.json", _finite(report))
    written["report.json"] = out / "report.json"
    atomic_write_text(out / "report.md", render_markdown(report))
    written["report.md"] = out / "report.md"
    json.loads((out / "report.json").read_text())  # what we wrote must read back
    return written


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(report: Mapping[str, Any]) -> str:
    """A human-readable report: models x metrics, ANN vs exact, segments, A/B, plots."""
    ks = report["ks"]
    lines = [
        f"# Offline evaluation — split `{report['split']}`",
        "",
        f"Data: `{report['data']['path']}` ({report['data']['n_users']} users, {report['data']['n_items']} items); "
        f"{report['users']['users_evaluated']} users evaluated "
        f"({report['users']['split_pairs_seen_before']} of {report['users']['split_pairs']} held-out pairs were "
        "already seen and are excluded).",
        "",
    ]
    for name, why in (report.get("in_sample") or {}).items():
        lines += [f"**IN-SAMPLE: `{name}` was trained on the scored interactions; its numbers are not an estimate "
                  f"of future quality.** ({why})", ""]
    for name, info in report.get("bundles", {}).items():
        lines.append(f"- `{name}`: bundle `{info['version']}` (ef={info['ef']}, "
                     f"users unknown to it: {info['users_unknown_to_bundle']}, "
                     f"relevant items unknown to it: {info['relevant_unknown_to_bundle']})")
    lines += ["", "## Retrieval quality (full catalogue, seen items excluded)", ""]
    cols = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + [f"hit_rate@{ks[0]}", "mrr", f"map@{ks[-1]}",
                                                                      f"coverage@{ks[-1]}", f"pop_percentile@{ks[-1]}"]
    lines.append("| model | retrieval | " + " | ".join(cols) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m['retrieval']} | " + " | ".join(_fmt(m["metrics"].get(c)) for c in cols) + " |")
    if report.get("ann"):
        lines += ["", "## HNSW against exact search", ""]
        rk = [f"ann_recall@{k}" for k in ks]
        lines.append("| model | ef | " + " | ".join(rk) + " |")
        lines.append("|---|---|" + "---|" * len(rk))
        for name, a in report["ann"].items():
            lines.append(f"| {name} | {a['ef']} | " + " | ".join(_fmt(a.get(c)) for c in rk) + " |")
    sw = report.get("ann_sweep")
    if sw:
        lines += ["", f"ef sweep (recall@{sw['k']} vs exact, {sw['n_queries']} queries, tuned ef = "
                      f"{sw['tuned_ef']}; exact scan p50 {_fmt(sw['exact']['p50_ms'], 3)} ms):", "",
                  "| ef | recall | p50 ms | p95 ms | batch ms/query |", "|---|---|---|---|---|"]
        for r in sw["rows"]:
            lines.append(f"| {r['ef']} | {_fmt(r['recall'])} | {_fmt(r['p50_ms'], 3)} | {_fmt(r['p95_ms'], 3)} | "
                         f"{_fmt(r['batch_ms_per_query'], 4)} |")
    seg_k = ks[1] if len(ks) > 1 else ks[0]
    segs = list(report["segments_definition"])
    lines += ["", f"## Segments — recall@{seg_k} (users in segment)", ""]
    lines.append("| model | " + " | ".join(segs) + " |")
    lines.append("|---|" + "---|" * len(segs))
    for name, m in report["models"].items():
        cells = []
        for s in segs:
            seg = m["segments"][s]
            cells.append(f"{_fmt(seg['metrics'][f'recall@{seg_k}'])} ({seg['n_users']})" if "metrics" in seg
                         else f"– ({seg['n_users']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- `{k}`: {v}" for k, v in report["segments_definition"].items()]
    if report.get("ab"):
        lines += ["", "## A/B: `compare` (B) against `two_tower` (A), exact retrieval", "",
                  "| metric | A | B | B − A | 95% CI | users B better / A better |", "|---|---|---|---|---|---|"]
        for mname, r in report["ab"].items():
            lines.append(f"| {mname} | {_fmt(r['a'])} | {_fmt(r['b'])} | {_fmt(r['delta'])} | "
                         f"[{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}] | {r['b_better_users']} / "
                         f"{r['a_better_users']} |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{n}]({f})" for n, f in report["plots"].items()]
    if report.get("embedding_map"):
        em = report["embedding_map"]
        lines.append(f"\nItem map: {em.get('method')} of {em.get('n_points')} items coloured by "
                     f"`{em.get('feature')}`.")
    return "\n".join(lines) + "\n"
