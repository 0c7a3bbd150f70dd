"""The models directory: version names, the ``LATEST`` pointer, listing (newest first), rollback and pruning,
under one lock file so concurrent publishers and pruners never interleave."""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recsys.bundle.files import MANIFEST, BundleError, read_json
from recsys.core import schema
from recsys.core.io import fsync_dir

log = logging.getLogger(__name__)


# Auto-generated version names sort in creation order: UTC timestamp + short content hash.
VERSION_RE = re.compile(r"^(\d{8}T\d{6}Z)-([0-9a-f]{6})$")


NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


_TS_FMT = "%Y%m%dT%H%M%SZ"


# ``MODELS_DIR/catalogue/<version>/``: each version's live-catalogue change log (recsys.catalogue.delta), beside the
# versions rather than inside them (a version directory holds exactly what its manifest lists). It has no manifest, so
# it is never listed as a version; ``prune`` deletes a version's log with the version.
CATALOGUE_DIR = "catalogue"


def check_new_version_name(version: str) -> None:
    """Refuse a hand-picked name for a new version (``recsys export --version``) that is not a version name
    (``NAME_RE``) or that is a name the models directory already uses for something else: ``LATEST`` (the pointer
    file) and ``catalogue`` (the live-catalogue change logs)."""
    if not isinstance(version, str) or not NAME_RE.match(version):
        raise ValueError(f"`version` must match {NAME_RE.pattern}, got {version!r}")
    if version in (schema.LATEST, CATALOGUE_DIR):
        raise ValueError(f"`version` {version!r} is reserved in the models directory (the {schema.LATEST} pointer and "
                         f"the {CATALOGUE_DIR}/ change logs live there); pick another name")


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _is_bundle_dir(path: Path) -> bool:
    return path.is_dir() and not path.name.startswith(".") and (path / MANIFEST).is_file()


