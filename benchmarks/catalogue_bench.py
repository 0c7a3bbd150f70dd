"""Cost of the live catalogue (issue 18): serving after UpsertItems / RetireItems, filters, change latency and
how fast a second replica of the same models directory follows.

    nice -n 5 python benchmarks/catalogue_bench.py                    # 20k items, dim 64 (builds the bundle once)
    python benchmarks/catalogue_bench.py --items 100000 --repeat 3    # serve_bench's default size (slower build)

1. Builds (once, cached in --workdir, shared with benchmarks/serve_bench.py) the bundle of
   ``serve_bench.build_bundle``: a synthetic prepared dataset with ``--items`` items whose one item attribute is
   ``category`` (50 values ``c0..c49``, ~2% of the items each), one training epoch of a dim-``--dim`` two-tower
   model, exported with its HNSW index. The default is 20k items, not serve_bench's 100k: that build takes minutes
   on a shared 2-core machine. Each run copies the cached models directory twice (the cache itself never gets a
   catalogue delta): ``models`` and ``models-control``.
2. Starts three ``recsys serve`` subprocesses (the admin token through ``RECSYS_ADMIN_TOKEN``): A on ``models``
   (no polling: it applies its own admin changes), B on the same ``models`` with ``--poll-s 1`` (a replica) and
   C on ``models-control``, never changed (the native known-user path throughout: the control).
3. Measures from this process over gRPC (serve_bench's driver: one channel, c=1, latency p50/p99, server CPU per
   request from /proc), Recommend = a known user, k=10, seen items excluded:
   (a) A untouched (native path), Recommend and BatchRecommend(64 users);
   then UpsertItems 1,000 new items (10 calls of 100, categories drawn like the bundle's) and RetireItems 1,000
   trained items (10 calls of 100) on A, and, ``--repeat`` times interleaved:
   (b) A changed (the LiveIndex view, the Python path), Recommend and BatchRecommend(64);
   (c) A changed + a filter ``category any_of 5 values`` (~10%) and ``any_of 1 value`` (~2%: the finest a single
       condition on this bundle's only attribute allows; ~1% is not reachable);
   the control C with the same requests (plain, the two filters, BatchRecommend): so (b) vs (a) is also compared
   within each repeat, under the same machine load.
   Answers of (b)/(c) are checked: no retired item, every filtered item in the filter's categories.
4. Change latency on A: UpsertItems of 1 item and of 100 new items, RetireItems of 1 item (``--change-calls``
   each, p50/p99), then ``--propagate`` changes (upsert 1 / retire 1 alternately, each after a random pause of up
   to 1 s so it lands at a random point of B's poll cycle): the time from A's answer until B's
   ``GetModelInfo.catalogue_seq`` reaches it (asked every 5 ms).
   Each change rebuilds the served view from the whole delta, so the JSON records the delta's size before each
   block; the first upsert of a server also imports torch and the item tower (``setup_upsert_100.all_ms[0]``).
5. In-process CPU per Recommend (no gRPC), the same requests on the untouched bundle and on the view as (b)
   served it (the delta of ``models`` up to the 2,000 changes): the native call, the Python handler (request ->
   response bytes), ``service.recommend``, and the index search alone (the graph with and without the live-item
   bitset, the exact delta segment, the merge).

Prints a table and writes benchmarks/results/catalogue_bench.json. Client and servers share the machine's cores
(and, on a shared machine, other people's processes): compare numbers within one run, CPU per request is the
steadier one.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.serve_bench import (  # noqa: E402
    build_bundle,
    cpu_seconds,
    drive,
    free_port,
    start,
    stop,
    wait_serving,
)

RESULTS = ROOT / "benchmarks" / "results" / "catalogue_bench.json"
TOKEN = "catalogue-bench-token"
RECOMMEND = "/recsys.v1.Recommender/Recommend"
BATCH = "/recsys.v1.Recommender/BatchRecommend"
N_CATEGORIES = 50  # serve_bench.build_bundle: category codes 1..50 = values c0..c49


# ------------------------------------------------------------------------------------------------ measuring


def measure(name: str, port: int, pid: int, method: str, reqs: list[bytes], n: int, *, users_per_req: int = 1,
            rep: int = 0) -> dict:
    """``n`` requests at c=1 (after min(200, n) warm-up ones): latency percentiles and CPU per request."""
    warmup = min(200, n)
    s0, c0 = cpu_seconds(pid), time.process_time()
    r = asyncio.run(drive(port, method, lambda i: reqs[i % len(reqs)], concurrency=1, n=n, warmup=warmup))
    s1, c1 = cpu_seconds(pid), time.process_time()
    r.update(name=name, repeat=rep, loadavg_1m=os.getloadavg()[0],
             server_cpu_us=(s1 - s0) / (n + warmup) * 1e6, client_cpu_us=(c1 - c0) / (n + warmup) * 1e6)
    if users_per_req > 1:
        r["users_per_s"] = r["qps"] * users_per_req
    print(f"  {name:<34} p50 {r['p50_ms']:7.2f}  p99 {r['p99_ms']:7.2f} ms  {r['qps']:6.0f}/s  "
          f"server {r['server_cpu_us']:6.0f} us/req  load {r['loadavg_1m']:4.1f}  {r['codes']}", flush=True)
    return r


def pct(xs: list[float]) -> dict:
    a = np.asarray(xs, dtype=np.float64) * 1e3
    return {"n": int(a.size), "p50_ms": float(np.percentile(a, 50)), "p99_ms": float(np.percentile(a, 99)),
            "max_ms": float(a.max()), "all_ms": [round(float(x), 3) for x in a]}


def category_filter(values: list[str]):
    from recsys.v1 import recommender_pb2 as pb

    return pb.ItemFilter(all_of=[pb.AttributeCondition(attribute="category", any_of=pb.StringSet(values=values))])


def item_record(item_id: str, category: int):
    from recsys.v1 import recommender_pb2 as pb

    return pb.ItemRecord(item_id=item_id, attributes={"category": pb.StringSet(values=[f"c{category}"])})


class Admin:
    """Sync admin + info stubs of one server."""

    def __init__(self, port: int) -> None:
        import grpc

        from recsys.v1 import recommender_pb2_grpc as pb_grpc

        self.channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self.admin = pb_grpc.RecommenderAdminStub(self.channel)
        self.info_stub = pb_grpc.RecommenderStub(self.channel)
        self.md = (("authorization", f"Bearer {TOKEN}"),)

    def upsert(self, records: list) -> tuple[float, object]:
        from recsys.v1 import recommender_pb2 as pb

        t = time.perf_counter()
        resp = self.admin.UpsertItems(pb.UpsertItemsRequest(items=records), metadata=self.md, timeout=120)
        return time.perf_counter() - t, resp

    def retire(self, ids: list[str]) -> tuple[float, object]:
        from recsys.v1 import recommender_pb2 as pb

        t = time.perf_counter()
        resp = self.admin.RetireItems(pb.RetireItemsRequest(item_ids=ids), metadata=self.md, timeout=120)
        return time.perf_counter() - t, resp

    def info(self):
        from recsys.v1 import recommender_pb2 as pb

        return self.info_stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)

    def recommend(self, req):
        return [x.item_id for x in self.info_stub.Recommend(req, timeout=10).items]


def wait_seq(admin: Admin, seq: int, *, timeout: float = 60.0, every: float = 0.005) -> float:
    """Until ``admin``'s server reports catalogue_seq >= ``seq``; returns the perf_counter time it did."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if admin.info().catalogue_seq >= seq:
            return time.perf_counter()
        time.sleep(every)
    raise TimeoutError(f"catalogue_seq {seq} not reached in {timeout}s")


