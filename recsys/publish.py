"""``export``: a training run (+ its prepared dataset) -> a new, verified version in the models directory.

Plan -> embed (the towers, on every item and known user) -> index (HNSW, ``ef`` auto-tuned against exact search)
-> quick evaluation -> write (atomic temp dir, every file's sha256 in the manifest) -> publish (rename, then
``LATEST``). ``set_latest`` / ``rollback`` move ``LATEST`` to another verified version. The bundle format itself
(files, versions, loading) is :mod:`recsys.bundle`; publishing sits above evaluation, which it runs.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.bundle.files import (
    BUNDLE_FILES,
    DATA_FILES,
    MANIFEST,
    PARTITION_PREFIX,
    RECENT_POPULARITY,
    BundleError,
    jsonable,
    ragged_rows,
    read_json,
    read_ragged,
)
from recsys.bundle.load import Bundle
from recsys.bundle.versions import (
    check_new_version_name,
    models_lock,
    new_version_name,
    prune_locked,
    read_latest,
    utc_now,
    version_dir,
)
from recsys.catalogue.delta import catalogue_dir
from recsys.catalogue.filters import Attributes, UnknownAttribute
from recsys.core import schema
from recsys.core.data import Interactions, fingerprint, history_and_seen, read_interactions, write_ragged
from recsys.core.io import atomic_dir, atomic_write_json, atomic_write_text, fsync_dir, sha256_file
from recsys.evaluate import quick_evaluation
from recsys.retrieval import ExactIndex, HnswIndex, IndexConfig, autotune_ef
from recsys.retrieval.partitions import Partitions
from recsys.train.embed import embed_items, embed_users, served_dim
from recsys.train.recency import choose_popularity_window, recent_counts

log = logging.getLogger(__name__)


def _package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("recsys", "torch", "numpy", "hnswlib", "polars", "pyarrow", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _fallback_popularity(data_dir: Path, state_dir: Path, trained_on: Mapping[str, Any] | None, *, n_users: int,
                         n_items: int) -> tuple[dict[str, Any], np.ndarray]:
    """(the manifest's ``popularity`` record, the fallback's counts ``[n_items]`` int64) for one export.

    The events are the final fit's splits (``trained_on``; train + valid, the serving state, for runs that did not
    record it). The window is chosen on them (:func:`choose_popularity_window`); the counts are each item's events
    in the last W days before the end of those events (newest + 1 ms). All time is the bundle's ``n_train``, as
    the fallback ranked before windows existed.
    """
    items = pq.read_table(state_dir / schema.ITEMS)
    all_time = (items.column("n_train").to_numpy().astype(np.int64) if "n_train" in items.column_names
                else np.zeros(n_items, dtype=np.int64))
    splits = [s for s in ((trained_on or {}).get("splits") or ("train", "valid"))
              if s in schema.SPLITS and (data_dir / schema.SPLITS[s]).is_file()]
    parts = [read_interactions(data_dir / schema.SPLITS[s], n_users=n_users, n_items=n_items) for s in splits]
    user_idx = np.concatenate([p.user_idx for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    item_idx = np.concatenate([p.item_idx for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    ts = np.concatenate([p.ts for p in parts]) if parts else np.zeros(0, dtype=np.int64)
    choice = choose_popularity_window(user_idx, item_idx, ts, n_items=n_items)
    window = choice.pop("window_days")
    end = int(ts.max()) + 1 if ts.size else 0
    counts = all_time if window is None else recent_counts(item_idx, ts, n_items=n_items, window_days=window, end=end)
    record = {"file": RECENT_POPULARITY, "window_days": window, "end_ms": end, "splits": splits,
              "items_in_window": int((counts > 0).sum()), "choice": choice}
    return record, counts


def _run_data_dir(run_dir: Path, cfg: Mapping[str, Any]) -> Path:
    """The prepared dataset a run was trained on, from its config.json ``cfg`` (``recsys.train.loop`` writes it):
    the path relative to the run first (a run moved together with its data still exports), then the absolute path;
    a candidate counts only if its fingerprint is the run's ``data_fingerprint``."""
    path = run_dir / schema.RUN_CONFIG
    want = cfg.get("data_fingerprint")
    tried: list[str] = []
    for key, base in (("data_dir_relative", run_dir), ("data_dir", None)):
        v = cfg.get(key)
        if not isinstance(v, str) or not v:
            continue
        cand = base / v if base is not None else Path(v)
        tried.append(str(cand))
        if (cand / schema.MANIFEST).is_file() and (not isinstance(want, str) or fingerprint(cand) == want):
            return cand
    if not tried:
        raise ValueError(f"{str(path)!r} does not name the prepared dataset (no `data_dir`); pass `data_dir` "
                         f"(recsys export --data DIR)")
    raise ValueError(f"the prepared dataset {str(run_dir)!r} was trained on (fingerprint {want}) is not at "
                     f"{' or '.join(repr(s) for s in tried)}: it was moved or rebuilt; pass `data_dir` "
                     f"(recsys export --data DIR)")


