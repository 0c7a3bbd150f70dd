"""Catalogue changes, written: encode + embed upserted items, record the change in the delta, report what changed.

The one implementation behind ``RecommenderAdmin.UpsertItems`` / ``RetireItems`` (server/store.py) and
``recsys items upsert`` / ``retire`` (for a server that is not running, or for many replicas at once: every
replica applies the delta at its next poll).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys.bundle import Bundle
from recsys.catalogue.delta import CatalogueLog

TITLE = "title"
ITEM_ID = "item_id"


@dataclasses.dataclass(frozen=True)
class UpsertResult:
    """What an upsert did (``UpsertItemsResponse``)."""

    added: int
    updated: int
    unknown: list[tuple[str, str, str]]
    """(item ID, attribute, value) of each value the bundle's vocabulary does not know (encoded as missing)."""
    seq: int
    change_id: str
    applied: bool
    """False when the change ID was already in the delta (nothing was written)."""


@dataclasses.dataclass(frozen=True)
class RetireResult:
    """What a retirement did (``RetireItemsResponse``)."""

    retired: int
    unknown_ids: list[str]
    seq: int
    change_id: str
    applied: bool


def upsert_items(models_dir: str | Path, view: Bundle, rows: Sequence[Mapping[str, Any]], *,
                 change_id: str | None = None, log: CatalogueLog | None = None) -> UpsertResult:
    """Embed ``rows`` (``{"item_id": ..., <attribute>: value or list of values, "title": ...}``) with ``view``'s
    bundle and append them to its version's catalogue delta in ``models_dir`` (through ``log`` when the caller
    keeps one open for that version).

    ``view``: the catalogue as the caller serves it (a :func:`recsys.catalogue.live.live_bundle` view, or a plain
    bundle): it decides which IDs count as added and which as updated. Raises ValueError for an unknown attribute,
    a missing or repeated item ID (naming it).
    """
    from recsys.catalogue.encode import embed_new_items, encode_items  # torch: not on the serving import path

    base = getattr(view, "base", view)
    if not rows:
        raise ValueError("no items to upsert")
    rows = _one_value_as_scalar(base, rows)
    encoded = encode_items(base, rows)
    vectors = np.asarray(embed_new_items(base, encoded), dtype=np.float32)
    unknown = [(str(i), str(f), str(v)) for i, f, v in encoded.unknown]
    unknown_of: dict[str, list[list[str]]] = {}
    for i, f, v in unknown:
        unknown_of.setdefault(i, []).append([f, v])
    items = []
    for row, vec in zip(rows, vectors, strict=True):
        item_id = str(row[ITEM_ID])
        features = {k: (v if isinstance(v, str) else [str(x) for x in v])
                    for k, v in row.items() if k not in (ITEM_ID, TITLE) and v is not None}
        title = row.get(TITLE)
        items.append({"item_id": item_id, "features": features, "title": None if title is None else str(title),
                      "embedding": vec.tolist(), "unknown": unknown_of.get(item_id, [])})
    log = log if log is not None else CatalogueLog(models_dir, str(base.version))
    change, created = log.append("upsert", items, change_id=change_id, dim=int(base.dim))
    if not created:
        return UpsertResult(0, 0, unknown, change.seq, change.change_id, False)
    known = [view.item_row(it["item_id"]) is not None for it in items]
    return UpsertResult(added=known.count(False), updated=known.count(True), unknown=unknown, seq=change.seq,
                        change_id=change.change_id, applied=True)


def retire_items(models_dir: str | Path, view: Bundle, item_ids: Sequence[str], *,
                 change_id: str | None = None, log: CatalogueLog | None = None) -> RetireResult:
    """Append the retirement of the known ``item_ids`` to the catalogue delta of ``view``'s version; IDs the
    catalogue does not know are reported, not recorded. Nothing is written when none is known."""
    base = getattr(view, "base", view)
    state = getattr(view, "catalogue_state", None)
    retired_before = state.retired if state is not None else frozenset()
    seen: set[str] = set()
    known, unknown = [], []
    for t in item_ids:
        t = str(t)
        if t in seen:
            continue
        seen.add(t)
        (known if view.item_row(t) is not None else unknown).append(t)
    seq = state.seq if state is not None else 0
    if not known:
        return RetireResult(0, unknown, seq, change_id or "", False)
    log = log if log is not None else CatalogueLog(models_dir, str(base.version))
    change, created = log.append("retire", [{"item_id": t} for t in known], change_id=change_id, dim=int(base.dim))
    if not created:
        return RetireResult(0, unknown, change.seq, change.change_id, False)
    return RetireResult(retired=sum(t not in retired_before for t in known), unknown_ids=unknown, seq=change.seq,
                        change_id=change.change_id, applied=True)


def _one_value_as_scalar(bundle: Bundle, rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose single-valued attributes came as a list of one value (the RPC's ``StringSet``) with that value;
    a multi-valued attribute keeps its list. Any other shape is left for ``encode_items`` to refuse by name."""
    from recsys.catalogue.encode import multi_valued  # torch: not on the serving import path

    single = {name for name, multi in multi_valued(bundle).items() if not multi}
    out = []
    for row in rows:
        r = dict(row)
        for name in single & set(r):
            v = r[name]
            if isinstance(v, (list, tuple)) and len(v) == 1:
                r[name] = v[0]
        out.append(r)
    return out
