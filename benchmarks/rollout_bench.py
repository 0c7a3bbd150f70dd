"""Rollout benchmark: two ``recsys serve`` replicas under load while LATEST flips and each replica restarts.

    python benchmarks/rollout_bench.py              # ~30 s of load (+ ~25 s to build two versions once)
    python benchmarks/rollout_bench.py --duration 12 --flips 4 --flip-every 1.5 --restart-s 3    # quicker

1. Builds (once, cached in --workdir) two real published versions of one small synthetic dataset with the CLI:
   ``recsys synth`` -> ``recsys prepare`` -> ``recsys train`` (2 epochs) twice with different seeds ->
   ``recsys export --version v1`` / ``v2``; LATEST is pointed back at v1 before the servers start.
2. Starts replicas A and B (``recsys serve --poll-s 0.25``, two processes, two ports) and drives them with one
   :class:`recsys.client.RecommenderClient` given both addresses (round_robin, retries on UNAVAILABLE/CANCELLED),
   ``--callers`` threads of known-user ``Recommend(k)``, through four phases, in this order:

   * ``steady``: nothing happens.
   * ``flips``: ``recsys.bundle.rollback`` points LATEST at the other version ``--flips`` times, every
     ``--flip-every`` s; the replicas hot-reload on their own poll.
   * ``sigterm-restart``: A gets SIGTERM (it drains: health NOT_SERVING, in-flight calls finish, exit 0); once it
     has exited it is started again on the same port (a rolling update).
   * ``sigkill-restart``: B is killed with SIGKILL (a node loss) and started again on the same port.

   Each phase starts with a mark and ``LEAD_S`` of quiet before its event, so a call in flight when the event
   lands started inside the phase. A restart phase lasts ``--restart-s`` at least, and ``SETTLE_S`` past the
   moment the replica answers health SERVING again; the last phase runs until ``--duration``.
3. Checks, over every call: the failed share (<= 0.1%), failures attributable to the SIGTERM restart (calls whose
   [start, end] overlaps that phase: 0), ``k`` items in every answer, answers from both versions, and that no
   caller's version goes back unless LATEST went back (:func:`check_versions`).

The version rule. The timeline records every LATEST write as (``before``, ``after``, version): the monotonic times
just before ``rollback`` was called and just after it returned (the atomic rename lies in between). Epoch ``j``
(version ``V_j``; epoch 0 is the version the servers started with) can be served from ``before_j`` on -- a replica
only swaps after reading LATEST -- and until ``after_{j+1} + lag`` at most, ``lag = poll_s + reload_s``: a replica
notices the change on its next poll and then loads, verifies and warms the bundle before swapping. Within that
window the two replicas may well disagree (one has swapped, the other has not yet), so a caller going round-robin
may see old, new, old, new: that is allowed. An answer is *explained* when its version is ``V_j`` of some epoch
whose window overlaps the call's [start, end]. A caller's version *goes back* when it switches (from its previous
answer) to a version that is not explained: e.g. v1 -> v2 -> v1 with LATEST = v2 for longer than ``lag`` before
the last call. When LATEST itself went back to v1, the v1 epoch explains it. An unexplained answer that repeats
the previous version is counted as *stale* (a replica that kept an old model past ``lag``). The replicas' own logs
("serving model version ...") give the measured reload lag of every flip, reported next to the ``lag`` bound.

Prints failures by status code and by phase and a per-phase table; writes benchmarks/results/rollout_bench.json.
Client and servers share the machine's cores (and, on a shared machine, other people's processes).
"""

from __future__ import annotations

import argparse
import calendar
import collections
import json
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve_bench import free_port, start, wait_serving  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "rollout_bench.json"
PHASES = ("steady", "flips", "sigterm-restart", "sigkill-restart")
LEAD_S = 0.25  # quiet time between a phase's mark and its event: longer than any normal call
SETTLE_S = 0.5  # a restart phase lasts at least this long after the replica serves again
SWAP_MSG = "serving model version "  # server/store.py's log line of a swap


# ------------------------------------------------------------------------------------------------ the version rule