@contextlib.contextmanager
def models_lock(models_dir: Path) -> Iterator[None]:
    """Serialise publish / prune / rollback between processes sharing ``models_dir`` (advisory flock)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl  # fcntl: POSIX-only (optional)
    except ImportError:  # pragma: no cover - non-POSIX: best effort, no lock
        yield
        return
    with open(models_dir / ".lock", "a+") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def new_version_name(models_dir: str | Path, content_hash: str, *, now: dt.datetime | None = None) -> str:
    """``YYYYmmddTHHMMSSZ-<6 hex>``, strictly later than every auto-named version already in ``models_dir``.

    Two exports in the same second (or a clock that stepped back) get the last timestamp + 1 s, so sorting names
    always gives publication order.
    """
    now = (now or utc_now()).astimezone(dt.timezone.utc).replace(microsecond=0)
    models_dir = Path(models_dir)
    stamps = []
    if models_dir.is_dir():
        for p in models_dir.iterdir():
            m = VERSION_RE.match(p.name)
            if m:
                stamps.append(dt.datetime.strptime(m.group(1), _TS_FMT).replace(tzinfo=dt.timezone.utc))
    if stamps and now <= max(stamps):
        now = max(stamps) + dt.timedelta(seconds=1)
    return f"{now.strftime(_TS_FMT)}-{content_hash[:6]}"


def read_latest(models_dir: str | Path, *, check: bool = True) -> str | None:
    """The version name ``MODELS_DIR/LATEST`` points to, or None when there is no pointer yet (or it is empty).

    Only the name is checked here (:func:`version_dir` checks the directory it names); ``check=False`` returns it
    unchecked, for a caller that passes it to ``version_dir(..., pointer=True)`` and counts the refusal itself.
    """
    p = Path(models_dir) / schema.LATEST
    try:
        name = p.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    if check:
        _check_pointer_name(name, p)
    return name or None


def _check_pointer_name(name: str, pointer: Path) -> None:
    """Refuse a ``LATEST`` that holds anything but a version name: a path (``../x``, ``/srv/x``) would lead out of
    the models directory."""
    if NAME_RE.match(name):
        return
    outside = "/" in name or "\\" in name or name.startswith(".")
    raise BundleError(
        f"{schema.LATEST}: {str(pointer)!r} holds {name[:200]!r}, which is not a version name"
        + (": a path outside the models directory" if outside else ""),
        reason="latest_outside" if outside else "latest_invalid",
    )


def version_dir(models_dir: str | Path, version: str, *, pointer: bool = False) -> Path:
    """The directory of ``version`` in ``models_dir``, refused (``BundleError``) unless it is a real directory of
    ``models_dir`` (not a symlink) holding a manifest.

    ``pointer``: the name was read from ``LATEST`` (a malformed one is then a ``BundleError``, not a ValueError,
    and the errors say so). The one owner of "a version name -> its directory": ``resolve``, ``set_latest`` and
    the server's reload all come through here.
    """
    models_dir = Path(models_dir)
    if pointer:
        _check_pointer_name(version, models_dir / schema.LATEST)
    elif not NAME_RE.match(version):
        raise ValueError(f"`version` must be a version name like 20261127T201500Z-3fa2c1, got {version!r}")
    named = f"{schema.LATEST} names {version!r}" if pointer else f"version {version!r}"
    p = models_dir / version
    if p.is_symlink():
        target = os.path.realpath(p)
        outside = Path(target).parent != models_dir.resolve()
        raise BundleError(
            f"{named}: {str(p)!r} is a symlink to {target!r}"
            + (", outside the models directory" if outside else "; a version must be a directory of its own"),
            reason="latest_outside" if outside else "symlink",
        )
    if not p.is_dir():
        known = [v["version"] for v in list_versions(models_dir)]
        raise BundleError(f"{named}: version {version!r} not found in {str(models_dir)!r}; versions: {known}",
                          reason="latest_missing")
    if not (p / MANIFEST).is_file():
        raise BundleError(f"{MANIFEST}: missing from version directory {str(p)!r} ({named})", reason="missing_file")
    return p


def resolve(models_dir_or_bundle: str | Path, version: str | None = None) -> Path:
    """The version directory meant by a path.

    ``MODELS_DIR`` follows ``LATEST`` (or names ``version``); ``MODELS_DIR/LATEST`` (the pointer file) follows it;
    a version directory (it holds manifest.json) is returned as is.
    """
    p = Path(models_dir_or_bundle)
    if p.name == schema.LATEST and p.is_file():
        if version is not None:
            raise ValueError(f"`version` cannot be combined with a LATEST pointer path, got {version!r}")
        p = p.parent
        version = read_latest(p)
        if version is None:  # pragma: no cover - raced with deletion
            raise BundleError(f"{schema.LATEST}: {str(p / schema.LATEST)!r} vanished", reason="latest_missing")
        return version_dir(p, version, pointer=True)
    if not p.exists():
        raise FileNotFoundError(f"bundle path {str(p)!r} does not exist")
    if version is not None:
        return version_dir(p, version)
    if (p / MANIFEST).is_file():
        return p
    latest = read_latest(p)
    if latest is not None:
        return version_dir(p, latest, pointer=True)
    raise BundleError(
        f"{MANIFEST}: missing: {str(p)!r} is neither a bundle (no {MANIFEST}) nor a models directory "
        f"(no {schema.LATEST} pointer)",
        reason="missing_file",
    )


def list_versions(models_dir: str | Path) -> list[dict[str, Any]]:
    """Published versions, oldest first: ``{version, path, created_at, latest, dim, n_users, n_items, run_path, ...}``.

    Reads only manifests (no verification); a directory whose manifest is unreadable is listed with ``error``.
    """
    models_dir = Path(models_dir)
    if not models_dir.is_dir():
        return []
    latest = read_latest(models_dir)
    rows = []
    for p in models_dir.iterdir():
        if not _is_bundle_dir(p):
            continue
        row: dict[str, Any] = {"version": p.name, "path": str(p), "latest": p.name == latest}
        try:
            m = read_json(p / MANIFEST, what=p.name)
            row.update(
                created_at=m.get("created_at"),
                dim=m.get("dim"),
                n_users=m.get("counts", {}).get("n_users"),
                n_items=m.get("counts", {}).get("n_items"),
                ef=m.get("index", {}).get("ef"),
                evaluation=m.get("evaluation", {}),
                run_path=m.get("run", {}).get("path"),  # the training run it was exported from
            )
        except BundleError as e:
            row["error"] = str(e)
        rows.append(row)
    # Auto names sort chronologically; created_at first keeps hand-named versions in publication order too.
    rows.sort(key=lambda r: (str(r.get("created_at") or ""), r["version"]))
    return rows


def prune(models_dir: str | Path, *, keep: int) -> list[str]:
    """Delete all but the newest ``keep`` versions; the one ``LATEST`` points to is never deleted.

    Each doomed directory is first renamed to a hidden name (one atomic step), so no reader ever sees a
    half-deleted version. Returns the deleted version names.
    """
    if keep < 1:
        raise ValueError(f"`keep` must be >= 1, got {keep}")
    models_dir = Path(models_dir)
    with models_lock(models_dir):
        return prune_locked(models_dir, keep=keep)


# Leftovers of a publish or prune that was killed (atomic_dir's temp dirs, renamed-for-deletion versions, the temp
# file of a LATEST that was being replaced).
_LEFTOVER_RE = re.compile(r"^\..+\.(tmp|deleting)-[^/]+$")


def prune_locked(models_dir: Path, *, keep: int) -> list[str]:
    # Under the lock no publish is in flight, so any temp dir or file left here belongs to a dead process.
    for p in models_dir.iterdir():
        if _LEFTOVER_RE.match(p.name):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
            log.info("removed leftover %s", p.name)
    versions = list_versions(models_dir)
    latest = read_latest(models_dir)
    doomed = [v["version"] for v in versions[: max(0, len(versions) - keep)] if v["version"] != latest]
    for name in doomed:
        trash = models_dir / f".{name}.deleting-{os.getpid()}"
        os.rename(models_dir / name, trash)
        shutil.rmtree(trash, ignore_errors=True)
        log.info("pruned version %s", name)
    if doomed:
        fsync_dir(models_dir)
    _prune_catalogues(models_dir)
    return doomed


def _prune_catalogues(models_dir: Path) -> None:
    """Delete the catalogue logs of versions that are gone: those just pruned, and any a killed prune left behind
    (it deletes the version first, then its log). Each is renamed hidden first, under the log's own lock so no
    append is half-way through it; an appender that was waiting for the lock then finds its log gone and refuses."""
    root = models_dir / CATALOGUE_DIR
    if not root.is_dir() or root.is_symlink():
        return
    removed = False
    for p in sorted(root.iterdir()):
        if _LEFTOVER_RE.match(p.name):  # a killed prune's renamed log
            _remove_path(p)
            removed = True
            continue
        if p.name.startswith(".") or not NAME_RE.match(p.name) or _is_bundle_dir(models_dir / p.name):
            continue
        trash = root / f".{p.name}.deleting-{os.getpid()}"
        if p.is_dir() and not p.is_symlink():
            with _flocked(p / ".lock"):
                os.rename(p, trash)
        else:
            os.rename(p, trash)
        _remove_path(trash)
        removed = True
        log.info("pruned the catalogue log of version %s", p.name)
    if removed:
        fsync_dir(root)


def _remove_path(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)


@contextlib.contextmanager
def _flocked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` (created if absent; opened read-only, which is all ``flock`` needs)."""
    try:
        import fcntl  # fcntl: POSIX-only (optional)
    except ImportError:  # pragma: no cover - non-POSIX: best effort, no lock
        yield
        return
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock
