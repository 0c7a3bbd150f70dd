"""What a bundle directory holds: the file names, the refusal reasons (``BundleError``), JSON and ragged-list
(history / seen CSR) helpers shared by publishing and loading."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from recsys.core import schema

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


# The graphs of index.partition_by (manifest index.partitions): index.part0000.hnsw, ... (recsys.retrieval.partitions)
PARTITION_PREFIX = "index.part"


# Files older bundles lack; when the manifest lists one, it is verified like any other.
OPTIONAL_FILES = (RECENT_POPULARITY,)


# Copied byte for byte from the prepared dataset.
DATA_FILES = (schema.USERS, schema.ITEMS, schema.FEATURE_VOCAB, schema.HISTORY, schema.SEEN)


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


def jsonable(obj: Any) -> Any:
    """Plain-JSON copy of ``obj`` (numpy scalars/arrays, tuples, Paths, dataclasses)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_json(path: Path, *, what: str, reason: str = "invalid") -> dict[str, Any]:
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


def read_ragged(path: Path, *, n_rows: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``user_idx i32, items list[i32]`` parquet -> (offsets [n_rows + 1] int64, values [nnz] int64)."""
    import pyarrow as pa  # pyarrow: not on the serving import path
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


def ragged_rows(offsets: np.ndarray, values: np.ndarray, rows: np.ndarray) -> list[np.ndarray]:
    return [values[offsets[r] : offsets[r + 1]] for r in rows]


