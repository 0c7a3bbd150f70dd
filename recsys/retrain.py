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

The candidate is fit without the newest slice (``train.final_fit = "train_valid"``: the slice must be unseen to
judge it). What is published when the gate passes is a refit on every split, the newest slice included, for the
epoch count the candidate's validation chose, from the same warm start and seed (``train.final_fit = "all"``, the
default; ``"train_valid"`` publishes the gated candidate itself). A refit rather than continued training on the
slice: it is the model ``recsys train`` would publish from the same logs, the gated candidate and the published
model differ only by the newest slice, and a few epochs on the slice alone would over-weight it and restart the
learning-rate schedule on 10% of the data.
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
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from recsys import bundle as bundle_mod
from recsys import publish
from recsys.bundle import embed_items, embed_users, read_latest
from recsys.core import schema
from recsys.core.config import load_section, parse_overrides, read_toml, to_dict
from recsys.core.io import atomic_write_json
from recsys.core.metrics import ranking_metrics
from recsys.core.vocab import Vocab
from recsys.retrieval import ExactIndex, IndexConfig, retrieve

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
    """Share of the newest events of the new logs held out (a global time split) as the gate's test slice; the
    same share before it is the validation slice used for early stopping."""
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


# What a batch retrain trains with unless the config file or an override names the field: the score's time prior
# (model.time_prior), chosen on the global-time slices retrain always validates on. Measured on the future after one
# global cut (benchmarks/future_bench.py --cut global, README "Results"): MovieLens-100K 0.2162 / 0.2406 R/N@20 with
# it against 0.1460 / 0.1925 without (3 seeds); synthetic logs 0.2233 / 0.1661 against 0.2003 / 0.1372. It stays off
# for `recsys train`, whose default per-user split it does not suit (per-user cut: 0.93x / 0.95x of the defaults).
RETRAIN_DEFAULTS = ("model.time_prior=true",)


def with_retrain_defaults(config_path: str | Path | None, overrides: Sequence[str]) -> list[str]:
    """``overrides`` preceded by each of :data:`RETRAIN_DEFAULTS` whose field neither the config file nor
    ``overrides`` sets (so an explicit ``model.time_prior = false`` wins)."""
    file_layer, given = read_toml(config_path), parse_overrides(overrides)
    defaults = []
    for d in RETRAIN_DEFAULTS:
        section, field = d.split("=", 1)[0].split(".", 1)
        if field not in file_layer.get(section, {}) and field not in given.get(section, {}):
            defaults.append(d)
    return [*defaults, *overrides]


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

    def mark(self, stage: str, **info: Any) -> dict[str, Any]:
        self.data["stages"][stage] = {"finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **info}
        atomic_write_json(self.path, self.data)
        return self.data["stages"][stage]


def config_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


# ---------------------------------------------------------------------------------------------------------------
# the gate: one retrieval path for the candidate and the serving model, scored by external IDs


class _Retriever:
    """A model + the vocabularies it was trained with: embeds users and retrieves items by external ID."""

    def __init__(self, model_dir: Path, vocab_dir: Path):
        from recsys.train.model import TwoTower  # torch: only a retrain run needs it

        self.model = TwoTower.from_run(model_dir)
        self.items = Vocab.from_parquet(vocab_dir / schema.ITEMS, schema.ITEM_ID)
        self.users = Vocab.from_parquet(vocab_dir / schema.USERS, schema.USER_ID)
        self.index = ExactIndex(embed_items(self.model, len(self.items)))

    def _known_rows(self, ids: list[str]):
        rows = self.items.numbers(ids)  # -1 = an item this model does not know
        return rows[rows >= 0]

    def recommend(self, users: list[str], histories: list[list[str]], seen: list[list[str]], k: int):
        """Top-k external item IDs per user [n, k] (None = padding), seen items excluded."""
        q = embed_users(self.model, self.users.numbers(users), [self._known_rows(h) for h in histories],
                        max_history=int(self.model.cfg.history_len))
        ids, _ = retrieve(self.index, q, k, exclude=[self._known_rows(s) for s in seen])
        return [[self.items.id(j) if j >= 0 else None for j in row] for row in ids.tolist()]


def _gate_users(data_dir: Path, *, split: str, max_users: int, seed: int):
    """Test users of ``split`` with their serving history, seen items and truth, all as external IDs."""
    if pq.read_metadata(data_dir / schema.SPLITS[split]).num_rows == 0:
        raise ValueError(f"the gate's slice {str(data_dir / schema.SPLITS[split])!r} holds no interactions: the new "
                         f"logs are too few or too short for `retrain.newest_fraction`")

    items = pq.read_table(data_dir / schema.ITEMS, columns=[schema.ITEM_ID]).column(schema.ITEM_ID).to_pylist()
    users = pq.read_table(data_dir / schema.USERS, columns=[schema.USER_ID]).column(schema.USER_ID).to_pylist()
    t = pq.read_table(data_dir / schema.SPLITS[split], columns=[schema.USER_IDX, schema.ITEM_IDX]).to_pydict()
    truth: dict[int, set[int]] = {}
    for u, i in zip(t[schema.USER_IDX], t[schema.ITEM_IDX], strict=True):
        truth.setdefault(u, set()).add(i)
    rows = np.asarray(sorted(truth), dtype=np.int64)
    if max_users and len(rows) > max_users:
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=max_users, replace=False))

    def lists(name: str) -> dict[int, list[int]]:
        d = pq.read_table(data_dir / name).to_pydict()
        return dict(zip(d[schema.USER_IDX], d["items"], strict=True))

    hist, seen = lists(schema.HISTORY), lists(schema.SEEN)
    sel = rows.tolist()
    return (
        [users[u] for u in sel],
        [[items[i] for i in hist.get(u, [])] for u in sel],
        [[items[i] for i in seen.get(u, [])] for u in sel],
        [sorted(items[i] for i in truth[u]) for u in sel],
        items,
    )


