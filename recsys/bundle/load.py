"""``Bundle.load``: a published version, verified (every sha256 *before* its file is parsed) and read-only."""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys.bundle.files import (
    BUNDLE_FILES,
    MANIFEST,
    OPTIONAL_FILES,
    PARTITION_PREFIX,
    RECENT_POPULARITY,
    BundleError,
    read_json,
    read_ragged,
)
from recsys.bundle.versions import resolve
from recsys.core import schema
from recsys.core.io import sha256_file
from recsys.retrieval import ExactIndex, HnswIndex
from recsys.retrieval.partitions import Partitions
from recsys.train.embed import embed_users, served_dim
from recsys.train.recency import popularity_order


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
        # items the towers know (rows 0..tower_items-1): all of them, except in a live catalogue view
        # (recsys.catalogue.live), where upserted items follow and are not in the user tower's item table
        self.tower_items: int = self.n_items
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
        manifest = read_json(path / MANIFEST, what=f"bundle {path.name}", reason="manifest_invalid")
        _check_manifest(path, manifest)
        _check_files(path, manifest, entries, verify=verify)
        b = cls(path, manifest)
        b._load_contents()
        return b

    def _load_contents(self) -> None:
        import pyarrow.parquet as pq  # pyarrow: not on the serving import path


        p = self.path
        self.item_embeddings = _load_matrix(p / schema.ITEM_EMBEDDINGS, rows=self.n_items, dim=self.dim)
        self.user_embeddings = _load_matrix(p / schema.USER_EMBEDDINGS, rows=self.n_users, dim=self.dim)
        model_json = read_json(p / schema.MODEL_JSON, what=f"bundle {p.name}")
        model_json.setdefault("served_dim", model_json.get("dim"))  # written before the score prior existed
        for key, want in (("served_dim", self.dim), ("metric", self.metric)):
            if model_json.get(key) is not None and model_json[key] != want:
                raise BundleError(f"{schema.MODEL_JSON}: {key} is {model_json[key]!r}, manifest says {want!r}",
                                  reason="manifest_mismatch")

        users = pq.read_table(p / schema.USERS)
        items = pq.read_table(p / schema.ITEMS)
        self.users = _vocab(users, schema.USER_ID, schema.USER_IDX, rows=self.n_users, what=schema.USERS)
        self.items = _vocab(items, schema.ITEM_ID, schema.ITEM_IDX, rows=self.n_items, what=schema.ITEMS)
        self.user_ids = self.users.ids  # [n_users] object array of str, read-only (the vocabulary's own)
        self.item_ids = self.items.ids
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
        self._load_partitions(precision)

    def _load_partitions(self, precision: str) -> None:
        """The graphs of ``index.partition_by`` (manifest ``index.partitions``; none in older bundles), each
        checked to hold ``count`` distinct item rows."""
        attributes = (self.manifest["index"].get("config") or {}).get("partition_by") or []
        entries = self.manifest["index"].get("partitions") or []
        if not attributes:
            return
        graphs = {}
        for e in entries:
            try:
                ix = HnswIndex.load(self.path / e["file"], dim=self.dim, metric=self.metric, size=e["count"],
                                    ef=e["ef"], search_precision=precision)
            except Exception as err:
                raise BundleError(f"{e['file']}: cannot be loaded: {err}") from err
            ids = ix.ids
            if ids.size != e["count"] or (ids.size and (ids[0] < 0 or ids[-1] >= self.n_items)):
                raise BundleError(f"{e['file']}: must hold {e['count']} item rows in [0, {self.n_items}) "
                                  f"({MANIFEST} index.partitions), got {ids.size}", reason="manifest_mismatch")
            graphs[(e["attribute"], e["value"])] = ix
        self.index.partitions = Partitions.attach(graphs, n_ids=self.n_items, attributes=attributes)

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
        return self.users.number(user_id)

    def item_row(self, item_id: str) -> int | None:
        return self.items.number(item_id)

    def item_rows(self, item_ids: Sequence[str]) -> tuple[np.ndarray, list[str]]:
        """(rows of the known ids in input order [m] int64, the unknown ids)."""
        rows, unknown = [], []
        for t in item_ids:
            r = self.items.number(t)
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
                    from recsys.train.model import TwoTower  # torch: not on the serving import path

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
            if h.size and (h.min() < 0 or h.max() >= self.tower_items):
                raise ValueError(f"history {i}: item rows must be in [0, {self.tower_items}), got [{h.min()}, {h.max()}]")
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
    parts = (m.get("index") or {}).get("partitions") if isinstance(m.get("index"), Mapping) else None
    if parts is not None:
        if not isinstance(parts, list):
            raise bad(f"index.partitions must be a list, got {type(parts).__name__}")
        for i, e in enumerate(parts):
            ok = (isinstance(e, Mapping) and isinstance(e.get("attribute"), str) and isinstance(e.get("value"), str)
                  and isinstance(e.get("file"), str) and e.get("file", "").startswith(PARTITION_PREFIX)
                  and all(isinstance(e.get(f), int) and not isinstance(e.get(f), bool) and e.get(f) >= 1
                          for f in ("count", "ef")))
            if not ok:
                raise bad(f"index.partitions[{i}] must be {{attribute: str, value: str, file: "
                          f"'{PARTITION_PREFIX}*', count: int >= 1, ef: int >= 1}}, got {e!r}")
            if e["file"] not in files:
                raise bad(f"index.partitions[{i}]: {e['file']} has no checksum")
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


def _vocab(t: Any, id_col: str, idx_col: str, *, rows: int, what: str) -> Any:
    """The checked ID column of a users / items table as a :class:`recsys.core.vocab.Vocab`."""
    from recsys.core.vocab import Vocab  # pyarrow: not on the serving import path

    if id_col not in t.column_names:
        raise BundleError(f"{what}: column {id_col!r} missing; columns: {t.column_names}")
    if t.num_rows != rows:
        raise BundleError(f"{what}: has {t.num_rows} rows, manifest says {rows}", reason="manifest_mismatch")
    if idx_col in t.column_names:
        idx = t.column(idx_col).to_numpy()
        if not np.array_equal(idx, np.arange(rows)):
            raise BundleError(f"{what}: {idx_col} must equal the row number 0..{rows - 1}")
    try:
        return Vocab(t.column(id_col).combine_chunks(), name=id_col)
    except ValueError as e:  # a repeated (or null) external ID
        raise BundleError(f"{what}: external ids are not unique ({e})") from None
