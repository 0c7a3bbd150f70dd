"""Filters on item attributes: the domain twin of the proto's ``ItemFilter``, compiled to an allowed-item bitset.

A filter is an AND of conditions, each on one attribute (an item feature of the bundle, as in the items file
given to ``recsys prepare``):

* ``any_of(values)``: the item has one of the values (a multi-valued attribute: at least one of its values);
* ``none_of(values)``: it has none of them (an item without a value satisfies it);
* ``range(low, high)``: its value read as a number lies in ``[low, high]`` (an open bound is None); values that
  are not numbers never do.

:class:`Attributes` holds every item's codes per attribute (the bundle's ``feat_<name>`` columns, plus the items
upserted since) and compiles a filter into a :mod:`recsys.retrieval.bitset` over item rows, which the index search
takes as ``allow``. Compiling walks an inverted list per attribute (value code -> item rows, built once), so it
costs the matching items, not the catalogue; :class:`FilterCache` keeps the last compiled filters of a view (a
service sees the same few filters again and again).
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np

from recsys.core import schema
from recsys.retrieval import bitset

OPS = ("any_of", "none_of", "range")


class UnknownAttribute(ValueError):
    """A filter names an attribute the bundle does not have."""


@dataclasses.dataclass(frozen=True)
class Condition:
    """One condition on one attribute (see the module docstring)."""

    attribute: str
    op: str
    values: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"`op` must be one of {OPS}, got {self.op!r}")
        if not self.attribute:
            raise ValueError("a filter condition needs an attribute name, got ''")
        if self.op == "range":
            for name, v in (("low", self.low), ("high", self.high)):
                if v is not None and math.isnan(v):
                    raise ValueError(f"range bound `{name}` of {self.attribute!r} must be a number, got NaN")
            if self.low is not None and self.high is not None and self.low > self.high:
                raise ValueError(f"range of {self.attribute!r} is empty: low {self.low} > high {self.high}")


@dataclasses.dataclass(frozen=True)
class ItemFilter:
    """Conditions that must all hold (AND); no condition = every item."""

    conditions: tuple[Condition, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.conditions)


# the command line's operators, the two-character ones first
_SYNTAX = ((">=", "ge"), ("<=", "le"), ("!=", "none_of"), ("=", "eq"))


def parse_filter(terms: Sequence[str]) -> ItemFilter:
    """The command line's filter syntax, one condition per term (the proto has a typed message instead):

    ``genre=Comedy,Drama`` (any of), ``genre!=Horror`` (none of), ``year>=1990``, ``year<=1999``,
    ``year=1990..1999`` (an inclusive range). Values are split on commas.
    """
    out = []
    for term in terms:
        t = term.strip()
        split = next(((t.partition(sep), op) for sep, op in _SYNTAX if sep in t), None)
        if split is None:
            raise ValueError(f"filter {term!r}: expected NAME=V1,V2 / NAME!=V / NAME>=X / NAME<=X / NAME=LOW..HIGH")
        (name, _, value), op = split
        name, value = name.strip(), value.strip()
        if not name or not value:
            raise ValueError(f"filter {term!r}: needs an attribute name and a value")
        try:
            if op == "ge":
                out.append(Condition(name, "range", low=float(value)))
            elif op == "le":
                out.append(Condition(name, "range", high=float(value)))
            elif op == "eq" and ".." in value:
                lo, _, hi = value.partition("..")
                out.append(Condition(name, "range", low=float(lo) if lo else None, high=float(hi) if hi else None))
            else:
                vals = tuple(v.strip() for v in value.split(",") if v.strip())
                out.append(Condition(name, "any_of" if op == "eq" else "none_of", values=vals))
        except ValueError as e:
            raise ValueError(f"filter {term!r}: {e}") from None
    return ItemFilter(tuple(out))


class Attributes:
    """Every item's attribute codes, and the value vocabulary of each attribute.

    ``codes[name]``: ``[n_items, w]`` int64 (``w`` = 1 for a single-valued attribute; 0 = missing / unknown);
    ``values[name]``: value string -> code (>= 1), the bundle's ``feature_vocab.parquet``.
    """

    def __init__(self, codes: Mapping[str, np.ndarray], values: Mapping[str, Mapping[str, int]], n_items: int) -> None:
        self.n_items = int(n_items)
        self.codes = {k: np.asarray(v, dtype=np.int64).reshape(self.n_items, -1) for k, v in codes.items()}
        self.values = {k: dict(v) for k, v in values.items()}
        self.names = tuple(self.codes)
        self._postings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._numeric: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_bundle(cls, bundle: Any) -> Attributes:
        """From a loaded bundle: its items table's ``feat_<name>`` columns and its feature vocabulary."""
        return cls.from_table(bundle.item_table, bundle.path, int(bundle.n_items))

    @classmethod
    def from_table(cls, table: Any, directory: Any, n_items: int) -> Attributes:
        """From an items table (``items.parquet`` as pyarrow) and the directory holding its
        ``feature_vocab.parquet`` (a bundle's, or prepared data's)."""
        from recsys.catalogue.encode import item_vocabulary  # pyarrow: not on the serving import path
        from recsys.core.data import feature_codes

        codes = {c[len(schema.FEAT_PREFIX):]: feature_codes(table.column(c))
                 for c in table.column_names if c.startswith(schema.FEAT_PREFIX)}
        vocab = item_vocabulary(directory)
        return cls(codes, {name: vocab.get(name, {}) for name in codes}, int(n_items))

    def groups(self, name: str, *, min_items: int = 1) -> dict[str, np.ndarray]:
        """The items of each value of attribute ``name`` that has at least ``min_items``: value -> sorted item rows
        (what :mod:`recsys.retrieval.partitions` builds a graph over)."""
        self._require(name, "")
        order, starts = self._posting(name)
        out = {}
        for value, code in sorted(self.values[name].items(), key=lambda kv: kv[1]):
            if code + 1 < starts.size and starts[code + 1] - starts[code] >= min_items:
                out[value] = np.sort(order[starts[code]:starts[code + 1]])
        return out

    def extended(self, n_items: int, rows: np.ndarray, features: Sequence[Mapping[str, Any]]) -> Attributes:
        """A copy for a catalogue of ``n_items`` rows where item ``rows[j]`` (an existing row: updated; a new row:
        added) has the raw values ``features[j]`` (attribute -> value or list of values), encoded with the value
        vocabularies by prepare's cleaning rule (:func:`recsys.catalogue.encode.clean`; unknown values -> 0). Rows
        past the old end that no ``rows[j]`` names are all-missing."""
        from recsys.catalogue.encode import clean  # polars: not on the serving import path

        codes = {}
        for name, old in self.codes.items():
            vocab = self.values.get(name, {})
            enc = [[vocab.get(v, 0) for v in vals] for vals in clean([f.get(name) for f in features], name)]
            w = max([old.shape[1], *(len(e) for e in enc)])
            new = np.zeros((n_items, w), dtype=np.int64)
            new[: old.shape[0], : old.shape[1]] = old
            for r, e in zip(np.asarray(rows, dtype=np.int64).tolist(), enc, strict=True):
                new[r] = 0
                new[r, : len(e)] = e
            codes[name] = new
        return Attributes(codes, self.values, n_items)

    # ---- compiling ---------------------------------------------------------------------------------------
    def allowed(self, f: ItemFilter) -> np.ndarray:
        """The items satisfying every condition of ``f``, as a bitset over item rows (uint64 words)."""
        words: np.ndarray | None = None
        for c in f.conditions:
            w = self._condition(c)
            words = w if words is None else words & w
        if words is None:
            return bitset.from_ids(np.arange(self.n_items, dtype=np.int64), self.n_items)
        return words

    def _require(self, name: str, where: str) -> None:
        """``UnknownAttribute`` naming ``name`` (``where``: e.g. " in the filter") and the known attributes."""
        if name not in self.codes:
            known = ", ".join(repr(n) for n in self.names) or "none"
            raise UnknownAttribute(f"unknown attribute {name!r}{where} (attributes: {known})")

    def _condition(self, c: Condition) -> np.ndarray:
        self._require(c.attribute, " in the filter")
        if c.op == "range":
            value_codes, value_num = self._numbers(c.attribute)
            keep = np.ones(value_codes.size, dtype=bool)
            if c.low is not None:
                keep &= value_num >= c.low
            if c.high is not None:
                keep &= value_num <= c.high
            return self._with_codes(c.attribute, value_codes[keep])
        vocab = self.values[c.attribute]
        codes = np.array(sorted({vocab[v] for v in c.values if v in vocab}), dtype=np.int64)
        words = self._with_codes(c.attribute, codes)
        if c.op == "none_of":
            every = bitset.from_ids(np.arange(self.n_items, dtype=np.int64), self.n_items)
            return every & ~words
        return words

    def _with_codes(self, name: str, codes: np.ndarray) -> np.ndarray:
        """Items having at least one of ``codes`` (sorted, >= 1) for attribute ``name``."""
        order, starts = self._posting(name)
        if not codes.size:
            return bitset.from_ids(np.empty(0, dtype=np.int64), self.n_items)
        codes = codes[codes < starts.size - 1]
        rows = np.concatenate([order[starts[c]:starts[c + 1]] for c in codes.tolist()]) if codes.size else order[:0]
        return bitset.from_ids(rows, self.n_items)

    def _posting(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Inverted list of ``name``: (item rows sorted by code, start offset of each code [max_code + 2])."""
        got = self._postings.get(name)
        if got is None:
            with self._lock:
                a = self.codes[name]
                rows = np.repeat(np.arange(self.n_items, dtype=np.int64), a.shape[1])
                flat = a.reshape(-1)
                keep = flat > 0
                rows, flat = rows[keep], flat[keep]
                order = np.argsort(flat, kind="stable")
                counts = np.bincount(flat, minlength=max(self.values[name].values(), default=0) + 1)
                starts = np.zeros(counts.size + 1, dtype=np.int64)
                np.cumsum(counts, out=starts[1:])
                got = self._postings[name] = (rows[order], starts)
        return got

    def _numbers(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(codes of the values that read as finite numbers, those numbers) of attribute ``name``."""
        got = self._numeric.get(name)
        if got is None:
            codes, nums = [], []
            for value, code in self.values[name].items():
                try:
                    x = float(value)
                except ValueError:
                    continue
                if math.isfinite(x):
                    codes.append(code)
                    nums.append(x)
            got = self._numeric[name] = (np.asarray(codes, dtype=np.int64), np.asarray(nums, dtype=np.float64))
        return got


def partition_keys(f: ItemFilter, attributes: Collection[str]) -> list[tuple[str, str]] | None:
    """The index partitions (``(attribute, value)`` keys, :mod:`recsys.retrieval.partitions`) said to hold every
    item ``f`` allows, or None: the values of an ``any_of`` condition on one of the partitioned ``attributes``
    (of several such conditions, the one naming the fewest values). The index checks the hint before it uses it."""
    best = None
    for c in f.conditions:
        if c.op == "any_of" and c.values and c.attribute in attributes:
            keys = [(c.attribute, v) for v in dict.fromkeys(c.values)]
            if best is None or len(keys) < len(best):
                best = keys
    return best


class FilterCache:
    """The last ``size`` compiled filters of one catalogue view (filters repeat: a service has a few). With the
    attributes the view's index is partitioned by, a compiled set carries the partitions that hold it
    (:func:`partition_keys`, :func:`recsys.retrieval.bitset.within`)."""

    def __init__(self, attributes: Attributes, size: int = 256, *, partitioned: Collection[str] = ()) -> None:
        self.attributes = attributes
        self.partitioned = frozenset(partitioned)
        self._size = size
        self._cache: OrderedDict[ItemFilter, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_bundle(cls, bundle: Any, attributes: Attributes | None = None) -> FilterCache:
        """For a loaded bundle (its :class:`Attributes` unless given) and the partitions of its index."""
        parts = getattr(getattr(bundle, "index", None), "partitions", None)
        return cls(Attributes.from_bundle(bundle) if attributes is None else attributes,
                   partitioned=parts.attributes if parts is not None else ())

    def allowed(self, f: ItemFilter) -> np.ndarray:
        with self._lock:
            words = self._cache.get(f)
            if words is not None:
                self._cache.move_to_end(f)
                return words
        words = self.attributes.allowed(f)
        words.setflags(write=False)
        keys = partition_keys(f, self.partitioned) if self.partitioned else None
        if keys is not None:
            words = bitset.within(words, keys)
        with self._lock:
            self._cache[f] = words
            while len(self._cache) > self._size:
                self._cache.popitem(last=False)
        return words
