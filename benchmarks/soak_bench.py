"""Soak benchmark of the gRPC server: memory growth and latency drift under long steady load (issue #17, part 3).

    python benchmarks/soak_bench.py     # 1M items, c=8, 60 s warm-up + 10 min (+ building the 1M bundle once)
    python benchmarks/soak_bench.py --items 20000 --users 2000 --minutes 1 --window-s 15 --warmup-s 10 --sample-s 2
        # quick: ~1.5 min (+ ~25 s to build its bundle once), 15 s windows; --out /tmp/x.json keeps the results file

1. Builds (once, cached in --workdir) a real bundle with ``serve_bench.build_bundle``: a synthetic prepared dataset
   with ``--items`` items and ``--users`` users (``--per-user`` interactions each), one training epoch of a
   dim-``--dim`` two-tower model, export with the HNSW index. Its cost: the HNSW build and the item tower grow with
   ``--items``; the training epoch and the per-user Python loop with ``--users`` x ``--per-user``.
2. Starts one ``recsys serve`` (default settings, hot reload off) and drives it from this process (grpc.aio, one
   channel) with ``--concurrency`` callers of known-user ``Recommend`` (k=10, seen items excluded, random known
   users) for ``--warmup-s`` of warm-up and then ``--minutes`` of measured load. Every call's start time, latency
   and status code is recorded; every ``--sample-s`` the server process's RSS (``VmRSS``) and peak RSS
   (``VmHWM``), open file descriptors (``/proc/PID/fd``), threads, CPU seconds, this process's CPU seconds and the
   load average are sampled. Every 50th answer is parsed and must hold k items.
3. Reports per ``--window-s`` window (a minute by default; the warm-up is its own row): calls, QPS, failed calls by
   status code, p50/p99/max latency of the OK calls, RSS at the end of the window, server CPU per call; overall:
   RSS after the warm-up vs at the end (growth %), max RSS, the RSS slope over the measured load (least squares),
   fds and threads first vs last, p99 of the last window / p99 of the first. Then shuts the server down with
   SIGTERM and waits for it (its exit status is recorded).

Targets (PASS/FAIL; the exit status is 1 when one fails):

* RSS growth after the warm-up <= 5% (the sample at the end of the load vs the first sample after the warm-up);
* p99 of the last window <= 1.5x the p99 of the first measured window;
* 0 failed calls (warm-up included).

If the server process exits during the load, the load stops there and ``server_up_for_the_whole_load`` fails too.

Prints a table and writes benchmarks/results/soak_bench.json (--out): machine, git commit, config, targets,
per-window and per-sample rows (``--calls-out`` also saves every call as .npz). Client and server share the
machine's cores (and, on a shared machine, other people's processes: the load average is in every sample and
window; a p99 drift that follows the load average is the neighbours, not the server).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from array import array
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.future_bench import _git, _machine  # noqa: E402
from benchmarks.serve_bench import build_bundle, cpu_seconds, free_port, start, wait_serving  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "soak_bench.json"
RECOMMEND = "/recsys.v1.Recommender/Recommend"
CHECK_EVERY = 50  # parse every Nth answer and check it holds k items
RSS_GROWTH_MAX = 0.05
P99_RATIO_MAX = 1.5


# ------------------------------------------------------------------------------------------------ sampling


def proc_sample(pid: int) -> dict:
    """RSS / peak RSS (MiB), threads, open fds and CPU seconds of a live process, from /proc (Linux)."""
    out: dict = {}
    try:
        status, fds = Path(f"/proc/{pid}/status").read_text(), len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:  # the process is gone: NaN / -1 (and the RSS target fails)
        status, fds = "", -1
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024  # kB -> MiB
        elif key == "Threads":
            out["threads"] = int(value)
    return {"rss_mb": out.get("VmRSS", float("nan")), "hwm_mb": out.get("VmHWM", float("nan")),
            "threads": out.get("threads", -1), "fds": fds,
            "server_cpu_s": cpu_seconds(pid)}


class Recorder:
    """Every call (start time since the load began, latency, status code index) in compact arrays."""

    def __init__(self) -> None:
        self.start = array("d")
        self.latency = array("d")
        self.code = array("H")
        self.codes: list[str] = ["OK"]
        self.checked = 0
        self.wrong_k = 0

    def add(self, t: float, lat: float, code: str) -> None:
        if code not in self.codes:
            self.codes.append(code)
        self.start.append(t)
        self.latency.append(lat)
        self.code.append(self.codes.index(code))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return np.frombuffer(self.start), np.frombuffer(self.latency), np.frombuffer(self.code, dtype=np.uint16)


async def soak(port: int, server: subprocess.Popen, reqs: list[bytes], *, concurrency: int, seconds: float,
               sample_s: float, k: int, timeout: float, rec: Recorder, samples: list[dict],
               progress_s: float = 60.0) -> tuple[float, float | None]:
    """``concurrency`` callers for ``seconds``, a /proc sample every ``sample_s``. Returns the load's length and
    when (s) the server process was seen gone (the load stops there), or None."""
    import grpc

    from recsys.v1 import recommender_pb2 as pb

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(RECOMMEND)
        for i in range(20):  # connected before the clock starts
            await call(reqs[i % len(reqs)], timeout=30)
        t0 = time.monotonic()
        stop = False
        nxt = 0
        died_at: float | None = None

        def sample() -> None:
            s = proc_sample(server.pid)
            s.update(t=round(time.monotonic() - t0, 3), calls=len(rec.start),
                     client_cpu_s=time.process_time(), loadavg_1m=os.getloadavg()[0])
            samples.append(s)

        async def caller() -> None:
            nonlocal nxt
            while not stop:
                i = nxt
                nxt += 1
                t = time.monotonic()
                try:
                    reply = await call(reqs[i % len(reqs)], timeout=timeout)
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    reply, code = None, e.code().name
                end = time.monotonic()
                rec.add(t - t0, end - t, code)
                if reply is not None and i % CHECK_EVERY == 0:
                    rec.checked += 1
                    rec.wrong_k += len(pb.RecommendResponse.FromString(reply).items) != k

        async def sampler() -> None:
            nonlocal stop, died_at
            j, last_print = 1, 0.0
            while not stop:
                await asyncio.sleep(max(0.0, t0 + j * sample_s - time.monotonic()))
                j += 1
                if stop:
                    break
                sample()
                s = samples[-1]
                if server.poll() is not None:  # the callers would only spin on UNAVAILABLE: stop the load
                    died_at, stop = s["t"], True
                    print(f"  t={s['t']:6.0f}s  the server exited ({server.returncode}); stopping the load "
                          f"(see {server.log})", flush=True)  # type: ignore[attr-defined]
                    break
                if s["t"] - last_print >= progress_s:
                    last_print = s["t"]
                    print(f"  t={s['t']:6.0f}s  calls {s['calls']:>8}  rss {s['rss_mb']:7.1f} MiB  fds {s['fds']}  "
                          f"threads {s['threads']}  load {s['loadavg_1m']:.1f}", flush=True)

        sample()  # t=0
        tasks = [asyncio.ensure_future(caller()) for _ in range(concurrency)]
        sampling = asyncio.ensure_future(sampler())
        while not stop and time.monotonic() < t0 + seconds:
            await asyncio.sleep(min(0.5, max(0.0, t0 + seconds - time.monotonic())))
        if not stop:
            stop = True
            sample()  # the end of the load (calls still in flight finish below)
        length = time.monotonic() - t0
        await asyncio.gather(*tasks)
        sampling.cancel()
        try:
            await sampling
        except asyncio.CancelledError:
            pass
    return length, died_at


# ------------------------------------------------------------------------------------------------ summary


def windows(warmup_s: float, minutes: float, window_s: float) -> list[tuple[str, float, float]]:
    """[(name, from, until)]: the warm-up, then measured windows of ``window_s`` (the last one may be shorter)."""
    out = [("warm-up", 0.0, warmup_s)] if warmup_s > 0 else []
    end, lo, n = warmup_s + minutes * 60, warmup_s, 1
    while lo < end - 1e-9:
        hi = min(lo + window_s, end)
        out.append((f"{'min' if window_s == 60 else 'w'}{n}", lo, hi))
        lo, n = hi, n + 1
    return out


def _at(samples: list[dict], t: float) -> dict:
    """The first sample taken at or after ``t`` (the last one if none)."""
    return next((s for s in samples if s["t"] >= t - 1e-6), samples[-1])


def summarize(rec: Recorder, samples: list[dict], *, warmup_s: float, minutes: float, window_s: float,
              length_s: float) -> dict:
    start, lat, code = rec.arrays()
    ms = lat * 1e3
    ok = code == 0
    rows = []
    for name, lo, hi in windows(warmup_s, minutes, window_s):
        last = hi >= warmup_s + minutes * 60 - 1e-9
        sel = (start >= lo) & ((start < hi) | last)  # calls still in flight at the end belong to the last window
        good = ms[sel & ok]
        failed = {rec.codes[c]: int(n) for c, n in zip(*np.unique(code[sel & ~ok], return_counts=True), strict=True)}
        s0, s1 = _at(samples, lo), _at(samples, min(hi, length_s))
        n = int(sel.sum())
        rows.append({
            "window": name, "from_s": round(lo, 1), "to_s": round(hi, 1), "calls": n,
            "qps": round(n / max(hi - lo, 1e-9), 1), "failed": sum(failed.values()), "failed_by_code": failed,
            "p50_ms": round(float(np.percentile(good, 50)), 3) if good.size else None,
            "p99_ms": round(float(np.percentile(good, 99)), 3) if good.size else None,
            "max_ms": round(float(good.max()), 2) if good.size else None,
            "rss_mb": round(s1["rss_mb"], 1), "fds": s1["fds"], "threads": s1["threads"],
            "server_cpu_us_per_call": round((s1["server_cpu_s"] - s0["server_cpu_s"]) / max(n, 1) * 1e6, 1),
            "loadavg_1m": round(s1["loadavg_1m"], 2),
        })
    measured = [r for r in rows if r["window"] != "warm-up"]
    after_warmup, end = _at(samples, warmup_s), samples[-1]
    growth = (end["rss_mb"] - after_warmup["rss_mb"]) / after_warmup["rss_mb"]
    post = [s for s in samples if s["t"] >= after_warmup["t"]]
    slope = (float(np.polyfit([s["t"] for s in post], [s["rss_mb"] for s in post], 1)[0]) * 60
             if len(post) >= 3 else float("nan"))
    first, last = measured[0]["p99_ms"], measured[-1]["p99_ms"]
    p99_ratio = last / first if first and last is not None else float("nan")
    n_failed = int((~ok).sum())
    return {
        "calls": int(code.size), "failed": n_failed,
        "failed_by_code": {rec.codes[c]: int(n) for c, n in zip(*np.unique(code[~ok], return_counts=True),
                                                                 strict=True)},
        "answers_checked": rec.checked, "answers_wrong_k": rec.wrong_k, "load_s": round(length_s, 2),
        "rss_after_warmup_mb": round(after_warmup["rss_mb"], 1), "rss_after_warmup_t": after_warmup["t"],
        "rss_end_mb": round(end["rss_mb"], 1), "rss_growth": growth,
        "rss_max_mb": round(max(s["rss_mb"] for s in samples), 1), "rss_peak_hwm_mb": round(end["hwm_mb"], 1),
        "rss_slope_mb_per_min": slope,
        "fds": {"first": samples[0]["fds"], "after_warmup": after_warmup["fds"], "last": end["fds"],
                "max": max(s["fds"] for s in samples)},
        "threads": {"first": samples[0]["threads"], "after_warmup": after_warmup["threads"], "last": end["threads"],
                    "max": max(s["threads"] for s in samples)},
        "p99_first_ms": first, "p99_last_ms": last, "p99_last_over_first": p99_ratio,
        "windows": rows,
        "targets": {
            f"rss_growth_after_warmup_le_{RSS_GROWTH_MAX:.0%}": bool(growth <= RSS_GROWTH_MAX),
            f"p99_last_over_first_le_{P99_RATIO_MAX}": bool(p99_ratio <= P99_RATIO_MAX),
            "no_failed_calls": n_failed == 0,
        },
    }


def print_report(s: dict) -> None:
    def cell(v: object, width: int) -> str:
        return f"{'-' if v is None else v:>{width}}"

    print(f"\n{'window':<8}{'from s':>8}{'calls':>9}{'qps':>8}{'failed':>7}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}"
          f"{'RSS MiB':>9}{'fds':>5}{'thr':>5}{'cpu us':>8}{'load':>6}  failures")
    for r in s["windows"]:
        print(f"{r['window']:<8}{r['from_s']:>8}{r['calls']:>9}{r['qps']:>8}{r['failed']:>7}{cell(r['p50_ms'], 8)}"
              f"{cell(r['p99_ms'], 8)}{cell(r['max_ms'], 8)}{r['rss_mb']:>9}{r['fds']:>5}{r['threads']:>5}"
              f"{r['server_cpu_us_per_call']:>8}{r['loadavg_1m']:>6}  {r['failed_by_code'] or ''}")
    print(f"\n{s['calls']} calls in {s['load_s']}s, {s['failed']} failed"
          f"{' ' + str(s['failed_by_code']) if s['failed_by_code'] else ''}; "
          f"answers checked {s['answers_checked']}, with != k items {s['answers_wrong_k']}")
    print(f"RSS: {s['rss_after_warmup_mb']} MiB after warm-up (t={s['rss_after_warmup_t']}s) -> {s['rss_end_mb']} MiB "
          f"at the end ({100 * s['rss_growth']:+.2f}%), max {s['rss_max_mb']} MiB (VmHWM {s['rss_peak_hwm_mb']}), "
          f"slope {s['rss_slope_mb_per_min']:+.2f} MiB/min")
    print(f"fds {s['fds']}   threads {s['threads']}")
    print(f"p99: first window {s['p99_first_ms']} ms, last {s['p99_last_ms']} ms, "
          f"ratio {s['p99_last_over_first']:.2f}")
    if s.get("server_exited_during_load_at_s") is not None:
        print(f"the server exited DURING the load (seen at t={s['server_exited_during_load_at_s']}s), "
              f"exit status {s['server_exit_status']}")
    else:
        print(f"server exit status after SIGTERM: {s.get('server_exit_status')}")
    for name, ok in s["targets"].items():
        print(f"  {'PASS' if ok else 'FAIL'}  {name}", flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=1_000_000)
    p.add_argument("--users", type=int, default=50_000,
                   help="synthetic users, all known (the training epoch and the build loop grow with users x per-user)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--per-user", type=int, default=12, help="interactions per synthetic user")
    p.add_argument("--concurrency", type=int, default=8, help="concurrent callers")
    p.add_argument("--minutes", type=float, default=10.0, help="measured load after the warm-up")
    p.add_argument("--warmup-s", type=float, default=60.0, help="load before the measurement (its own row)")
    p.add_argument("--window-s", type=float, default=60.0, help="length of a reported window (default a minute)")
    p.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples of the server process")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--timeout", type=float, default=5.0, help="deadline per call (s)")
    p.add_argument("--workers", type=int, default=0, help="server RPC threads; 0 = recsys serve's default")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/recsys_soak_bench"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--calls-out", type=Path, help="also save every call (start s, latency s, code) as .npz here")
    args = p.parse_args(argv)
    if args.window_s <= 0 or args.sample_s <= 0 or args.minutes <= 0:
        p.error("--minutes, --window-s and --sample-s must be positive")

    from recsys.v1 import recommender_pb2 as pb

    t = time.perf_counter()
    models = build_bundle(args.workdir, n_items=args.items, n_users=args.users, dim=args.dim, per_user=args.per_user)
    print(f"bundle ready ({time.perf_counter() - t:.0f}s): {models}", flush=True)
    results: dict = {
        "config": {key: (str(v) if isinstance(v, Path) else v) for key, v in vars(args).items()},
        # other processes share the cores: a load average above the core count inflates every latency below
        "machine": {**_machine(), "loadavg_at_start": list(os.getloadavg())},
        "git": _git(),
    }
    rng = np.random.default_rng(0)
    reqs = [pb.RecommendRequest(user_id=f"u{u}", k=args.k).SerializeToString()
            for u in rng.integers(0, args.users, 50_000)]
    port = free_port()
    cmd = [sys.executable, "-m", "recsys", "serve", "--models", str(models), "--host", "127.0.0.1",
           "--port", str(port), "--poll-s", "0", "--workers", str(args.workers)]
    server = start(cmd, args.workdir / "logs" / "serve.log")
    rec, samples = Recorder(), []
    seconds = args.warmup_s + args.minutes * 60
    try:
        wait_serving(port, server)
        print(f"server pid {server.pid} serving on {port}; {args.concurrency} callers for {args.warmup_s:.0f}s "
              f"warm-up + {args.minutes:g} min (log {server.log})", flush=True)  # type: ignore[attr-defined]
        length, died_at = asyncio.run(soak(port, server, reqs, concurrency=args.concurrency, seconds=seconds,
                                  sample_s=args.sample_s, k=args.k, timeout=args.timeout, rec=rec, samples=samples,
                                  progress_s=max(args.window_s, args.sample_s)))
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
        try:
            exit_status = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_status = f"killed after 60s ({server.wait()})"
    summary = summarize(rec, samples, warmup_s=args.warmup_s, minutes=args.minutes, window_s=args.window_s,
                        length_s=length)
    summary["server_exit_status"] = exit_status
    summary["server_exited_during_load_at_s"] = died_at
    if died_at is not None:
        summary["targets"]["server_up_for_the_whole_load"] = False
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results.update(summary)
    results["samples"] = samples
    print_report(summary)
    if args.calls_out:
        start_s, lat, code = rec.arrays()
        args.calls_out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(args.calls_out, start_s=start_s, latency_s=lat, code=code, codes=np.array(rec.codes))
        print(f"wrote {args.calls_out}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from recsys.core.io import atomic_write_json

    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0 if all(summary["targets"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
