"""How the time-aware defaults are chosen: on validation data only, forward in time, never on the future.

    .venv/bin/python benchmarks/time_defaults.py                          # ML-100K, the default variants
    .venv/bin/python benchmarks/time_defaults.py --variant name:train.half_life_days=30,model.time_features=true

The data is what ``benchmarks/future_bench.py``'s global cut hands to the CLI as the past: every event before the
time t that leaves the last 20% of events after it. The benchmark's future (events from t on) is never read here.
That past goes through ``recsys prepare`` with a **global-time** split (``prepare.split=global_time``: the newest 10%
of the past's events are validation, the rest train; validation rows of users or items without a train row go to
``extra``, as always), and each variant is trained by ``recsys train`` with the default config plus its overrides
(``train.refit=false``: only the fit phase, whose early stopping already reports the best validation epoch). The
table is each variant's best validation Recall@20 / NDCG@20 (the trainer's exact evaluation over the full catalogue,
the user's train items excluded) and its ratio to the first variant (the defaults of the commit that ran it).

A variant wins a default when it is ahead on both metrics over ``--seeds`` seeds; the winners and these numbers are
quoted in the README. Writes benchmarks/results/time_defaults.json (per variant and seed: best epoch, metrics,
seconds). With a kept ``--workdir`` finished trainings are reused (their ``summary.json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.future_bench import ml100k_raw, synth_raw, write_user_files  # noqa: E402

PY = sys.executable
FUTURE_FRAC = 0.2  # the benchmark's global cut: the last 20% of events are the future (never read here)
VALID_FRAC = 0.1  # the newest share of the past that validates
METRICS = ("recall@20", "ndcg@20")
DEFAULT_VARIANTS = (
    "defaults:",
    "time_batches+batch_logq:train.time_batches=true,loss.logq_frequencies=batch",
    "time_inputs+time_batches+batch_logq:model.time_features=true,train.time_batches=true,loss.logq_frequencies=batch",
    "half_life_60:train.half_life_days=60",
)


def past_of_global_cut(events: pl.DataFrame, frac: float = FUTURE_FRAC) -> pl.DataFrame:
    """The events strictly before the time t at which the last ``frac`` of events (by time) start."""
    ts = np.sort(events["ts"].to_numpy())
    t = int(ts[len(ts) - int(np.ceil(frac * len(ts)))])
    return events.filter(pl.col("ts") < t)


def run_variant(prepared: Path, run: Path, sets: list[str], seed: int) -> dict:
    if not (run / "summary.json").exists():
        cmd = [PY, "-m", "recsys", "train", "--data", str(prepared), "--out", str(run), "--set", "train.refit=false",
               "--set", f"train.seed={seed}"]
        for s in sets:
            cmd += ["--set", s]
        t0 = time.perf_counter()
        with open(run.with_suffix(".log"), "w") as fh:
            subprocess.run(cmd, check=True, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT)
        (run / "seconds.txt").write_text(f"{time.perf_counter() - t0:.1f}")
    s = json.loads((run / "summary.json").read_text())
    seconds = float((run / "seconds.txt").read_text()) if (run / "seconds.txt").exists() else None
    return {"best_epoch": s.get("best_epoch"), "seconds": seconds,
            **{m: float(s["best_metrics"][m]) for m in METRICS}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="ml100k", help="comma list of ml100k, synth")
    p.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE[,KEY=VALUE] (repeatable)")
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--workdir", default="/tmp/recsys_time_defaults")
    p.add_argument("--cache", default=str(Path.home() / ".cache" / "recsys"))
    p.add_argument("--synth-events", type=int, default=200_000)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "time_defaults.json"))
    args = p.parse_args(argv)
    variants = {}
    for v in args.variant or DEFAULT_VARIANTS:
        name, _, sets = v.partition(":")
        variants[name] = [s for s in sets.split(",") if s]
    report = {"machine": {"python": platform.python_version(), "cpus": __import__("os").cpu_count()},
              "protocol": __doc__.split("\n\n")[1], "variants": {k: v for k, v in variants.items()}, "datasets": {}}
    for name in args.datasets.split(","):
        work = Path(args.workdir) / name
        work.mkdir(parents=True, exist_ok=True)
        raw = ml100k_raw(Path(args.cache)) if name == "ml100k" else synth_raw(
            work, events=args.synth_events, users=args.synth_events // 50, items=args.synth_events // 100)
        prepared = work / "prepared"
        if not (prepared / "manifest.json").exists():
            files = write_user_files(raw, past_of_global_cut(raw.events), work / "files")
            subprocess.run([PY, "-m", "recsys", "prepare", *files, "--out", str(prepared),
                            "--set", "prepare.split=global_time", "--set", f"prepare.valid_frac={VALID_FRAC}",
                            "--set", "prepare.test_frac=0"], check=True, cwd=ROOT, capture_output=True)
        rows = {}
        for vname, sets in variants.items():
            runs = [run_variant(prepared, work / f"run-{vname}-s{s}", sets, s) for s in range(args.seeds)]
            rows[vname] = {"sets": sets, "runs": runs,
                           "mean": {m: float(np.mean([r[m] for r in runs])) for m in METRICS}}
            base = next(iter(rows.values()))["mean"]
            mean = rows[vname]["mean"]
            print(f"{name:8s} {vname:40s} " + "  ".join(
                f"{m} {mean[m]:.4f} ({mean[m] / base[m]:.2f}x)" for m in METRICS)
                + f"  best epochs {[r['best_epoch'] for r in runs]}", flush=True)
        report["datasets"][name] = rows
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