def gate_metrics(retriever: _Retriever, users, histories, seen, truth, item_vocab, *, k: int) -> dict[str, float]:
    """Recall@k / NDCG@k / HitRate@k of one retriever, recommendations and truth compared by external ID."""
    vocab = Vocab(item_vocab, name=schema.ITEM_ID)
    recs: list[list[str | None]] = []
    for s in range(0, len(users), 2048):
        recs += retriever.recommend(users[s:s + 2048], histories[s:s + 2048], seen[s:s + 2048], k)
    # items the new data does not know can never be relevant: code -2 (never equal to a truth code, not padding)
    topk = np.asarray([[-1 if x is None else (-2 if (r := vocab.number(x)) is None else r) for x in row]
                       for row in recs], dtype=np.int64)
    relevant = [vocab.numbers(t, missing="error") for t in truth]
    m = ranking_metrics(topk, relevant, ks=(k,))
    return {key: float(v) for key, v in m.items() if key.endswith(f"@{k}")}


def run_gate(candidate_run: Path, serving_dir: Path | None, data_dir: Path, *, cfg: RetrainConfig) -> dict[str, Any]:
    """Score candidate and serving model on the newest slice (``test`` split of ``data_dir``); decide."""
    users, histories, seen, truth, vocab = _gate_users(data_dir, split="test", max_users=cfg.max_eval_users, seed=0)
    metric = f"recall@{cfg.k}"
    report: dict[str, Any] = {"metric": metric, "tolerance": cfg.tolerance, "n_users": len(users)}
    cand = gate_metrics(_Retriever(candidate_run, data_dir), users, histories, seen, truth, vocab, k=cfg.k)
    report["candidate"] = cand
    if serving_dir is None:
        report.update(serving=None, passed=True, reason="no serving model: the first version is published")
        return report
    serv = gate_metrics(_Retriever(serving_dir, serving_dir), users, histories, seen, truth, vocab, k=cfg.k)
    report["serving"] = serv
    report["serving_version"] = serving_dir.name
    drop = serv[metric] - cand[metric]
    report["drop"] = drop
    report["passed"] = bool(drop <= cfg.tolerance)
    report["reason"] = (
        f"candidate {metric}={cand[metric]:.4f} vs serving {serv[metric]:.4f} (drop {drop:+.4f}, "
        f"tolerance {cfg.tolerance})"
    )
    return report


