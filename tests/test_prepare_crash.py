"""`recsys prepare` killed mid-run or out of disk: the output directory is absent or complete, never half-written.

Each run is a subprocess through a ``-c`` wrapper that wraps the calls the output writing makes
(``polars.DataFrame.write_parquet`` for the output files, ``os.rename`` / ``recsys.core.io._rename_exchange`` for the
directory moves) and SIGKILLs its own process -- or raises ENOSPC -- at the point named by ``RECSYS_CRASH_AT``; a real
disk limit comes from ``RLIMIT_FSIZE``. Afterwards ``--out`` is absent (or the previous complete output when
overwriting), a failure's error names ``--out``, and a rerun completes and removes the dead run's leftovers.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from recsys.cli import main

HOOK = textwrap.dedent(r"""
    import errno, os, signal, sys
    from pathlib import Path

    import polars as pl
    import recsys.core.io

    AT = os.environ["RECSYS_CRASH_AT"]
    FULL_DISK = os.environ.get("RECSYS_CRASH_MODE") == "enospc"

    def die(where):
        if where == AT:
            if FULL_DISK:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), where)
            os.kill(os.getpid(), signal.SIGKILL)

    real_write, real_rename, real_exchange = pl.DataFrame.write_parquet, os.rename, recsys.core.io._rename_exchange

    def write_parquet(self, file, *a, **k):
        die("before-file:" + Path(file).name)
        out = real_write(self, file, *a, **k)
        die("after-file:" + Path(file).name)
        return out

    def publishing(src):
        return ".tmp-" in Path(src).name and Path(src).is_dir()

    def rename(src, dst, *a, **k):
        if publishing(src):
            die("before-publish")
        out = real_rename(src, dst, *a, **k)
        if ".old-" in Path(dst).name:
            die("mid-swap")  # the previous output moved aside, the new one not yet in place
        return out

    def exchange(a, b):
        if os.environ.get("RECSYS_NO_EXCHANGE"):
            return False  # as on a filesystem without renameat2(RENAME_EXCHANGE)
        die("before-publish")
        return real_exchange(a, b)

    pl.DataFrame.write_parquet, os.rename, recsys.core.io._rename_exchange = write_parquet, rename, exchange

    from recsys.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> Path:
    from recsys.prepare.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("prepare_crash_logs")
    generate(root / "synth", config=SynthConfig(events=20000, users=500, items=200))
    return root / "synth"


def args(logs: Path, out: Path, *extra: str) -> list[str]:
    return ["prepare", "--logs", str(logs / "logs"), "--items", str(logs / "items.parquet"), "--out", str(out),
            *extra]


def digest(out: Path) -> dict[str, str]:
    """The output files (not the manifest: it holds timings)."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())
            if p.name != "manifest.json"}


def complete(out: Path) -> bool:
    return (out / "manifest.json").is_file() and (out / "train.parquet").is_file()


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


def run_hooked(argv: list[str], at: str, *, mode: str = "kill", no_exchange: bool = False,
               preexec_fn=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RECSYS_CRASH_AT": at, "RECSYS_CRASH_MODE": mode}
    if no_exchange:
        env["RECSYS_NO_EXCHANGE"] = "1"
    return subprocess.run([sys.executable, "-c", HOOK, *argv], env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=preexec_fn)


@pytest.fixture(scope="module")
def reference(logs, tmp_path_factory) -> dict[str, dict[str, str]]:
    """Digests of a clean run with the default split and with ``--split last_n`` (the 'previous' output)."""
    root = tmp_path_factory.mktemp("prepare_crash_ref")
    assert main(args(logs, root / "new")) == 0
    assert main(args(logs, root / "old", "--split", "last_n")) == 0
    return {"new": digest(root / "new"), "old": digest(root / "old")}


KILL_POINTS = ["after-file:train.parquet", "after-file:feature_vocab.parquet", "before-publish"]


@pytest.mark.parametrize("at", KILL_POINTS)
def test_killed_fresh_run_leaves_no_output(logs, reference, tmp_path, at):
    out = tmp_path / "out"
    r = run_hooked(args(logs, out), at)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not out.exists()
    assert leftovers(out), "the kill should have left the temp dir behind"
    assert main(args(logs, out)) == 0  # a rerun needs no --overwrite: nothing was published
    assert digest(out) == reference["new"] and complete(out)
    assert leftovers(out) == []


@pytest.mark.parametrize("at", ["after-file:train.parquet", "before-publish"])
def test_killed_overwrite_keeps_previous_output(logs, reference, tmp_path, at):
    out = tmp_path / "out"
    assert main(args(logs, out, "--split", "last_n")) == 0
    r = run_hooked(args(logs, out, "--overwrite"), at)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert digest(out) == reference["old"] and complete(out)
    assert main(args(logs, out, "--overwrite")) == 0
    assert digest(out) == reference["new"] and complete(out)
    assert leftovers(out) == []


def test_killed_mid_swap_without_exchange_restores_previous_output(logs, reference, tmp_path):
    """Without an atomic swap the old output is moved aside first: killed then, the next run puts it back."""
    out = tmp_path / "out"
    assert main(args(logs, out, "--split", "last_n")) == 0
    r = run_hooked(args(logs, out, "--overwrite"), "mid-swap", no_exchange=True)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert not out.exists()  # absent for that instant, never a mix
    # the next run first restores the previous (complete) output: without --overwrite it is then refused
    assert main(args(logs, out)) == 2
    assert digest(out) == reference["old"]
    assert main(args(logs, out, "--overwrite")) == 0
    assert digest(out) == reference["new"] and leftovers(out) == []


def test_enospc_while_writing_names_out_and_rerun_completes(logs, reference, tmp_path):
    out = tmp_path / "out"
    r = run_hooked(args(logs, out), "before-file:items.parquet", mode="enospc")
    assert r.returncode == 1
    assert "No space left on device" in r.stderr and str(out) in r.stderr, r.stderr[-2000:]
    # one line for the operator (the machine, not a bug): no traceback
    (line,) = [ln for ln in r.stderr.splitlines() if "No space left on device" in ln]
    assert line.startswith("recsys prepare: error: ") and str(out) in line and "Traceback" not in r.stderr
    assert not out.exists() and leftovers(out) == []  # the failed run removed its own temp dir
    assert main(args(logs, out)) == 0
    assert digest(out) == reference["new"]


def _small_disk() -> None:
    # the kernel's "disk full" for this process: writes past 64 KiB fail with EFBIG (SIGXFSZ ignored so the
    # write returns the error instead of killing the process)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def test_file_size_limit_on_overwrite_keeps_previous_output(logs, reference, tmp_path):
    out = tmp_path / "out"
    assert main(args(logs, out, "--split", "last_n")) == 0
    r = run_hooked(args(logs, out, "--overwrite"), "nowhere", preexec_fn=_small_disk)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "File too large" in r.stderr and str(out) in r.stderr, r.stderr[-2000:]
    assert "cannot read" not in r.stderr  # a full disk is not blamed on the input file
    assert digest(out) == reference["old"] and leftovers(out) == []
    assert main(args(logs, out, "--overwrite")) == 0
    assert digest(out) == reference["new"]
