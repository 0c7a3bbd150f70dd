"""`recsys export` killed with SIGKILL at the moments that matter leaves a models directory a server can trust.

The export runs in a subprocess through a ``-c`` wrapper that wraps the calls a publish makes (``shutil.copyfile``,
``numpy.save`` and ``os.replace`` for the files of the temporary version directory, ``os.rename`` for the directory
itself and for pruning, ``os.replace`` for ``LATEST``) and SIGKILLs its own process at the point named by
``RECSYS_CRASH_AT``; no library code is changed. Afterwards:

* ``LATEST`` is absent or names a complete version that ``Bundle.load(..., verify=True)`` accepts, and every visible
  (non-hidden) version verifies;
* before the version directory's rename no new version is visible; after it the new one is complete;
* a rerun of the same export completes, publishes exactly one new version and points ``LATEST`` at it;
* the rerun removes the killed run's leftovers (temporary directories, files) without touching published versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from test_bundle import index_cfg, trained
from test_retrain import TINY, logs  # noqa: F401 (logs: a fixture)

from recsys.bundle import BUNDLE_FILES, MANIFEST, Bundle, list_versions, read_latest
from recsys.core import schema
from recsys.publish import export

# The wrapper: wraps the publish's calls, then runs the CLI. ``after-file:NAME`` fires once NAME is complete in the
# temporary version directory (``.<version>.tmp-*``); the others fire on the renames of the version dir / LATEST.
HOOK = textwrap.dedent(r"""
    import os, shutil, signal, sys
    from pathlib import Path

    import numpy as np

    AT = os.environ["RECSYS_CRASH_AT"]
    FULL_DISK = os.environ.get("RECSYS_CRASH_MODE") == "enospc"  # the disk fills up there instead of a kill

    def die(where):
        if where == AT:
            if FULL_DISK:
                import errno

                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)
            os.kill(os.getpid(), signal.SIGKILL)

    def in_tmp_version(p):
        parent = Path(p).parent.name
        return parent.startswith(".") and ".tmp-" in parent

    def after_write(p):
        if in_tmp_version(p):
            die("after-file:" + Path(p).name)

    real_copyfile, real_save, real_replace, real_rename = shutil.copyfile, np.save, os.replace, os.rename

    def copyfile(src, dst, *a, **k):
        out = real_copyfile(src, dst, *a, **k)
        after_write(dst)
        return out

    def save(file, *a, **k):
        out = real_save(file, *a, **k)
        if isinstance(file, (str, os.PathLike)):
            after_write(file)
        return out

    def replace(src, dst, *a, **k):
        latest = Path(dst).name == "LATEST"
        if latest:
            die("before-latest")  # the new pointer is written + fsynced in its temp file, not yet renamed
        out = real_replace(src, dst, *a, **k)
        if latest:
            die("after-latest")
        else:
            after_write(dst)
        return out

    def rename(src, dst, *a, **k):
        version = ".tmp-" in Path(src).name and Path(src).is_dir()
        if version:
            die("before-rename")  # the temp dir is complete and fsynced
        out = real_rename(src, dst, *a, **k)
        if version:
            die("after-rename")
        elif ".deleting-" in Path(dst).name:
            die("mid-prune")  # an old version renamed for deletion, not yet deleted
        return out

    shutil.copyfile, np.save, os.replace, os.rename = copyfile, save, replace, rename

    from recsys.cli import main
    sys.exit(main(sys.argv[1:]))
""")

# Every file of the temporary version directory, in the order export writes them, then the directory moves.
FILE_POINTS = [f"after-file:{name}" for name in (*BUNDLE_FILES, MANIFEST)]
PUBLISH_POINTS = ["before-rename", "after-rename", "before-latest", "after-latest"]
POINTS = FILE_POINTS + PUBLISH_POINTS
BEFORE_VISIBLE = {*FILE_POINTS, "before-rename"}  # the new version is not visible yet at these points



@pytest.fixture(scope="module")
def source(tmp_path_factory) -> tuple[Path, Path]:
    """(training run, a models dir holding one published version) -- copied, never changed, by the tests."""
    _data, run = trained(tmp_path_factory)
    models = tmp_path_factory.mktemp("crash_models_src")
    export(run, models, index_cfg=index_cfg(), evaluate_split=None)
    return run, models


def export_args(run: Path, models: Path, *, keep: int) -> list[str]:
    return [
        "export",
        "--run",
        str(run),
        "--models",
        str(models),
        "--keep",
        str(keep),
        "--no-eval",
        "--set",
        "index.num_threads=1",
    ]


def run_export(run: Path, models: Path, *, keep: int, crash_at: str | None, full_disk: bool = False
               ) -> subprocess.CompletedProcess:
    return run_hooked(export_args(run, models, keep=keep), crash_at=crash_at, full_disk=full_disk)


def run_hooked(args: list[str], *, crash_at: str | None, full_disk: bool = False) -> subprocess.CompletedProcess:
    """``recsys ARGS`` in a subprocess through HOOK, killed (or out of disk) at ``crash_at``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "RECSYS_CRASH_AT": crash_at or "",
           "RECSYS_CRASH_MODE": "enospc" if full_disk else "kill"}
    return subprocess.run([sys.executable, "-c", HOOK, *args], env=env, capture_output=True, text=True, timeout=300)