# ------------------------------------------------------------------------------------------------ in-process


def profile(models: Path, users: list[str], filters: dict[str, list[str]], upto_seq: int,
            *, n: int = 300, rounds: int = 3) -> dict:
    """CPU per Recommend in-process (best of ``rounds``), untouched bundle vs the view of ``models`` with its
    catalogue delta applied up to change ``upto_seq``."""
    from recsys.catalogue.delta import CatalogueLog, CatalogueState
    from recsys.catalogue.filters import Condition, ItemFilter
    from recsys.catalogue.live import live_bundle
    from recsys.v1 import recommender_pb2 as pb
    from server import fastpath, service
    from server.store import ModelStore
    from server.wire import recommend_response

    store = ModelStore(models, warmup_queries=8)
    store.reload()
    base = store.current.base
    # the catalogue as (b) and (c) served it: the delta up to ``upto_seq``
    changes = [ch for ch in CatalogueLog(models, str(base.version)).read() if ch.seq <= upto_seq]
    live = live_bundle(base, CatalogueState.empty().apply(changes))
    service.prepared(live)
    untouched = live_bundle(base, CatalogueState.empty())  # the bundle's view with no changes (as served by C)
    fast = fastpath.for_bundle(untouched)
    limits = service.Limits()
    us = users[:n]
    reqs = [pb.RecommendRequest(user_id=u, k=10) for u in us]
    raw = [r.SerializeToString() for r in reqs]
    rows = [base.user_row(u) for u in us]
    q = [base.user_embeddings[r: r + 1] for r in rows]
    seen = [base.seen_items(r) for r in rows]
    li = live.index
    allow = {name: service.allowed_by(live, ItemFilter((Condition("category", "any_of", tuple(v)),)))
             for name, v in filters.items()}
    stages = {
        "native KnownUserRecommender (untouched)": lambda i: fast.recommend(raw[i], limits.max_k,
                                                                            limits.max_id_length,
                                                                            limits.max_history),
        "python handler, untouched": lambda i: recommend_response(untouched, reqs[i], limits).SerializeToString(),
        "python handler, changed view": lambda i: recommend_response(live, reqs[i], limits).SerializeToString(),
        "  service.recommend, untouched": lambda i: service.recommend(untouched, user_id=us[i], k=10),
        "  service.recommend, changed view": lambda i: service.recommend(live, user_id=us[i], k=10),
        "index.search excl. seen, untouched (HNSW)": lambda i: untouched.index.search(q[i], 10, exclude=[seen[i]]),
        "index.search excl. seen, changed (LiveIndex)": lambda i: li.search(q[i], 10, exclude=[seen[i]]),
        # the graph part as LiveIndex runs it: the masked rows joined to the exclusion (few) or a live bitset (many)
        "  graph part (HNSW, masked rows excluded)": lambda i: li.base.search(
            q[i], 10, exclude=[seen[i] if li._masked_list is None else np.concatenate((seen[i], li._masked_list))],
            **({} if li._base_live is None else {"allow": li._base_live})),
        "  delta segment (one matrix product)": lambda i: li._search_delta(q[i], 10, [seen[i]], None, None),
    }
    for name, a in allow.items():
        f = category_filter(filters[name])
        stages[f"python handler, changed + filter {name}"] = (
            lambda i, f=f: recommend_response(live, pb.RecommendRequest(user_id=us[i], k=10, filter=f),
                                              limits).SerializeToString())
        stages[f"index.search, changed + filter {name}"] = (
            lambda i, a=a: li.search(q[i], 10, exclude=[seen[i]], allow=a))
    best = {name: float("inf") for name in stages}
    for _ in range(rounds):
        for name, fn in stages.items():
            for i in range(20):
                fn(i)
            t = time.process_time()
            for i in range(n):
                fn(i)
            best[name] = min(best[name], (time.process_time() - t) / n * 1e6)
    # merge cost: both halves' answers merged by score
    from recsys.retrieval import merge_topk

    a_ids, a_sc = li.base.search(q[0], 10, exclude=[seen[0]])
    b_ids, b_sc = li._search_delta(q[0], 10, [seen[0]], None, None)
    t = time.process_time()
    for _ in range(n):
        merge_topk([(a_ids, a_sc), (b_ids, b_sc)], 10)
    best["  merge_topk"] = (time.process_time() - t) / n * 1e6
    return {"us": best, "users": n, "rounds": rounds, "native_built": fast is not None, "upto_seq": upto_seq,
            "delta_rows": int(li._delta_rows.size), "masked_graph_rows": int(li._base_masked.size)}


