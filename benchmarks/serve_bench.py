"""Load benchmark of the gRPC server: QPS and p50/p95/p99 latency at 1, 8 and 32 concurrent clients.

    python benchmarks/serve_bench.py                 # 100k items, dim 64 (builds the bundle once, ~2-4 min)
    python benchmarks/serve_bench.py --items 20000 --requests 1000    # quicker

1. Builds (once, cached in --workdir) a real bundle: a synthetic prepared dataset with ``--items`` items, one
   training epoch of a dim-``--dim`` two-tower model (recsys.train.train), recsys.bundle.export (HNSW index).
2. Starts ``recsys serve`` in a subprocess, and, in the same run, a bare grpcio server (same thread pool size)
   that answers an empty message: the transport ceiling on this machine.
3. Drives them from this process (grpc.aio, one channel, N concurrent callers) for a fixed number of requests:
   Recommend (known user, seen items excluded, k=10) and BatchRecommend (64 users), and checks that with
   --max-concurrency 32 and 256 concurrent callers every reply is OK or RESOURCE_EXHAUSTED.
Prints a table and writes benchmarks/results/serve_bench.json. Client and server share the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "serve_bench.json"
EMPTY_METHOD = "/bench.Empty/Call"


# ------------------------------------------------------------------------------------------------ bundle


def build_bundle(workdir: Path, *, n_items: int, n_users: int, dim: int, per_user: int, seed: int = 0) -> Path:
    """Prepared dataset -> 1 training epoch -> export; returns the models dir (cached by its parameters)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys import schema

    key = f"items{n_items}-users{n_users}-dim{dim}-per{per_user}-seed{seed}"
    models = workdir / key / "models"
    if (models / schema.LATEST).is_file():
        return models
    data = workdir / key / "data"
    data.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_clusters = 50
    # Zipf-like popularity inside clusters: users draw mostly from their own cluster
    item_cluster = rng.integers(0, n_clusters, n_items)
    by_cluster = [np.flatnonzero(item_cluster == c) for c in range(n_clusters)]
    user_cluster = rng.integers(0, n_clusters, n_users)
    rows = []
    for u in range(n_users):
        pool = by_cluster[user_cluster[u]]
        pick = pool[np.minimum(rng.zipf(1.3, per_user) - 1, pool.size - 1)]
        rows.append(np.unique(pick)[:per_user])
    users = np.repeat(np.arange(n_users), [len(r) for r in rows])
    items = np.concatenate(rows)
    t0 = 1_700_000_000_000
    ts = t0 + np.arange(items.size, dtype=np.int64)
    last = np.r_[np.diff(users) != 0, True]  # each user's last interaction is held out
    split = {"train": ~last, "valid": last & (users % 2 == 0), "test": last & (users % 2 == 1)}
    for name, mask in split.items():
        pq.write_table(pa.table({
            schema.USER_IDX: pa.array(users[mask], pa.int32()), schema.ITEM_IDX: pa.array(items[mask], pa.int32()),
            schema.TS: pa.array(ts[mask], pa.int64()), schema.WEIGHT: pa.array(np.ones(mask.sum()), pa.float32()),
        }), data / schema.SPLITS[name])  # fmt: skip
    counts = np.bincount(items[split["train"]], minlength=n_items)
    first_ts = np.full(n_items, ts[-1] + 1, dtype=np.int64)
    np.minimum.at(first_ts, items, ts)
    pq.write_table(pa.table({
        schema.ITEM_ID: [f"i{i}" for i in range(n_items)], schema.ITEM_IDX: pa.array(np.arange(n_items), pa.int32()),
        "n_train": pa.array(counts, pa.int32()), "prob": pa.array((counts + 1) / (counts + 1).sum(), pa.float64()),
        "first_ts": pa.array(first_ts, pa.int64()), "feat_category": pa.array(item_cluster + 1, pa.int32()),
    }), data / schema.ITEMS)  # fmt: skip
    pq.write_table(pa.table({
        schema.USER_ID: [f"u{u}" for u in range(n_users)], schema.USER_IDX: pa.array(np.arange(n_users), pa.int32()),
        "n_train": pa.array(np.bincount(users[split["train"]], minlength=n_users), pa.int32()),
    }), data / schema.USERS)  # fmt: skip
    pq.write_table(pa.table({
        "entity": ["item"] * n_clusters, "feature": ["category"] * n_clusters,
        "value": [f"c{c}" for c in range(n_clusters)], "code": pa.array(np.arange(1, n_clusters + 1), pa.int32()),
    }), data / schema.FEATURE_VOCAB)  # fmt: skip
    before = ~split["test"]
    lists = [[] for _ in range(n_users)]
    for u, i in zip(users[before].tolist(), items[before].tolist(), strict=True):
        lists[u].append(i)
    for name, ls in ((schema.HISTORY, [x[-20:] for x in lists]), (schema.SEEN, [sorted(set(x)) for x in lists])):
        pq.write_table(pa.table({
            schema.USER_IDX: pa.array(np.arange(n_users), pa.int32()), "items": pa.array(ls, pa.list_(pa.int32())),
        }), data / name)  # fmt: skip
    (data / schema.MANIFEST).write_text(json.dumps({
        "schema_version": schema.SCHEMA_VERSION, "fingerprint": key,
        "counts": {"n_users": n_users, "n_items": n_items, **{s: int(m.sum()) for s, m in split.items()}},
    }))  # fmt: skip

    from recsys.bundle import export
    from recsys.index import IndexConfig
    from recsys.model import LossConfig, ModelConfig, TrainConfig
    from recsys.train import train

    t = time.perf_counter()
    train(data, workdir / key / "run", model_cfg=ModelConfig(dim=dim, embedding_dim=dim, history_len=20),
          train_cfg=TrainConfig(batch_size=1024, epochs=1, progress=False, tensorboard=False, patience=0,
                                max_eval_users=500),
          loss_cfg=LossConfig(), device="cpu")
    print(f"trained in {time.perf_counter() - t:.0f}s", flush=True)
    t = time.perf_counter()
    export(workdir / key / "run", models, index_cfg=IndexConfig(), tune_queries=500, evaluate_split=None)
    print(f"exported in {time.perf_counter() - t:.0f}s", flush=True)
    return models


