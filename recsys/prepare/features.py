"""Items / users metadata files -> feature vocabularies and codes (MovieLens item/user files included)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from recsys.core import schema
from recsys.prepare.config import PrepareConfig
from recsys.prepare.inputs import (
    ML_CSV_IDS,
    detect_format,
    first_line,
    open_bytes,
    scan_file,
    strip_compression,
)

log = logging.getLogger(__name__)


_ML_YEAR = r"\((\d{4})\)\s*$"  # "Toy Story (1995)"


def _read_text(path: Path) -> str:
    """A whole (optionally compressed) text file; MovieLens's older releases are Latin-1, not UTF-8."""
    with open_bytes(path) as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _read_movielens_meta(path: Path, *, id_col: str, entity: str, title_col: str) -> pl.DataFrame:
    """MovieLens metadata as a table: movies.dat (``id::title::genres``, ML-1M / 10M), users.dat
    (``id::gender::age::occupation::zip``), ML-100K's u.item (``id|title|release date|video release date|IMDb URL|``
    19 genre flags) and u.user (``id|age|gender|occupation|zip``). Items get ``title``, ``genres`` (a list: a
    multi-valued feature) and ``year`` (from the title); zip codes are left out (nearly one per user: a second user
    ID, not a feature)."""
    lines = [ln for ln in _read_text(path).splitlines() if ln.strip()]
    if not lines:
        raise ValueError(f"{path}: the {entity}s file is empty")
    sep = "::" if "::" in lines[0] else "|"
    layouts = {  # (separator, entity, field count) -> column names (None = not kept)
        ("::", "item", 3): (id_col, title_col, "genres"),
        ("::", "user", 5): (id_col, "gender", "age", "occupation", None),
        ("|", "item", 5 + len(ML100K_GENRES)): (id_col, title_col, None, None, None) + ML100K_GENRES,
        ("|", "user", 5): (id_col, "age", "gender", "occupation", None),
    }
    n_fields = len(lines[0].split(sep))
    names = layouts.get((sep, entity, n_fields))
    if names is None:
        known = ", ".join(f"{n} fields separated by {s!r}" for (s, e, n) in layouts if e == entity)
        raise ValueError(f"{path}: row 1 has {n_fields} fields separated by {sep!r}; a MovieLens {entity}s file has "
                         f"{known}")
    rows = []
    for k, line in enumerate(lines, start=1):
        fields = line.split(sep, n_fields - 1) if sep == "::" else line.split(sep)
        if len(fields) != n_fields:
            raise ValueError(f"{path}: row {k} has {len(fields)} fields, row 1 has {n_fields} (value {line[:120]!r})")
        rows.append(fields)
    df = pl.DataFrame(rows, schema=[f"c{j}" for j in range(n_fields)], orient="row")
    df = df.rename({f"c{j}": c for j, c in enumerate(names) if c is not None})
    df = df.select([c for c in names if c is not None])
    if sep == "|" and entity == "item":  # 19 0/1 genre flags -> ["Action", "Comedy"]
        flags = [pl.when(pl.col(g) == "1").then(pl.lit(g)) for g in ML100K_GENRES]
        df = df.with_columns(pl.concat_list(flags).list.drop_nulls().alias("genres")).drop(ML100K_GENRES)
    elif entity == "item":
        df = df.with_columns(pl.col("genres").str.split("|"))
    if entity == "item":
        df = _with_movielens_year(df, title_col)
    return df


def _with_movielens_year(df: pl.DataFrame, title_col: str) -> pl.DataFrame:
    """Add ``year`` from MovieLens titles ("Toy Story (1995)"), a categorical feature; no year = missing."""
    return df.with_columns(pl.col(title_col).str.extract(_ML_YEAR, 1).alias("year"))


