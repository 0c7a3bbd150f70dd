"""Batch retraining with a quality gate: prepare -> train (warm start) -> gate -> export/publish.

``retrain(logs, models_dir, ...)`` is one resumable job. Every stage writes its output atomically into a job
directory keyed by a fingerprint of the inputs and the config (``MODELS_DIR/.retrain/<job>/``), and records its
completion in ``state.json``; a rerun after a crash skips the finished stages (training resumes from its last
checkpoint) and publishes at most once. A lock file (``MODELS_DIR/.retrain.lock``, ``flock``) keeps two retrains
from racing on the same models directory.

The gate compares the candidate with the serving model (``LATEST``) on the newest time slice of the new logs,
both retrieving through the same path (users embedded from their history in the new data, exact search, seen items
excluded, scored by external IDs, so the two vocabularies need not match), and publishes only when
``recall_candidate >= recall_serving - tolerance``. The gate report is written either way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.io import atomic_write_json

log = logging.getLogger(__name__)

LOCK_FILE = ".retrain.lock"
JOBS_DIR = ".retrain"


class RetrainLocked(RuntimeError):
    """Another retrain holds the lock on this models directory."""


@dataclass(frozen=True)
class RetrainConfig:
    """Section ``[retrain]``."""

    k: int = 20
    """Cutoff of the gate metric, Recall@k on the newest time slice."""
    tolerance: float = 0.005
    """Largest allowed absolute drop in Recall@k of the candidate against the serving model."""
    newest_fraction: float = 0.1
    """Fraction of the time range of the new logs held out (globally, by time) as the gate's test slice."""
    keep: int = 5
    """Number of published versions kept in the models directory."""
    warm_start: bool = True
    """Initialise the candidate from the serving model where the vocabularies overlap (new IDs start fresh)."""
    max_eval_users: int = 20000
    """Evaluate the gate on at most this many test users (a deterministic sample), for bounded time."""
    device: str = "auto"
    """Training device: auto | cpu | cuda."""

    def validate(self) -> None:
        if self.k < 1:
            raise ValueError(f"`retrain.k` must be >= 1, got {self.k}")
        if not 0.0 < self.newest_fraction < 1.0:
            raise ValueError(f"`retrain.newest_fraction` must be in (0, 1), got {self.newest_fraction}")
        if self.tolerance < 0:
            raise ValueError(f"`retrain.tolerance` must be >= 0, got {self.tolerance}")
        if self.keep < 1:
            raise ValueError(f"`retrain.keep` must be >= 1, got {self.keep}")


@contextlib.contextmanager
def retrain_lock(models_dir: str | Path) -> Iterator[Path]:
    """Hold an exclusive, non-blocking ``flock`` on ``MODELS_DIR/.retrain.lock`` (released by the OS on a crash)."""
    models_dir = Path(models_dir)
    models_dir.mkdir(parents=True, exist_ok=True)
    path = models_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise RetrainLocked(f"another retrain holds {str(path)!r} (pid {holder}); try again later") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


def fingerprint_inputs(paths: Sequence[Path], config: dict[str, Any]) -> str:
    """A short key of the input files (path, size, mtime) and the resolved config: the job's identity."""
    h = hashlib.sha256()
    for p in sorted(paths):
        st = p.stat()
        h.update(f"{p.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


class JobState:
    """``state.json`` of one retrain job: which stages are done and what they produced."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {"stages": {}}

    def done(self, stage: str) -> dict[str, Any] | None:
        return self.data["stages"].get(stage)

    def mark(self, stage: str, **info: Any) -> None:
        self.data["stages"][stage] = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
        atomic_write_json(self.path, self.data)


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
