"""Scoring a bundle and the baselines on an eval set through the one retrieval rule: metrics, segments, ANN
recall and its ef sweep, the A/B comparison; optionally under an item filter (:func:`evaluate`'s ``item_filter``)."""

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
from tqdm.auto import tqdm

from recsys.bundle import Bundle
from recsys.catalogue.filters import Attributes, Condition, ItemFilter
from recsys.core import schema
from recsys.core.logs import Throttle
from recsys.core.metrics import ranking_metrics
from recsys.evaluate.evalset import (
    HEAD_SHARE,
    TORSO_SHARE,
    EvalSet,
    InSampleError,
    in_sample_reason,
    load_eval_set,
    popularity_percentile,
    restrict_relevant,
)
from recsys.retrieval import HnswIndex, bitset, recall_vs_exact, retrieve

log = logging.getLogger(__name__)


DEFAULT_KS = (10, 20, 50, 100)


BASELINES = ("popularity", "itemknn", "ease")


REPORT_SCHEMA = 1




# ef values swept for the ANN recall / latency curve (the tuned ef is added)
SWEEP_EFS = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


_SEARCH_BATCH = 1024


def _batched(
    fn: Callable[[slice], np.ndarray], n: int, k: int, *, desc: str, progress: bool | None
) -> np.ndarray:
    """``fn`` over ``n`` users in batches. ``progress``: True = a tqdm bar, False = log lines, None = silent."""
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
    progress: bool | None = None, allow: np.ndarray | None = None,
) -> np.ndarray:
    """Top-``k`` item ids ``[n, k]`` for ``queries [n, dim]`` minus each query's seen items (serving's rule),
    within ``allow`` (a :mod:`recsys.retrieval.bitset` over the index's ids, shared by every query) when given.
    ``progress``: True = a tqdm bar, False = log lines (a progress line every `--progress-every` s), None = silent."""
    return _batched(lambda sl: retrieve(index, queries[sl], k, seen=seen[sl], allow=allow)[0], len(queries), k,
                    desc=desc, progress=progress)


def score_topk(
    topk: np.ndarray,
    es: EvalSet,
    ks: Sequence[int],
    *,
    cold_threshold: int = 5,
    pop_pct: np.ndarray | None = None,
    n_candidates: int | None = None,
) -> dict[str, Any]:
    """Metrics, coverage, popularity bias and segments of ``topk [m, K]`` (dataset item rows, -1 = none).

    ``coverage@k``: distinct recommended items / ``n_candidates`` (default the catalogue; a filter's allowed count
    under a filter)."""
    metrics = ranking_metrics(topk, es.relevant, ks)
    pop_pct = popularity_percentile(es.item_popularity) if pop_pct is None else pop_pct
    n_candidates = es.n_items if n_candidates is None else n_candidates
    for k in ks:
        rec = topk[:, :k]
        rec = rec[rec >= 0]
        metrics[f"coverage@{k}"] = float(np.unique(rec).size / max(1, n_candidates))
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
    keep = np.array([len(r) > 0 for r in relevant], dtype=bool)
    n = int(keep.sum())
    out: dict[str, Any] = {"n_users": n, "n_relevant": int(sum(len(r) for r in relevant))}
    if n:
        out["metrics"] = ranking_metrics(topk[keep], [r for r, k in zip(relevant, keep, strict=True) if k], ks)
    return out


def ann_recall(ann: np.ndarray, exact: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
    """``ann_recall@k`` = mean |ANN top-k ∩ exact top-k| / |exact top-k| for each k."""
    return {f"ann_recall@{k}": float(recall_vs_exact(ann[:, :k], exact[:, :k])) for k in ks}


@dataclass
class _BundleRun:
    exact: np.ndarray  # [m, K] dataset item rows
    ann: np.ndarray
    ann_recall: dict[str, float]
    info: dict[str, Any]
    queries: np.ndarray  # [m, dim]
    seen_b: list[np.ndarray]  # bundle item rows
    allow: np.ndarray | None  # the filter's bitset over bundle item rows, None = unfiltered


def _same_vocabulary(bundle: Any, es: EvalSet) -> bool:
    return bool(
        bundle.n_users == es.n_users
        and bundle.n_items == es.n_items
        and np.array_equal(bundle.user_ids, es.user_ids)
        and np.array_equal(bundle.item_ids, es.item_ids)
    )


def _item_map(bundle: Any, es: EvalSet) -> np.ndarray:
    """``d2b [n_items]``: the bundle's item row of each dataset item row (matched by external ID), -1 = unknown."""
    if _same_vocabulary(bundle, es):
        return np.arange(es.n_items, dtype=np.int64)
    return np.array([bundle.item_row(t) if bundle.item_row(t) is not None else -1 for t in es.item_ids],
                    dtype=np.int64)


def allowed_items(bundle: Any, es: EvalSet, item_filter: ItemFilter) -> np.ndarray:
    """``[n_items]`` bool over the dataset's item rows: the items ``item_filter`` allows, read from the bundle's
    item attributes (as serving reads them). An item the bundle does not know has no attributes: not allowed.
    A filter naming an attribute the bundle lacks raises ``UnknownAttribute`` (a ``ValueError``) naming it."""
    words = Attributes.from_bundle(bundle).allowed(item_filter)
    mask_b = bitset.to_mask(words, bundle.n_items)  # [bundle n_items]
    d2b = _item_map(bundle, es)
    return (d2b >= 0) & mask_b[np.maximum(d2b, 0)]


def filter_terms(item_filter: ItemFilter) -> list[str]:
    """The command-line terms of ``item_filter`` (:func:`recsys.catalogue.filters.parse_filter` reads them back)."""
    def term(c: Condition) -> str:
        if c.op == "any_of":
            return f"{c.attribute}={','.join(c.values)}"
        if c.op == "none_of":
            return f"{c.attribute}!={','.join(c.values)}"
        if c.low is not None and c.high is not None:
            return f"{c.attribute}={c.low:g}..{c.high:g}"
        if c.low is not None:
            return f"{c.attribute}>={c.low:g}"
        return f"{c.attribute}<={c.high:g}" if c.high is not None else f"{c.attribute}=.."

    return [term(c) for c in item_filter.conditions]


def _run_bundle(bundle: Any, es: EvalSet, big_k: int, ks: Sequence[int], *, progress: bool, name: str,
                allowed: np.ndarray | None = None) -> _BundleRun:
    """Embed the evaluation users with the bundle's towers and retrieve exact + ANN top-``big_k``, only among
    ``allowed [n_items]`` (bool over dataset item rows) when given."""
    same_vocab = _same_vocabulary(bundle, es)
    d2b_item = _item_map(bundle, es)
    if same_vocab:
        b2d_item = d2b_item
        rows = es.users.astype(np.int64)
    else:
        b2d_item = np.full(bundle.n_items, -1, dtype=np.int64)
        b2d_item[d2b_item[d2b_item >= 0]] = np.flatnonzero(d2b_item >= 0)
        rows = np.array([-1 if (r := bundle.user_row(u)) is None else r for u in es.user_ids[es.users]],
                        dtype=np.int64)
    allow = None if allowed is None else bitset.from_ids(d2b_item[allowed & (d2b_item >= 0)], bundle.n_items)

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
    exact_b = search_all(bundle.exact, queries, big_k, seen=seen_b, desc=f"{name} exact", progress=progress,
                         allow=allow)
    exact_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ann_b = search_all(bundle.index, queries, big_k, seen=seen_b, desc=f"{name} hnsw", progress=progress,
                       allow=allow)
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
    return _BundleRun(to_d(exact_b), to_d(ann_b), ann_recall(ann_b, exact_b, ks), info, queries, seen_b, allow)


def _pad_k(topk: np.ndarray, big_k: int) -> np.ndarray:
    if topk.shape[1] >= big_k:
        return topk
    return np.concatenate([topk, np.full((topk.shape[0], big_k - topk.shape[1]), -1, dtype=np.int64)], axis=1)


def make_baseline(name: str, *, n_items: int, ease_max_items: int = 10_000) -> Any:
    """Popularity / ItemKNN / EASE with their default hyper-parameters; ``ValueError`` if EASE would not fit."""
    from recsys.evaluate.baselines import EASE, ItemKNN, Popularity  # scipy: heavy, only baselines need it

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
    allow: np.ndarray | None = None,
) -> dict[str, Any]:
    """ANN recall vs exact and single-query latency for each ``ef`` (on a private copy of the bundle's index).

    Returns ``{"k", "n_queries", "tuned_ef", "exact": {p50_ms, ...}, "rows": [{ef, recall, p50_ms, p95_ms,
    batch_ms_per_query}]}``; queries are searched with their seen items excluded, as served, and within ``allow``
    (a bitset over the bundle's item rows: a filtered request's search) when given.
    """
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(queries), size=min(max_queries, len(queries)), replace=False))
    q, s = queries[pick], [seen[i] for i in pick]
    k = min(k, bundle.n_items)
    # a private copy: changing ef on the bundle's own index would affect anyone sharing the bundle
    index = HnswIndex.load(
        bundle.path / schema.INDEX_FILE, dim=bundle.dim, metric=bundle.metric, size=bundle.n_items
    )
    truth = retrieve(bundle.exact, q, k, seen=s, allow=allow)[0]

    def timed(idx: Any) -> dict[str, float]:
        t0 = time.perf_counter()
        got = retrieve(idx, q, k, seen=s, allow=allow)[0]
        batch = (time.perf_counter() - t0) / len(q)
        n_lat = min(latency_queries, len(q))
        lat = np.empty(n_lat)
        for j in range(n_lat):
            t0 = time.perf_counter()
            retrieve(idx, q[j : j + 1], k, seen=s[j : j + 1], allow=allow)
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


