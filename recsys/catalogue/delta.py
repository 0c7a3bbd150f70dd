"""The live catalogue's change log: items upserted and retired between retrains, persisted beside the bundle versions
so every replica serving a version folds the same changes into the same catalogue (issue #18).

Pure storage: the caller passes embeddings already computed with the version's item tower; the log stores them so
every replica serves the same vector without recomputing it.

Layout
------
``MODELS_DIR/catalogue/<version>/``   one directory per bundle version (``<version>`` is a version name,
                                      ``recsys.bundle.versions.NAME_RE``); ``prune`` deletes it with its version.
``    <seq:08d>.json``                 one file per change, ``seq`` = 1, 2, 3, ... contiguous; written once (temp file
                                      in the same directory + fsync + rename), never rewritten.
``    .lock``                         ``flock``-ed by every writer while it assigns and writes the next ``seq``.
Hidden files (``.lock``, a dead writer's ``.<seq>.json.tmp-*``) and names that are not ``<8 digits>.json`` are
ignored by readers; the next writer removes leftover temp files.

Record (one JSON object, written as its canonical JSON + ``\\n``)
---------------------------------------------------------------
``format`` 1; ``version`` the bundle version; ``seq``; ``change_id`` (the writer's idempotency key, ``[A-Za-z0-9._:-]``,
1-128 chars; a uuid4 hex when the caller gives none); ``prev_sha256`` the sha256 of the previous record's *file*
bytes (``""`` for seq 1); ``created_at`` ISO-8601 UTC (``...Z``); ``op`` ``"upsert"`` | ``"retire"``; ``items``:
upsert ``{"item_id", "features": {name: str | [str, ...]}, "title": str | null, "embedding": [float, ...],
"unknown": [[feature, value], ...]}``, retire ``{"item_id"}``; ``sha256`` the sha256 of the canonical JSON
(``sort_keys``, ``separators=(",", ":")``, ``ensure_ascii=False``) of the record without ``sha256``. Embedding values
are float32 written as the Python float of the float32, so they read back bit-exact.

Reading verifies incrementally: a ``CatalogueLog`` keeps the file sha256 of every record it has verified (from seq 1,
the first time it reads) and afterwards only reads what is new, checking the first new record's ``prev_sha256``
against the last verified one; a record it already verified and reads again (``read(after)`` below what it knows)
must still have the same bytes. A fresh ``CatalogueLog`` therefore verifies the whole chain once. A record that fails
makes ``read`` raise ``CatalogueError`` and return nothing, and the log's own memory stays as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import numbers
import os
import re
import stat
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from recsys.bundle.files import MANIFEST
from recsys.bundle.versions import CATALOGUE_DIR, NAME_RE
from recsys.core.io import atomic_write_bytes, fsync_dir

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no lock (a single writer only)
    fcntl = None  # type: ignore[assignment]

FORMAT = 1
OPS = ("upsert", "retire")
LOCK = ".lock"
NORM_TOLERANCE = 1e-3  # embeddings are L2-normalised (the metric is cosine): |‖e‖ - 1| must be within this

# Why a log was refused (``CatalogueError.reason``), few and fixed: the server can count refusals by it.
REASONS = ("checksum", "sequence", "chain", "version", "invalid")

_RECORD_RE = re.compile(r"^(\d{8})\.json$")
_TEMP_RE = re.compile(r"^\.\d{8}\.json\.tmp-[^/]+$")  # what recsys.core.io.atomic_write_file leaves when killed
_CHANGE_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_RECORD_KEYS = frozenset({"format", "version", "seq", "change_id", "prev_sha256", "created_at", "op", "items", "sha256"})
_UPSERT_KEYS = frozenset({"item_id", "features", "title", "embedding", "unknown"})
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class CatalogueError(ValueError):
    """A change log that is refused: the message names the file and the check; ``reason`` (one of ``REASONS``) is
    the kind of check. Bad arguments to ``append`` are plain ``ValueError``s, not this."""

    def __init__(self, message: str, *, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason if reason in REASONS else "invalid"


@dataclasses.dataclass(frozen=True, eq=False)
class ItemUpsert:
    item_id: str
    embedding: np.ndarray
    """float32 [dim], L2-normalised, read-only."""
    features: dict[str, str | tuple[str, ...]]
    """Feature name -> value (a tuple of values for a multi-valued feature), as the caller sent them."""
    title: str | None
    unknown: tuple[tuple[str, str], ...]
    """(feature, value) pairs the version's vocabulary did not know (they were encoded as missing)."""


