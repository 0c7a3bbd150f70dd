"""New items from their raw features: an items file or request rows -> the bundle's codes -> served vectors.

An item added between retrains (issue #18) is embedded by the bundle's item tower from its features alone, the
path ``item_id_dropout`` trains (:meth:`recsys.train.model.TwoTower.encode_item_features`: no ID embedding; with
``model.time_prior`` the prior of an item without events), so its vector lives in the same space, and is scored by
the same cosine, as the trained items'.

    rows = read_items("new_items.csv", config=PrepareConfig(multi_valued={"genres": "|"}))
    enc = encode_items(bundle, rows)        # codes [m, W] in the model's column layout; enc.unknown: unknown values
    vecs = embed_new_items(bundle, enc)         # [m, bundle.dim] float32, unit rows

Rows are ``{"item_id": str, <feature>: value | [values], "title": str}`` (``title`` optional, any feature may be
absent = missing). Values are coded with the bundle's ``feature_vocab.parquet`` by prepare's own rules
(:func:`recsys.prepare.features.clean_values` / :func:`~recsys.prepare.features.clean_lists`: strings, whitespace
stripped, a multi-valued feature's empty values dropped and repeats kept once; its codes sorted, the most frequent
value first, at most the model's columns for it). A value the vocabulary lacks gets code 0 (the tower's
"missing or unknown" code, as for a trained item without that value) and is listed in ``unknown``; a feature name
the bundle lacks is an error. The title is embedded by :func:`recsys.core.data.embed_titles`, the function training
embedded the trained titles with (a missing title as "", as training read a null title).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from recsys.core import schema

_SCALARS = (str, bool, int, float)


@dataclass(frozen=True)
class EncodedItems:
    """New items coded for one bundle's item tower."""

    item_ids: list[str]
    """``[m]`` the items' external IDs, in input order."""
    codes: np.ndarray
    """``[m, W]`` int64 feature codes in the model's item-feature layout (``model.item_feature_names`` order, a
    multi-valued feature taking its width of columns, 0-padded; 0 = missing or unknown)."""
    titles: list[str | None]
    """``[m]`` the titles (None = none given)."""
    unknown: list[tuple[str, str, str]]
    """(item_id, feature, value) for each value the bundle's vocabulary does not know (coded 0), by row, then
    feature; ``value`` as looked up (a string, whitespace stripped)."""


def read_items(path: str | Path, *, config: Any = None) -> list[dict[str, Any]]:
    """Read an items file in any layout ``recsys prepare --items`` accepts (CSV / TSV / parquet / NDJSON,
    MovieLens u.item / movies.dat / movies.csv, RecBole .item) -> rows ``{"item_id": str, <feature>: value or list
    of values, "title": str}``, in file order.

    ``config``: the ``recsys.prepare.PrepareConfig`` the bundle's data was prepared with (``item_col``,
    ``title_col``, ``multi_valued`` separators, ``item_features``, ``format``, ``separator``); prepare's defaults
    when None. The features are the columns prepare would encode: ``item_features`` when set, else every string /
    integer / boolean / list-of-strings column but the ID and the title. A bad file or row is a ``ValueError``
    naming the file, the row, the column and the value.
    """
    import polars as pl  # polars: not on the serving import path

    from recsys.prepare import PrepareConfig
    from recsys.prepare.features import is_categorical, read_meta

    cfg = config or PrepareConfig()
    cfg.validate()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"items file {str(path)!r} does not exist")
    df = read_meta(path, id_col=cfg.item_col, cfg=cfg, entity="item")
    missing = [c for c in cfg.multi_valued if c not in df.columns]
    if missing:
        raise ValueError(f"{path}: `prepare.multi_valued` names column(s) {missing} the file lacks; it has "
                         f"{df.columns}")
    if cfg.item_features is not None:
        features = list(cfg.item_features)
        absent = [c for c in features if c not in df.columns]
        if absent:
            raise ValueError(f"{path}: missing item feature column(s) {absent}; the file has {df.columns}")
    else:
        features = [c for c in df.columns
                    if c not in (cfg.item_col, cfg.title_col) and is_categorical(df.schema[c])]
    for c in features:
        dt = df.schema[c]
        if not (is_categorical(dt) or dt.is_float() or isinstance(dt, pl.List)):
            raise ValueError(f"{path}: column {c!r} has type {dt}; an item feature holds strings, numbers, "
                             f"booleans or lists of strings")
    title = cfg.title_col if cfg.title_col in df.columns else None
    cols = [pl.col(cfg.item_col).alias(schema.ITEM_ID)]
    cols += [pl.col(c).cast(pl.List(pl.String)) if isinstance(df.schema[c], pl.List) else pl.col(c)
             for c in features]  # prepare reads a list's values as strings
    if title is not None:
        cols.append(pl.col(title).cast(pl.String).alias(schema.TITLE))
    rows = df.select(cols).to_dicts()
    for r in rows:  # a row without a title leaves the key out
        if title is not None and r[schema.TITLE] is None:
            del r[schema.TITLE]
    _check_rows(rows, where=str(path), first=1)
    return rows