def _tuning_users(
    data_dir: Path, user_emb: np.ndarray, *, n_queries: int, seed: int
) -> tuple[np.ndarray, str]:
    """Held-out users (rows) for tuning ef: test users, then valid users, then any others, up to n_queries."""
    rng = np.random.default_rng(seed)
    chosen: list[np.ndarray] = []
    sources = []
    have = np.zeros(len(user_emb), dtype=bool)
    for split in ("test", "valid"):
        p = data_dir / schema.SPLITS[split]
        if not p.exists() or have.sum() >= n_queries:
            continue
        u = np.unique(pq.read_table(p, columns=[schema.USER_IDX]).column(0).to_numpy())
        u = u[(u >= 0) & (u < len(user_emb))]
        u = u[~have[u]]
        u = rng.permutation(u)[: n_queries - int(have.sum())]
        have[u] = True
        chosen.append(u)
        sources.append(f"{split}:{len(u)}")
    if have.sum() < n_queries:
        rest = rng.permutation(np.flatnonzero(~have))[: n_queries - int(have.sum())]
        chosen.append(rest)
        sources.append(f"other:{len(rest)}")
    rows = np.concatenate(chosen) if chosen else np.arange(0)
    return rows, ",".join(sources)


@dataclass(frozen=True)
class _Plan:
    """One export's inputs, checked, and what was read from them: the run's files, the dataset's manifest, the model."""

    run_dir: Path
    models_dir: Path
    data_dir: Path
    index_cfg: Any
    keep: int
    version: str | None  # the name asked for; None: one is made when the version is written
    tune_queries: int | None
    evaluate_split: str | None
    seed: int
    model: Any
    model_json: dict
    run_config: dict
    summary: dict
    data_manifest: dict
    trained_on: dict[str, Any] | None  # the final fit (summary's ``final_fit``); absent in runs from before it
    metric: str
    n_users: int
    n_items: int

    @property
    def full_state(self) -> bool:
        """Whether the final fit saw more than train + valid (then the serving state is rebuilt from every split)."""
        return self.trained_on is not None and bool(set(self.trained_on.get("splits", ())) - {"train", "valid"})


@dataclass(frozen=True)
class _Embeddings:
    item: np.ndarray  # [n_items, dim]
    user: np.ndarray  # [n_users, dim], every known user from their serving history
    max_history: int | None  # how many recent history items the user tower reads


@dataclass(frozen=True)
class _Index:
    ann: Any  # the HnswIndex, its ef set
    exact: Any  # ExactIndex on the same items
    ef: int
    tune_k: int
    query_source: str
    table: list
    filtered_table: list
    partitions: list  # the manifest's index.partitions: one entry per graph (attribute, value, file, count, ef)