# ---------------------------------------------------------------------------------------------------------------
# the job


# ~95 lines: the job's stages in order (prepare, train, gate, final fit, publish), each recorded in state.json so a
# rerun resumes; the stages themselves are the functions it calls.
def retrain(
    logs: Sequence[str | Path],
    models_dir: str | Path,
    *,
    items: str | Path | None = None,
    users: str | Path | None = None,
    config_path: str | Path | None = None,
    overrides: Sequence[str] = (),
) -> dict[str, Any]:
    """Prepare -> train -> gate -> publish, resumably, under the models directory's retrain lock.

    Returns the job report (also written to ``MODELS_DIR/.retrain/<job>/report.json``): the gate's numbers, whether
    a version was published and which.
    """
    from recsys.prepare import PrepareConfig, expand_inputs, prepare  # polars: only a retrain run needs it
    from recsys.train.loop import load_configs, train  # torch: only a retrain run needs it

    models_dir = Path(models_dir)
    cfg = load_section(RetrainConfig, "retrain", path=config_path, overrides=overrides)
    prep_over = [o for o in overrides if o.startswith("prepare.")]
    prep_cfg = load_section(PrepareConfig, "prepare", path=config_path, overrides=prep_over)
    # the gate's slice is the newest events of the new logs: a global time split at event-time quantiles
    prep_cfg = dataclasses.replace(prep_cfg, split="global_time", valid_start="", test_start="",
                                   valid_frac=cfg.newest_fraction, test_frac=cfg.newest_fraction)
    train_over = with_retrain_defaults(config_path, [o for o in overrides if o.split(".")[0] in ("model", "train", "loss")])
    model_cfg, train_cfg, loss_cfg = load_configs(config_path, train_over)
    index_cfg = load_section(IndexConfig, "index", path=config_path, overrides=[o for o in overrides if o.startswith("index.")])

    files = expand_inputs(logs)
    extra = [Path(p) for p in (items, users) if p is not None]
    resolved = {"retrain": to_dict(cfg), "prepare": to_dict(prep_cfg), "model": to_dict(model_cfg),
                "train": to_dict(train_cfg), "loss": to_dict(loss_cfg), "index": to_dict(index_cfg)}

    with retrain_lock(models_dir):
        job = fingerprint_inputs(files + extra, resolved)
        job_dir = models_dir / JOBS_DIR / job
        job_dir.mkdir(parents=True, exist_ok=True)
        state = JobState(job_dir / "state.json")
        log.info("retrain job %s in %s", job, job_dir)
        t0 = time.perf_counter()

        published = state.done("publish")
        if published:
            log.info("job %s already published version %s; nothing to do", job, published["version"])
            return json.loads((job_dir / "report.json").read_text())

        data_dir = job_dir / "prepared"
        if not state.done("prepare"):
            prepare(files, data_dir, items=items, users=users, config=prep_cfg, overwrite=True)
            state.mark("prepare", data_dir=str(data_dir))

        serving_dir = _serving_dir(models_dir)
        run_dir = job_dir / "run"
        warm_from = serving_dir if cfg.warm_start else None
        # the gated candidate never sees the newest slice
        cand_cfg = dataclasses.replace(train_cfg, final_fit="train_valid")
        if not state.done("train"):
            summary = _train_stage(train, data_dir, run_dir, warm_from, model_cfg=model_cfg, train_cfg=cand_cfg,
                                   loss_cfg=loss_cfg, device=cfg.device)
            state.mark("train", run_dir=str(run_dir), warm_start=str(warm_from) if warm_from else None,
                       best=summary.get("best_metrics"), final_fit=summary.get("final_fit"))

        gate = state.done("gate")
        if not gate:
            gate = run_gate(run_dir, serving_dir, data_dir, cfg=cfg)
            state.mark("gate", **gate)
        report: dict[str, Any] = {"job": job, "job_dir": str(job_dir), "gate": gate, "published": None,
                                  "candidate": {"run_dir": str(run_dir), "trained_on": state.done("train").get(
                                      "final_fit")}}
        publish_dir = run_dir
        if gate["passed"] and train_cfg.refit and train_cfg.final_fit == "all":
            publish_dir = job_dir / "run_final"
            final = state.done("final_fit")
            if not final:
                summary = _train_stage(train, data_dir, publish_dir, warm_from, model_cfg=model_cfg,
                                       train_cfg=train_cfg, loss_cfg=loss_cfg, device=cfg.device,
                                       final_fit_epochs=_chosen_epochs(run_dir))
                final = state.mark("final_fit", run_dir=str(publish_dir), trained_on=summary.get("final_fit"))
            report["published_fit"] = {"run_dir": str(publish_dir), "trained_on": final.get("trained_on"),
                                       "why": "refit on every split, the gate's slice included, for the epochs the "
                                              "candidate chose"}
        if gate["passed"]:
            # A job killed after its version became visible (or after LATEST moved) but before it noted the
            # publish: finish that publish instead of publishing a second copy.
            adopted = _finish_publish(models_dir, publish_dir, keep=cfg.keep)
            version_dir = adopted or publish.export(publish_dir, models_dir, data_dir=data_dir,
                                                       index_cfg=index_cfg, keep=cfg.keep)
            report["published"] = version_dir.name
            atomic_write_json(job_dir / "report.json", report)
            state.mark("publish", version=version_dir.name)
            log.info("published %s: %s", version_dir.name, gate["reason"])
        else:
            atomic_write_json(job_dir / "report.json", report)
            log.warning("candidate rejected, %s keeps serving: %s", gate.get("serving_version"), gate["reason"])
        report["seconds"] = round(time.perf_counter() - t0, 2)
        return report