# ------------------------------------------------------------------------------------------------ servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def empty_server(port: int, workers: int) -> None:
    """The transport ceiling: a sync grpcio server, same thread pool size, answering an empty message."""
    from concurrent import futures

    import grpc

    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers), options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Empty", {"Call": handler}),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def wait_serving(port: int, *, timeout: float = 180.0, health: bool = True) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        while time.monotonic() < deadline:
            try:
                grpc.channel_ready_future(ch).result(timeout=1)
                if not health:
                    return
                status = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=1).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except (grpc.FutureTimeoutError, grpc.RpcError):
                pass
            time.sleep(0.2)
    raise TimeoutError(f"server on port {port} not serving after {timeout}s")


# ------------------------------------------------------------------------------------------------ driver


async def drive(port: int, method: str, make_request, *, concurrency: int, n: int, warmup: int,
                serializer=None, deserializer=None) -> dict:
    """``n`` requests from ``concurrency`` callers over one channel; latency percentiles in ms, QPS, codes."""
    import grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        call = ch.unary_unary(method, request_serializer=serializer, response_deserializer=deserializer)
        for i in range(warmup):
            await call(make_request(i), timeout=10)
        lat = np.zeros(n)
        codes: dict[str, int] = {}
        nxt = 0

        async def caller() -> None:
            nonlocal nxt
            while nxt < n:
                i = nxt
                nxt += 1
                req = make_request(i)
                t = time.perf_counter()
                try:
                    await call(req, timeout=30)
                    code = "OK"
                except grpc.aio.AioRpcError as e:
                    code = e.code().name
                lat[i] = time.perf_counter() - t
                codes[code] = codes.get(code, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    ms = lat * 1e3
    return {
        "concurrency": concurrency, "requests": n, "qps": n / wall, "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)), "p99_ms": float(np.percentile(ms, 99)), "codes": codes,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--per-user", type=int, default=12, help="interactions per synthetic user")
    p.add_argument("--requests", type=int, default=3000, help="requests per measurement")
    p.add_argument("--batch-requests", type=int, default=300, help="BatchRecommend requests per measurement")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--workers", type=int, default=4, help="server RPC threads (both servers)")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/recsys_serve_bench"))
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--empty-server", type=int, help=argparse.SUPPRESS)  # internal: run the bare server
    args = p.parse_args(argv)
    if args.empty_server:
        empty_server(args.empty_server, args.workers)
        return 0

    from recsys.v1 import recommender_pb2 as pb

    t = time.perf_counter()
    models = build_bundle(args.workdir, n_items=args.items, n_users=args.users, dim=args.dim,
                          per_user=args.per_user)
    print(f"bundle ready ({time.perf_counter() - t:.0f}s): {models}", flush=True)

    procs = []
    results: dict = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                                 "platform": platform.platform(),
                                 # other processes share the cores: a load average above the core count
                                 # inflates every latency below
                                 "loadavg_at_start": list(os.getloadavg())}, "runs": []}
    try:
        ep = free_port()
        procs.append(start([sys.executable, __file__, "--empty-server", str(ep), "--workers", str(args.workers)]))
        sp = free_port()
        serve = [sys.executable, "-m", "recsys", "serve", "--models", str(models), "--host", "127.0.0.1",
                 "--workers", str(args.workers), "--poll-s", "0"]
        procs.append(start([*serve, "--port", str(sp), "--max-concurrency", "1000"]))
        lp = free_port()  # the overload check: concurrency limit 32
        procs.append(start([*serve, "--port", str(lp), "--max-concurrency", "32"]))
        wait_serving(ep, health=False)
        wait_serving(sp)
        wait_serving(lp)

        rng = np.random.default_rng(0)
        users = [f"u{u}" for u in rng.integers(0, args.users, 100_000)]
        rec_bytes = [pb.RecommendRequest(user_id=u, k=10).SerializeToString() for u in users[:5000]]
        batch_bytes = [pb.BatchRecommendRequest(user_ids=users[i * 64:(i + 1) * 64], k=10).SerializeToString()
                       for i in range(200)]

        def run(name: str, port: int, method: str, reqs: list, c: int, n: int) -> dict:
            r = asyncio.run(drive(port, method, lambda i: reqs[i % len(reqs)], concurrency=c, n=n,
                                  warmup=min(200, n)))
            r["name"] = name
            results["runs"].append(r)
            print(f"{name:<22} c={c:<4} n={n:<6} {r['qps']:>9.0f}/s  p50 {r['p50_ms']:6.2f}  p95 {r['p95_ms']:6.2f}  "
                  f"p99 {r['p99_ms']:6.2f} ms  {r['codes']}", flush=True)
            return r

        print(f"{'':<22} {'':<6} {'':<8} {'QPS':>10}  latency", flush=True)
        for c in args.concurrency:
            run("empty", ep, EMPTY_METHOD, [b""], c, args.requests)
            run("Recommend", sp, "/recsys.v1.Recommender/Recommend", rec_bytes, c, args.requests)
        for c in (1, 8):
            r = run("BatchRecommend(64)", sp, "/recsys.v1.Recommender/BatchRecommend", batch_bytes, c,
                    args.batch_requests)
            r["users_per_s"] = r["qps"] * 64
            print(f"{'':<22} -> {r['users_per_s']:.0f} users/s", flush=True)
        over = run("overload(limit 32)", lp, "/recsys.v1.Recommender/Recommend", rec_bytes, 256, 5000)
        results["overload_only_ok_or_exhausted"] = set(over["codes"]) <= {"OK", "RESOURCE_EXHAUSTED"}
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def find(name: str, c: int) -> dict:
        return next(r for r in results["runs"] if r["name"] == name and r["concurrency"] == c)

    if 1 in args.concurrency and 8 in args.concurrency:
        one, eight = find("Recommend", 1), find("Recommend", 8)
        results["targets"] = {
            "c1_p50_le_0.8ms": one["p50_ms"] <= 0.8, "c1_p99_le_1.5ms": one["p99_ms"] <= 1.5,
            "c8_qps_ge_2000": eight["qps"] >= 2000, "c8_p99_le_8ms": eight["p99_ms"] <= 8,
            "c8_ratio_to_empty": eight["qps"] / find("empty", 8)["qps"],
            "c8_ratio_ge_0.7": eight["qps"] / find("empty", 8)["qps"] >= 0.7,
            "batch_users_per_s_ge_20000": max(find("BatchRecommend(64)", c)["users_per_s"] for c in (1, 8)) >= 20000,
            "overload_only_ok_or_exhausted": results["overload_only_ok_or_exhausted"],
        }
        print(json.dumps(results["targets"], indent=2))
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from recsys.io import atomic_write_json

    atomic_write_json(args.out, results)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