def export(
    run_dir: str | Path,
    models_dir: str | Path,
    *,
    data_dir: str | Path | None = None,
    index_cfg: Any = None,
    keep: int = 5,
    version: str | None = None,
    tune_queries: int | None = None,
    evaluate_split: str | None = "test",
    seed: int = 0,
) -> Path:
    """Publish a training run as a new bundle version and point ``LATEST`` at it; returns the version directory.

    ``data_dir`` defaults to the dataset named in the run's config.json. ``index_cfg`` is an
    ``recsys.retrieval.IndexConfig`` (defaults when None). ``ef`` is auto-tuned on up to ``tune_queries`` held-out
    users' embeddings (default: ``max(1000, index_cfg.autotune_queries)``; test users first, then valid users, then
    others), to the config's ``target_recall`` (0.99) at ``autotune_k``. After publishing, all but the newest
    ``keep`` versions are deleted (never the one ``LATEST`` points to).

    What the bundle knows is what its model was fit on: when the run's final fit included the test split
    (``train.final_fit = "all"``, the default), the serving state -- histories, seen sets, the popularity counts
    (``items.parquet``'s ``n_train`` and ``prob``) -- is rebuilt from every split; otherwise it is the prepared
    train + valid state. The manifest's ``trained_on`` records the final fit (splits, rows, time range, sha256 of
    each split file) for ``recsys evaluate``'s in-sample check. With ``evaluate_split`` and a split the final fit
    did not see, a quick exact/ANN evaluation of it is stored as ``evaluation``; when the model saw it, the
    ``evaluation`` is the holdout estimate (the fit's validation metrics), labelled as such.

    The popularity fallback ranks by recent popularity: each item's events in the last W days before the end of
    the fit events (``recent_popularity.npy``), W chosen on the newest 20% of those events
    (:func:`choose_popularity_window`); the manifest's ``popularity`` records W, the grid's scores and the cut.
    """
    plan = _plan(run_dir, models_dir, data_dir=data_dir, index_cfg=index_cfg, keep=keep, version=version,
                 tune_queries=tune_queries, evaluate_split=evaluate_split, seed=seed)
    with _serving_state(plan) as state_dir:
        emb = _embed(plan, state_dir)
        index = _build_index(plan, state_dir, emb)
        evaluation = _evaluate(plan, emb, index)
        # The popularity fallback: recent counts, the window chosen on the fit events' own newest slice.
        popularity, fallback_counts = _fallback_popularity(plan.data_dir, state_dir, plan.trained_on,
                                                           n_users=plan.n_users, n_items=plan.n_items)
        with models_lock(plan.models_dir):
            final = _write_version(plan, state_dir, emb, index, evaluation=evaluation, popularity=popularity,
                                   fallback_counts=fallback_counts)
            _publish(plan, final, ef=index.ef)
    return final


def _plan(run_dir: str | Path, models_dir: str | Path, *, data_dir: str | Path | None, index_cfg: Any, keep: int,
          version: str | None, tune_queries: int | None, evaluate_split: str | None, seed: int) -> _Plan:
    """Check the export's inputs and read what it works from: the run's files, the dataset's manifest, the model."""
    from recsys.train.model import TwoTower  # torch: loaded on export only, not on `import recsys.publish`

    if keep < 1:
        raise ValueError(f"`keep` must be >= 1, got {keep}")
    if version is not None:
        check_new_version_name(version)
    run_dir = Path(run_dir)
    models_dir = Path(models_dir)
    for name in (schema.MODEL_JSON, schema.MODEL_WEIGHTS):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"run dir {str(run_dir)!r} has no {name} (train the model first)")
    # config.json is required only to find the dataset (data_dir=None)
    config_path = run_dir / schema.RUN_CONFIG
    run_config = read_json(config_path, what="run") if data_dir is None or config_path.is_file() else {}
    data_dir = _resolve_data_dir(run_dir, run_config, data_dir)
    for name in (*DATA_FILES, schema.MANIFEST):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(f"prepared dataset {str(data_dir)!r} has no {name}")
    index_cfg = index_cfg if index_cfg is not None else IndexConfig()

    data_manifest = read_json(data_dir / schema.MANIFEST, what="prepared dataset")
    model_json = read_json(run_dir / schema.MODEL_JSON, what="run")
    summary = read_json(run_dir / schema.SUMMARY, what="run") if (run_dir / schema.SUMMARY).is_file() else {}

    model = TwoTower.from_run(run_dir, device="cpu")
    metric = _check_model(model, model_json, run_dir, data_dir)
    return _Plan(run_dir=run_dir, models_dir=models_dir, data_dir=data_dir, index_cfg=index_cfg, keep=keep,
                 version=version, tune_queries=tune_queries, evaluate_split=evaluate_split, seed=seed, model=model,
                 model_json=model_json, run_config=run_config, summary=summary, data_manifest=data_manifest,
                 trained_on=summary.get("final_fit"), metric=metric, n_users=int(model.n_users),
                 n_items=int(model.n_items))


