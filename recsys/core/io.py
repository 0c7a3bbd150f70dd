"""Atomic publishing helpers: readers never see a half-written file or directory.

Modes: what these helpers publish gets the modes a plain ``mkdir`` / ``open`` would give under the process umask
(directories ``0o777 & ~umask``, files ``0o666 & ~umask``), not the private ``0o700`` / ``0o600`` of
``tempfile.mkdtemp`` / ``mkstemp``. With the usual umask 022 (or 002) a reader in the same group -- a server and a
retrain Job running as different UIDs that share a group (Kubernetes ``fsGroup``) -- can read every published file;
a umask of 077 keeps everything private to the writing user. Nothing is ever made world-writable unless the umask
asks for it. The umask is never changed or read with ``os.umask`` (racy in a threaded process): the kernel applies it
when the temp file or directory is created, and the directory's resulting mode is the reference for the files
written into it by other means (``mkstemp`` elsewhere).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: no leftover detection
    fcntl = None  # type: ignore[assignment]


def fsync_dir(path: str | Path) -> None:
    fd = os.open(str(path), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def _temp_name(parent: Path, prefix: str) -> Path:
    return parent / f"{prefix}{secrets.token_hex(4)}"


def _open_temp_file(parent: Path, prefix: str) -> tuple[int, Path]:
    """Create a new file beside its final name with ``open``'s usual mode (0o666 & ~umask), unlike ``mkstemp``."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        path = _temp_name(parent, prefix)
        try:
            return os.open(path, flags, 0o666), path
        except FileExistsError:
            continue
    raise FileExistsError(errno.EEXIST, f"no free temporary name {prefix}* in {str(parent)!r}")


def _publish_modes(root: Path) -> None:
    """Widen what was written under ``root`` to the modes a plain ``mkdir`` / ``open`` gets under the umask.

    ``root`` itself was made with ``mkdir(0o777)``, so its mode is ``0o777 & ~umask``. Bits are only ever added, up
    to that: a file some library wrote with ``mkstemp`` (0o600) becomes 0o644 under umask 022; under umask 077
    nothing changes; an executable bit someone set stays.
    """
    allowed = stat.S_IMODE(os.lstat(root).st_mode) & 0o777  # rwx bits only (not setgid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in (*dirnames, *filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                continue
            mode = stat.S_IMODE(st.st_mode)
            want = mode | (allowed if stat.S_ISDIR(st.st_mode) else allowed & 0o666)
            if want != mode:
                os.chmod(path, want)


def _try_lock(fd: int) -> bool | None:
    """A non-blocking exclusive ``flock`` on ``fd``: True if taken (its holder, if any, is gone), False if held
    elsewhere, None where the filesystem cannot lock a directory (some NFS setups): nothing can be told then."""
    if fcntl is None:  # pragma: no cover
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _remove_leftovers(final: Path) -> None:
    """Remove the temp dirs of earlier ``atomic_dir(final)`` runs that died (SIGKILL, power loss, ...).

    A live run holds an ``flock`` on its temp dir, so only a dead run's dir can be locked here. A dead overwrite
    that had moved the previous output aside (``.NAME.old-*``) but not yet renamed the new one in, gets the previous
    (complete) output put back.
    """
    if fcntl is None or not final.parent.is_dir():  # pragma: no cover - non-POSIX
        return
    tmp_prefix, old_prefix = f".{final.name}.tmp-", f".{final.name}.old-"
    for p in sorted(final.parent.iterdir()):
        if not (p.name.startswith(tmp_prefix) or p.name.startswith(old_prefix)) or p.is_symlink() or not p.is_dir():
            continue
        try:
            fd = os.open(p, os.O_RDONLY)
        except OSError:
            continue
        try:
            if not _try_lock(fd):
                continue  # a live run's, or no way to tell (no flock here): left alone
            if p.name.startswith(old_prefix) and not final.exists():
                os.rename(p, final)
                fsync_dir(final.parent)
                continue
            _remove(p)
        except OSError:
            continue  # e.g. a dir this user may not remove: leave it
        finally:
            os.close(fd)


def _make_locked_temp_dir(parent: Path, prefix: str) -> tuple[Path, int]:
    """``mkdir(0o777)`` (the umask applies) under a fresh name, locked with ``flock`` for this run's lifetime."""
    for _ in range(100):
        path = _temp_name(parent, prefix)
        try:
            os.mkdir(path, 0o777)
        except FileExistsError:
            continue
        fd = os.open(path, os.O_RDONLY)
        # a concurrent _remove_leftovers could take it between mkdir and flock: then start over with a new name.
        # Without flock (None) no cleaner ever removes a temp dir, so it is safe to go on.
        if _try_lock(fd) is not False and os.fstat(fd).st_nlink > 0:
            return path, fd
        os.close(fd)
    raise FileExistsError(errno.EEXIST, f"no free temporary name {prefix}* in {str(parent)!r}")


def _rename_exchange(a: Path, b: Path) -> bool:
    """Swap ``a`` and ``b`` in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


@contextlib.contextmanager
def atomic_dir(final: str | Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; on success fsync it and rename it to ``final``.

    On an exception the temporary directory is removed and ``final`` is untouched (the error gets a note naming
    ``final``). With ``overwrite`` an existing ``final`` is replaced in one atomic step where the filesystem can
    swap two directories (Linux ``renameat2``); elsewhere it is moved aside, the new one renamed in, then the old one
    deleted -- for that instant ``final`` is absent, never a mix. Otherwise an existing ``final`` is an error.

    The published tree gets the modes of a plain ``mkdir`` / ``open`` under the umask (see the module docstring).
    Leftovers of a run that died (``.NAME.tmp-*``, ``.NAME.old-*``) are cleaned up by the next run for the same
    ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(final)
    if final.exists() and not overwrite:
        raise FileExistsError(f"output directory {str(final)!r} already exists (pass overwrite to replace it)")
    tmp, lock_fd = _make_locked_temp_dir(final.parent, f".{final.name}.tmp-")
    published = False
    try:
        try:
            yield tmp
            _publish_modes(tmp)
            fsync_tree(tmp)
            if final.exists() and _rename_exchange(tmp, final):
                published = True
                fsync_dir(final.parent)
                _remove(tmp)  # now the previous output
                return
            old = old_fd = None
            if final.exists():
                old_fd = os.open(final, os.O_RDONLY)
                _try_lock(old_fd)  # a concurrent run must not "restore" it while it is aside
                old = _temp_name(final.parent, f".{final.name}.old-")
                os.rename(final, old)
            try:
                os.rename(tmp, final)
                published = True
            except BaseException:
                if old is not None:
                    with contextlib.suppress(OSError):
                        os.rename(old, final)
                raise
            finally:
                if old_fd is not None:
                    os.close(old_fd)
            fsync_dir(final.parent)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException as e:
            if published:
                raise  # `final` is the new output; `tmp` holds no more than the old one's remains
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, Exception):
                e.add_note(f"{str(final)!r} was not written: it is as it was before (the partial output was removed)")
            raise
    finally:
        os.close(lock_fd)


def atomic_write_file(path: str | Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` writes the file at the temp path ``tmp`` beside ``path`` (for writers that take a path, e.g.
    hnswlib's ``save_index``); then fsync, rename onto ``path``, fsync the directory. The file gets ``open``'s mode
    (0o666 & ~umask), unlike ``mkstemp``'s 0o600; a failure removes the temp file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _open_temp_file(path.parent, f".{path.name}.tmp-")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (:func:`atomic_write_file`)."""
    atomic_write_file(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def sha256_file(path: str | Path, *, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