# ~115 lines: the report's sections in order (load, each model and baseline, segments, ANN sweep, A/B); each is a
# call of its own, this function only assembles the report.
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
    item_filter: ItemFilter | None = None,
) -> dict[str, Any]:
    """Evaluate a bundle (a ``Bundle`` or a path for ``Bundle.load``) on ``split`` of ``data_dir``.

    A bundle whose final fit trained on ``split`` (see :func:`in_sample_reason`) raises :class:`InSampleError`;
    with ``in_sample=True`` it is scored and the report says so (``report["in_sample"]``).

    ``compare``: a second bundle for an A/B. ``baselines``: any of ``popularity``, ``itemknn``, ``ease`` (EASE is
    skipped with a note above ``ease_max_items`` items). ``max_users``: evaluate a seeded sample of users.

    ``item_filter`` (e.g. ``parse_filter(["category=space"])``): score the filtered use, as a filtered request is
    served. The allowed items are read from ``bundle``'s item attributes (an item it does not know is not allowed;
    an attribute it lacks raises ``UnknownAttribute``, a ``ValueError`` naming it), then

    * the two-tower models (exact and the served HNSW path, and ``compare``) retrieve only allowed items (the
      filter's bitset as ``allow`` of :func:`recsys.retrieval.retrieve`); the ef sweep searches with it too;
    * the baselines rank only allowed items (``recommend(..., allowed=mask)``);
    * relevance is restricted to allowed items: a user is judged only on the future items the filter lets
      through, and users left with none are dropped (before any model runs, so every model sees the same users);
      with ``max_users`` the sample is drawn first, then filtered;
    * ``coverage@k`` is over the allowed items, not the catalogue.

    ``report["filter"] = {"terms", "allowed_items", "users_kept", "users_dropped"}`` records it (absent without a
    filter). A filter that leaves no user with a relevant item is an error.

    Returns the report dict (JSON-ready). The keys a quality gate reads: ``report["models"]["two_tower"]
    ["metrics"]["recall@20"]`` (exact retrieval), ``"two_tower_hnsw"`` for the served ANN path, and
    ``report["summary"]`` (a flat copy of the two-tower metrics + ANN recall).
    """
    ks = sorted({check_k(k) for k in ks})
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
    allowed, filter_info = None, None
    if item_filter:
        allowed = allowed_items(a, es, item_filter)
        n_before = len(es.users)
        es = restrict_relevant(es, allowed)
        filter_info = {"terms": filter_terms(item_filter), "allowed_items": int(allowed.sum()),
                       "users_kept": len(es.users), "users_dropped": n_before - len(es.users)}
        if not len(es.users):
            raise ValueError(f"filter {filter_info['terms']} leaves no user with a relevant item: it allows "
                             f"{filter_info['allowed_items']} of {es.n_items} items and none of the {n_before} "
                             f"evaluated users has a held-out item among them")
    n_candidates = None if allowed is None else int(allowed.sum())
    pop_pct = popularity_percentile(es.item_popularity)
    t_start = time.perf_counter()

    models: dict[str, Any] = {}
    ann: dict[str, Any] = {}
    bundles: dict[str, Any] = {}
    runs: dict[str, _BundleRun] = {}
    for name, bun in (("two_tower", a), ("compare", b)):
        if bun is None:
            continue
        run = _run_bundle(bun, es, big_k, ks, progress=progress, name=name, allowed=allowed)
        runs[name] = run
        bundles[name] = run.info
        for suffix, topk, retrieval in (("", run.exact, "exact"), ("_hnsw", run.ann, "hnsw")):
            entry = score_topk(_pad_k(topk, big_k), es, ks, cold_threshold=cold_threshold, pop_pct=pop_pct,
                               n_candidates=n_candidates)
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
            lambda sl, model=model: model.recommend(es.users[sl], big_k, user_items=es.seen_matrix,
                                                    allowed=allowed)[0],
            len(es.users), big_k, desc=name, progress=progress,
        )
        entry = score_topk(ids, es, ks, cold_threshold=cold_threshold, pop_pct=pop_pct, n_candidates=n_candidates)
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
    if filter_info is not None:
        report["filter"] = filter_info
    if b is not None:
        report["ab"] = ab_test(runs["two_tower"].exact, runs["compare"].exact, es, ks)
    if sweep:
        report["ann_sweep"] = ann_sweep(a, runs["two_tower"].queries, runs["two_tower"].seen_b,
                                        k=ks[0], seed=seed, allow=runs["two_tower"].allow)
    report["seconds"] = round(time.perf_counter() - t_start, 3)
    return finite(report)


def check_k(k: Any) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`ks` values must be integers >= 1, got {k!r}")
    return int(k)


def finite(obj: Any) -> Any:
    """JSON-safe copy: numpy scalars to Python, NaN/inf to None."""
    if isinstance(obj, Mapping):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
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
