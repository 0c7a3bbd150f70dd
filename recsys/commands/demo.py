"""`recsys demo`: the whole product end to end on built-in synthetic data (what `make demo` runs).

synth -> (older 85% of the logs) prepare -> train -> export/publish -> evaluate on the newer 15% -> gRPC server ->
client calls -> retrain on the full logs -> the running server hot-reloads the new version -> the same calls answer
from it. Heavy imports (torch, polars, grpc, the server) happen inside the functions, as in every command.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from recsys.core.config import load_section
from recsys.core.io import atomic_dir

log = logging.getLogger(__name__)

# The demo's trimmed config (recsys/configs/demo.toml, package data).
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.toml"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo",
        help="run synth -> prepare -> train -> evaluate -> publish -> serve -> query -> retrain + hot reload",
        description=(
            "End-to-end demo on built-in synthetic logs: generate logs, prepare the older part, train a two-tower "
            "model, evaluate it against baselines, publish a bundle, start the gRPC server, query it through the "
            "Python client (a known user, a new user by history, similar items, an error case), then retrain on "
            "the full logs and show the running server hot-reloading the new version. A few minutes on 2 CPU cores."
        ),
    )
    p.add_argument("--workdir", default="demo", help="where data, runs, models and reports go (default: demo)")
    p.add_argument("--events", type=int, default=400_000, help="synthetic events (default: 400000)")
    p.add_argument("--users", type=int, default=10_000, help="synthetic users (default: 10000)")
    p.add_argument("--items", type=int, default=3_000, help="synthetic items (default: 3000)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the demo config's)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--port", type=int, default=50051, help="server port for --serve (default: 50051; 0 = free)")
    p.add_argument("--serve", action="store_true", help="leave the server running afterwards (Ctrl-C to stop)")
    p.add_argument("--no-retrain", action="store_true", help="skip the retrain + hot-reload step")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    run_demo(DemoOptions(
        workdir=args.workdir, events=args.events, users=args.users, items=args.items, epochs=args.epochs,
        device=args.device, port=args.port, serve=args.serve, retrain=not args.no_retrain,
    ))
    return 0



@dataclass(frozen=True)
class DemoOptions:
    workdir: str | Path = "demo"
    events: int = 400_000
    users: int = 10_000
    items: int = 3_000
    epochs: int | None = None
    device: str = "auto"
    port: int = 50051
    serve: bool = False
    retrain: bool = True
    first_share: float = 0.85
    """Share of the synthetic time range used for the first model; the retrain sees all of it."""


def _say(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 74 - len(title)), flush=True)


def _split_logs(synth_dir: Path, out: Path, share: float) -> tuple[Path, int]:
    """Write the oldest ``share`` of the synthetic logs' time range to ``out/part-0.parquet``; returns the
    directory and the cut (epoch ms, exclusive)."""
    import polars as pl  # polars: imported here so `recsys --help` stays fast

    logs = pl.scan_parquet(synth_dir / "logs" / "*.parquet")
    lo, hi = logs.select(pl.col("timestamp").min().alias("lo"), pl.col("timestamp").max().alias("hi")).collect().row(0)
    cut = lo + int((hi - lo) * share)
    if not out.exists():
        with atomic_dir(out) as tmp:
            logs.filter(pl.col("timestamp") < cut).sink_parquet(tmp / "part-0.parquet")
    return out, int(cut)


def _print_table(rows: list[dict[str, Any]], cols: list[str]) -> None:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def _show(title: str, rec: Any, titles: dict[str, str], cats: dict[str, str]) -> None:
    print(f"{title}  (model {rec.model_version}, source={getattr(rec, 'source', '')})")
    for i, (item, score) in enumerate(zip(rec.item_ids, rec.scores, strict=True), 1):
        print(f"  {i:2d}. {item:<10} {score:6.3f}  [{cats.get(item, '?'):<12}] {titles.get(item, '')}")


# ~160 lines: the demo's script, one numbered section per stage printed in order; kept in one function so it
# reads top to bottom like the README's quick start.
def run_demo(opts: DemoOptions) -> dict[str, Any]:
    # polars, torch, grpc, the server: imported here so `recsys --help` stays fast
    import polars as pl

    from recsys import bundle as bundle_mod
    from recsys import publish
    from recsys.client import RecommenderClient, RecommenderError
    from recsys.evaluate import evaluate, write_report
    from recsys.prepare import PrepareConfig, format_summary, prepare
    from recsys.prepare.synth import SynthConfig, generate
    from recsys.retrain import retrain
    from recsys.train.loop import load_configs, train
    from server import ServeSettings, create_server, serve_until_signal

    t_start = time.perf_counter()
    work = Path(opts.workdir)
    work.mkdir(parents=True, exist_ok=True)
    config_path = DEMO_CONFIG
    if not config_path.is_file():  # a broken install: the demo's short schedule is part of what it promises
        raise FileNotFoundError(f"the demo's config {str(config_path)!r} is missing (package data of recsys)")
    overrides = [f"train.epochs={opts.epochs}"] if opts.epochs else []
    timings: dict[str, float] = {}

    def step(name: str, t0: float) -> None:
        timings[name] = round(time.perf_counter() - t0, 1)

    _say("1. synthetic logs")
    t0 = time.perf_counter()
    synth_dir = work / "synth"
    scfg = SynthConfig(events=opts.events, users=opts.users, items=opts.items)
    if not (synth_dir / "synth.json").exists():
        info = generate(synth_dir, config=scfg)
        print(f"generated {info['counts']['events']:,} events -> {synth_dir}")
    else:
        print(f"reusing {synth_dir}")
    first_logs, cut = _split_logs(synth_dir, work / "logs_v1", opts.first_share)
    step("synth", t0)

    _say("2. prepare (Polars, older part of the logs)")
    t0 = time.perf_counter()
    data_dir = work / "prepared"
    pcfg = load_section(PrepareConfig, "prepare", path=config_path)
    manifest = prepare([first_logs / "*.parquet"], data_dir, items=synth_dir / "items.parquet",
                       users=synth_dir / "users.parquet", config=pcfg, overwrite=True)
    print(format_summary(manifest))
    step("prepare", t0)

    _say("3. train the two-tower model")
    t0 = time.perf_counter()
    run_dir = work / "runs" / "v1"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    model_cfg, train_cfg, loss_cfg = load_configs(config_path, overrides)
    summary = train(data_dir, run_dir, model_cfg=model_cfg, train_cfg=train_cfg, loss_cfg=loss_cfg,
                    device=opts.device)
    best = {k: round(v, 4) for k, v in (summary.get("best_metrics") or {}).items()}
    print(f"best epoch {summary.get('best_epoch')} of {summary.get('steps')} steps, {summary.get('train_seconds')} s: valid {best}")
    step("train", t0)

    _say("4. publish the bundle (safetensors + npy + parquet + HNSW index, atomic, LATEST)")
    t0 = time.perf_counter()
    models_dir = work / "models"
    version_dir = publish.export(run_dir, models_dir, data_dir=data_dir)
    print(f"published {version_dir}")
    step("export", t0)

    _say("5. offline evaluation on the future: the newer logs v1 never saw (seen items excluded, full catalogue)")
    t0 = time.perf_counter()
    served = bundle_mod.Bundle.load(models_dir)
    # v1 was fit on every event before the cut (train.final_fit = "all"): score it, and baselines fit on the same
    # past, on what came after -- the whole logs split at the cut
    future_dir = work / "prepared_future"
    prepare([synth_dir / "logs" / "*.parquet"], future_dir, items=synth_dir / "items.parquet",
            users=synth_dir / "users.parquet", overwrite=True,
            config=dataclasses.replace(pcfg, split="global_time", test_start=str(cut), valid_frac=0.0))
    report = evaluate(served, future_dir, split="test", sweep=True)
    paths = write_report(report, work / "report", bundle=served)  # with the bundle: the item-embedding map too
    rows = []
    for name, m in report["models"].items():
        met = m.get("metrics", {})
        rows.append({"model": name, **{k: f"{met[k]:.4f}" for k in ("recall@10", "recall@20", "ndcg@20",
                                                                    "hit_rate@20") if k in met}})
    _print_table(rows, ["model", "recall@10", "recall@20", "ndcg@20", "hit_rate@20"])
    print(f"report: {paths.get('markdown', work / 'report')}")
    step("evaluate", t0)

    _say("6. gRPC server")
    # the admin token lets the demo call UpsertItems / RetireItems (a random one: the server is local and short-lived)
    admin_token = secrets.token_hex(16)
    settings = ServeSettings(models_dir=str(models_dir), poll_s=0.5, admin_token=admin_token)
    address = f"127.0.0.1:{opts.port if opts.serve else 0}"
    app, port = create_server(address, settings)
    app.start()
    target = f"127.0.0.1:{port}"
    print(f"serving {models_dir} on {target}")

    items = pl.read_parquet(synth_dir / "items.parquet")
    titles = dict(zip(items["item_id"].to_list(), items["title"].to_list(), strict=True))
    cats = dict(zip(items["item_id"].to_list(), items["category"].to_list(), strict=True))
    test = pl.read_parquet(data_dir / "test.parquet")
    users = pl.read_parquet(data_dir / "users.parquet")
    known_user = users["user_id"][int(test["user_idx"][0])]
    # a "new" user: the 5 most recent items of another test user's history, sent without any user ID
    history = pl.read_parquet(data_dir / "history.parquet")
    item_vocab = pl.read_parquet(data_dir / "items.parquet")["item_id"]
    other = int(test["user_idx"][len(test) // 2])
    new_history = [item_vocab[int(i)] for i in history.filter(pl.col("user_idx") == other)["items"][0][-5:]]

    def calls(client: RecommenderClient) -> str:
        rec = client.recommend(known_user, k=5)
        _show(f"Recommend(user_id={known_user!r}, k=5)", rec, titles, cats)
        fresh = new_history[-3:]  # what the known user just did (since the model was built), oldest first
        rec_fresh = client.recommend(known_user, history=fresh, k=5)
        cats_fresh = ", ".join(cats.get(i, "?") for i in fresh)
        _show(f"Recommend(user_id={known_user!r}, history={fresh} [{cats_fresh}], k=5) -- the same user, right "
              f"after these events", rec_fresh, titles, cats)
        rec2 = client.recommend(history=new_history, k=5)
        cats_seen = ", ".join(cats.get(i, "?") for i in new_history)
        _show(f"Recommend(history={new_history} [{cats_seen}], k=5) -- a user the model never saw",
              rec2, titles, cats)
        sim = client.similar_items(new_history[0], k=5)
        _show(f"SimilarItems({new_history[0]!r} [{cats[new_history[0]]}], k=5)", sim, titles, cats)
        try:
            client.recommend(known_user, k=0)
        except RecommenderError as e:
            print(f"Recommend(k=0) -> {e.code.name}: {e.details}")
        return rec.model_version

    def live_catalogue(client: RecommenderClient) -> None:
        rec = client.recommend(known_user, k=5)
        top_cat = cats.get(rec.item_ids[0], "?")
        other = next(c for c in sorted(set(cats.values())) if c != top_cat)
        _show(f"Recommend(user_id={known_user!r}, k=5, filter=['category={other}']) -- only {other}",
              client.recommend(known_user, k=5, filter=[f"category={other}"]), titles, cats)
        new_id = "i-new-001"
        up = client.upsert_items([{"item_id": new_id, "category": top_cat, "title": f"new {top_cat} arrival"}])
        cats[new_id], titles[new_id] = top_cat, f"new {top_cat} arrival"
        print(f"UpsertItems({new_id!r} [{top_cat}]) -> added={up['added']}, catalogue change {up['catalogue_seq']}")
        _show(f"SimilarItems({new_id!r}, k=5) -- a new item, embedded from its attributes alone",
              client.similar_items(new_id, k=5), titles, cats)
        gone = rec.item_ids[0]
        client.retire_items([gone])
        after = client.recommend(known_user, k=5)
        print(f"RetireItems({gone!r}) -> Recommend(user_id={known_user!r}) now: {after.item_ids} "
              f"({'gone' if gone not in after.item_ids else 'STILL THERE'})")
        info = client.model_info()
        print(f"catalogue: {info['catalogue_size']} items, {info['upserted_items']} upserted, "
              f"{info['retired_items']} retired (change {info['catalogue_seq']})")

    result: dict[str, Any] = {"timings": timings}
    with RecommenderClient(target, admin_token=admin_token) as client:
        client.wait_ready(timeout=30)
        _say("7. client calls")
        v1 = calls(client)
        result["v1"] = v1
        _say("7b. the live catalogue: a filter, a new item, a retired one (no retrain)")
        live_catalogue(client)

        if opts.retrain:
            _say("8. retrain on the full logs (gate vs the serving model) -> hot reload")
            t0 = time.perf_counter()
            # The demo retrains without the time prior that `recsys retrain` uses by default: on these logs (a
            # batch spans hundreds of days) its per-batch time inputs made the retrain take over 12 minutes instead
            # of 82 s on 2 CPU cores (README "Results").
            rep = retrain([synth_dir / "logs" / "*.parquet"], models_dir, items=synth_dir / "items.parquet",
                          users=synth_dir / "users.parquet", config_path=config_path,
                          overrides=["model.time_prior=false", *overrides])
            print(f"gate: {rep['gate']['reason']}")
            step("retrain", t0)
            if rep["published"]:
                deadline = time.time() + 60
                while client.model_info()["version"] != rep["published"] and time.time() < deadline:
                    time.sleep(0.2)
                print(f"server now answers with {client.model_info()['version']} (was {v1})")
                print("(a new version starts with its own, empty catalogue delta: the upsert and the retirement above "
                      "belonged to the old one; README \"A live catalogue\")")
                _say("9. the same calls, answered by the new version")
                result["v2"] = calls(client)
            else:
                print(f"candidate rejected; the server keeps serving {v1}")
    timings["total"] = round(time.perf_counter() - t_start, 1)
    _say("done")
    print("timings (s): " + ", ".join(f"{k}={v}" for k, v in timings.items()))
    if opts.serve:
        print(f"server left running on {target} (Ctrl-C to stop); try: recsys query info --target {target}")
        serve_until_signal(app, grace_s=settings.grace_s)
    else:
        app.stop(grace=2).wait()
    return result