class Call(NamedTuple):
    """One Recommend call of one caller; times in seconds since the load started (monotonic)."""

    start: float
    end: float
    code: str  # "OK" or the grpc.StatusCode name
    version: str  # model_version of the answer ("" when it failed)
    n_items: int


@dataclass(frozen=True)
class Flip:
    """One LATEST write: it happened between ``before`` and ``after`` (seconds since the load started)."""

    before: float
    after: float
    version: str


def epoch_windows(initial: str, flips: Sequence[Flip], *, lag_s: float) -> list[tuple[float, float, str]]:
    """[(from, until, version)] per LATEST epoch: when a replica may serve it (see the module docstring)."""
    starts = [(-np.inf, -np.inf, initial), *((f.before, f.after, f.version) for f in flips)]
    out = []
    for j, (before, _after, version) in enumerate(starts):
        until = starts[j + 1][1] + lag_s if j + 1 < len(starts) else np.inf
        out.append((before, until, version))
    return out


def check_versions(calls: Sequence[Call], initial: str, flips: Sequence[Flip], *, lag_s: float) -> dict:
    """Judge one caller's answers (in the order it made them) against the LATEST timeline.

    Returns ``{"went_back": [...], "stale": [...]}``, each a list of ``{"t", "from", "to"}`` of answers no LATEST
    epoch explains: ``went_back`` when the version changed from the caller's previous answer, ``stale`` when it
    did not. Failed calls are skipped.
    """
    windows = epoch_windows(initial, flips, lag_s=lag_s)
    went_back, stale = [], []
    previous = ""
    for c in calls:
        if c.code != "OK":
            continue
        explained = any(v == c.version and lo <= c.end and c.start <= hi for lo, hi, v in windows)
        if not explained:
            row = {"t": round(c.start, 3), "from": previous, "to": c.version}
            (went_back if previous and c.version != previous else stale).append(row)
        previous = c.version
    return {"went_back": went_back, "stale": stale}


# ------------------------------------------------------------------------------------------------ versions


def _run(cmd: list[str], log: Path) -> None:
    with open(log, "ab") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[2:5])} ... failed ({proc.returncode}); see {log}")


def build_versions(workdir: Path, *, events: int, users: int, items: int, epochs: int) -> tuple[Path, list[str]]:
    """Two real published versions, v1 and v2 (same data, training seeds 1 and 2), LATEST = v1; cached by size.

    Returns (models dir, ["v1", "v2"]).
    """
    from recsys.bundle import Bundle
    from recsys.publish import set_latest

    key = workdir / f"events{events}-users{users}-items{items}-epochs{epochs}"
    models, versions = key / "models", ["v1", "v2"]
    try:
        for v in versions:
            Bundle.load(models / v, verify=True)
        set_latest(models, versions[0])
        return models, versions
    except Exception as e:  # anything missing or refused: rebuild
        print(f"building two versions in {key} ({type(e).__name__}: {e})", flush=True)
    key.mkdir(parents=True, exist_ok=True)
    log = key / "build.log"
    cli = [sys.executable, "-m", "recsys"]
    t = time.perf_counter()
    _run([*cli, "synth", "--out", str(key / "synth"), "--events", str(events), "--users", str(users),
          "--items", str(items), "--overwrite"], log)
    _run([*cli, "prepare", "--logs", str(key / "synth" / "logs"), "--items", str(key / "synth" / "items.parquet"),
          "--out", str(key / "data"), "--overwrite"], log)
    for seed, version in enumerate(versions, start=1):
        run = key / f"run-{version}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        _run([*cli, "train", "--data", str(key / "data"), "--out", str(run), "--device", "cpu",
              "--set", f"train.epochs={epochs}", "--set", f"train.seed={seed}", "--set", "model.dim=32",
              "--set", "train.progress=false"], log)
        _run([*cli, "export", "--run", str(run), "--models", str(models), "--version", version, "--no-eval"], log)
    set_latest(models, versions[0])
    print(f"two versions built in {time.perf_counter() - t:.0f}s: {models}", flush=True)
    return models, versions


# ------------------------------------------------------------------------------------------------ replicas