def encode_items(bundle: Any, rows: Sequence[Mapping[str, Any]]) -> EncodedItems:
    """Code ``rows`` (see :func:`read_items`) for ``bundle``'s item tower: ``EncodedItems`` with ``codes`` ``[m, W]``
    int64 in ``model.item_feature_names`` layout.

    A value the bundle's ``feature_vocab.parquet`` does not know becomes 0 and is listed in ``unknown``. A feature
    name the bundle does not have is a ``ValueError`` naming it and the known ones; so is a malformed row (no or an
    empty ``item_id``, a repeated ID, a list for a single-valued feature or a string for a multi-valued one, a value
    that is not a string / number / boolean), naming the row, the field and the value.
    """
    rows = list(rows)
    _check_rows(rows, where="rows", first=0)
    spec = _spec(bundle)
    seen: dict[str, int] = {}
    for k, r in enumerate(rows):
        t = str(r[schema.ITEM_ID])
        if t in seen:
            raise ValueError(f"rows: row {k}, field {schema.ITEM_ID!r}: item {t!r} is repeated (first at row "
                             f"{seen[t]})")
        seen[t] = k
        extra = [f for f in r if f not in (schema.ITEM_ID, schema.TITLE) and f not in spec.features]
        if extra:
            raise ValueError(f"rows: row {k}: unknown item feature {extra[0]!r}; the bundle's item features are "
                             f"{sorted(spec.features)} (and {schema.TITLE!r})")
        for f in spec.features:
            v = r.get(f)
            multi = spec.features[f]
            if multi and v is not None and not isinstance(v, (list, tuple)):
                raise ValueError(f"rows: row {k}, field {f!r}: a multi-valued feature takes a list of values, got "
                                 f"{v!r} (split it first, as `prepare.multi_valued` does, or read the file with "
                                 f"read_items)")
            if not multi and isinstance(v, (list, tuple)):
                raise ValueError(f"rows: row {k}, field {f!r}: a single-valued feature takes one value, got {v!r}")

    m = len(rows)
    ids = [str(r[schema.ITEM_ID]) for r in rows]
    codes = np.zeros((m, spec.width), dtype=np.int64)
    unknown: list[list[tuple[str, str, str]]] = [[] for _ in range(m)]  # per row, in feature order
    for f, multi in spec.features.items():
        col = spec.columns.get(f)  # (start, width, cardinality) when the model reads the feature
        vocab = spec.vocab.get(f, {})
        card = col[2] if col is not None else math.inf
        values = [r.get(f) for r in rows]
        if multi:
            for i, vals in enumerate(_clean_lists(values, f)):
                known = []
                for v in vals:
                    c = vocab.get(v, 0)
                    if c == 0 or c >= card:
                        unknown[i].append((ids[i], f, v))
                    else:
                        known.append(c)
                if col is not None and known:
                    # prepare's rule (features._encode_multi): sorted codes, i.e. the most frequent value first,
                    # and the first ones kept when there are more than the columns
                    kept = sorted(known)[: col[1]]
                    codes[i, col[0] : col[0] + len(kept)] = kept
        else:
            for i, v in enumerate(_clean_values(values, f)):
                if v is None or v == "":
                    continue
                c = vocab.get(v, 0)
                if c == 0 or c >= card:
                    unknown[i].append((ids[i], f, v))
                elif col is not None:
                    codes[i, col[0]] = c
    titles = [None if r.get(schema.TITLE) is None else str(r[schema.TITLE]) for r in rows]
    return EncodedItems(item_ids=ids, codes=codes, titles=titles, unknown=[u for row in unknown for u in row])


