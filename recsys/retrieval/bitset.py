"""The allowed set of a filtered search: one packed bitset over item ids.

``words`` is a 1-D ``np.uint64`` array; bit ``i & 63`` of word ``i >> 6`` set = id ``i`` allowed. Ids past the
end (``i >= 64 * len(words)``) are not allowed, so a set built for ``n`` ids never allows an id added later.
It is the one representation every index takes (``allow=`` of ``ExactIndex.search``, ``HnswIndex.search``,
:func:`recsys.retrieval.retrieve`), and the native search reads it as it is (no copy, no conversion).

Combining sets is plain numpy on the words (pad the shorter one with zeros first)::

    both = a & b          # AND: allowed by both filters (e.g. genre AND in stock)
    either = a | b        # OR
    a_not_b = a & ~b      # AND-NOT: allowed by a, not by b

(``~b`` sets the bits past ``b``'s ids too: keep it on the right of an ``&``.)

A set may carry a hint for a partitioned index (:func:`within`): the keys of the index partitions (see
:mod:`recsys.retrieval.partitions`) that hold every allowed id. Any numpy operation on it gives a plain set again
(the hint is dropped, never carried to a set it may not describe).

Example, ids 0..69 (two words)::

    from_ids([0, 3, 64], 70)  ->  [0b1001, 0b1] = [9, 1]
    count([9, 1]) -> 3;  ids([9, 1]) -> [0, 3, 64];  to_mask([9, 1], 5) -> [T, F, F, T, F]
"""

from __future__ import annotations

from typing import Any

import numpy as np

_HAS_BITWISE_COUNT = hasattr(np, "bitwise_count")  # numpy >= 2.0


def n_words(n: int) -> int:
    """Words needed for ``n`` ids."""
    return (int(n) + 63) >> 6


def from_mask(mask: Any) -> np.ndarray:
    """``mask [n] bool`` (True = allowed) -> ``words [ceil(n / 64)] uint64``."""
    m = np.asarray(mask)
    if m.ndim != 1:
        raise ValueError(f"`mask` must be 1-D, got shape {m.shape}")
    if m.dtype != np.bool_:
        raise ValueError(f"`mask` must be a bool array, got dtype {m.dtype}")
    packed = np.packbits(m, bitorder="little")  # byte j bit b = id 8j + b
    buf = np.zeros(n_words(m.shape[0]) * 8, dtype=np.uint8)
    buf[: packed.shape[0]] = packed
    return buf.view("<u8").astype(np.uint64, copy=False)  # little-endian words: byte 8w + j = bits 8j.. of word w


def from_ids(ids: Any, n: int) -> np.ndarray:
    """Allowed ``ids`` (any order, repeats fine) over ``n`` ids -> ``words [ceil(n / 64)] uint64``."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"`n` must be an integer >= 0, got {n!r}")
    a = np.asarray(ids).reshape(-1)
    if a.size and a.dtype.kind not in "iu":
        raise ValueError(f"`ids` must be integers, got dtype {a.dtype}")
    a = a.astype(np.int64, copy=False)
    if a.size and (a.min() < 0 or a.max() >= n):
        bad = int(a.min()) if a.min() < 0 else int(a.max())
        raise ValueError(f"`ids` must be in [0, {n}), got {bad}")
    mask = np.zeros(int(n), dtype=bool)
    mask[a] = True
    return from_mask(mask)


def to_mask(words: Any, n: int) -> np.ndarray:
    """``words`` -> ``mask [n] bool`` (ids past the words' end: False)."""
    w = check(words)
    bits = np.unpackbits(w.astype("<u8", copy=False).view(np.uint8), bitorder="little",
                         count=min(int(n), w.shape[0] * 64)).astype(bool)
    if bits.shape[0] < n:
        bits = np.concatenate([bits, np.zeros(int(n) - bits.shape[0], dtype=bool)])
    return bits


def count(words: Any) -> int:
    """How many ids are allowed (the popcount of the words)."""
    w = check(words)
    if _HAS_BITWISE_COUNT:
        return int(np.bitwise_count(w).sum(dtype=np.int64))
    return int(np.unpackbits(w.astype("<u8", copy=False).view(np.uint8)).sum(dtype=np.int64))


def ids(words: Any) -> np.ndarray:
    """The allowed ids, sorted -> ``[count] int64``."""
    w = check(words)
    nz = np.flatnonzero(w)  # skip empty words: a sparse set unpacks only the words it touches
    if not nz.size:
        return np.zeros(0, dtype=np.int64)
    bits = np.unpackbits(w[nz].astype("<u8", copy=False).view(np.uint8), bitorder="little").reshape(nz.size, 64)
    r, b = np.nonzero(bits)
    return nz[r].astype(np.int64) * 64 + b


def contains(words: Any, ids_: np.ndarray) -> np.ndarray:
    """Whether each of ``ids_`` (int64, any shape) is allowed -> bool of the same shape."""
    w = check(words)
    a = np.asarray(ids_, dtype=np.int64)
    inside = (a >= 0) & (a < w.shape[0] * 64)
    safe = np.where(inside, a, 0)
    bit = (w[safe >> 6] >> (safe & 63).astype(np.uint64)) & np.uint64(1) if w.size else np.zeros(a.shape, np.uint64)
    return inside & (bit != 0)


def check(words: Any, *, name: str = "allow") -> np.ndarray:
    """``words`` as a C-contiguous 1-D uint64 array, refused with the parameter's name otherwise (no conversion
    from other dtypes: a bool mask or an id list passed by mistake must not be read as bits)."""
    w = words if type(words) is np.ndarray else np.asarray(words)
    if w.dtype != np.uint64:
        hint = " (build it with recsys.retrieval.bitset.from_ids / from_mask)"
        raise ValueError(f"`{name}` must be a uint64 bitset, got dtype {w.dtype}{hint}")
    if w.ndim != 1:
        raise ValueError(f"`{name}` must be a 1-D uint64 bitset, got shape {w.shape}")
    return np.ascontiguousarray(w)


class _Within(np.ndarray):
    """Words with the keys of the partitions said to hold every allowed id (``within``); see :func:`within`."""

    within: tuple[Any, ...] | None = None

    def __array_finalize__(self, obj: Any) -> None:
        self.within = None  # a slice, a copy or an operation: a set the hint may not describe


def within(words: Any, keys: Any) -> np.ndarray:
    """``words`` (a view, not a copy) with the hint that every allowed id lies in the index partitions ``keys``
    (:class:`recsys.retrieval.partitions.Partitions`: e.g. the values of a filter's ``any_of`` condition on the
    attribute the index is partitioned by). The index checks the hint (:func:`within_of`) before it uses it: a
    set that strays outside the partitions is searched as if it had none."""
    w = check(words).view(_Within)
    w.within = tuple(keys)
    return w


def within_of(words: Any) -> tuple[Any, ...] | None:
    """The partition keys :func:`within` attached to ``words``, or None."""
    return getattr(words, "within", None)