@dataclass
class Replica:
    """One ``recsys serve`` process on a fixed port; each start logs (JSON) to ``logs/NAME-<n>.log``."""

    name: str
    models: Path
    port: int
    logs: Path
    poll_s: float
    grace_s: float
    metrics_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None
    log_files: list[Path] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = self.logs / f"{self.name}-{len(self.log_files)}.log"
        self.log_files.append(log)
        cmd = [sys.executable, "-m", "recsys", "serve", "--models", str(self.models), "--host", "127.0.0.1",
               "--port", str(self.port), "--poll-s", str(self.poll_s), "--grace-s", str(self.grace_s),
               "--metrics-port", str(self.metrics_port)]
        self.proc = start(cmd, log)

    def wait_serving(self, *, timeout: float = 120.0) -> None:
        """Until health says SERVING (the model is loaded); raises at once if the process died."""
        assert self.proc is not None
        wait_serving(self.port, self.proc, timeout=timeout, poll_s=0.05)  # fine-grained: restart times are measured

    def stop(self, sig: int, *, timeout: float = 60.0) -> int:
        """Send ``sig`` and wait for the process to exit; returns its exit status."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def answered(self) -> int | None:
        """Recommend calls this process answered OK since it started (its Prometheus counter); None if down."""
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return None
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("recsys_requests_total{") and 'method="Recommend"' in line
                       and 'code="OK"' in line))

    def swaps(self) -> list[tuple[float, str]]:
        """(wall time, version) of every model swap this replica logged, over all its starts."""
        out = []
        for log in self.log_files:
            for line in log.read_text(errors="replace").splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                if str(rec.get("msg", "")).startswith(SWAP_MSG):
                    ts, ms = rec["ts"].rstrip("Z").split(".")
                    wall = calendar.timegm(time.strptime(ts, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000
                    out.append((wall, str(rec.get("version", ""))))
        return out


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class Schedule:
    """When things happen; seconds."""

    steady_s: float = 3.0
    """Load before the first flip."""
    flips: int = 10
    """LATEST writes, alternating between the two versions."""
    flip_every_s: float = 1.5
    """Time between flips (make it longer than the lag bound, or the version check has nothing to refuse)."""
    restart_s: float = 6.0
    """Minimum length of each restart phase."""
    duration_s: float = 30.0
    """Minimum total load time; what is left after the SIGKILL restart stays in that phase."""


def run_rollout(
    models: Path,
    versions: Sequence[str],
    users: Sequence[str],
    *,
    workdir: Path,
    schedule: Schedule = Schedule(),
    callers: int = 8,
    k: int = 10,
    poll_s: float = 0.25,
    grace_s: float = 5.0,
    reload_s: float = 1.0,
    timeout: float = 1.0,
    seed: int = 0,
) -> dict:
    """Two replicas, ``callers`` threads of ``Recommend(user, k)`` for known ``users``, through the four phases;
    LATEST must name ``versions[0]`` on entry. Returns the summary (see :func:`summarize`), with the raw timeline.
    """
    from recsys.bundle import read_latest
    from recsys.client import RecommenderClient, RecommenderError
    from recsys.publish import rollback

    if read_latest(models) != versions[0]:
        raise ValueError(f"LATEST of {models} must name {versions[0]!r}, got {read_latest(models)!r}")
    logs = workdir / "logs"
    for old in logs.glob("*.log") if logs.is_dir() else ():
        old.unlink()
    a, b = (Replica(n, models, free_port(), logs, poll_s, grace_s) for n in ("A", "B"))
    events: dict[str, float | int] = {}
    flips: list[Flip] = []
    marks: list[tuple[str, float]] = []
    per_caller: list[list[Call]] = [[] for _ in range(callers)]
    stop = threading.Event()
    try:
        for r in (a, b):
            r.start()
        for r in (a, b):
            r.wait_serving()
        client = RecommenderClient([a.address, b.address], timeout=timeout)
        client.wait_ready()
        for _ in range(20):  # both subchannels connected and warm before the clock starts
            client.recommend(users[0], k=k)
        t0_wall, t0 = time.time(), time.monotonic()

        def now() -> float:
            return time.monotonic() - t0

        def caller(i: int) -> None:
            rng, out = random.Random(seed * 1000 + i), per_caller[i]
            while not stop.is_set():
                user = users[rng.randrange(len(users))]
                start = now()
                try:
                    rec = client.recommend(user, k=k)
                except RecommenderError as e:
                    out.append(Call(start, now(), e.code.name, "", 0))
                else:
                    out.append(Call(start, now(), "OK", rec.model_version, len(rec.item_ids)))

        def sleep_until(t: float) -> None:
            time.sleep(max(0.0, t - now()))

        threads = [threading.Thread(target=caller, args=(i,), name=f"caller-{i}") for i in range(callers)]
        marks.append(("steady", 0.0))
        for t in threads:
            t.start()
        try:
            sleep_until(schedule.steady_s)
            marks.append(("flips", now()))
            for j in range(schedule.flips):
                sleep_until(marks[-1][1] + LEAD_S + j * schedule.flip_every_s)
                version = versions[(j + 1) % len(versions)]
                before = now()
                rollback(models, version)
                flips.append(Flip(before, now(), version))
            sleep_until(flips[-1].after + poll_s + reload_s if flips else now())  # the last reload lands here

            for phase, replica, sig in (("sigterm-restart", a, signal.SIGTERM), ("sigkill-restart", b, signal.SIGKILL)):
                start = now()
                marks.append((phase, start))
                sleep_until(start + LEAD_S)
                key = phase.split("-")[0]
                events[f"{key}_answered_before"] = replica.answered()  # by this process, since it started
                events[f"{key}_at"] = now()
                events[f"{key}_exit_status"] = replica.stop(sig, timeout=grace_s + 30)
                events[f"{key}_exited_at"] = now()
                replica.start()
                replica.wait_serving()
                events[f"{key}_serving_again_at"] = now()
                sleep_until(max(start + schedule.restart_s, now() + SETTLE_S))
            sleep_until(schedule.duration_s)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout + 10)
        end = now()
        # calls each restarted process answered: the client's round_robin took it back after the restart
        events["A_answered_after_restart"], events["B_answered_after_restart"] = a.answered(), b.answered()
        client.close()
    finally:
        for r in (a, b):
            if r.proc is not None and r.proc.poll() is None:
                r.proc.terminate()
                try:
                    r.proc.wait(timeout=grace_s + 10)
                except subprocess.TimeoutExpired:
                    r.proc.kill()
    # leave LATEST where it started, so a rerun (or the next test) finds it there
    if read_latest(models) != versions[0]:
        rollback(models, versions[0])
    lags = reload_lags(flips, [a, b], t0_wall)
    return summarize(per_caller, versions[0], flips, marks, end, k=k, lag_s=poll_s + reload_s, events=events,
                     reload_lags=lags)


def reload_lags(flips: Sequence[Flip], replicas: Sequence[Replica], t0_wall: float) -> list[float]:
    """Seconds from each LATEST write (its ``before``) to each replica's logged swap to that version, for the flips
    a replica swapped for before the next flip (wall clock: the logs' millisecond timestamps)."""
    out = []
    for replica in replicas:
        swaps = replica.swaps()
        for j, f in enumerate(flips):
            lo = t0_wall + f.before - 0.002
            hi = t0_wall + flips[j + 1].before if j + 1 < len(flips) else np.inf
            hit = [w for w, v in swaps if v == f.version and lo <= w < hi]
            if hit:
                out.append(max(0.0, min(hit) - lo))
    return out


# ------------------------------------------------------------------------------------------------ summary


def _phase_windows(marks: Sequence[tuple[str, float]], end: float) -> list[tuple[str, float, float]]:
    return [(name, t, marks[i + 1][1] if i + 1 < len(marks) else end) for i, (name, t) in enumerate(marks)]


def _phase_at(windows: Sequence[tuple[str, float, float]], t: float) -> str:
    for name, lo, hi in windows:
        if lo <= t < hi:
            return name
    return windows[-1][0]


def summarize(
    per_caller: Sequence[Sequence[Call]],
    initial: str,
    flips: Sequence[Flip],
    marks: Sequence[tuple[str, float]],
    end: float,
    *,
    k: int,
    lag_s: float,
    events: dict | None = None,
    reload_lags: Sequence[float] = (),
) -> dict:
    """Counts, failures by code and by phase (the phase in which the call ended: when its failure was seen),
    SIGTERM-attributable failures (calls overlapping that phase at all), ``k`` check, versions seen, the version
    rule per caller (:func:`check_versions`), a per-phase table and the targets."""
    windows = _phase_windows(marks, end)
    calls = [c for cs in per_caller for c in cs]
    failed = [c for c in calls if c.code != "OK"]
    ok = [c for c in calls if c.code == "OK"]
    by_phase: dict[str, dict[str, int]] = {name: {} for name, _, _ in windows}
    for c in failed:
        row = by_phase[_phase_at(windows, c.end)]
        row[c.code] = row.get(c.code, 0) + 1
    term = next(((lo, hi) for name, lo, hi in windows if name == "sigterm-restart"), None)
    sigterm_failed = [] if term is None else [c for c in failed if c.start < term[1] and c.end >= term[0]]
    checks = [check_versions(cs, initial, flips, lag_s=lag_s) for cs in per_caller]
    went_back = [dict(caller=i, **r) for i, ch in enumerate(checks) for r in ch["went_back"]]
    stale = [dict(caller=i, **r) for i, ch in enumerate(checks) for r in ch["stale"]]
    table = []
    for name, lo, hi in windows:
        mine = [c for c in calls if lo <= c.start < hi]
        lat = np.array([c.end - c.start for c in mine if c.code == "OK"]) * 1000
        table.append({
            "phase": name, "seconds": round(hi - lo, 2), "calls": len(mine),
            "qps": round(len(mine) / max(hi - lo, 1e-9), 1),
            "failed": sum(by_phase[name].values()),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if lat.size else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if lat.size else None,
            "max_ms": round(float(lat.max()), 1) if lat.size else None,
            "versions": dict(collections.Counter(c.version for c in mine if c.code == "OK")),
        })
    wrong_k = sum(c.n_items != k for c in ok)
    versions = dict(collections.Counter(c.version for c in ok))
    share = len(failed) / max(len(calls), 1)
    lags = np.asarray(reload_lags, dtype=float)
    return {
        "calls": len(calls), "ok": len(ok), "failed": len(failed), "failed_share": share,
        "failures_by_code": dict(collections.Counter(c.code for c in failed)),
        "failures_by_phase": by_phase,
        "sigterm_attributable_failures": len(sigterm_failed),
        "wrong_k": wrong_k, "versions_seen": versions,
        "lag_bound_s": lag_s,
        "reload_lag_s": ({"n": int(lags.size), "median": float(np.median(lags)), "max": float(lags.max())}
                         if lags.size else {"n": 0}),
        "went_back": len(went_back), "stale": len(stale),
        "went_back_examples": went_back[:10], "stale_examples": stale[:10],
        "table": table,
        "timeline": {"initial": initial, "flips": [asdict(f) for f in flips],
                     "phases": [{"phase": n, "start": round(lo, 3), "end": round(hi, 3)} for n, lo, hi in windows],
                     "events": {key: (round(v, 3) if isinstance(v, float) else v)
                                for key, v in (events or {}).items()}},
        "targets": {
            "failed_share_le_0.1%": share <= 0.001,
            "no_failure_from_sigterm_restart": not sigterm_failed,
            "every_answer_has_k_items": wrong_k == 0 and bool(ok),
            "both_versions_answered": len(versions) >= 2,
            "no_caller_version_goes_back": not went_back,
        },
    }


def print_report(s: dict) -> None:
    print(f"\n{s['calls']} calls, {s['failed']} failed ({100 * s['failed_share']:.3f}%), "
          f"{s['sigterm_attributable_failures']} overlapping the SIGTERM restart; "
          f"answers with != k items: {s['wrong_k']}; versions: {s['versions_seen']}")
    print(f"failures by code: {s['failures_by_code'] or '{}'}")
    head = f"{'phase':<16}{'s':>6}{'calls':>8}{'qps':>8}{'failed':>8}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}  failures"
    print(head)
    for r in s["table"]:
        codes = s["failures_by_phase"][r["phase"]]
        print(f"{r['phase']:<16}{r['seconds']:>6}{r['calls']:>8}{r['qps']:>8}{r['failed']:>8}"
              f"{r['p50_ms'] if r['p50_ms'] is not None else '-':>8}{r['p99_ms'] if r['p99_ms'] is not None else '-':>8}"
              f"{r['max_ms'] if r['max_ms'] is not None else '-':>8}  {codes or ''}")
    ev = s["timeline"]["events"]
    if "sigterm_at" in ev:
        print(f"SIGTERM: exit status {ev['sigterm_exit_status']} after {ev['sigterm_exited_at'] - ev['sigterm_at']:.2f}s,"
              f" serving again {ev['sigterm_serving_again_at'] - ev['sigterm_at']:.2f}s after the signal")
    if "sigkill_at" in ev:
        print(f"SIGKILL: exit status {ev['sigkill_exit_status']},"
              f" serving again {ev['sigkill_serving_again_at'] - ev['sigkill_at']:.2f}s after the signal")
    if "A_answered_after_restart" in ev:
        print(f"Recommend answered OK per process: A {ev.get('sigterm_answered_before')} before SIGTERM, "
              f"{ev['A_answered_after_restart']} after its restart; B {ev.get('sigkill_answered_before')} before "
              f"SIGKILL, {ev['B_answered_after_restart']} after its restart")
    lag = s["reload_lag_s"]
    if lag["n"]:
        print(f"reload lag after a flip (replica logs): median {lag['median']:.2f}s, max {lag['max']:.2f}s over "
              f"{lag['n']} swaps; bound used by the version check {s['lag_bound_s']:.2f}s")
    print(f"version went back: {s['went_back']}, stale answers: {s['stale']}")
    print(json.dumps(s["targets"], indent=2))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=30.0, help="minimum seconds of load (default 30)")
    p.add_argument("--steady", type=float, default=3.0, help="seconds before the first flip")
    p.add_argument("--flips", type=int, default=10, help="LATEST flips between the two versions")
    p.add_argument("--flip-every", type=float, default=1.5, help="seconds between flips")
    p.add_argument("--restart-s", type=float, default=6.0, help="minimum seconds of each restart phase")
    p.add_argument("--callers", type=int, default=8, help="concurrent caller threads")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--poll-s", type=float, default=0.25, help="replicas' LATEST poll interval")
    p.add_argument("--grace-s", type=float, default=5.0, help="replicas' drain time on SIGTERM")
    p.add_argument("--reload-s", type=float, default=1.0,
                   help="time a replica may take to load a version after polling it (lag bound = poll + this)")
    p.add_argument("--timeout", type=float, default=1.0, help="client deadline per call (the client's default)")
    p.add_argument("--users", type=int, default=2000, help="synthetic users (all are known)")
    p.add_argument("--items", type=int, default=500)
    p.add_argument("--events", type=int, default=30_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/recsys_rollout_bench"))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from recsys.bundle import Bundle

    models, versions = build_versions(args.workdir, events=args.events, users=args.users, items=args.items,
                                      epochs=args.epochs)
    users = Bundle.load(models / versions[0]).user_ids.tolist()
    schedule = Schedule(steady_s=args.steady, flips=args.flips, flip_every_s=args.flip_every,
                        restart_s=args.restart_s, duration_s=args.duration)
    results: dict = {
        "config": {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
                    # other processes share the cores: a load average above the core count inflates latencies
                    "loadavg_at_start": list(os.getloadavg())},
        "versions": versions, "known_users": len(users),
    }
    summary = run_rollout(models, versions, users, workdir=args.workdir, schedule=schedule, callers=args.callers,
                          k=args.k, poll_s=args.poll_s, grace_s=args.grace_s, reload_s=args.reload_s,
                          timeout=args.timeout)
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results.update(summary)
    print_report(summary)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from recsys.core.io import atomic_write_json

    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0 if all(summary["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