def visible(models: Path) -> list[str]:
    """Non-hidden entries besides LATEST: what a reader listing the directory can take for a version."""
    return sorted(p.name for p in models.iterdir() if not p.name.startswith(".") and p.name != schema.LATEST)


def hidden(models: Path) -> list[str]:
    """Hidden entries but the locks and retrain's job directories: what a killed publish can leave behind."""
    return sorted(p.name for p in models.iterdir()
                  if p.name.startswith(".") and p.name not in (".lock", ".retrain", ".retrain.lock"))


def tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


def check_trustworthy(models: Path) -> None:
    """LATEST (if any) names a version that loads verified; every visible entry is a complete version."""
    names = visible(models)
    assert names == [v["version"] for v in list_versions(models)]  # nothing visible that is not a version
    for name in names:
        assert Bundle.load(models / name, verify=True).version == name
    latest = read_latest(models)
    if latest is not None:
        assert latest in names
        assert Bundle.load(models, verify=True).version == latest


def seeded(source: tuple[Path, Path], tmp_path: Path, *, with_old: bool) -> Path:
    models = tmp_path / "models"
    if with_old:
        shutil.copytree(source[1], models)
    else:
        models.mkdir()
    return models


def cases() -> list:
    """Every point over an old version; on a first publish (no LATEST yet) the first and last file + the moves."""
    first_publish = [FILE_POINTS[0], FILE_POINTS[-1], *PUBLISH_POINTS]
    out = []
    for with_old, points in ((True, POINTS), (False, first_publish)):
        for p in points:
            out.append(pytest.param(p, with_old, id=f"{p}-{'over-old-version' if with_old else 'first-publish'}"))
    return out


@pytest.mark.parametrize(("point", "with_old"), cases())
def test_export_killed_then_rerun(source, tmp_path, point, with_old):
    run, _ = source
    models = seeded(source, tmp_path, with_old=with_old)
    old_latest = read_latest(models)
    old = {name: tree_digest(models / name) for name in visible(models)}

    killed = run_export(run, models, keep=5, crash_at=point)
    assert killed.returncode == -signal.SIGKILL, f"the hook never fired at {point}:\n{killed.stderr[-3000:]}"

    # Right after the kill: nothing half-written is visible, LATEST is old or new but always complete.
    check_trustworthy(models)
    new = sorted(set(visible(models)) - set(old))
    if point in BEFORE_VISIBLE:
        assert new == [] and read_latest(models) == old_latest
        assert any(".tmp-" in n for n in hidden(models))  # the killed run's temp version dir is left over
    else:
        assert len(new) == 1
        assert read_latest(models) == (new[0] if point == "after-latest" else old_latest)
    if old_latest is None and point != "after-latest":
        assert not (models / schema.LATEST).exists()
    for name, digest in old.items():
        assert tree_digest(models / name) == digest

    # The same export again: completes, publishes exactly once, cleans up, leaves published versions alone.
    before_rerun = {name: tree_digest(models / name) for name in visible(models)}
    rerun = run_export(run, models, keep=5, crash_at=None)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    added = sorted(set(visible(models)) - set(before_rerun))
    assert len(added) == 1 and read_latest(models) == added[0]
    check_trustworthy(models)
    assert Bundle.load(models, verify=True).version == added[0]
    for name, digest in before_rerun.items():
        assert tree_digest(models / name) == digest
    assert [n for n in hidden(models) if (models / n).is_dir()] == []  # temp version dirs are gone
    assert hidden(models) == [], f"leftover files after the rerun: {hidden(models)}"  # e.g. `.LATEST.tmp-*` of a kill before LATEST moved


def test_export_killed_mid_prune_then_rerun(source, tmp_path):
    """keep=1: the old version is renamed aside for deletion when the kill comes; the next run deletes it."""
    run, _ = source
    models = seeded(source, tmp_path, with_old=True)
    (old_name,) = visible(models)

    killed = run_export(run, models, keep=1, crash_at="mid-prune")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    check_trustworthy(models)
    (new_name,) = visible(models)
    assert new_name != old_name and read_latest(models) == new_name
    assert any(".deleting-" in n for n in hidden(models))

    digest = tree_digest(models / new_name)
    rerun = run_export(run, models, keep=2, crash_at=None)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (added,) = sorted(set(visible(models)) - {new_name})
    assert read_latest(models) == added
    check_trustworthy(models)
    assert tree_digest(models / new_name) == digest
    assert hidden(models) == []