def _resolve_data_dir(run_dir: Path, run_config: Mapping[str, Any], data_dir: str | Path | None) -> Path:
    """``data_dir``, or the dataset the run names when None; warns when a given one is not the run's dataset."""
    if data_dir is None:
        return _run_data_dir(run_dir, run_config)
    data_dir = Path(data_dir)
    want = run_config.get("data_fingerprint")
    if isinstance(want, str) and (data_dir / schema.MANIFEST).is_file():
        got = fingerprint(data_dir)
        if got != want:
            log.warning("`data_dir` %s is not the prepared dataset the run was trained on (fingerprint %s, the "
                        "run's %s); the vocabularies must match for the export to be right", data_dir, got, want)
    return data_dir


def _check_model(model: Any, model_json: Mapping[str, Any], run_dir: Path, data_dir: Path) -> str:
    """The model's metric, after checking it is the served one and the model's counts are the dataset's."""
    metric = str(getattr(model, "metric", model_json.get("metric", schema.METRIC)))
    if metric != schema.METRIC:
        raise BundleError(f"{schema.MODEL_JSON}: model metric is {metric!r}, the system serves {schema.METRIC!r}")
    n_users, n_items = int(model.n_users), int(model.n_items)
    n_users_data = pq.read_metadata(data_dir / schema.USERS).num_rows
    n_items_data = pq.read_metadata(data_dir / schema.ITEMS).num_rows
    if (n_users_data, n_items_data) != (n_users, n_items):
        raise BundleError(
            f"run {str(run_dir)!r} has {n_users} users / {n_items} items but {str(data_dir)!r} has "
            f"{n_users_data} / {n_items_data}: the run was not trained on this dataset"
        )
    return metric


@contextmanager
def _serving_state(plan: _Plan) -> Iterator[Path]:
    """The directory holding the bundle's data files: the prepared train + valid state as it is, or (the final fit
    saw more splits) that state rebuilt from every split in a temporary directory, removed afterwards."""
    if not plan.full_state:
        yield plan.data_dir
        return
    state_dir = Path(tempfile.mkdtemp(prefix="recsys-serving-state-"))
    try:
        _write_serving_state(plan.data_dir, state_dir, plan.data_manifest, n_users=plan.n_users,
                             n_items=plan.n_items)
        yield state_dir
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def _write_serving_state(data_dir: Path, out: Path, data_manifest: Mapping[str, Any], *, n_users: int,
                         n_items: int) -> None:
    """The bundle's data files from EVERY split of ``data_dir``: history (last N, oldest first), seen sets, and
    users / items with ``n_train`` = interactions in all splits (``prob`` recomputed by prepare's rule)."""
    from recsys.prepare import logq_prob  # polars: only prepare needs it

    inter = Interactions.concat(*(read_interactions(data_dir / f, n_users=n_users, n_items=n_items)
                                  for f in schema.SPLITS.values() if (data_dir / f).is_file()))
    cfg = data_manifest.get("config") or {}
    history_len = int(data_manifest.get("history_len") or cfg.get("history_len") or 50)
    (h_off, h_val), (s_off, s_val) = history_and_seen(inter.user_idx, inter.item_idx, n_users=n_users,
                                                      n_items=n_items, history_len=history_len)
    write_ragged(out / schema.HISTORY, h_off, h_val)
    write_ragged(out / schema.SEEN, s_off, s_val)
    shutil.copyfile(data_dir / schema.FEATURE_VOCAB, out / schema.FEATURE_VOCAB)
    for name, col, n in ((schema.ITEMS, inter.item_idx, n_items), (schema.USERS, inter.user_idx, n_users)):
        t = pq.read_table(data_dir / name)
        counts = np.bincount(col, minlength=n)
        if "n_train" in t.column_names:
            t = t.set_column(t.column_names.index("n_train"), "n_train", pa.array(counts.astype(np.int32)))
        if "prob" in t.column_names:
            prob = logq_prob(counts, smoothing=float(cfg.get("prob_smoothing") or 0.0))
            t = t.set_column(t.column_names.index("prob"), "prob", pa.array(prob))
        pq.write_table(t, out / name)


