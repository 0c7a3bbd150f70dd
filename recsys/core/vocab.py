"""ID vocabularies: external ID (always a string) <-> row number.

LensKit-style: unknown IDs are explicit. ``vocab.number("u42")`` returns ``None`` for an ID the vocabulary does not
hold, never a silent row 0; ``vocab.numbers(ids)`` marks unknown IDs with ``-1``. Row order is the prepared
dataset's order (most frequent in train first), so ``vocab.id(0)`` is the most popular item.

numpy + pyarrow only: serving and the training machine (no polars there) share this object.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


class Vocab:
    """A frozen mapping between external IDs and rows ``0..len-1``.

    ``ids``: the external IDs in row order; integers are stored as their decimal string (``42`` -> ``"42"``),
    the same way ``recsys prepare`` stores them, so ``number(42) == number("42")``.
    """

    def __init__(self, ids: Iterable[Any], *, name: str = "id") -> None:
        arr = pa.array([str(x) for x in ids], type=pa.string()) if not isinstance(ids, pa.Array) else ids
        if arr.type != pa.string():
            arr = arr.cast(pa.string())
        if arr.null_count:
            raise ValueError(f"{name} vocabulary holds a null ID at row {arr.is_null().index(True).as_py()}")
        self.name = name
        self._arr: pa.Array = arr
        self._ids = np.asarray(arr.to_pylist(), dtype=object)  # [n] external IDs, row order
        self._index = {x: i for i, x in enumerate(self._ids)}
        if len(self._index) != len(self._ids):
            seen: set[str] = set()
            for i, x in enumerate(self._ids):
                if x in seen:
                    raise ValueError(f"{name} vocabulary holds the ID {x!r} twice (second time at row {i})")
                seen.add(x)

    @classmethod
    def from_parquet(cls, path: str | Path, column: str) -> Vocab:
        """Read a vocabulary from a prepared ``users.parquet`` / ``items.parquet`` (row order == index)."""
        table = pq.read_table(path, columns=[column])
        return cls(table.column(column).combine_chunks(), name=column)

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, id_: object) -> bool:
        return str(id_) in self._index

    def __repr__(self) -> str:
        head = ", ".join(repr(x) for x in self._ids[:3])
        return f"Vocab({self.name}, size={len(self)}, ids=[{head}{', ...' if len(self) > 3 else ''}])"

    @property
    def ids(self) -> np.ndarray:
        """External IDs in row order, ``[n]`` object array of str (read-only view)."""
        view = self._ids.view()
        view.flags.writeable = False
        return view

    def number(self, id_: Any, missing: Literal["error"] | None = None) -> int | None:
        """Row of one external ID; ``None`` if unknown, or ``KeyError`` with ``missing="error"``."""
        row = self._index.get(str(id_))
        if row is None and missing == "error":
            raise KeyError(f"unknown {self.name} {str(id_)!r}")
        return row

    def numbers(self, ids: Sequence[Any] | np.ndarray, *, missing: Literal["negative", "error"] = "negative"
                ) -> np.ndarray:
        """Rows of many external IDs, ``[n]`` int64; unknown IDs are ``-1`` (or ``KeyError`` with ``"error"``)."""
        query = pa.array([str(x) for x in ids], type=pa.string())
        rows = pc.fill_null(pc.index_in(query, value_set=self._arr), -1).to_numpy().astype(np.int64)
        if missing == "error" and (rows < 0).any():
            bad = query[int(np.flatnonzero(rows < 0)[0])].as_py()
            raise KeyError(f"unknown {self.name} {bad!r}")
        return rows

    def id(self, row: int) -> str:
        """External ID of one row; ``IndexError`` names the valid range."""
        if not 0 <= int(row) < len(self._ids):
            raise IndexError(f"{self.name} row must be in [0, {len(self._ids) - 1}], got {row}")
        return str(self._ids[int(row)])

    def id_array(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """External IDs of many rows, ``[n]`` object array; ``IndexError`` on any row out of range."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= len(self._ids)):
            bad = rows[(rows < 0) | (rows >= len(self._ids))][0]
            raise IndexError(f"{self.name} row must be in [0, {len(self._ids) - 1}], got {bad}")
        return self._ids[rows]