@pytest.mark.parametrize("point", [FILE_POINTS[0], FILE_POINTS[len(FILE_POINTS) // 2], "before-rename", "before-latest"])
def test_export_on_a_full_disk_fails_cleanly_then_rerun(source, tmp_path, point):
    """The disk fills up mid-publish (ENOSPC from the next write): the export fails with that error, nothing new is
    visible, LATEST and the published versions are untouched, no temporary file or directory is left; with space
    back, the same export publishes once."""
    run, _ = source
    models = seeded(source, tmp_path, with_old=True)
    old_latest = read_latest(models)
    old = {name: tree_digest(models / name) for name in visible(models)}

    failed = run_export(run, models, keep=5, crash_at=point, full_disk=True)
    assert failed.returncode not in (0, -signal.SIGKILL), failed.stderr[-3000:]
    assert "No space left on device" in failed.stderr, failed.stderr[-3000:]
    check_trustworthy(models)
    assert visible(models) == sorted(old) and read_latest(models) == old_latest
    for name, digest in old.items():
        assert tree_digest(models / name) == digest
    assert hidden(models) == [], f"a failed publish left {hidden(models)}"

    rerun = run_export(run, models, keep=5, crash_at=None)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (added,) = sorted(set(visible(models)) - set(old))
    assert read_latest(models) == added
    check_trustworthy(models)
    assert hidden(models) == []


# ------------------------------------------------------------------------------------------------------- retrain
# `recsys retrain` is a resumable job: killed while it publishes, the rerun finishes that publish (the version it
# finds exported from the job's run) rather than publishing a second copy.


def retrain_args(logs: dict[str, Path], models: Path) -> list[str]:  # noqa: F811 (the fixture)
    sets = [a for o in (*TINY, "index.num_threads=1") for a in ("--set", o)]
    return ["retrain", "--logs", str(logs["old"]), "--models", str(models), "--items", str(logs["items"]),
            "--users", str(logs["users"]), *sets]


@pytest.fixture(scope="module")
def retrain_source(logs, tmp_path_factory) -> Path:  # noqa: F811
    """A models dir (no version yet) holding a retrain job killed after its first bundle file: prepared, trained,
    gated, the version half-written. Copied, never changed, by the tests; each copy resumes straight into export."""
    models = tmp_path_factory.mktemp("retrain_crash_src") / "models"
    killed = run_hooked(retrain_args(logs, models), crash_at=FILE_POINTS[0])
    assert killed.returncode == -signal.SIGKILL, f"the hook never fired:\n{killed.stderr[-3000:]}"
    (job,) = (models / ".retrain").iterdir()
    stages = json.loads((job / "state.json").read_text())["stages"]
    assert {"prepare", "train", "gate"} <= set(stages) and "publish" not in stages
    check_trustworthy(models)
    assert visible(models) == [] and read_latest(models) is None
    return models


@pytest.mark.parametrize("point", ["before-rename", "after-rename", "before-latest", "after-latest"])
def test_retrain_killed_while_publishing_then_rerun_publishes_once(logs, retrain_source, tmp_path, point):  # noqa: F811
    models = tmp_path / "models"
    shutil.copytree(retrain_source, models, symlinks=True)
    args = retrain_args(logs, models)

    killed = run_hooked(args, crash_at=point)
    assert killed.returncode == -signal.SIGKILL, f"the hook never fired at {point}:\n{killed.stderr[-3000:]}"
    check_trustworthy(models)
    after_kill = visible(models)
    assert len(after_kill) == (0 if point in BEFORE_VISIBLE else 1)
    assert read_latest(models) == (after_kill[0] if point == "after-latest" else None)
    kept = {name: tree_digest(models / name) for name in after_kill}

    rerun = run_hooked(args, crash_at=None)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    (version,) = visible(models)  # published once over the killed run and its rerun
    if after_kill:
        assert version == after_kill[0] and tree_digest(models / version) == kept[version]  # finished, not redone
    assert read_latest(models) == version
    check_trustworthy(models)
    assert hidden(models) == [], f"leftovers after the rerun: {hidden(models)}"
    (job,) = (models / ".retrain").iterdir()
    assert json.loads((job / "report.json").read_text())["published"] == version
    assert json.loads((job / "state.json").read_text())["stages"]["publish"]["version"] == version

    if point == "after-latest":  # the finished job again: nothing to do
        again = run_hooked(args, crash_at=None)
        assert again.returncode == 0, again.stderr[-3000:]
        assert visible(models) == [version] and read_latest(models) == version