def _embed(plan: _Plan, state_dir: Path) -> _Embeddings:
    """Embeddings with the exported towers: every item; every user from their serving history, as serving would."""
    item_emb = embed_items(plan.model, plan.n_items)
    hist_off, hist_val = read_ragged(state_dir / schema.HISTORY, n_rows=plan.n_users, what=schema.HISTORY)
    max_history = _max_history(plan.model, plan.model_json)
    user_emb = embed_users(
        plan.model,
        np.arange(plan.n_users, dtype=np.int64),
        ragged_rows(hist_off, hist_val, np.arange(plan.n_users)),
        max_history=max_history,
    )
    for name, arr in (("item", item_emb), ("user", user_emb)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} embeddings contain NaN/inf: the run's weights are broken")
    return _Embeddings(item=item_emb, user=user_emb, max_history=max_history)


def _build_index(plan: _Plan, state_dir: Path, emb: _Embeddings) -> _Index:
    """The HNSW index over the items, ``ef`` auto-tuned against exact search on held-out users' embeddings."""
    cfg = plan.index_cfg
    index = HnswIndex.from_config(emb.item, metric=plan.metric, cfg=cfg)
    exact = ExactIndex(emb.item, metric=plan.metric)
    tune_k = min(int(cfg.autotune_k), plan.n_items)
    n_queries = max(1000, int(cfg.autotune_queries)) if plan.tune_queries is None else int(plan.tune_queries)
    query_source, table, filtered_table = "", [], []
    ef = int(cfg.ef)
    if cfg.autotune:
        rows, query_source = _tuning_users(plan.data_dir, emb.user, n_queries=n_queries, seed=plan.seed)
        # The same users minus their seen items (what serving excludes) tune the width of excluding searches.
        seen_off, seen_val = read_ragged(state_dir / schema.SEEN, n_rows=plan.n_users, what=schema.SEEN)
        ef, table = autotune_ef(
            index, exact, emb.user[rows], k=tune_k, target_recall=cfg.target_recall,
            efs=cfg.autotune_efs, exclude=ragged_rows(seen_off, seen_val, rows),
        )
        filtered_table = list(getattr(index, "ef_filtered_table", []))
    index.set_ef(int(ef))
    partitions = _build_partitions(plan, state_dir, index, emb.user[rows] if cfg.autotune else None)
    return _Index(ann=index, exact=exact, ef=ef, tune_k=tune_k, query_source=query_source, table=table,
                  filtered_table=filtered_table, partitions=partitions)


def _build_partitions(plan: _Plan, state_dir: Path, index: HnswIndex, queries: np.ndarray | None) -> list[dict]:
    """``index.partition_by``: one graph per value of each named item attribute with more items than
    ``partition_min_items`` (0: the index's exact-scan switch, below which a value is scanned exactly anyway;
    :mod:`recsys.retrieval.partitions`), each one's ef auto-tuned on ``queries`` (the main index's tuning users;
    None: the main ef) -> the manifest's entries (none: the attributes still steer their filters' sets to the
    exact scan, see ``Partitions.plan``)."""
    cfg = plan.index_cfg
    if not cfg.partition_by:
        return []
    t0 = time.perf_counter()
    attrs = Attributes.from_table(pq.read_table(state_dir / schema.ITEMS), state_dir, plan.n_items)
    floor = cfg.partition_min_items or index.exact_scan_limit
    groups: dict[tuple[str, str], np.ndarray] = {}
    for name in cfg.partition_by:
        try:
            found = attrs.groups(name, min_items=int(floor) + 1)
        except UnknownAttribute as e:
            raise ValueError(f"`index.partition_by`: {e}, in the items of the data in {str(plan.data_dir)!r}") from None
        groups.update(((name, value), rows) for value, rows in found.items())
    index.partitions = Partitions.build(index, groups, attributes=cfg.partition_by)
    efs = (index.partitions.tune(queries, k=min(int(cfg.autotune_k), plan.n_items), target_recall=cfg.target_recall,
                                 efs=cfg.autotune_efs) if queries is not None and groups else {})
    entries = [{"attribute": name, "value": value, "file": f"{PARTITION_PREFIX}{i:04d}.hnsw",
                "count": int(index.partitions.parts[(name, value)].count), "ef": int(efs.get((name, value), index.ef))}
               for i, (name, value) in enumerate(groups)]
    log.info("index.partition_by %s: %d graphs (values with more than %d items; %d items in all) in %.1f s",
             list(cfg.partition_by), len(entries), int(floor), sum(e["count"] for e in entries),
             time.perf_counter() - t0)
    return entries


