"""The model bundle: one immutable, verified directory per published model version.

``export`` turns a training run (+ its prepared dataset) into ``MODELS_DIR/<version>/`` holding everything serving
needs (schema.py lists the files): the towers (so unseen users are embedded from their history and new items from
their features), item and known-user embeddings computed with those towers, the vocabularies, the serving history
and seen sets, item popularity and an hnswlib index whose ``ef`` was auto-tuned against exact search. Publishing is
atomic (temp dir + fsync + rename) and the ``LATEST`` pointer moves afterwards (temp file + rename), so a reader
sees either the old or the new version, never half of one. Versions and ``LATEST`` get the modes a plain
``mkdir`` / ``open`` would under the umask (``recsys.core.io``): group-readable with umask 022 / 002 / 027, so a server in
another UID of the same group (Kubernetes ``fsGroup``) can load what a retrain Job published; private with 077.

``Bundle.load`` refuses anything that does not match its manifest (``BundleError`` names the file and the
mismatch, ``BundleError.reason`` the kind of check, one of ``REFUSAL_REASONS``) and checks every sha256 *before*
reading a file's contents: hnswlib index files are parsed by C++ without bounds checks and must not be loaded
untrusted. A version directory holds exactly the manifest and the files it lists, all regular files (no symlinks,
nothing unlisted), and ``LATEST`` must name a real directory of the models directory.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys.core import schema
from recsys.core.io import atomic_dir, atomic_write_json, atomic_write_text, fsync_dir, sha256_file
from recsys.recency import choose_popularity_window, popularity_order, recent_counts

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
# The popularity fallback's counts: int64 [n_items], each item's events in the window the export chose
# (``manifest["popularity"]``). Bundles from before it have none and fall back on all-time counts (``n_train``).
RECENT_POPULARITY = "recent_popularity.npy"
# Every file an export writes besides the manifest; the manifest lists each with sha256 + size.
BUNDLE_FILES = (
    schema.MODEL_JSON,
    schema.MODEL_WEIGHTS,
    schema.ITEM_EMBEDDINGS,
    schema.USER_EMBEDDINGS,
    schema.USERS,
    schema.ITEMS,
    schema.FEATURE_VOCAB,
    schema.HISTORY,
    schema.SEEN,
    schema.INDEX_FILE,
    RECENT_POPULARITY,
)
# Files older bundles lack; when the manifest lists one, it is verified like any other.
OPTIONAL_FILES = (RECENT_POPULARITY,)
# Copied byte for byte from the prepared dataset.
DATA_FILES = (schema.USERS, schema.ITEMS, schema.FEATURE_VOCAB, schema.HISTORY, schema.SEEN)
# Auto-generated version names sort in creation order: UTC timestamp + short content hash.
VERSION_RE = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{6})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_TS_FMT = "%Y%m%dT%H%M%SZ"


# Why a bundle was refused (``BundleError.reason``), few and fixed: the server counts refusals by it.
REFUSAL_REASONS = (
    "checksum",  # a listed file's sha256 differs from the manifest's
    "truncated",  # a listed file is shorter than the manifest says
    "size",  # ... or longer
    "missing_file",  # a listed file (or the manifest itself) is absent or not a regular file
    "extra_file",  # a file in the version directory that the manifest does not list
    "symlink",  # a symlink inside the version directory (or a version directory that is one, inside MODELS_DIR)
    "manifest_invalid",  # the manifest is unreadable, of another schema, or lacks / malforms a field
    "manifest_mismatch",  # the manifest's dim, metric or counts disagree with the files (or with the system)
    "latest_outside",  # LATEST holds a path, or names a symlink leaving the models directory
    "latest_invalid",  # LATEST holds something that is not a version name
    "latest_missing",  # LATEST (or a requested version) names no directory
    "invalid",  # a file passed its checksum but its contents are not what a bundle holds
)


class BundleError(ValueError):
    """A bundle that is refused: the message names the file and the check; ``reason`` (one of ``REFUSAL_REASONS``)
    is the kind of check, for metrics."""

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason if reason in REFUSAL_REASONS else "invalid"


# --------------------------------------------------------------------------------------------------------------
# small helpers


def _jsonable(obj: Any) -> Any:
    """Plain-JSON copy of ``obj`` (numpy scalars/arrays, tuples, Paths, dataclasses)."""
    import dataclasses

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _read_json(path: Path, *, what: str, reason: str = "invalid") -> dict[str, Any]:
    try:
        with path.open("r", encoding="utf-8") as f:
            out = json.load(f)
    except FileNotFoundError:
        raise BundleError(f"{what}: {path.name} is missing ({str(path)!r})", reason="missing_file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BundleError(f"{what}: {path.name} is not valid JSON ({str(path)!r}): {e}", reason=reason) from None
    if not isinstance(out, dict):
        raise BundleError(f"{what}: {path.name} must hold a JSON object, got {type(out).__name__}", reason=reason)
    return out


def _package_versions() -> dict[str, str | None]:
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("recsys", "torch", "numpy", "hnswlib", "polars", "pyarrow", "safetensors"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _is_bundle_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / MANIFEST).is_file()


@contextlib.contextmanager
def _models_lock(models_dir: Path) -> Iterator[None]:
    """Serialise publish / prune / rollback between processes sharing ``models_dir`` (advisory flock)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX: best effort, no lock
        yield
        return
    with open(models_dir / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def new_version_name(models_dir: str | Path, content_hash: str, *, now: dt.datetime | None = None) -> str:
    """``YYYYmmddTHHMMSSZ-<6 hex>``, strictly later than every auto-named version already in ``models_dir``.

    Two exports in the same second (or a clock that stepped back) get the last timestamp + 1 s, so sorting names
    always gives publication order.
    """
    now = (now or _utc_now()).astimezone(dt.timezone.utc).replace(microsecond=0)
    models_dir = Path(models_dir)
    stamps = []
    if models_dir.is_dir():
        for p in models_dir.iterdir():
            m = VERSION_RE.match(p.name)
            if m:
                stamps.append(dt.datetime.strptime(m.group(1), _TS_FMT).replace(tzinfo=dt.timezone.utc))
    if stamps and now <= max(stamps):
        now = max(stamps) + dt.timedelta(seconds=1)
    return f"{now.strftime(_TS_FMT)}-{content_hash[:6]}"


# --------------------------------------------------------------------------------------------------------------
# pointers, listing, pruning, rollback


def read_latest(models_dir: str | Path) -> str | None:
    """The version name ``MODELS_DIR/LATEST`` points to, or None when there is no pointer yet.

    Only the name is checked here (:func:`version_dir` checks the directory it names).
    """
    p = Path(models_dir) / schema.LATEST
    try:
        name = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    _check_pointer_name(name, p)
    return name


def _check_pointer_name(name: str, pointer: Path) -> None:
    """Refuse a ``LATEST`` that holds anything but a version name: a path (``../x``, ``/srv/x``) would lead out of
    the models directory."""
    if _NAME_RE.match(name):
        return
    outside = "/" in name or "\\" in name or name.startswith(".")
    raise BundleError(
        f"{schema.LATEST}: {str(pointer)!r} holds {name[:200]!r}, which is not a version name"
        + (": a path outside the models directory" if outside else ""),
        reason="latest_outside" if outside else "latest_invalid",
    )


def version_dir(models_dir: str | Path, version: str, *, pointer: bool = False) -> Path:
    """The directory of ``version`` in ``models_dir``, refused (``BundleError``) unless it is a real directory of
    ``models_dir`` (not a symlink) holding a manifest.

    ``pointer``: the name was read from ``LATEST`` (a malformed one is then a ``BundleError``, not a ValueError,
    and the errors say so). The one owner of "a version name -> its directory": ``resolve``, ``set_latest`` and
    the server's reload all come through here.
    """
    models_dir = Path(models_dir)
    if pointer:
        _check_pointer_name(version, models_dir / schema.LATEST)
    elif not _NAME_RE.match(version):
        raise ValueError(f"`version` must be a version name like 20261127T201500Z-3fa2c1, got {version!r}")
    named = f"{schema.LATEST} names {version!r}" if pointer else f"version {version!r}"
    p = models_dir / version
    if p.is_symlink():
        target = os.path.realpath(p)
        outside = Path(target).parent != models_dir.resolve()
        raise BundleError(
            f"{named}: {str(p)!r} is a symlink to {target!r}"
            + (", outside the models directory" if outside else "; a version must be a directory of its own"),
            reason="latest_outside" if outside else "symlink",
        )
    if not p.is_dir():
        known = [v["version"] for v in list_versions(models_dir)]
        raise BundleError(f"{named}: version {version!r} not found in {str(models_dir)!r}; versions: {known}",
                          reason="latest_missing")
    if not (p / MANIFEST).is_file():
        raise BundleError(f"{MANIFEST}: missing from version directory {str(p)!r} ({named})", reason="missing_file")
    return p


def resolve(models_dir_or_bundle: str | Path, version: str | None = None) -> Path:
    """The version directory meant by a path.

    ``MODELS_DIR`` follows ``LATEST`` (or names ``version``); ``MODELS_DIR/LATEST`` (the pointer file) follows it;
    a version directory (it holds manifest.json) is returned as is.
    """
    p = Path(models_dir_or_bundle)
    if p.name == schema.LATEST and p.is_file():
        if version is not None:
            raise ValueError(f"`version` cannot be combined with a LATEST pointer path, got {version!r}")
        p = p.parent
        version = read_latest(p)
        if version is None:  # pragma: no cover - raced with deletion
            raise BundleError(f"{schema.LATEST}: {str(p / schema.LATEST)!r} vanished", reason="latest_missing")
        return version_dir(p, version, pointer=True)
    if not p.exists():
        raise FileNotFoundError(f"bundle path {str(p)!r} does not exist")
    if version is not None:
        return version_dir(p, version)
    if (p / MANIFEST).is_file():
        return p
    latest = read_latest(p)
    if latest is not None:
        return version_dir(p, latest, pointer=True)
    raise BundleError(
        f"{MANIFEST}: missing: {str(p)!r} is neither a bundle (no {MANIFEST}) nor a models directory "
        f"(no {schema.LATEST} pointer)",
        reason="missing_file",
    )


def list_versions(models_dir: str | Path) -> list[dict[str, Any]]:
    """Published versions, oldest first: ``{version, path, created_at, latest, dim, n_users, n_items, run_path, ...}``.

    Reads only manifests (no verification); a directory whose manifest is unreadable is listed with ``error``.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    latest = read_latest(models_dir)
    rows = []
    for p in models_dir.iterdir():
        if not _is_bundle_dir(p):
            continue
        row: dict[str, Any] = {"version": p.name, "path": str(p), "latest": p.name == latest}
        try:
            m = _read_json(p / MANIFEST, what=p.name)
            row.update(
                created_at=m.get("created_at"),
                dim=m.get("dim"),
                n_users=m.get("counts", {}).get("n_users"),
                n_items=m.get("counts", {}).get("n_items"),
                ef=m.get("index", {}).get("ef"),
                evaluation=m.get("evaluation", {}),
                run_path=m.get("run", {}).get("path"),  # the training run it was exported from
            )
        except BundleError as e:
            row["error"] = str(e)
        rows.append(row)
    # Auto names sort chronologically; created_at first keeps hand-named versions in publication order too.
    rows.sort(key=lambda r: (str(r.get("created_at") or ""), r["version"]))
    return rows


def set_latest(models_dir: str | Path, version: str, *, verify: bool = True) -> None:
    """Point ``LATEST`` at ``version`` (atomically), after loading and verifying it unless ``verify=False``."""
    models_dir = Path(models_dir)
    with _models_lock(models_dir):
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


def prune(models_dir: str | Path, *, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions; the one ``LATEST`` points to is never deleted.

    Each doomed directory is first renamed to a hidden name (one atomic step), so no reader ever sees a
    half-deleted version. Returns the deleted version names.
    """
    if keep < 1:
        raise ValueError(f"`keep` must be >= 1, got {keep}")
    models_dir = Path(models_dir)
    with _models_lock(models_dir):
        return _prune_locked(models_dir, keep=keep)


# Leftovers of a publish or prune that was killed (atomic_dir's temp dirs, renamed-for-deletion versions, the temp
# file of a LATEST that was being replaced).
_LEFTOVER_RE = re.compile(r"^\..+\.(tmp|deleting)-[^/]+$")


def _prune_locked(models_dir: Path, *, keep: int) -> list[str]:
    # Under the lock no publish is in flight, so any temp dir or file left here belongs to a dead process.
    for p in models_dir.iterdir():
        if _LEFTOVER_RE.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            log.info("removed leftover %s", p.name)
    versions = list_versions(models_dir)
    latest = read_latest(models_dir)
    doomed = [v["version"] for v in versions[: max(0, len(versions) - keep)] if v["version"] != latest]
    for name in doomed:
        trash = models_dir / f".{name}.deleting-{os.getpid()}"
        os.rename(models_dir / name, trash)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("pruned version %s", name)
    if doomed:
        fsync_dir(models_dir)
    return doomed


# --------------------------------------------------------------------------------------------------------------
# ragged lists (history / seen) as CSR


def read_ragged(path: Path, *, n_rows: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``user_idx i32, items list[i32]`` parquet -> (offsets [n_rows + 1] int64, values [nnz] int64)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    for col in (schema.USER_IDX, "items"):
        if col not in t.column_names:
            raise BundleError(f"{what}: column {col!r} missing; columns: {t.column_names}")
    users = t.column(schema.USER_IDX).to_numpy().astype(np.int64)
    if users.size and (users.min() < 0 or users.max() >= n_rows):
        raise BundleError(f"{what}: user_idx must be in [0, {n_rows}), got range [{users.min()}, {users.max()}]")
    lists = t.column("items").combine_chunks()
    if isinstance(lists, pa.ChunkedArray):  # pragma: no cover - combine_chunks of 0 chunks
        lists = pa.array([], type=pa.list_(pa.int32()))
    lens = np.asarray(lists.value_lengths().fill_null(0), dtype=np.int64)
    flat = np.asarray(lists.flatten(), dtype=np.int64)
    if np.unique(users).size != users.size:
        raise BundleError(f"{what}: user_idx values must be unique")
    counts = np.zeros(n_rows, dtype=np.int64)
    counts[users] = lens
    offsets = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(counts, out=offsets[1:])
    # Move each source row's slice of `flat` to its user's slot without a Python loop.
    within = np.arange(int(lens.sum())) - np.repeat(np.cumsum(lens) - lens, lens)  # position inside its list
    src = np.repeat(np.cumsum(lens) - lens, lens) + within
    dst = np.repeat(offsets[users], lens) + within
    values = np.empty_like(flat)
    values[dst] = flat[src]
    return offsets, values


def _ragged_rows(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    return [values[offsets[r] : offsets[r + 1]] for r in rows]


def pad_histories(histories: Sequence[np.ndarray], *, max_len: int | None = None) -> np.ndarray:
    """Right-align ragged item-row lists into ``[n, N]`` int64, ``-1`` = padding; keeps the most recent ``max_len``."""
    lens = [len(h) for h in histories]
    n = max(lens, default=0)
    if max_len is not None:
        n = min(n, max_len)
    out = np.full((len(histories), max(n, 1)), -1, dtype=np.int64)
    for i, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-n:] if n else np.asarray(h, dtype=np.int64)[:0]
        if len(h):
            out[i, out.shape[1] - len(h) :] = h
    return out


def _fallback_popularity(data_dir: Path, state_dir: Path, trained_on: Mapping[str, Any] | None, *, n_users: int,
                         n_items: int) -> tuple[dict[str, Any], np.ndarray]:
    """(the manifest's ``popularity`` record, the fallback's counts ``[n_items]`` int64) for one export.

    The events are the final fit's splits (``trained_on``; train + valid, the serving state, for runs that did not
    record it). The window is chosen on them (:func:`choose_popularity_window`); the counts are each item's events
    in the last W days before the end of those events (newest + 1 ms). All time is the bundle's ``n_train``, as
    the fallback ranked before windows existed.
    """
    import pyarrow.parquet as pq

    from recsys.data import read_interactions

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


# --------------------------------------------------------------------------------------------------------------
# export


def _torch_embed(model: Any, fn: str, batches: Iterator[tuple[Any, ...]], *, n: int, dim: int) -> np.ndarray:
    import torch

    out = np.empty((n, dim), dtype=np.float32)
    pos = 0
    with torch.inference_mode():
        for args in batches:
            z = getattr(model, fn)(*(torch.as_tensor(a) for a in args))
            z = z.detach().to("cpu", torch.float32).numpy()
            out[pos : pos + len(z)] = z
            pos += len(z)
    if pos != n:
        raise RuntimeError(f"{fn} produced {pos} rows, expected {n}")
    return out


def served_dim(model: Any) -> int:
    """The size of the vectors a model's bundle stores and its index searches: the towers' ``dim``, plus the score
    prior's dimensions (``model.time_prior``, ``TwoTower.out_dim``)."""
    return int(getattr(model, "out_dim", model.dim))


def embed_items(model: Any, n_items: int, *, batch_size: int = 4096) -> np.ndarray:
    """Item tower over every item row: ``[n_items, dim]`` float32."""

    def batches() -> Iterator[tuple[np.ndarray]]:
        for s in range(0, n_items, batch_size):
            yield (np.arange(s, min(s + batch_size, n_items), dtype=np.int64),)

    return _torch_embed(model, "encode_items", batches(), n=n_items, dim=served_dim(model))


def embed_users(
    model: Any,
    user_rows: np.ndarray,
    histories: Sequence[np.ndarray],
    *,
    max_history: int | None = None,
    batch_size: int = 2048,
) -> np.ndarray:
    """User tower: ``user_rows [n]`` (-1 = unknown user) + histories (item rows, oldest first) -> ``[n, dim]``."""
    user_rows = np.asarray(user_rows, dtype=np.int64)
    if len(user_rows) != len(histories):
        raise ValueError(f"user_rows and histories must have the same length (got {len(user_rows)} and {len(histories)})")

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in range(0, len(user_rows), batch_size):
            e = min(s + batch_size, len(user_rows))
            yield user_rows[s:e], pad_histories(histories[s:e], max_len=max_history)

    return _torch_embed(model, "encode_users", batches(), n=len(user_rows), dim=served_dim(model))


def _run_data_dir(run_dir: Path) -> Path:
    """The prepared dataset a run was trained on: ``data_dir`` of its config.json (``recsys.train`` writes it)."""
    path = run_dir / schema.RUN_CONFIG
    v = _read_json(path, what="run").get("data_dir")
    if not isinstance(v, str) or not v:
        raise ValueError(f"{str(path)!r} does not name the prepared dataset (no `data_dir`, got {v!r}); pass "
                         f"`data_dir` (recsys export --data)")
    return Path(v)


def _tuning_users(
    data_dir: Path, user_emb: np.ndarray, *, n_queries: int, seed: int
) -> tuple[np.ndarray, str]:
    """Held-out users (rows) for tuning ef: test users, then valid users, then any others, up to n_queries."""
    import pyarrow.parquet as pq

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
    import pyarrow.parquet as pq

    from recsys.model import TwoTower
    from recsys.retrieval import IndexConfig

    if keep < 1:
        raise ValueError(f"`keep` must be >= 1, got {keep}")
    if version is not None and not _NAME_RE.match(version):
        raise ValueError(f"`version` must match {_NAME_RE.pattern}, got {version!r}")
    run_dir = Path(run_dir)
    models_dir = Path(models_dir)
    for name in (schema.MODEL_JSON, schema.MODEL_WEIGHTS):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"run dir {str(run_dir)!r} has no {name} (train the model first)")
    data_dir = Path(data_dir) if data_dir is not None else _run_data_dir(run_dir)
    for name in (*DATA_FILES, schema.MANIFEST):
        if not (data_dir / name).is_file():
            raise FileNotFoundError(f"prepared dataset {str(data_dir)!r} has no {name}")
    index_cfg = index_cfg if index_cfg is not None else IndexConfig()

    data_manifest = _read_json(data_dir / schema.MANIFEST, what="prepared dataset")
    model_json = _read_json(run_dir / schema.MODEL_JSON, what="run")
    run_config = _read_json(run_dir / schema.RUN_CONFIG, what="run") if (run_dir / schema.RUN_CONFIG).is_file() else {}
    summary = _read_json(run_dir / schema.SUMMARY, what="run") if (run_dir / schema.SUMMARY).is_file() else {}

    model = TwoTower.from_run(run_dir, device="cpu")
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

    trained_on = summary.get("final_fit")  # absent in runs from before it was recorded
    full_state = trained_on is not None and bool(set(trained_on.get("splits", ())) - {"train", "valid"})
    kw = dict(model=model, model_json=model_json, run_config=run_config, summary=summary,
              data_manifest=data_manifest, index_cfg=index_cfg, keep=keep, version=version,
              tune_queries=tune_queries, seed=seed, evaluate_split=evaluate_split, trained_on=trained_on)
    if not full_state:  # the prepared train + valid state is the bundle's as it is
        return _export(run_dir, models_dir, data_dir, data_dir, **kw)
    state_dir = Path(tempfile.mkdtemp(prefix="recsys-serving-state-"))
    try:
        _write_serving_state(data_dir, state_dir, data_manifest, n_users=n_users, n_items=n_items)
        return _export(run_dir, models_dir, data_dir, state_dir, **kw)
    finally:
        shutil.rmtree(state_dir, ignore_errors=True)


def _write_serving_state(data_dir: Path, out: Path, data_manifest: Mapping[str, Any], *, n_users: int,
                         n_items: int) -> None:
    """The bundle's data files from EVERY split of ``data_dir``: history (last N, oldest first), seen sets, and
    users / items with ``n_train`` = interactions in all splits (``prob`` recomputed by prepare's rule)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys.data import Interactions, history_and_seen, read_interactions, write_ragged
    from recsys.prepare import logq_prob

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


def _export(run_dir: Path, models_dir: Path, data_dir: Path, state_dir: Path, *, model: Any, model_json: dict,
            run_config: dict, summary: dict, data_manifest: dict, index_cfg: Any, keep: int, version: str | None,
            tune_queries: int | None, seed: int, evaluate_split: str | None,
            trained_on: dict[str, Any] | None) -> Path:
    from recsys.retrieval import ExactIndex, HnswIndex, autotune_ef

    metric = str(getattr(model, "metric", model_json.get("metric", schema.METRIC)))
    dim = served_dim(model)
    n_users, n_items = int(model.n_users), int(model.n_items)
    # Embeddings with the exported towers: users from their serving history, exactly as serving would.
    item_emb = embed_items(model, n_items)
    hist_off, hist_val = read_ragged(state_dir / schema.HISTORY, n_rows=n_users, what=schema.HISTORY)
    max_history = _max_history(model, model_json)
    user_emb = embed_users(
        model,
        np.arange(n_users, dtype=np.int64),
        _ragged_rows(hist_off, hist_val, np.arange(n_users)),
        max_history=max_history,
    )
    for name, arr in (("item", item_emb), ("user", user_emb)):
        if not np.isfinite(arr).all():
            raise ValueError(f"{name} embeddings contain NaN/inf: the run's weights are broken")

    # Index + ef auto-tuned against exact search on held-out users' embeddings.
    index = HnswIndex.from_config(item_emb, metric=metric, cfg=index_cfg)
    exact = ExactIndex(item_emb, metric=metric)
    tune_k = min(int(index_cfg.autotune_k), n_items)
    n_queries = max(1000, int(index_cfg.autotune_queries)) if tune_queries is None else int(tune_queries)
    query_source, table, filtered_table = "", [], []
    ef = int(index_cfg.ef)
    if index_cfg.autotune:
        rows, query_source = _tuning_users(data_dir, user_emb, n_queries=n_queries, seed=seed)
        # The same users minus their seen items (what serving excludes) tune the width of excluding searches.
        seen_off, seen_val = read_ragged(state_dir / schema.SEEN, n_rows=n_users, what=schema.SEEN)
        ef, table = autotune_ef(
            index, exact, user_emb[rows], k=tune_k, target_recall=index_cfg.target_recall,
            efs=index_cfg.autotune_efs, exclude=_ragged_rows(seen_off, seen_val, rows),
        )
        filtered_table = list(getattr(index, "ef_filtered_table", []))
    index.set_ef(int(ef))

    evaluation: dict[str, Any] = {}
    seen_splits = (trained_on or {}).get("splits", ())
    if evaluate_split is not None and evaluate_split in seen_splits:
        holdout = summary.get("holdout") or {}
        if holdout.get("metrics"):  # the split is in-sample: the estimate is the fit's validation metrics
            evaluation = {"split": holdout.get("split", "valid"), "source": "holdout run: " + holdout["estimate"],
                          **holdout["metrics"]}
    elif evaluate_split is not None and _has_rows(data_dir / schema.SPLITS[evaluate_split]):
        from recsys.evaluate import quick_evaluation

        evaluation = quick_evaluation(
            user_emb=user_emb, exact=exact, ann=index, data_dir=data_dir, split=evaluate_split
        )

    # The popularity fallback: recent counts, the window chosen on the fit events' own newest slice.
    popularity, fallback_counts = _fallback_popularity(data_dir, state_dir, trained_on, n_users=n_users,
                                                       n_items=n_items)

    with _models_lock(models_dir):
        h = hashlib.sha256(sha256_file(run_dir / schema.MODEL_WEIGHTS).encode())
        h.update(sha256_file(data_dir / schema.MANIFEST).encode())
        created = _utc_now()
        if version is None:
            version = new_version_name(models_dir, h.hexdigest(), now=created)
        final = models_dir / version
        if final.exists():
            raise FileExistsError(f"version {version!r} already exists in {str(models_dir)!r}")
        with atomic_dir(final) as tmp:
            for name in (schema.MODEL_JSON, schema.MODEL_WEIGHTS):
                shutil.copyfile(run_dir / name, tmp / name)
            for name in DATA_FILES:
                shutil.copyfile(state_dir / name, tmp / name)
            np.save(tmp / schema.ITEM_EMBEDDINGS, item_emb, allow_pickle=False)
            np.save(tmp / schema.USER_EMBEDDINGS, user_emb, allow_pickle=False)
            index.save(tmp / schema.INDEX_FILE)
            np.save(tmp / RECENT_POPULARITY, fallback_counts.astype(np.int64), allow_pickle=False)
            manifest = {
                "schema_version": schema.SCHEMA_VERSION,
                "version": version,
                "created_at": created.isoformat().replace("+00:00", "Z"),
                "metric": metric,
                "dim": dim,
                "counts": {"n_users": n_users, "n_items": n_items},
                "max_history": max_history,
                "model": model_json,
                "run": {"path": str(run_dir.resolve()), "config": run_config, "summary": summary},
                "data": {
                    "path": str(data_dir.resolve()),
                    "manifest_sha256": sha256_file(data_dir / schema.MANIFEST),
                    "fingerprint": _data_fingerprint(data_manifest),
                    "counts": data_manifest.get("counts"),
                    "split": data_manifest.get("split"),
                },
                "index": {
                    "kind": "hnsw",
                    "file": schema.INDEX_FILE,
                    "config": _jsonable(index_cfg),
                    "ef": int(ef),
                    "ef_filtered": int(index.ef_filtered),
                    "params": index.params(),
                    "tune": {
                        "autotune": bool(index_cfg.autotune),
                        "k": tune_k,
                        "target_recall": index_cfg.target_recall,
                        "queries": query_source,
                        "table": table,
                        "filtered_table": filtered_table,
                    },
                },
                "training": summary,
                "trained_on": trained_on,
                "catalogue": {"servable_items": n_items,
                              "filtered_rows": (data_manifest.get("rows") or {}).get("filtered"),
                              "items_before_kcore": (data_manifest.get("counts") or {}).get("items_before_kcore")},
                "evaluation": evaluation,
                "popularity": popularity,
                "packages": _package_versions(),
                "files": {
                    name: {"sha256": sha256_file(tmp / name), "size": (tmp / name).stat().st_size}
                    for name in BUNDLE_FILES
                },
            }
            atomic_write_json(tmp / MANIFEST, _jsonable(manifest))
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
        log.info("published %s (ef=%d, %d items, %d users)", final, ef, n_items, n_users)
        _prune_locked(models_dir, keep=keep)
    return final


def _has_rows(path: Path) -> bool:
    import pyarrow.parquet as pq

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


# --------------------------------------------------------------------------------------------------------------
# loading


class Bundle:
    """A loaded, verified, read-only model version; safe to share across threads.

    Arrays are read-only. ``index`` (HNSW, ids = item rows, ``ef`` as tuned at export) and ``exact`` (brute force)
    share one interface. The towers are loaded on first use of ``embed_history`` / ``embed_users``.
    """

    def __init__(self, path: Path, manifest: dict[str, Any]) -> None:
        # Use Bundle.load: it verifies before anything below touches a file.
        self.path = path
        self.manifest = manifest
        self.version: str = manifest.get("version") or path.name
        self.created_at: str = manifest.get("created_at", "")
        self.dim: int = int(manifest["dim"])
        self.metric: str = manifest["metric"]
        self.n_users: int = int(manifest["counts"]["n_users"])
        self.n_items: int = int(manifest["counts"]["n_items"])
        self.evaluation: dict[str, Any] = dict(manifest.get("evaluation") or {})
        self.max_history: int | None = manifest.get("max_history")
        # the towers' own size: less than ``dim`` when the vectors carry a score prior (model.time_prior)
        self.tower_dim: int = int((manifest.get("model") or {}).get("dim", self.dim))
        self._model: Any = None
        self._model_lock = threading.Lock()

    # ---- construction ------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, *, verify: bool = True) -> Bundle:
        """Load a version directory, or ``MODELS_DIR`` (follows ``LATEST``), refusing any mismatch.

        Order: the directory's entries (no symlinks) -> manifest (schema version, metric, dim, counts, file
        list) -> the entries against the list (none missing, none extra) -> every file's size and, with
        ``verify``, sha256 -> only then contents (npy without pickle, parquet, the hnswlib index) with shape
        checks against the manifest. ``verify=False`` skips only the hashing, for bundles this process just wrote.
        Any refusal is a ``BundleError`` naming the file and the check, with a ``reason``.
        """
        path = resolve(path)
        entries = _check_entries(path)
        manifest = _read_json(path / MANIFEST, what=f"bundle {path.name}", reason="manifest_invalid")
        _check_manifest(path, manifest)
        _check_files(path, manifest, entries, verify=verify)
        b = cls(path, manifest)
        b._load_contents()
        return b

    def _load_contents(self) -> None:
        import pyarrow.parquet as pq

        p = self.path
        self.item_embeddings = _load_matrix(p / schema.ITEM_EMBEDDINGS, rows=self.n_items, dim=self.dim)
        self.user_embeddings = _load_matrix(p / schema.USER_EMBEDDINGS, rows=self.n_users, dim=self.dim)
        model_json = _read_json(p / schema.MODEL_JSON, what=f"bundle {p.name}")
        model_json.setdefault("served_dim", model_json.get("dim"))  # written before the score prior existed
        for key, want in (("served_dim", self.dim), ("metric", self.metric)):
            if model_json.get(key) is not None and model_json[key] != want:
                raise BundleError(f"{schema.MODEL_JSON}: {key} is {model_json[key]!r}, manifest says {want!r}",
                                  reason="manifest_mismatch")

        users = pq.read_table(p / schema.USERS)
        items = pq.read_table(p / schema.ITEMS)
        self.user_ids = _vocab(users, schema.USER_ID, schema.USER_IDX, rows=self.n_users, what=schema.USERS)
        self.item_ids = _vocab(items, schema.ITEM_ID, schema.ITEM_IDX, rows=self.n_items, what=schema.ITEMS)
        self._user_row = {u: i for i, u in enumerate(self.user_ids.tolist())}
        self._item_row = {t: i for i, t in enumerate(self.item_ids.tolist())}
        if len(self._user_row) != self.n_users or len(self._item_row) != self.n_items:
            raise BundleError(f"{schema.USERS}/{schema.ITEMS}: external ids are not unique")
        self.item_table = items  # features / first_ts / title for callers that need them (pyarrow Table)
        n_train = (
            items.column("n_train").to_numpy().astype(np.int64)
            if "n_train" in items.column_names
            else np.zeros(self.n_items, dtype=np.int64)
        )
        self.item_popularity = _readonly(n_train)  # all-time counts
        # the popularity fallback's counts (events in the window export chose); all-time in bundles without them
        self.recent_popularity = _readonly(self._load_recent_popularity(n_train))
        self.popularity_window_days: float | None = (self.manifest.get("popularity") or {}).get("window_days")
        # the fallback's order, most popular first: recent counts, then all-time, then vocabulary order
        self.popular_items = _readonly(popularity_order(self.recent_popularity, n_train))

        self._hist_off, self._hist_val = read_ragged(p / schema.HISTORY, n_rows=self.n_users, what=schema.HISTORY)
        self._seen_off, self._seen_val = read_ragged(p / schema.SEEN, n_rows=self.n_users, what=schema.SEEN)
        for name, vals in ((schema.HISTORY, self._hist_val), (schema.SEEN, self._seen_val)):
            if vals.size and (vals.min() < 0 or vals.max() >= self.n_items):
                raise BundleError(f"{name}: item rows must be in [0, {self.n_items}), got [{vals.min()}, {vals.max()}]")
        for a in (self._hist_off, self._hist_val, self._seen_off, self._seen_val):
            a.setflags(write=False)

        from recsys.retrieval import ExactIndex, HnswIndex

        self.exact = ExactIndex(self.item_embeddings, metric=self.metric)
        ef = int(self.manifest.get("index", {}).get("ef") or 64)
        ef_filtered = self.manifest.get("index", {}).get("ef_filtered")  # absent in bundles before it existed
        # the traversal the ef was tuned with; absent in bundles before bf16 existed: hnswlib's float32 search
        precision = str(self.manifest.get("index", {}).get("params", {}).get("search_precision") or "fp32")
        try:
            self.index = HnswIndex.load(p / schema.INDEX_FILE, dim=self.dim, metric=self.metric, size=self.n_items,
                                        ef=ef, ef_filtered=int(ef_filtered) if ef_filtered else None,
                                        search_precision=precision)
        except Exception as e:  # a header that disagrees (ValueError) or hnswlib's RuntimeError
            raise BundleError(f"{schema.INDEX_FILE}: cannot be loaded: {e}") from e
        if int(self.index.size) != self.n_items or not np.array_equal(self.index.ids, np.arange(self.n_items)):
            raise BundleError(f"{schema.INDEX_FILE}: labels are not the item rows 0..{self.n_items - 1} "
                              f"({MANIFEST} counts.n_items)", reason="manifest_mismatch")

    def _load_recent_popularity(self, all_time: np.ndarray) -> np.ndarray:
        """``[n_items]`` int64 from ``recent_popularity.npy`` (checksummed with the rest), or a copy of
        ``all_time`` for a bundle from before it (no such file and no ``popularity`` in the manifest)."""
        if RECENT_POPULARITY not in self.manifest["files"]:  # (_check_manifest: then no `popularity` either)
            return all_time.copy()
        try:
            a = np.load(self.path / RECENT_POPULARITY, allow_pickle=False)
        except ValueError as e:
            raise BundleError(f"{RECENT_POPULARITY}: not a plain .npy array: {e}") from e
        if a.dtype != np.int64 or a.shape != (self.n_items,):
            raise BundleError(f"{RECENT_POPULARITY}: got {a.dtype} {a.shape}, manifest says int64 ({self.n_items},)",
                              reason="manifest_mismatch")
        if a.size and a.min() < 0:
            raise BundleError(f"{RECENT_POPULARITY}: counts must be >= 0, got {a.min()}")
        return a

    # ---- lookups -----------------------------------------------------------------------------------------
    def user_row(self, user_id: str) -> int | None:
        """Row of a known user, None when the bundle has never seen ``user_id``."""
        return self._user_row.get(user_id)

    def item_row(self, item_id: str) -> int | None:
        return self._item_row.get(item_id)

    def item_rows(self, item_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(rows of the known ids in input order [m] int64, the unknown ids)."""
        rows, unknown = [], []
        for t in item_ids:
            r = self._item_row.get(t)
            if r is None:
                unknown.append(t)
            else:
                rows.append(r)
        return np.asarray(rows, dtype=np.int64), unknown

    def seen_items(self, user_row: int) -> np.ndarray:
        """Distinct item rows the user interacted with (train + valid): excluded from recommendations."""
        self._check_user_row(user_row)
        return self._seen_val[self._seen_off[user_row] : self._seen_off[user_row + 1]]

    def seen_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """Every user's seen items at once: (offsets [n_users + 1] int64, item rows [nnz] int64), read-only; user
        ``r``'s are ``rows[offsets[r]:offsets[r + 1]]`` (= :meth:`seen_items`)."""
        return self._seen_off, self._seen_val

    def history_csr(self) -> tuple[np.ndarray, np.ndarray]:
        """Every user's serving history at once: (offsets [n_users + 1] int64, item rows int64), read-only; user
        ``r``'s are ``rows[offsets[r]:offsets[r + 1]]`` (= :meth:`history`)."""
        return self._hist_off, self._hist_val

    def history(self, user_row: int) -> np.ndarray:
        """The user's serving history (item rows, oldest first)."""
        self._check_user_row(user_row)
        return self._hist_val[self._hist_off[user_row] : self._hist_off[user_row + 1]]

    def _check_user_row(self, user_row: int) -> None:
        if not 0 <= int(user_row) < self.n_users:
            raise IndexError(f"`user_row` must be in [0, {self.n_users}), got {user_row}")

    # ---- towers ------------------------------------------------------------------------------------------
    @property
    def model(self) -> Any:
        """The two towers (eval mode, CPU), loaded on first use."""
        if self._model is None:
            with self._model_lock:
                if self._model is None:
                    from recsys.model import TwoTower

                    m = TwoTower.from_run(self.path, device="cpu")
                    if served_dim(m) != self.dim:
                        raise BundleError(f"{schema.MODEL_WEIGHTS}: served dim {served_dim(m)}, manifest says {self.dim}")
                    self._model = m
        return self._model

    def item_queries(self, rows: np.ndarray) -> np.ndarray:
        """``[n, dim]`` unit query vectors for "items like these" (SimilarItems): the items' own vectors, or with a
        score prior (``model.time_prior``) their tower part alone, ``[v, 0, ..., 0]``, so the ranking is by cosine
        to ``v`` (what is similar, not what is popular now)."""
        z = self.item_embeddings[np.asarray(rows, dtype=np.int64)]
        if self.tower_dim == self.dim:
            return z
        q = np.zeros_like(z)
        q[:, : self.tower_dim] = z[:, : self.tower_dim]
        return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)

    def embed_history(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        """Embed unknown users from their histories (item rows, oldest first): ``[n, dim]`` float32."""
        return self.embed_users(np.full(len(histories), -1, dtype=np.int64), histories)

    def embed_users(self, user_rows: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        """User tower for ``user_rows [n]`` (-1 = unknown) with the given histories: ``[n, dim]`` float32."""
        user_rows = np.asarray(user_rows, dtype=np.int64)
        if user_rows.size and (user_rows.min() < -1 or user_rows.max() >= self.n_users):
            raise ValueError(f"`user_rows` must be in [-1, {self.n_users}), got [{user_rows.min()}, {user_rows.max()}]")
        for i, h in enumerate(histories):
            h = np.asarray(h)
            if h.size and (h.min() < 0 or h.max() >= self.n_items):
                raise ValueError(f"history {i}: item rows must be in [0, {self.n_items}), got [{h.min()}, {h.max()}]")
        if len(user_rows) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return embed_users(self.model, user_rows, histories, max_history=self.max_history)

    def __repr__(self) -> str:
        return f"Bundle({str(self.path)!r}, version={self.version!r}, n_users={self.n_users}, n_items={self.n_items})"


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


def _check_manifest(path: Path, m: Mapping[str, Any]) -> None:
    where = f"{MANIFEST} of {str(path)!r}"

    def bad(msg: str, reason: str = "manifest_invalid") -> BundleError:
        return BundleError(f"{where}: {msg}", reason=reason)

    sv = m.get("schema_version")
    if sv != schema.SCHEMA_VERSION:
        raise bad(f"schema_version is {sv!r}, this recsys reads {schema.SCHEMA_VERSION}")
    if m.get("metric") != schema.METRIC:
        raise bad(f"metric is {m.get('metric')!r}, the system (and every bundle's index) serves {schema.METRIC!r}",
                  "manifest_mismatch")
    dim = m.get("dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
        raise bad(f"dim must be a positive integer, got {dim!r}")
    counts = m.get("counts")
    for key in ("n_users", "n_items"):
        v = counts.get(key) if isinstance(counts, Mapping) else None
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise bad(f"counts.{key} must be a positive integer, got {v!r}")
    files = m.get("files")
    if not isinstance(files, Mapping):
        raise bad("`files` (sha256 + size of every file) is missing")
    missing = [f for f in BUNDLE_FILES if f not in files and f not in OPTIONAL_FILES]
    if missing:
        raise bad(f"no checksum for {missing}")
    if m.get("popularity") and RECENT_POPULARITY not in files:
        raise bad(f"`popularity` is recorded but {RECENT_POPULARITY} has no checksum")
    for name, entry in files.items():
        # manifest names are joined to the bundle dir: refuse anything that could escape it
        if not isinstance(name, str) or Path(name).name != name or name in (".", "..", MANIFEST):
            raise bad(f"invalid file name {name!r}")
        if (
            not isinstance(entry, Mapping)
            or not isinstance(entry.get("sha256"), str)
            or not isinstance(entry.get("size"), int)
        ):
            raise bad(f"files[{name!r}] must be {{sha256: str, size: int}}, got {entry!r}")


def _check_entries(path: Path) -> set[str]:
    """The names in a version directory, refusing any symlink: a bundle's bytes are its own regular files (a link
    can point anywhere, and change under a verified bundle). One ``scandir``, before the manifest is read."""
    names = set()
    with os.scandir(path) as it:
        for e in it:
            if e.is_symlink():
                target = os.path.realpath(e.path)
                if Path(target).is_relative_to(path.resolve()):
                    where = "inside the version directory"
                elif Path(target).is_relative_to(path.resolve().parent):
                    where = "outside the version directory"
                else:
                    where = "outside the version directory and the models directory"
                raise BundleError(f"{e.name}: is a symlink to {target!r} ({where}); a bundle holds only its own "
                                  f"regular files", reason="symlink")
            names.add(e.name)
    return names


def _check_files(path: Path, m: Mapping[str, Any], entries: set[str], *, verify: bool) -> None:
    # Entries against the list, then sizes (cheap, catches truncation), then hashes; nothing is parsed until every
    # file passes.
    files = m["files"]
    for name in files:
        if name not in entries:
            raise BundleError(f"{name}: missing from bundle {str(path)!r}", reason="missing_file")
        if not (path / name).is_file():
            raise BundleError(f"{name}: not a regular file in bundle {str(path)!r}", reason="missing_file")
    extra = sorted(entries - set(files) - {MANIFEST})
    if extra:
        raise BundleError(f"{extra[0]}: extra file not listed in {MANIFEST} of {str(path)!r} (all extra: {extra[:5]})",
                          reason="extra_file")
    for name, want in files.items():
        size = (path / name).stat().st_size
        if size != want["size"]:
            short = size < want["size"]
            raise BundleError(f"{name}: size is {size} bytes, {MANIFEST} says {want['size']} "
                              f"({'truncated' if short else 'longer: appended to or replaced'})",
                              reason="truncated" if short else "size")
    if verify:
        for name, want in files.items():
            got = sha256_file(path / name)
            if got != want["sha256"]:
                raise BundleError(f"{name}: sha256 is {got[:12]}..., {MANIFEST} says {want['sha256'][:12]}...",
                                  reason="checksum")


def _load_matrix(f: Path, *, rows: int, dim: int) -> np.ndarray:
    try:
        a = np.load(f, allow_pickle=False, mmap_mode=None)
    except ValueError as e:
        raise BundleError(f"{f.name}: not a plain .npy array: {e}") from e
    if a.dtype != np.float32 or a.shape != (rows, dim):
        raise BundleError(f"{f.name}: got {a.dtype} {a.shape}, manifest says float32 ({rows}, {dim}) "
                          f"({MANIFEST}: counts and dim disagree with the array)", reason="manifest_mismatch")
    return _readonly(a)


def _vocab(t: Any, id_col: str, idx_col: str, *, rows: int, what: str) -> np.ndarray:
    if id_col not in t.column_names:
        raise BundleError(f"{what}: column {id_col!r} missing; columns: {t.column_names}")
    if t.num_rows != rows:
        raise BundleError(f"{what}: has {t.num_rows} rows, manifest says {rows}", reason="manifest_mismatch")
    if idx_col in t.column_names:
        idx = t.column(idx_col).to_numpy()
        if not np.array_equal(idx, np.arange(rows)):
            raise BundleError(f"{what}: {idx_col} must equal the row number 0..{rows - 1}")
    ids = np.asarray(t.column(id_col).to_pylist(), dtype=object)
    return _readonly(ids)