def _chosen_epochs(run_dir: Path) -> int:
    """The epoch count a finished run's validation chose (its refit's length, or its best epoch without one)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    return max(1, int(summary.get("refit_epochs") or summary.get("best_epoch") or 1))


def _train_stage(train: Any, data_dir: Path, run_dir: Path, warm_from: Path | None, **kw: Any) -> dict[str, Any]:
    """One training run of the job, resumed from its checkpoint after a crash, warm-started otherwise."""
    resume = (run_dir / "checkpoint" / "state.json").exists()
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # a crash before the first checkpoint: start the run over
    return train(data_dir, run_dir, resume=resume, init_from=None if resume else warm_from, **kw)


def _finish_publish(models_dir: Path, run_dir: Path, *, keep: int) -> Path | None:
    """The published version exported from ``run_dir`` (its manifest's ``run.path``), if a killed run of this job
    got that far: ``LATEST`` is moved to it unless it already names it or a newer version, and the killed run's
    leftovers are removed (``bundle.prune``). None when no published version came from ``run_dir``."""
    run_path = str(run_dir.resolve())
    versions = bundle_mod.list_versions(models_dir)  # oldest first
    mine = [i for i, v in enumerate(versions) if v.get("run_path") == run_path]
    if not mine:
        return None
    at = mine[-1]
    version = versions[at]["version"]
    latest = [i for i, v in enumerate(versions) if v["latest"]]
    if not latest or latest[0] < at:
        publish.set_latest(models_dir, version, verify=True)
    bundle_mod.prune(models_dir, keep=keep)
    log.info("found version %s already published by this job (a run killed before it noted it); LATEST -> %s",
             version, bundle_mod.read_latest(models_dir))
    return models_dir / version


def _serving_dir(models_dir: Path) -> Path | None:
    version = read_latest(models_dir)
    return None if version is None else models_dir / version