def _evaluate(plan: _Plan, emb: _Embeddings, index: _Index) -> dict[str, Any]:
    """The manifest's ``evaluation``: a quick exact/ANN evaluation of ``evaluate_split`` when the final fit did not
    see it; when it did, the fit's holdout (validation) metrics, labelled as such; else empty."""
    split = plan.evaluate_split
    if split is not None and split in (plan.trained_on or {}).get("splits", ()):
        holdout = plan.summary.get("holdout") or {}
        if holdout.get("metrics"):  # the split is in-sample: the estimate is the fit's validation metrics
            return {"split": holdout.get("split", "valid"), "source": "holdout run: " + holdout["estimate"],
                    **holdout["metrics"]}
    elif split is not None and _has_rows(plan.data_dir / schema.SPLITS[split]):
        return quick_evaluation(user_emb=emb.user, exact=index.exact, ann=index.ann, data_dir=plan.data_dir,
                                split=split)
    return {}


def _write_version(plan: _Plan, state_dir: Path, emb: _Embeddings, index: _Index, *, evaluation: dict[str, Any],
                   popularity: dict[str, Any], fallback_counts: np.ndarray) -> Path:
    """Under the models lock: name the new version and write it whole in a temporary directory (every file's
    sha256 in the manifest), fsynced and renamed into place (``atomic_dir``); returns its directory."""
    h = hashlib.sha256(sha256_file(plan.run_dir / schema.MODEL_WEIGHTS).encode())
    h.update(sha256_file(plan.data_dir / schema.MANIFEST).encode())
    created = utc_now()
    version = plan.version
    if version is None:
        version = new_version_name(plan.models_dir, h.hexdigest(), now=created)
    final = plan.models_dir / version
    if final.exists():
        raise FileExistsError(f"version {version!r} already exists in {str(plan.models_dir)!r}")
    with atomic_dir(final) as tmp:
        for name in (schema.MODEL_JSON, schema.MODEL_WEIGHTS):
            shutil.copyfile(plan.run_dir / name, tmp / name)
        for name in DATA_FILES:
            shutil.copyfile(state_dir / name, tmp / name)
        np.save(tmp / schema.ITEM_EMBEDDINGS, emb.item, allow_pickle=False)
        np.save(tmp / schema.USER_EMBEDDINGS, emb.user, allow_pickle=False)
        index.ann.save(tmp / schema.INDEX_FILE)
        for entry in index.partitions:
            index.ann.partitions.parts[(entry["attribute"], entry["value"])].index.save(tmp / entry["file"])
        np.save(tmp / RECENT_POPULARITY, fallback_counts.astype(np.int64), allow_pickle=False)
        manifest = _manifest(plan, tmp, version=version, created=created, emb=emb, index=index,
                             evaluation=evaluation, popularity=popularity)
        atomic_write_json(tmp / MANIFEST, jsonable(manifest))
    return final