def embed_new_items(bundle: Any, encoded: EncodedItems, *, batch_size: int = 4096) -> np.ndarray:
    """The served vectors of new items: ``[m, bundle.dim]`` float32, unit rows, comparable with
    ``bundle.item_embeddings`` (the item tower's features-only path, + the title embedding when the model uses
    text; with ``model.time_prior`` the prior of an item without events)."""
    import torch  # torch: not on the serving import path

    from recsys.core.data import embed_titles

    model = bundle.model
    m = len(encoded.item_ids)
    width = _spec(bundle).width
    if encoded.codes.shape != (m, width):
        raise ValueError(f"`encoded.codes` must have shape [{m}, {width}] for this bundle's item tower, got "
                         f"{list(encoded.codes.shape)} (encoded for another bundle?)")
    if m == 0:
        return np.zeros((0, bundle.dim), dtype=np.float32)
    title_emb = None
    if model.text_dim:
        # training embedded every trained title with this function, a missing one as "" (recsys.core.data)
        title_emb = embed_titles([t if t is not None else "" for t in encoded.titles],
                                 model_dir=model.cfg.text_model or None)
    out = np.empty((m, bundle.dim), dtype=np.float32)
    with torch.inference_mode():
        for a in range(0, m, batch_size):
            feats = torch.as_tensor(encoded.codes[a : a + batch_size])
            text = None if title_emb is None else torch.as_tensor(title_emb[a : a + batch_size])
            out[a : a + len(feats)] = model.encode_item_features(feats, text).to(torch.float32).numpy()
    return out


# ------------------------------------------------------------------------------------------------ internals
@dataclass(frozen=True)
class _Spec:
    features: dict[str, bool]  # every item feature of the bundle -> multi-valued?
    vocab: dict[str, dict[str, int]]  # feature -> value -> code (>= 1)
    columns: dict[str, tuple[int, int, int]]  # feature the model reads -> (start column, width, cardinality)
    width: int  # columns of the model's feature buffer


_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _spec(bundle: Any) -> _Spec:
    """The bundle's item features (from items.parquet), their vocabularies and the model's column layout; read
    once per bundle."""
    got = _SPECS.get(bundle)
    if got is not None:
        return got
    import pyarrow as pa

    items = bundle.item_table
    features = {
        name[len(schema.FEAT_PREFIX) :]: pa.types.is_list(items.schema.field(name).type)
        or pa.types.is_large_list(items.schema.field(name).type)
        for name in items.column_names if name.startswith(schema.FEAT_PREFIX)
    }
    vocab = item_vocabulary(bundle)
    model = bundle.model
    widths = model.spec.item_feature_widths
    columns, start = {}, 0
    for j, name in enumerate(model.item_feature_names):
        w = int(widths.get(name, 1))
        columns[name] = (start, w, int(model.item_feat[j].num_embeddings))
        start += w
        features.setdefault(name, w > 1)
    spec = _Spec(features=features, vocab=vocab, columns=columns, width=start)
    _SPECS[bundle] = spec
    return spec