# ------------------------------------------------------------------------------------------------ main


def versions() -> dict:
    out = {"python": sys.version.split()[0]}
    for pkg in ("recsys", "grpcio", "protobuf", "numpy"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    try:
        out["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                           check=True).stdout.strip()
        # uncommitted edits of the served code (a shared checkout): the numbers are of this tree, not the commit
        out["git_modified"] = subprocess.run(["git", "status", "--porcelain", "--", "recsys", "server"], cwd=ROOT,
                                             capture_output=True, text=True, check=True).stdout.splitlines()
    except (OSError, subprocess.CalledProcessError):
        out["git_commit"] = None
    return out


def partitioned(cached: Path, attributes: list[str]) -> Path:
    """The cached bundle's run exported again with ``index.partition_by = attributes`` (cached next to it)."""
    from recsys.core import schema
    from recsys.publish import export
    from recsys.retrieval import IndexConfig

    models = cached.parent / f"models-parts-{'-'.join(attributes)}"
    if not (models / schema.LATEST).is_file():
        t = time.perf_counter()
        export(cached.parent / "run", models, index_cfg=IndexConfig(partition_by=tuple(attributes)),
               tune_queries=500, evaluate_split=None)
        print(f"exported with partitions in {time.perf_counter() - t:.0f}s", flush=True)
    return models


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=20_000, help="catalogue size (serve_bench's default is 100000)")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--per-user", type=int, default=12)
    p.add_argument("--requests", type=int, default=1000, help="Recommend requests per measurement (c=1)")
    p.add_argument("--batch-requests", type=int, default=60, help="BatchRecommend(64) requests per measurement")
    p.add_argument("--repeat", type=int, default=3, help="interleaved repeats of the after-change measurements")
    p.add_argument("--changes", type=int, default=1000, help="items upserted, and items retired, before (b)")
    p.add_argument("--change-calls", type=int, default=20, help="calls per change-latency measurement")
    p.add_argument("--propagate", type=int, default=5, help="changes timed until the poll-1s replica shows them")
    p.add_argument("--workers", type=int, default=0, help="server RPC threads; 0 = recsys serve's default")
    p.add_argument("--workdir", type=Path, default=Path("/tmp/recsys_serve_bench"),
                   help="bundle cache (serve_bench's) and this run's copies")
    p.add_argument("--no-profile", action="store_true", help="skip the in-process CPU profile")
    p.add_argument("--partition-by", nargs="+", default=[],
                   help="serve the same trained model exported with index.partition_by = these attributes (a "
                        "graph per value, recsys.retrieval.partitions), e.g. category")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from recsys.core import schema
    from recsys.core.io import atomic_write_json
    from recsys.v1 import recommender_pb2 as pb
    from server.settings import ServeSettings

    t_start = time.perf_counter()
    cached = build_bundle(args.workdir, n_items=args.items, n_users=args.users, dim=args.dim, per_user=args.per_user)
    if args.partition_by:
        cached = partitioned(cached, args.partition_by)
    print(f"bundle ready ({time.perf_counter() - t_start:.0f}s): {cached}", flush=True)
    run_dir = args.workdir / f"catalogue-run-{cached.parent.name}"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    models, control = run_dir / "models", run_dir / "models-control"
    shutil.copytree(cached, models, symlinks=True)
    shutil.copytree(cached, control, symlinks=True)

    import pyarrow.parquet as pq

    items_tab = pq.read_table(cached.parent / "data" / schema.ITEMS, columns=[schema.ITEM_ID, "feat_category"])
    item_category = dict(zip(items_tab[schema.ITEM_ID].to_pylist(),
                             (np.asarray(items_tab["feat_category"]) - 1).tolist(), strict=True))
    cats = np.array(list(item_category.values()))
    filters = {"10%": [f"c{c}" for c in range(5)], "2%": ["c0"]}
    workers = ServeSettings(workers=args.workers).resolved_workers()
    results: dict = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "settings": {"workers": workers, "k": 10, "concurrency": 1, "seen_excluded": True,
                     "server_A": "poll_s=0 (applies its own admin changes)", "server_B": "poll_s=1 (replica)",
                     "server_C": "untouched copy (control)", "filters": filters,
                     "filter_fraction_of_trained_items": {n: float(np.isin(cats, [int(v[1:]) for v in vs]).mean())
                                                          for n, vs in filters.items()}},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_at_start": list(os.getloadavg())},
        "versions": versions(), "runs": [],
    }
    os.environ["RECSYS_ADMIN_TOKEN"] = TOKEN  # the servers' admin token (serve_bench.start passes os.environ on)
    procs: list[subprocess.Popen] = []
    rng = np.random.default_rng(1)
    try:
        serve = [sys.executable, "-m", "recsys", "serve", "--host", "127.0.0.1", "--workers", str(workers)]
        pa_, pb_, pc_ = free_port(), free_port(), free_port()
        logs = run_dir / "logs"
        a = start([*serve, "--models", str(models), "--port", str(pa_), "--poll-s", "0"], logs / "A.log")
        b = start([*serve, "--models", str(models), "--port", str(pb_), "--poll-s", "1"], logs / "B.log")
        c = start([*serve, "--models", str(control), "--port", str(pc_), "--poll-s", "0"], logs / "C.log")
        procs = [a, b, c]
        for port, proc in ((pa_, a), (pb_, b), (pc_, c)):
            wait_serving(port, proc)
        A, B = Admin(pa_), Admin(pb_)
        print(f"servers up ({time.perf_counter() - t_start:.0f}s)", flush=True)

        users = [f"u{u}" for u in rng.integers(0, args.users, 20_000)]
        rec = [pb.RecommendRequest(user_id=u, k=10).SerializeToString() for u in users[:5000]]
        rec_f = {name: [pb.RecommendRequest(user_id=u, k=10, filter=category_filter(v)).SerializeToString()
                        for u in users[:5000]] for name, v in filters.items()}
        batch = [pb.BatchRecommendRequest(user_ids=users[i * 64:(i + 1) * 64], k=10).SerializeToString()
                 for i in range(200)]

        def run(name: str, port: int, proc, method: str, reqs: list, n: int, rep: int, upr: int = 1) -> None:
            results["runs"].append(measure(name, port, proc.pid, method, reqs, n, users_per_req=upr, rep=rep))

        print("(a) A untouched", flush=True)
        run("(a) Recommend, untouched", pa_, a, RECOMMEND, rec, args.requests, 0)
        run("(a) BatchRecommend(64), untouched", pa_, a, BATCH, batch, args.batch_requests, 0, 64)

        # the changes: 1,000 new items, 1,000 trained items retired, in calls of 100
        n_new = args.changes
        new_ids = [f"new{j}" for j in range(n_new)]
        new_cat = rng.integers(0, N_CATEGORIES, n_new)
        item_category.update(zip(new_ids, new_cat.tolist(), strict=True))
        retired = [f"i{j}" for j in rng.choice(args.items, args.changes, replace=False)]
        setup = {"upsert_100_s": [], "retire_100_s": []}
        for s in range(0, n_new, 100):
            dt, resp = A.upsert([item_record(t, int(cc)) for t, cc in zip(new_ids[s:s + 100], new_cat[s:s + 100],
                                                                           strict=True)])
            assert resp.added == len(new_ids[s:s + 100]) and not resp.unknown_values, resp
            setup["upsert_100_s"].append(dt)
        for s in range(0, len(retired), 100):
            dt, resp = A.retire(retired[s:s + 100])
            assert resp.retired == len(retired[s:s + 100]), resp
            setup["retire_100_s"].append(dt)
        info = A.info()
        results["after_changes"] = {"catalogue_size": info.catalogue_size, "upserted_items": info.upserted_items,
                                    "retired_items": info.retired_items, "catalogue_seq": info.catalogue_seq,
                                    "setup_upsert_100": pct(setup["upsert_100_s"]),
                                    "setup_retire_100": pct(setup["retire_100_s"])}
        print(f"changed: {results['after_changes']['catalogue_size']} items, seq {info.catalogue_seq}; "
              f"upsert(100) p50 {results['after_changes']['setup_upsert_100']['p50_ms']:.0f} ms, "
              f"retire(100) p50 {results['after_changes']['setup_retire_100']['p50_ms']:.0f} ms", flush=True)

        # answers of the changed view: no retired item; filtered ones in the filter's categories
        gone, bad, new_hits = set(retired), 0, 0
        for u in users[:100]:
            got = A.recommend(pb.RecommendRequest(user_id=u, k=10))
            bad += len(gone.intersection(got))
            new_hits += sum(t.startswith("new") for t in got)
            for vs in filters.values():
                allowed = {int(v[1:]) for v in vs}
                got_f = A.recommend(pb.RecommendRequest(user_id=u, k=10, filter=category_filter(vs)))
                bad += sum(item_category[t] not in allowed or t in gone for t in got_f) + (len(got_f) != 10)
        results["checks"] = {"users": 100, "violations": bad, "new_items_in_unfiltered_answers": new_hits}
        print(f"checks: {results['checks']}", flush=True)

        for rep in range(args.repeat):
            print(f"--- repeat {rep + 1}/{args.repeat}", flush=True)
            run("(a') Recommend, control C", pc_, c, RECOMMEND, rec, args.requests, rep)
            run("(b) Recommend, changed", pa_, a, RECOMMEND, rec, args.requests, rep)
            for name in filters:
                run(f"(c) Recommend, changed + filter {name}", pa_, a, RECOMMEND, rec_f[name], args.requests, rep)
                run(f"(a'+f) Recommend, control + filter {name}", pc_, c, RECOMMEND, rec_f[name], args.requests, rep)
            run("(a') BatchRecommend(64), control C", pc_, c, BATCH, batch, args.batch_requests, rep, 64)
            run("(b) BatchRecommend(64), changed", pa_, a, BATCH, batch, args.batch_requests, rep, 64)

        # change latency
        print("change latency on A", flush=True)
        lat: dict[str, list[float]] = {"UpsertItems(1)": [], "UpsertItems(100)": [], "RetireItems(1)": []}
        live_trained = [f"i{j}" for j in range(args.items) if f"i{j}" not in gone]
        random.Random(2).shuffle(live_trained)
        def upserted() -> int:
            return int(A.info().upserted_items)

        before = {"UpsertItems(1)": upserted()}
        for j in range(args.change_calls):
            lat["UpsertItems(1)"].append(A.upsert([item_record(f"one{j}", j % N_CATEGORIES)])[0])
        before["UpsertItems(100)"] = upserted()
        for j in range(args.change_calls):
            lat["UpsertItems(100)"].append(A.upsert([item_record(f"hundred{j}-{i}", i % N_CATEGORIES)
                                                     for i in range(100)])[0])
        before["RetireItems(1)"] = upserted()
        for _ in range(args.change_calls):
            lat["RetireItems(1)"].append(A.retire([live_trained.pop()])[0])
        # every change rebuilds the served view from the whole delta: its size at the start of each block
        results["change_latency"] = {name: {**pct(xs), "upserted_items_before": before[name]}
                                     for name, xs in lat.items()}
        for name, r in results["change_latency"].items():
            print(f"  {name:<18} p50 {r['p50_ms']:7.1f}  p99 {r['p99_ms']:7.1f} ms  "
                  f"(delta: {r['upserted_items_before']} upserted items before)", flush=True)

        # propagation to the poll-1s replica B
        t = time.perf_counter()
        wait_seq(B, A.info().catalogue_seq)
        catch_up = time.perf_counter() - t
        prop, pause = [], random.Random(3)
        for j in range(args.propagate):
            time.sleep(pause.uniform(0.0, 1.0))
            if j % 2 == 0:
                _, resp = A.upsert([item_record(f"prop{j}", j % N_CATEGORIES)])
            else:
                _, resp = A.retire([live_trained.pop()])
            t_ack = time.perf_counter()
            prop.append(wait_seq(B, resp.catalogue_seq) - t_ack)
        results["propagation"] = {**pct(prop), "poll_s": 1.0, "asked_every_ms": 5,
                                  "initial_catch_up_s": catch_up}
        print(f"  replica B shows a change after p50 {results['propagation']['p50_ms']:.0f} ms "
              f"(max {results['propagation']['max_ms']:.0f}); catching up {catch_up:.2f}s", flush=True)
        results["final_info"] = {"A": str(A.info()).replace("\n", "; "), "B_seq": B.info().catalogue_seq}
        A.channel.close()
        B.channel.close()
    finally:
        stop(procs)
    for proc in procs:
        text = Path(proc.log).read_text(errors="replace")  # type: ignore[attr-defined]
        if "native Recommend disabled" in text:
            results.setdefault("warnings", []).append(f"{proc.log}: native Recommend disabled")  # type: ignore[attr-defined]

    if not args.no_profile:
        print("in-process CPU per Recommend (us, best of 3):", flush=True)
        results["profile"] = profile(models, users, filters, results["after_changes"]["catalogue_seq"])
        for name, us in results["profile"]["us"].items():
            print(f"  {name:<48} {us:8.1f}", flush=True)

    # medians over repeats, and the changed/untouched ratios within each repeat
    groups: dict[str, list[dict]] = {}
    for r in results["runs"]:
        groups.setdefault(r["name"], []).append(r)
    results["summary"] = {name: {key: float(np.median([r[key] for r in rs]))
                                 for key in ("p50_ms", "p99_ms", "qps", "server_cpu_us", "client_cpu_us",
                                             "loadavg_1m", *(("users_per_s",) if "users_per_s" in rs[0] else ()))}
                          | {"repeats": len(rs)} for name, rs in groups.items()}

    def ratio(num: str, den: str, key: str) -> float:
        pairs = zip(groups[num], groups[den], strict=True)
        return float(np.median([x[key] / y[key] for x, y in pairs]))

    results["ratios_within_repeat"] = {
        f"{num} / {den}": {key: ratio(num, den, key) for key in ("p50_ms", "p99_ms", "server_cpu_us")}
        for num, den in (("(b) Recommend, changed", "(a') Recommend, control C"),
                         ("(b) BatchRecommend(64), changed", "(a') BatchRecommend(64), control C"),
                         *((f"(c) Recommend, changed + filter {n}", "(a') Recommend, control C") for n in filters),
                         *((f"(a'+f) Recommend, control + filter {n}", "(a') Recommend, control C")
                           for n in filters))
    }
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    results["wall_s"] = time.perf_counter() - t_start

    print(f"\nc=1, k=10, seen excluded; {args.items} items, dim {args.dim}; medians of {args.repeat} repeats "
          f"(the (a) rows: once, before the changes)")
    print(f"{'':<40} {'p50 ms':>8} {'p99 ms':>8} {'server us/req':>14} {'users/s':>8}")
    for name, s in results["summary"].items():
        ups = f"{s['users_per_s']:8.0f}" if "users_per_s" in s else ""
        print(f"{name:<40} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f} {s['server_cpu_us']:14.0f} {ups}")
    for name, r in results["ratios_within_repeat"].items():
        print(f"ratio {name}: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items()))
    for name, r in results["change_latency"].items():
        print(f"{name:<40} {r['p50_ms']:8.1f} {r['p99_ms']:8.1f}")
    print(f"{'replica (poll 1 s) shows the change':<40} {results['propagation']['p50_ms']:8.0f} "
          f"{results['propagation']['max_ms']:8.0f} (max)")
    atomic_write_json(args.out, results)
    print(f"wrote {args.out} ({results['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