def _manifest(plan: _Plan, tmp: Path, *, version: str, created: Any, emb: _Embeddings, index: _Index,
              evaluation: dict[str, Any], popularity: dict[str, Any]) -> dict[str, Any]:
    """The new version's manifest.json, once every other file of it is written in ``tmp`` (their sha256 and size)."""
    cfg, data_manifest = plan.index_cfg, plan.data_manifest
    return {
        "schema_version": schema.SCHEMA_VERSION,
        "version": version,
        "created_at": created.isoformat().replace("+00:00", "Z"),
        "metric": plan.metric,
        "dim": served_dim(plan.model),
        "counts": {"n_users": plan.n_users, "n_items": plan.n_items},
        "max_history": emb.max_history,
        "model": plan.model_json,
        "run": {"path": str(plan.run_dir.resolve()), "config": plan.run_config, "summary": plan.summary},
        "data": {
            "path": str(plan.data_dir.resolve()),
            "manifest_sha256": sha256_file(plan.data_dir / schema.MANIFEST),
            "fingerprint": _data_fingerprint(data_manifest),
            "counts": data_manifest.get("counts"),
            "split": data_manifest.get("split"),
            # how the items file was read (recsys items upsert reads new items the same way)
            "prepare_config": data_manifest.get("config"),
        },
        "index": {
            "kind": "hnsw",
            "file": schema.INDEX_FILE,
            "config": jsonable(cfg),
            "ef": int(index.ef),
            "ef_filtered": int(index.ann.ef_filtered),
            "params": index.ann.params(),
            "partitions": index.partitions,
            "tune": {
                "autotune": bool(cfg.autotune),
                "k": index.tune_k,
                "target_recall": cfg.target_recall,
                "queries": index.query_source,
                "table": index.table,
                "filtered_table": index.filtered_table,
            },
        },
        "training": plan.summary,
        "trained_on": plan.trained_on,
        "catalogue": {"servable_items": plan.n_items,
                      "filtered_rows": (data_manifest.get("rows") or {}).get("filtered"),
                      "items_before_kcore": (data_manifest.get("counts") or {}).get("items_before_kcore"),
                      "delta": _previous_delta(plan.models_dir)},
        "evaluation": evaluation,
        "popularity": popularity,
        "packages": _package_versions(),
        "files": {
            name: {"sha256": sha256_file(tmp / name), "size": (tmp / name).stat().st_size}
            for name in (*BUNDLE_FILES, *(e["file"] for e in index.partitions))
        },
    }


def _previous_delta(models_dir: Path) -> dict[str, Any]:
    """What the new version does with the serving version's live catalogue (recsys/catalogue/delta.py): it is not
    carried (a delta belongs to its version; items upserted there are in the new version only when its logs or
    items file hold them), and the manifest says so, naming the version and how many changes it had."""
    try:
        previous = read_latest(models_dir)
    except BundleError:
        previous = None
    changes = len(list(catalogue_dir(models_dir, previous).glob("*.json"))) if previous else 0
    return {"carried": False, "previous_version": previous, "previous_changes": changes}


def _publish(plan: _Plan, final: Path, *, ef: int) -> None:
    """Under the models lock: point ``LATEST`` at the new version ``final`` (or take it back out if that fails),
    then prune to the newest ``keep`` versions."""
    models_dir, version = plan.models_dir, final.name
    try:
        atomic_write_text(models_dir / schema.LATEST, version + "\n")
    except BaseException:
        # LATEST could not move (a full disk, ...): take the new version back out, so a failed export leaves the
        # models directory as it found it (renamed aside first: a reader never sees half a version)
        aside = models_dir / f".{version}.deleting-{os.getpid()}"
        os.rename(final, aside)
        shutil.rmtree(aside, ignore_errors=True)
        raise
    fsync_dir(models_dir)
    log.info("published %s (ef=%d, %d items, %d users)", final, ef, plan.n_items, plan.n_users)
    prune_locked(models_dir, keep=plan.keep)


def _has_rows(path: Path) -> bool:
    return path.is_file() and pq.read_metadata(path).num_rows > 0


def _data_fingerprint(data_manifest: Mapping[str, Any]) -> Any:
    for key in ("fingerprint", "data_fingerprint", "input_fingerprints", "fingerprints", "inputs"):
        if key in data_manifest:
            return data_manifest[key]
    return None


def _max_history(model: Any, model_json: Mapping[str, Any]) -> int | None:
    """N: how many of the most recent history items the user tower reads (it ignores older ones)."""
    cfg = getattr(model, "cfg", None)
    v = getattr(cfg, "history_len", None)
    if v is None:
        v = (model_json.get("config") or {}).get("history_len")
    return int(v) if isinstance(v, int) and v > 0 else None


def set_latest(models_dir: str | Path, version: str, *, verify: bool = True) -> None:
    """Point ``LATEST`` at ``version`` (atomically), after loading and verifying it unless ``verify=False``."""
    models_dir = Path(models_dir)
    with models_lock(models_dir):
        path = version_dir(models_dir, version)
        if verify:
            Bundle.load(path, verify=True)
        atomic_write_text(models_dir / schema.LATEST, version + "\n")
        fsync_dir(models_dir)


def rollback(models_dir: str | Path, version: str) -> Path:
    """Move ``LATEST`` back (or forth) to an existing, verified ``version``; returns its directory."""
    set_latest(models_dir, version, verify=True)
    log.info("LATEST -> %s", version)
    return Path(models_dir) / version