def item_vocabulary(bundle: Any) -> dict[str, dict[str, int]]:
    """The bundle's item feature vocabularies (``feature_vocab.parquet``; ``bundle``: a bundle, or the directory of
    a bundle or of prepared data): feature -> value -> code (>= 1)."""
    import pyarrow.parquet as pq  # pyarrow: not on the serving import path

    root = bundle if isinstance(bundle, Path) else bundle.path
    vocab: dict[str, dict[str, int]] = {}
    for r in pq.read_table(root / schema.FEATURE_VOCAB).to_pylist():
        if r["entity"] == "item":
            vocab.setdefault(str(r["feature"]), {})[str(r["value"])] = int(r["code"])
    return vocab


def multi_valued(bundle: Any) -> dict[str, bool]:
    """The bundle's item features -> whether each is multi-valued (a list of values per item)."""
    return dict(_spec(bundle).features)


def clean(values: Sequence[Any], name: str) -> list[list[str]]:
    """Raw values of attribute ``name``, one per item (a value, a list of values, or None), as prepare looks them
    up in its vocabulary: per item its cleaned values (a single value: at most one; a list: its distinct ones)."""
    out: list[list[str]] = [[] for _ in values]
    lists = [i for i, v in enumerate(values) if isinstance(v, (list, tuple))]
    single = [i for i, v in enumerate(values) if v is not None and not isinstance(v, (list, tuple))]
    for i, vals in zip(lists, _clean_lists([values[i] for i in lists], name), strict=True):
        out[i] = vals
    for i, v in zip(single, _clean_values([values[i] for i in single], name), strict=True):
        out[i] = [v] if v else []
    return out


def _check_rows(rows: list[Mapping[str, Any]], *, where: str, first: int) -> None:
    """Each row a mapping with a non-empty ``item_id``, a string title and values that are strings, numbers,
    booleans or lists of them; else a ValueError naming ``where``, the row (counted from ``first``), the field and
    the value."""
    for k, r in enumerate(rows, start=first):
        if not isinstance(r, Mapping):
            raise ValueError(f"{where}: row {k} must be a mapping of field -> value, got {r!r}")
        t = r.get(schema.ITEM_ID)
        if isinstance(t, bool) or not isinstance(t, (str, int)) or not str(t).strip():
            raise ValueError(f"{where}: row {k}, field {schema.ITEM_ID!r}: the item ID must be a non-empty string, "
                             f"got {t!r}")
        title = r.get(schema.TITLE)
        if title is not None and not isinstance(title, str):
            raise ValueError(f"{where}: row {k}, field {schema.TITLE!r}: the title must be a string, got {title!r}")
        for f, v in r.items():
            if f in (schema.ITEM_ID, schema.TITLE) or v is None:
                continue
            vals = v if isinstance(v, (list, tuple)) else [v]
            for x in vals:
                if x is not None and (not isinstance(x, _SCALARS) or (isinstance(x, float) and not math.isfinite(x))):
                    raise ValueError(f"{where}: row {k}, field {f!r}: values must be strings, numbers or booleans, "
                                     f"got {x!r}")


def _as_string(v: Any) -> str | None:
    """One raw value as the string prepare would have read from its column (Polars' cast: True -> "true")."""
    if v is None or isinstance(v, str):
        return v
    import polars as pl

    return pl.Series([v]).cast(pl.String)[0]


def _clean_values(values: list[Any], name: str) -> list[str | None]:
    import polars as pl

    from recsys.prepare.features import clean_values

    return clean_values(pl.Series(name, [_as_string(v) for v in values], dtype=pl.String)).to_list()


def _clean_lists(values: list[Any], name: str) -> list[list[str]]:
    import polars as pl

    from recsys.prepare.features import clean_lists

    lists = [None if v is None else [_as_string(x) for x in v] for v in values]
    out = clean_lists(pl.Series(name, lists, dtype=pl.List(pl.String))).to_list()
    return [x or [] for x in out]