@dataclasses.dataclass(frozen=True)
class ItemRetire:
    item_id: str


@dataclasses.dataclass(frozen=True, eq=False)
class Change:
    """One verified record of the log."""

    seq: int
    change_id: str
    op: str
    """``"upsert"`` (items are ``ItemUpsert``) or ``"retire"`` (items are ``ItemRetire``)."""
    items: tuple[ItemUpsert, ...] | tuple[ItemRetire, ...]
    created_at: str
    sha256: str
    """The record's own ``sha256`` field (of its canonical JSON without that field)."""

    @property
    def item_ids(self) -> tuple[str, ...]:
        return tuple(it.item_id for it in self.items)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_sha256(record: Mapping[str, Any]) -> str:
    """The ``sha256`` field a record must hold: of its canonical JSON without that field."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def utc_timestamp() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def catalogue_dir(models_dir: str | Path, version: str) -> Path:
    """``MODELS_DIR/catalogue/<version>``, after checking ``version`` is a version name (not a path)."""
    if not isinstance(version, str) or not NAME_RE.match(version):
        raise ValueError(f"`version` must be a version name like 20261127T201500Z-3fa2c1, got {version!r}")
    return Path(models_dir) / CATALOGUE_DIR / version


# ---------------------------------------------------------------------------------------------------- validation
# One set of checks for what a caller appends (errors: ValueError) and what a reader finds (errors: CatalogueError).

Fail = Callable[[str], NoReturn]


def _str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _parse_upsert(raw: Any, i: int, *, dim: int | None, fail: Fail) -> ItemUpsert:
    if isinstance(raw, ItemUpsert):
        raw = {"item_id": raw.item_id, "features": {k: list(v) if isinstance(v, tuple) else v
                                                    for k, v in raw.features.items()},
               "title": raw.title, "embedding": raw.embedding, "unknown": [list(p) for p in raw.unknown]}
    if not isinstance(raw, Mapping):
        fail(f"items[{i}] must be an object, got {type(raw).__name__}")
    extra = set(raw) - _UPSERT_KEYS
    if extra:
        fail(f"items[{i}] has unexpected keys {sorted(extra)} (an upsert item holds {sorted(_UPSERT_KEYS)})")
    for key in ("item_id", "embedding"):
        if key not in raw:
            fail(f"items[{i}] lacks {key!r}")
    item_id = raw["item_id"]
    features = raw.get("features") or {}
    if not isinstance(features, Mapping):
        fail(f"items[{i}] ({item_id!r}): `features` must be an object, got {type(features).__name__}")
    feats: dict[str, str | tuple[str, ...]] = {}
    for name, value in features.items():
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(name, str) or not name or not (isinstance(value, str) or _str_list(value)):
            fail(f"items[{i}] ({item_id!r}): feature {name!r} must map a name to a string or a list of strings, "
                 f"got {value!r}")
        feats[name] = value if isinstance(value, str) else tuple(value)
    title = raw.get("title")
    if title is not None and not isinstance(title, str):
        fail(f"items[{i}] ({item_id!r}): `title` must be a string or null, got {type(title).__name__}")
    unknown = raw.get("unknown") or []
    if not isinstance(unknown, (list, tuple)) or not all(
        isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(s, str) for s in p) for p in unknown
    ):
        fail(f"items[{i}] ({item_id!r}): `unknown` must be a list of [feature, value] string pairs, got {unknown!r}")
    emb = raw["embedding"]
    if isinstance(emb, (list, tuple)) and not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in emb):
        fail(f"items[{i}] ({item_id!r}): `embedding` must hold numbers only")
    try:
        vec = np.array(emb, dtype=np.float32)  # a copy: the caller's array stays theirs
    except (TypeError, ValueError) as e:
        fail(f"items[{i}] ({item_id!r}): `embedding` is not a vector of numbers ({e})")
    if vec.ndim != 1 or vec.size == 0:
        fail(f"items[{i}] ({item_id!r}): `embedding` must be a non-empty vector, got shape {vec.shape}")
    if dim is not None and vec.shape[0] != dim:
        fail(f"items[{i}] ({item_id!r}): `embedding` must have dim={dim} values, got {vec.shape[0]}")
    if not np.isfinite(vec).all():
        fail(f"items[{i}] ({item_id!r}): `embedding` holds a non-finite value")
    norm = float(np.linalg.norm(vec.astype(np.float64)))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        fail(f"items[{i}] ({item_id!r}): `embedding` must be L2-normalised (|norm - 1| <= {NORM_TOLERANCE}), "
             f"got norm {norm:.6g}")
    vec.flags.writeable = False
    return ItemUpsert(item_id=item_id, embedding=vec, features=feats, title=title,
                      unknown=tuple((str(f), str(v)) for f, v in unknown))


def _parse_retire(raw: Any, i: int, *, fail: Fail) -> ItemRetire:
    if isinstance(raw, ItemRetire):
        return raw
    if isinstance(raw, str):
        return ItemRetire(raw)
    if not isinstance(raw, Mapping):
        fail(f"items[{i}] must be an object, got {type(raw).__name__}")
    if set(raw) != {"item_id"}:
        fail(f"items[{i}]: a retire item holds only 'item_id', got keys {sorted(raw)}")
    return ItemRetire(raw["item_id"])


def _parse_items(op: Any, items: Any, *, dim: int | None, fail: Fail,
                 strict: bool = False) -> tuple[ItemUpsert, ...] | tuple[ItemRetire, ...]:
    """``strict``: items read from a record, which holds every key of an item (a caller may leave out the optional
    ones, and pass ids or the dataclasses)."""
    if op not in OPS:
        fail(f"`op` must be one of {list(OPS)}, got {op!r}")
    if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
        fail(f"`items` must be a list of items, got {type(items).__name__}")
    items = list(items)
    if not items:
        fail("`items` must hold at least one item, got none")
    parsed: list[Any] = []
    seen: set[str] = set()
    for i, raw in enumerate(items):
        if strict and not (isinstance(raw, dict) and set(raw) == (_UPSERT_KEYS if op == "upsert" else {"item_id"})):
            fail(f"items[{i}] must be an object with keys {sorted(_UPSERT_KEYS if op == 'upsert' else {'item_id'})}")
        it = _parse_upsert(raw, i, dim=dim, fail=fail) if op == "upsert" else _parse_retire(raw, i, fail=fail)
        if not isinstance(it.item_id, str) or not it.item_id:
            fail(f"items[{i}]: `item_id` must be a non-empty string, got {it.item_id!r}")
        if it.item_id in seen:
            fail(f"items[{i}]: item_id {it.item_id!r} appears twice in one change")
        seen.add(it.item_id)
        parsed.append(it)
    if op == "upsert":
        dims = {it.embedding.shape[0] for it in parsed}
        if len(dims) > 1:
            fail(f"`embedding`s of one change must share one dim, got {sorted(dims)}")
    return tuple(parsed)


def _items_json(op: str, items: Sequence[Any]) -> list[dict[str, Any]]:
    if op == "retire":
        return [{"item_id": it.item_id} for it in items]
    return [
        {
            "item_id": it.item_id,
            "features": {k: list(v) if isinstance(v, tuple) else v for k, v in it.features.items()},
            "title": it.title,
            # float(np.float32) is exact in a float64, and json writes a float64 so that it reads back the same
            "embedding": [float(x) for x in it.embedding],
            "unknown": [[f, v] for f, v in it.unknown],
        }
        for it in items
    ]


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


# ---------------------------------------------------------------------------------------------------------- log
class CatalogueLog:
    """The change log of one version: ``append`` (any number of processes and threads), ``read`` (verified).

    Thread-safe. Writers serialise on an exclusive ``flock`` of ``<dir>/.lock``, so two writers (a server and a
    ``recsys items`` command, or two replicas) never assign the same ``seq``. Reading takes no lock: a record is
    renamed into place whole, so a reader sees it entirely or not at all.
    """

    def __init__(self, models_dir: str | Path, version: str) -> None:
        self.models_dir = Path(models_dir)
        self.version = version
        self.path = catalogue_dir(models_dir, version)
        self._mutex = threading.RLock()
        # What this object has verified, from seq 1: the file sha256 of record seq (at index seq - 1), and each
        # change_id's seq. Replaced only once a whole read has passed.
        self._file_shas: list[str] = []
        self._ids: dict[str, int] = {}
        self._dim: int | None = None

    def __repr__(self) -> str:
        return f"CatalogueLog({str(self.path)!r})"

    # ----------------------------------------------------------------------------------------------- reading
    def read(self, after: int = 0) -> list[Change]:
        """The changes with ``seq > after``, in order, each verified (checksum, contiguous ``seq``, the
        ``prev_sha256`` chain, version); ``[]`` when there is no log yet.

        Raises ``CatalogueError`` (and returns nothing) when any record fails, or when ``after`` is beyond the
        log's last record (a log that was truncated or replaced under a caller that had applied more).
        """
        if isinstance(after, bool) or not isinstance(after, int) or after < 0:
            raise ValueError(f"`after` must be an int >= 0, got {after!r}")
        with self._mutex:
            return self._verify(after)

    def last_seq(self) -> int:
        """The last record's ``seq`` (0 when there is none), after verifying what is new."""
        with self._mutex:
            self._verify(None)
            return len(self._file_shas)

    def _record_path(self, seq: int) -> Path:
        return self.path / f"{seq:08d}.json"

    def _list(self) -> int:
        """The number of records, after checking their names are 1..N with no gap."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return 0
        if not stat.S_ISDIR(st.st_mode):
            raise CatalogueError(f"catalogue log {str(self.path)!r} is not a directory (a symlink or a file)",
                                 reason="invalid")
        seqs = sorted(int(m.group(1)) for name in os.listdir(self.path) if (m := _RECORD_RE.match(name)))
        for expected, seq in enumerate(seqs, start=1):
            if seq != expected:
                missing = self._record_path(expected).name
                raise CatalogueError(
                    f"catalogue log {str(self.path)!r}: record {missing} is missing (sequence): the records "
                    f"must be numbered 1, 2, 3, ... with no gap, found {seqs[0]}..{seqs[-1]} ({len(seqs)} files)",
                    reason="sequence",
                )
        return len(seqs)

    def _verify(self, after: int | None) -> list[Change]:
        n = self._list()
        known = len(self._file_shas)
        if n < known:
            raise CatalogueError(
                f"catalogue log {str(self.path)!r}: holds {n} records, but {known} were read from it before "
                f"(sequence): records were deleted", reason="sequence")
        if after is not None and after > n:
            raise CatalogueError(
                f"catalogue log {str(self.path)!r}: changes after seq {after} were asked for, but the log ends at "
                f"seq {n} (sequence): was it truncated or replaced?", reason="sequence")
        start = known + 1 if after is None else min(after, known) + 1
        shas = self._file_shas[: start - 1]
        new_ids: dict[str, int] = {}
        dim = self._dim
        out: list[Change] = []
        for seq in range(start, n + 1):
            path = self._record_path(seq)
            change, file_sha = self._read_record(path, seq, prev=shas[-1] if shas else "")
            if seq <= known and file_sha != self._file_shas[seq - 1]:
                raise CatalogueError(f"catalogue record {str(path)!r}: its bytes changed since it was verified "
                                     f"(chain): a record is written once, never rewritten", reason="chain")
            if change.op == "upsert":
                d = change.items[0].embedding.shape[0]
                if dim is not None and d != dim:
                    raise CatalogueError(f"catalogue record {str(path)!r}: embeddings of dim {d}, but earlier "
                                         f"records have dim {dim}", reason="invalid")
                dim = d
            if seq > known:
                first = self._ids.get(change.change_id, new_ids.get(change.change_id))
                if first is not None:
                    raise CatalogueError(f"catalogue record {str(path)!r}: change_id {change.change_id!r} was "
                                         f"already used by record {first:08d}.json", reason="invalid")
                new_ids[change.change_id] = seq
            shas.append(file_sha)
            if after is not None and seq > after:
                out.append(change)
        self._file_shas = shas
        self._ids.update(new_ids)
        self._dim = dim
        return out

    def _read_record(self, path: Path, seq: int, *, prev: str) -> tuple[Change, str]:
        where = f"catalogue record {str(path)!r}"

        def fail(msg: str, reason: str = "invalid") -> NoReturn:
            raise CatalogueError(f"{where}: {msg}", reason=reason)

        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                fail("is not a regular file (a symlink or a directory)")
            data = path.read_bytes()
        except FileNotFoundError:
            fail("vanished while the log was read (sequence): was the version pruned?", "sequence")
        file_sha = hashlib.sha256(data).hexdigest()
        try:
            rec = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError) as e:
            fail(f"is not valid JSON ({e})")
        if not isinstance(rec, dict):
            fail(f"must hold a JSON object, got {type(rec).__name__}")
        stored = rec.get("sha256")
        if not isinstance(stored, str):
            fail("has no `sha256` field")
        actual = record_sha256(rec)
        if stored != actual:
            fail(f"sha256 field {stored[:64]!r} does not match the sha256 of its contents {actual!r} (checksum)",
                 "checksum")
        if rec.get("format") != FORMAT:
            fail(f"`format` must be {FORMAT}, got {rec.get('format')!r}")
        if rec.get("version") != self.version:
            fail(f"belongs to version {rec.get('version')!r}, not {self.version!r} (version)", "version")
        if rec.get("seq") != seq or isinstance(rec.get("seq"), bool):
            fail(f"holds seq {rec.get('seq')!r}, but its file name says {seq} (sequence)", "sequence")
        if rec.get("prev_sha256") != prev:
            fail(f"prev_sha256 {str(rec.get('prev_sha256'))[:64]!r} is not the sha256 of the previous record's "
                 f"file {prev!r} (chain)", "chain")
        keys = set(rec)
        if keys != _RECORD_KEYS:
            fail(f"has keys {sorted(keys)}, expected {sorted(_RECORD_KEYS)}")
        change_id, created_at = rec["change_id"], rec["created_at"]
        if not isinstance(change_id, str) or not _CHANGE_ID_RE.match(change_id):
            fail(f"`change_id` must match {_CHANGE_ID_RE.pattern}, got {change_id!r}")
        if not _is_utc_timestamp(created_at):
            fail(f"`created_at` must be an ISO-8601 UTC time like 2026-12-03T18:30:00.000000Z, got {created_at!r}")
        items = _parse_items(rec["op"], rec["items"], dim=None, fail=fail, strict=True)
        return Change(seq=seq, change_id=change_id, op=rec["op"], items=items, created_at=created_at,
                      sha256=stored), file_sha

    # ----------------------------------------------------------------------------------------------- writing
    def append(self, op: str, items: Iterable[Any], *, change_id: str | None = None,
               dim: int | None = None) -> tuple[Change, bool]:
        """Append one change; returns ``(change, created)``.

        ``items``: for ``"upsert"``, objects ``{"item_id", "embedding" (float [dim], L2-normalised), "features"
        ({name: str | list[str]}), "title" (str | None), "unknown" ([(feature, value), ...])}`` (or ``ItemUpsert``);
        for ``"retire"``, item ids (or ``{"item_id"}``). ``dim``: the version's embedding dim, required for an
        upsert. Idempotent by ``change_id``: when a record with this ``change_id`` exists it is returned with
        ``created=False`` and nothing is written (a client retrying after a timeout); the same id with another
        ``op`` or other item ids is a ``ValueError``. Bad arguments are ``ValueError``s; a log that fails
        verification is a ``CatalogueError`` (nothing is written onto it). The version directory
        (``MODELS_DIR/<version>/manifest.json``) must exist.
        """

        def fail(msg: str) -> NoReturn:
            raise ValueError(msg)

        if change_id is None:
            change_id = uuid.uuid4().hex
        elif not isinstance(change_id, str) or not _CHANGE_ID_RE.match(change_id):
            raise ValueError(f"`change_id` must match {_CHANGE_ID_RE.pattern}, got {change_id!r}")
        if op == "upsert" and (isinstance(dim, bool) or not isinstance(dim, int) or dim < 1):
            raise ValueError(f"`dim` must be an int >= 1 for an upsert, got {dim!r}")
        parsed = _parse_items(op, items, dim=dim, fail=fail)
        self._check_version_exists()
        with self._mutex, self._locked():
            self._remove_temp_leftovers()
            self._verify(None)
            if change_id in self._ids:
                existing = self._reread(self._ids[change_id])
                if existing.op != op or existing.item_ids != tuple(it.item_id for it in parsed):
                    raise ValueError(
                        f"`change_id` {change_id!r} was already used by record {existing.seq:08d}.json for a "
                        f"{existing.op} of {len(existing.items)} items; a retry must send the same change")
                return existing, False
            if op == "upsert" and self._dim is not None and dim != self._dim:
                raise ValueError(f"`dim` must be {self._dim} (the log's embeddings), got {dim}")
            seq = len(self._file_shas) + 1
            record: dict[str, Any] = {
                "format": FORMAT,
                "version": self.version,
                "seq": seq,
                "change_id": change_id,
                "prev_sha256": self._file_shas[-1] if self._file_shas else "",
                "created_at": utc_timestamp(),
                "op": op,
                "items": _items_json(op, parsed),
            }
            record["sha256"] = record_sha256(record)
            data = (canonical_json(record) + "\n").encode("utf-8")
            atomic_write_bytes(self._record_path(seq), data)
            self._file_shas.append(hashlib.sha256(data).hexdigest())
            self._ids[change_id] = seq
            if op == "upsert":
                self._dim = dim
            return Change(seq=seq, change_id=change_id, op=op, items=parsed, created_at=record["created_at"],
                          sha256=record["sha256"]), True

    def _reread(self, seq: int) -> Change:
        """Record ``seq``, already verified by this object: its bytes must not have changed since."""
        path = self._record_path(seq)
        change, file_sha = self._read_record(path, seq, prev=self._file_shas[seq - 2] if seq > 1 else "")
        if file_sha != self._file_shas[seq - 1]:
            raise CatalogueError(f"catalogue record {str(path)!r}: its bytes changed since it was verified "
                                 f"(chain): a record is written once, never rewritten", reason="chain")
        return change

    def _check_version_exists(self) -> None:
        if not (self.models_dir / self.version / MANIFEST).is_file():
            raise CatalogueError(
                f"catalogue log {str(self.path)!r}: version {self.version!r} is not in {str(self.models_dir)!r} "
                f"(version): a change log belongs to a published version", reason="version")

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """The exclusive writer lock, taken on a log directory that still belongs to a live version (``prune``
        takes the same lock before it renames a pruned version's log away)."""
        created = []
        for d in (self.path.parent, self.path):
            if not d.is_dir():
                with contextlib.suppress(FileExistsError):
                    d.mkdir()
                    created.append(d)
        for d in created:
            fsync_dir(d.parent)
        lock = self.path / LOCK
        fd = os.open(lock, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except FileNotFoundError:
                same = False
            if not same:
                raise CatalogueError(f"catalogue log {str(self.path)!r} was removed while waiting for its lock "
                                     f"(version): the version was pruned", reason="version")
            self._check_version_exists()
            yield
        finally:
            os.close(fd)  # releases the flock

    def _remove_temp_leftovers(self) -> None:
        """Under the writer lock no other writer is active: a temp file here is a killed writer's."""
        for name in os.listdir(self.path):
            if _TEMP_RE.match(name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path / name)


def _is_utc_timestamp(value: Any) -> bool:
    if not isinstance(value, str) or not value.endswith("Z"):
        return False
    try:
        return dt.datetime.fromisoformat(value[:-1] + "+00:00").utcoffset() == dt.timedelta(0)
    except ValueError:
        return False


# -------------------------------------------------------------------------------------------------------- state
@dataclasses.dataclass(frozen=True, eq=False)
class UpsertedItem:
    embedding: np.ndarray
    """float32 [dim], read-only."""
    features: dict[str, str | tuple[str, ...]]
    title: str | None
    unknown: tuple[tuple[str, str], ...]
    seq: int
    """The change that stored this version of the item."""


@dataclasses.dataclass(frozen=True, eq=False)
class CatalogueState:
    """The fold of a log's changes over a version's base catalogue (which this state does not hold).

    Rules: an upsert stores the item (an update replaces the entry in place, so ``upserts`` keeps first-upsert
    order) and un-retires it; a retire marks the id retired -- a base item or an upserted one, whose stored data is
    kept so a later upsert restores it. An item is served iff it is in the base or in ``upserts``, and not in
    ``retired``. A retire of an id neither in the base nor upserted is recorded as is; the caller decides.
    """

    seq: int = 0
    """The last change applied (0: none)."""
    upserts: dict[str, UpsertedItem] = dataclasses.field(default_factory=dict)
    """item_id -> its latest upsert, in first-upsert order; retired ones included. Never mutated (``apply``
    copies it), and not to be mutated by a caller either."""
    retired: frozenset[str] = frozenset()
    """Retired item ids (base or upserted)."""
    dim: int | None = None
    """The upserted embeddings' dim (None before the first upsert)."""

    @classmethod
    def empty(cls) -> CatalogueState:
        return cls()

    @property
    def n_upserted(self) -> int:
        """Upserted items that are live (not retired)."""
        return sum(1 for k in self.upserts if k not in self.retired)

    @property
    def n_retired(self) -> int:
        return len(self.retired)

    def apply(self, changes: Iterable[Change]) -> CatalogueState:
        """A new state with ``changes`` folded in; this one is left as it is.

        ``changes`` must continue from ``self.seq + 1`` with no gap: changes applied twice or out of order are a
        ``CatalogueError`` (reason ``"sequence"``), and so are embeddings of another dim (``"invalid"``).
        """
        changes = list(changes)
        if not changes:
            return self
        upserts = dict(self.upserts)
        retired = set(self.retired)
        seq, dim = self.seq, self.dim
        for change in changes:
            if change.seq != seq + 1:
                raise CatalogueError(
                    f"catalogue change {change.seq} ({change.change_id!r}) does not follow the state at seq {seq} "
                    f"(sequence): expected change {seq + 1}; changes are applied once, in order",
                    reason="sequence")
            if change.op == "upsert":
                for it in change.items:
                    if dim is not None and it.embedding.shape[0] != dim:
                        raise CatalogueError(
                            f"catalogue change {change.seq}: item {it.item_id!r} has an embedding of dim "
                            f"{it.embedding.shape[0]}, the state's is {dim}", reason="invalid")
                    dim = it.embedding.shape[0]
                    upserts[it.item_id] = UpsertedItem(embedding=it.embedding, features=it.features, title=it.title,
                                                       unknown=it.unknown, seq=change.seq)
                    retired.discard(it.item_id)
            elif change.op == "retire":
                retired.update(it.item_id for it in change.items)
            else:  # pragma: no cover - Change comes from the log's checks
                raise CatalogueError(f"catalogue change {change.seq}: unknown op {change.op!r}", reason="invalid")
            seq = change.seq
        return CatalogueState(seq=seq, upserts=upserts, retired=frozenset(retired), dim=dim)


def load_state(models_dir: str | Path, version: str) -> CatalogueState:
    """The state of ``version``'s whole log (empty when it has none), verified from seq 1."""
    return CatalogueState.empty().apply(CatalogueLog(models_dir, version).read())
