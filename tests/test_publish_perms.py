"""Published output gets the modes of a plain ``mkdir`` / ``open`` under the umask, not ``mkdtemp``'s private ones.

A retrain Job and a server running as different UIDs that share a group (Kubernetes ``fsGroup``) must be able to
read each other's output: with umask 022 / 002 / 027 a published version (directories, files) and ``LATEST`` are
group-readable; with umask 077 they stay private to the writer. Nothing is world-writable unless the umask says so.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_bundle import index_cfg, trained

from recsys.core import schema
from recsys.core.io import atomic_dir, atomic_write_json, atomic_write_text
from recsys.publish import export, set_latest

UMASKS = [0o022, 0o002, 0o077]
OTHER_UID = 54321  # a UID no file here belongs to
SHARED_GID = 54320  # the group a models dir is handed to (what Kubernetes' fsGroup does)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(root: Path) -> dict[str, int]:
    """Permission bits (no setgid) of ``root`` and everything under it, by relative path."""
    return {str(p.relative_to(root)): stat.S_IMODE(p.lstat().st_mode) & 0o777 for p in [root, *root.rglob("*")]}


def expected(path: Path, mask: int) -> int:
    return (0o777 if path.is_dir() else 0o666) & ~mask


def assert_umask_modes(root: Path, mask: int) -> None:
    got = modes(root)
    want = {name: expected(root / name if name != "." else root, mask) for name in got}
    assert got == want, {k: (oct(got[k]), oct(want[k])) for k in got if got[k] != want[k]}


@pytest.mark.parametrize("mask", UMASKS, ids=lambda m: f"umask{m:03o}")
def test_atomic_helpers_follow_umask(tmp_path, mask):
    """atomic_dir's tree (a file from mkstemp included, as hnswlib's index save makes) and atomic_write_* files."""
    with umask(mask):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "plain.txt").write_text("x")
            fd, _ = tempfile.mkstemp(dir=tmp)  # 0o600 whatever the umask
            os.close(fd)
            (tmp / "sub").mkdir()
            atomic_write_json(tmp / "sub" / "manifest.json", {"a": 1})
        atomic_write_text(tmp_path / "LATEST", "v1\n")
        with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "again.txt").write_text("y")
    assert_umask_modes(tmp_path / "out", mask)
    assert stat.S_IMODE((tmp_path / "LATEST").stat().st_mode) == 0o666 & ~mask
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", "out"]  # no temp leftovers


@pytest.mark.parametrize("mask", UMASKS, ids=lambda m: f"umask{m:03o}")
def test_index_saved_on_its_own_follows_umask(tmp_path, mask):
    """``HnswIndex.save`` outside a version directory (atomic_write_file, not mkstemp's 0o600)."""
    import numpy as np

    from recsys.retrieval import HnswIndex, IndexConfig

    vecs = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    index = HnswIndex.from_config(vecs / np.linalg.norm(vecs, axis=1, keepdims=True), cfg=IndexConfig(num_threads=1))
    with umask(mask):
        index.save(tmp_path / "index.hnsw")
    assert stat.S_IMODE((tmp_path / "index.hnsw").stat().st_mode) == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir()] == ["index.hnsw"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained(tmp_path_factory)[1]


@pytest.fixture(scope="module")
def shared_root() -> Iterator[Path]:
    """A directory under /tmp that another UID can traverse (pytest's own tmp dirs are 0700)."""
    root = Path(tempfile.mkdtemp(prefix="recsys-perms-"))
    os.chmod(root, 0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def publish(run: Path, models: Path, mask: int) -> Path:
    with umask(mask):
        return export(run, models, index_cfg=index_cfg(), evaluate_split=None)


@pytest.mark.parametrize("mask", UMASKS, ids=lambda m: f"umask{m:03o}")
def test_published_version_modes(run_dir, shared_root, mask):
    models = shared_root / f"modes-{mask:03o}"
    version = publish(run_dir, models, mask)
    assert_umask_modes(version, mask)
    latest = models / schema.LATEST
    assert stat.S_IMODE(latest.stat().st_mode) == 0o666 & ~mask
    os.chmod(latest, 0o600)  # e.g. written by an older release: set_latest rewrites it with the umask's mode
    with umask(mask):
        set_latest(models, version.name)
    assert stat.S_IMODE(latest.stat().st_mode) == 0o666 & ~mask


# The reader: imports everything as root (the interpreter lives under /root, 0700 here), loads once to pull in any
# lazy import, then drops to another UID whose only group is the models dir's, and loads again, verifying every file.
READER = textwrap.dedent("""
    import os, sys
    from recsys.bundle import Bundle

    models, uid, gid = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    Bundle.load(models, verify=True)
    os.setgroups([])
    os.setgid(gid)
    os.setuid(uid)
    assert (os.getuid(), os.getgid(), os.getgroups()) == (uid, gid, [])
    b = Bundle.load(models, verify=True)
    print("loaded", b.version)
""")


def read_as_other_uid(models: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", READER, str(models), str(OTHER_UID), str(SHARED_GID)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="needs root: the test reads the published version as another UID (setuid/chown)")
@pytest.mark.parametrize(("mask", "readable"), [(0o027, True), (0o077, False)], ids=["umask027", "umask077"])
def test_reader_in_another_uid_same_group(run_dir, shared_root, mask, readable):
    """The models dir belongs to a shared group with setgid (as fsGroup sets it up); the writer is root."""
    models = shared_root / f"shared-{mask:03o}"
    models.mkdir()
    os.chown(models, -1, SHARED_GID)
    os.chmod(models, 0o2750)  # group may read + traverse, new entries inherit the group
    version = publish(run_dir, models, mask)
    assert version.stat().st_gid == SHARED_GID
    r = read_as_other_uid(models)
    if readable:
        assert r.returncode == 0, r.stderr[-3000:]
        assert f"loaded {version.name}" in r.stdout
        assert all(m & 0o007 == 0 for m in modes(version).values())  # nothing for the world
    else:
        assert r.returncode != 0, r.stdout
        assert "Permission denied" in r.stderr or "PermissionError" in r.stderr, r.stderr[-3000:]