def read_meta(path: Path, *, id_col: str, cfg: PrepareConfig, entity: str) -> pl.DataFrame:
    name = strip_compression(path.name.lower())
    typed = name.endswith((".item", ".user")) and re.search(r":(token|float|token_seq|float_seq)\b",
                                                             first_line(path))
    fmt = "recbole" if typed else detect_format(path) if cfg.format in ("auto", "movielens") else cfg.format
    try:
        if fmt == "movielens":
            df = _read_movielens_meta(path, id_col=id_col, entity=entity, title_col=cfg.title_col)
        elif fmt == "recbole":  # RecBole .item / .user: tab-separated with a typed header ("item_id:token")
            lf = pl.scan_csv(path, separator="\t", infer_schema=False, quote_char=None)
            seqs = [c.split(":", 1)[0] for c in lf.collect_schema().names() if c.endswith(":token_seq")]
            df = lf.rename(lambda c: c.split(":", 1)[0]).collect()
            # token_seq: space-separated values (a multi-valued feature), except the title's words
            df = df.with_columns(pl.col(c).str.split(" ") for c in seqs if c != cfg.title_col)
        else:
            df = scan_file(path, fmt, separator=cfg.separator).collect()
        df = df.with_columns(pl.col(c).str.split(sep) for c, sep in cfg.multi_valued.items()
                             if df.schema.get(c) == pl.String)  # fmt: skip
    except pl.exceptions.PolarsError as e:
        raise ValueError(f"{path}: cannot read the {entity}s file: {e}") from None
    ml_id = ML_CSV_IDS[entity]
    if id_col == f"{entity}_id" and id_col not in df.columns and ml_id in df.columns:  # MovieLens CSV: movies.csv
        df = df.rename({ml_id: id_col})
        if entity == "item" and cfg.title_col in df.columns and "year" not in df.columns:
            df = _with_movielens_year(df, cfg.title_col)
        if entity == "item" and df.schema.get("genres") == pl.String:
            df = df.with_columns(pl.col("genres").str.split("|"))
    if id_col not in df.columns:
        raise ValueError(f"{path}: missing column {id_col!r} (the {entity} ID); the file has columns {df.columns}")
    df = df.with_columns(pl.col(id_col).cast(pl.String))  # IDs are strings everywhere
    null_rows = df.with_row_index("_row", offset=1).filter(
        pl.col(id_col).is_null() | (pl.col(id_col).str.strip_chars() == ""))
    if null_rows.height:
        r = null_rows.row(0, named=True)
        raise ValueError(f"{path}: row {r['_row']}, column {id_col!r}: {entity} ID is null or empty "
                         f"(value {r[id_col]!r})")
    dup = df.with_row_index("_row", offset=1).filter(~pl.col(id_col).is_first_distinct())
    if dup.height:
        r = dup.row(0, named=True)
        raise ValueError(f"{path}: row {r['_row']}, column {id_col!r}: duplicate {entity} ID {r[id_col]!r}")
    return df


def is_categorical(dtype: pl.DataType) -> bool:
    """Whether a metadata column is encoded as a feature when none are named (``prepare.item_features`` /
    ``user_features`` = None): strings, lists of strings, booleans, integers, categoricals."""
    return (dtype in (pl.String, pl.Boolean, pl.List(pl.String)) or dtype.is_integer()
            or isinstance(dtype, (pl.Categorical, pl.Enum)))


def clean_values(col: pl.Series) -> pl.Series:
    """A single-valued feature's raw values as they are looked up in its vocabulary: strings, surrounding whitespace
    stripped (null or "" = missing). The one rule for prepare and for items encoded later
    (``recsys.catalogue``)."""
    return pl.Series(col.name, col.cast(pl.String)).str.strip_chars()


def clean_lists(col: pl.Series) -> pl.Series:
    """A multi-valued feature's raw lists as they are looked up in its vocabulary: each value stripped, empty ones
    dropped, a value repeated within one row kept once (at its first place). The one rule for prepare and for items
    encoded later (``recsys.catalogue``)."""
    # two steps: inside one eval, `filter`'s pl.element() is the unstripped value (a blank " " was kept as "")
    vals = col.cast(pl.List(pl.String)).list.eval(pl.element().str.strip_chars())
    vals = vals.list.eval(pl.element().filter(pl.element() != ""))
    return vals.list.unique(maintain_order=True)  # a value repeated within one row counts once


def _value_codes(present: pl.Series, name: str) -> pl.DataFrame:
    """A feature's vocabulary from its present values (one per row, or per row and value): value, code >= 1, codes
    by frequency, ties by value."""
    return (present.value_counts(name="n").sort(["n", name], descending=[True, False])
            .with_row_index("code", offset=1).select(pl.col(name).alias("value"), pl.col("code").cast(pl.Int32)))


def _encode_multi(col: pl.Series, name: str, max_values: int) -> tuple[pl.DataFrame, pl.Series]:
    """A multi-valued column (lists of strings) -> (its vocabulary: value, code >= 1 by frequency then value; the
    rows' codes: sorted distinct codes, at most ``max_values``, so the most frequent values are kept)."""
    vals = clean_lists(col)
    table = _value_codes(vals.explode().drop_nulls(), name)
    mapping = dict(zip(table["value"].to_list(), table["code"].to_list(), strict=True))
    coded = vals.list.eval(pl.element().replace_strict(mapping, return_dtype=pl.Int32)).list.sort()
    return table, coded.list.head(max_values).fill_null([])


def encode_features(vocab_ids: pl.Series, meta: pl.DataFrame | None, *, id_col: str, entity: str,
                    features: Sequence[str] | None, exclude: Sequence[str] = (), path: Path | None = None,
                    max_values: int = 32) -> tuple[pl.DataFrame, pl.DataFrame, dict[str, int]]:  # fmt: skip
    """Encode categorical metadata columns with their own vocabularies.

    A list-of-strings column (a multi-valued feature: genres, tags) becomes a ``list[i32]`` column of its values'
    codes (at most ``max_values`` per row, the most frequent; empty = missing).

    ``vocab_ids``: ``[n]`` external IDs in vocabulary order. Returns ``(codes, feature_vocab, cardinality)``:
    ``codes`` has one ``feat_<name>`` Int32 column per feature, ``[n]`` rows in vocabulary order (0 = missing or
    unknown; an entity absent from ``meta`` is all 0); ``feature_vocab`` rows (entity, feature, value, code >= 1),
    codes ordered by frequency among the vocabulary's entities, ties by value.
    """
    base = pl.DataFrame({id_col: vocab_ids}).with_row_index("_k")
    vocab_rows = []
    cards: dict[str, int] = {}
    if meta is None:
        return pl.DataFrame(), _empty_feature_vocab(), cards
    if features is None:
        features = [c for c in meta.columns if c != id_col and c not in exclude and is_categorical(meta.schema[c])]
        skipped = [c for c in meta.columns if c != id_col and c not in exclude and c not in features]
        if skipped:
            log.info("%s features: not encoding non-categorical column(s) %s of %s", entity, skipped, path)
    else:
        missing = [c for c in features if c not in meta.columns]
        if missing:
            raise ValueError(f"{path}: missing {entity} feature column(s) {missing}; the file has {meta.columns}")
    joined = base.join(meta, on=id_col, how="left").sort("_k")
    codes = joined.select("_k")
    for name in features:
        if isinstance(joined.schema[name], pl.List):
            table, coded = _encode_multi(joined[name], name, max_values)
        else:
            val = clean_values(joined[name])
            table = _value_codes(val.filter(val.is_not_null() & (val != "")), name)
            coded = pl.DataFrame({"value": val}).join(table, on="value", how="left", maintain_order="left")["code"]
            coded = coded.fill_null(0).cast(pl.Int32)
        cards[name] = table.height
        vocab_rows.append(table.select(pl.lit(entity).alias("entity"), pl.lit(name).alias("feature"), "value", "code"))
        codes = codes.with_columns(coded.alias(f"{schema.FEAT_PREFIX}{name}"))
    fv = pl.concat(vocab_rows) if vocab_rows else _empty_feature_vocab()
    return codes.drop("_k"), fv, cards


def _empty_feature_vocab() -> pl.DataFrame:
    return pl.DataFrame(schema={"entity": pl.String, "feature": pl.String, "value": pl.String, "code": pl.Int32})


ML100K_GENRES = ("unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
                  "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
                  "War", "Western")  # fmt: skip
