"""Training throughput: our Trainer step vs a bare-PyTorch reference loop, on synthetic power-law data.

Measured per (implementation, towers, batch size), side by side in one process on the same data:

* ``ours``: :class:`recsys.train.loop.Trainer` exactly as ``recsys train`` runs it: the interaction table resident on
  the device, batches sliced there from a device permutation, histories built by index arithmetic, bf16 autocast
  on CUDA, sparse ID-table gradients with row-wise Adagrad (``--optimizer``), the in-batch softmax with
  accidental-hit + same-user masking and logQ (``--loss-kernels``: the fused Triton kernels of recsys.train.kernels.fused_loss
  and/or the chunked torch softmax), and no host sync inside the step (``Trainer.step(check=False)``).
* ``reference``: two ``nn.Embedding`` ID tables, dense Adam, float32 ``[B, B]`` logits with a ``[B, B]`` boolean
  duplicate mask and cross-entropy: the textbook loop, ID towers only.

Towers: ``id_only`` (ID embeddings; the user tower pools a 1-item history from the shared item table, the
smallest the model allows) and ``history_features`` (the default user tower: the last ``--history-len`` items
attention-pooled from the item tower's ID table, plus the most recent item's own row, categorical item/user features,
and an MLP with one hidden layer in each tower; ``--history-kernels``: the fused lookup + pooling of
recsys.train.kernels.fused_pool and/or the torch path).

Throughput = interactions per second over ``--steps`` steps without a sync between them (the rows those steps
actually took, ``rows_timed``, over their wall time ``wall_s``); step time = median of the per-step times
``step_s`` (CUDA events on GPU, wall clock on CPU); ``weight_norm_change``: how far the timed steps moved the
weights (sum of the parameters' L2 norms, after minus before; 0 would mean no step trained); peak memory =
``torch.cuda.max_memory_allocated`` during the timed steps (CUDA only). A configuration that runs out of memory
is recorded as ``"oom"``.

    python benchmarks/train_bench.py --device cuda                 # 1M users x 1M items, dim 128, ~5 min on an H100
    python benchmarks/train_bench.py --device cpu --n-users 5000 --n-items 5000 --n-interactions 100000 \\
        --batch-sizes 256 1024 --dim 32 --steps 3 --warmup 1                      # CPU smoke size

``--user-towers pool transformer``: instead, CPU (or GPU) examples/s of the history_features towers with each
``model.user_tower``, same data, interleaved repeats; "examples" = targets trained (the transformer trains every
position of a window), the unit recsys train logs as examples_per_s. Writes benchmarks/results/train_bench_tower.json:

    python benchmarks/train_bench.py --device cpu --user-towers pool transformer --n-users 2000 --n-items 20000 \\
        --n-interactions 200000 --batch-sizes 1024 --dim 64 --steps 5 --warmup 2 --repeat 3

Imports only torch, numpy and the training path (recsys.train.loop / model / losses / optim / distributed; pyarrow via
recsys.core.data): no polars, no hnswlib. Writes benchmarks/results/train_bench.json.
"""

from __future__ import annotations

import argparse
import gc
import logging
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "train_bench.json"
TARGETS = {  # interactions / s on one H100 (issue 4)
    "ours/id_only/8192": 10e6,
    "ours/history_features/8192": 5e6,
}


def make_data(*, n_users: int, n_items: int, n_interactions: int, n_item_cats: int, n_user_cats: int,
              zipf: float, seed: int = 0):
    """A PreparedData held in memory: items drawn from a power law (p_r ~ 1 / r^zipf), rows grouped by user."""
    from recsys.core.data import Interactions, PreparedData

    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, n_items + 1, dtype=np.float64) ** zipf
    p /= p.sum()
    ranks = rng.choice(n_items, size=n_interactions, p=p)
    item_of_rank = rng.permutation(n_items)  # popular items are not the low rows
    items = item_of_rank[ranks].astype(np.int64)
    users = np.sort(rng.integers(0, n_users, size=n_interactions)).astype(np.int64)
    train = Interactions(users, items, np.arange(n_interactions, dtype=np.int64),
                         np.ones(n_interactions, dtype=np.float32))  # fmt: skip
    empty = Interactions.empty()
    counts = np.bincount(items, minlength=n_items).astype(np.float64) + 1.0  # +1: every item has prob > 0
    return PreparedData(
        path=Path("."), n_users=n_users, n_items=n_items, train=train, valid=empty, test=empty, extra=empty,
        item_prob=counts / counts.sum(),
        item_features={"category": rng.integers(1, n_item_cats, size=n_items), "brand": rng.integers(1, n_item_cats,
                                                                                                       size=n_items)},
        user_features={"region": rng.integers(1, n_user_cats, size=n_users)},
        item_cardinality={"category": n_item_cats, "brand": n_item_cats}, user_cardinality={"region": n_user_cats},
        titles=None, fingerprint="synthetic",
    )  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, n_steps: int, warmup: int, device: torch.device, *, start=None) -> tuple[float, float, list[float]]:
    """(median step seconds, wall seconds of ``n_steps`` steps without a sync between them, each step's seconds).

    ``start()`` runs after the warm-up, outside the timing (a snapshot of the weights)."""
    for i in range(warmup):
        step(i)
    _sync(device)
    if start is not None:
        start()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n_steps)]
    times = []
    t0 = time.perf_counter()
    for i in range(n_steps):
        if device.type == "cuda":
            events[i][0].record()
            step(warmup + i)
            events[i][1].record()
        else:
            s = time.perf_counter()
            step(warmup + i)
            times.append(time.perf_counter() - s)
    _sync(device)
    wall = time.perf_counter() - t0
    if device.type == "cuda":
        times = [a.elapsed_time(b) / 1e3 for a, b in events]
    return statistics.median(times), wall, times


def _weight_norm(params) -> float:
    """Sum of the parameters' L2 norms: moves when an optimizer step touched any weight (cheap at any size)."""
    with torch.no_grad():
        return float(sum(p.detach().double().norm() for p in params))


def _measured(med: float, wall: float, times: list[float], *, rows: int, n: int, before: float,
              after: float) -> dict[str, Any]:
    """What a row reports about its timed steps: throughput = the rows the timed steps actually took / wall."""
    return {"step_ms": med * 1e3, "interactions_per_s": rows / wall, "rows_timed": rows, "n_interactions": n,
            "wall_s": wall, "step_s": times, "weight_norm_change": abs(after - before)}


def bench_ours(data, *, towers: str, batch: int, loss_kernel: str, history_kernel: str, graphs: bool, args,
               device: torch.device, user_tower: str | None = None) -> dict[str, Any]:  # fmt: skip
    """``user_tower`` (``--user-towers``): that ``model.user_tower`` in the ``history_features`` towers; ``batch``
    then counts targets, as ``recsys train`` does: the transformer's step takes as many windows as make about
    ``batch`` targets (``recsys.train.loop._run_phase``), and ``examples_per_s`` = targets trained / wall (every
    position of a window is a query), = ``interactions_per_s`` for the pooling tower."""
    from recsys.train.config import LossConfig, ModelConfig, TrainConfig
    from recsys.train.loop import Trainer

    if towers == "id_only":
        mcfg = ModelConfig(dim=args.dim, embedding_dim=args.dim, history_len=1, share_history_embeddings=True,
                           use_user_features=False, use_item_features=False, user_id_dropout=0.0,
                           item_id_dropout=0.0)  # fmt: skip
    else:
        mcfg = ModelConfig(dim=args.dim, embedding_dim=args.dim, history_len=args.history_len,
                           hidden=(2 * args.dim,), **({"user_tower": user_tower} if user_tower else {}))  # fmt: skip
    sparse = args.optimizer != "adamw"
    tcfg = TrainConfig(batch_size=batch, lr=1e-3, embedding_lr=0.05, sparse_embeddings=sparse,
                       sparse_optimizer=args.optimizer if sparse else "sparse_adam",
                       loss_chunk_size=min(args.chunk, batch) if args.chunk else 0, compile=args.compile,
                       loss_kernel=loss_kernel, history_kernel=history_kernel, cuda_graphs=graphs,
                       progress=False,
                       tensorboard=False)  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(data, model_cfg=mcfg, train_cfg=tcfg, loss_cfg=LossConfig(), device=device)
    trainer.set_interactions(data.train)
    n = int(trainer.t_item.shape[0])
    # the examples a step samples from: rows, or with the transformer the window ends (Trainer.set_interactions)
    n_examples = int(trainer.n_examples)
    targets_of = None  # per example, the targets it trains (the transformer: its window's real positions)
    if trainer.windows is not None:
        ends = trainer.windows
        targets_of = (ends - trainer.t_start[ends]).clamp(max=args.history_len).cpu().numpy()
        batch = max(2, round(batch / trainer.targets_per_example))  # as recsys.train.loop._run_phase sizes it
    batch = min(batch, n_examples)
    perm = torch.randperm(n_examples, device=device)
    perm_host = perm.cpu().numpy() if targets_of is not None else None
    n_batches = max(n_examples // batch, 1)

    rows = [0]  # rows (examples) the timed steps trained on (warm-up excluded)
    targets = [0]  # targets the timed steps trained (= rows for the pooling tower)
    before = [0.0]  # the weights' norm after the warm-up

    def step(i: int) -> None:
        b = i % n_batches
        batch_rows = perm[b * batch : (b + 1) * batch]
        trainer.step(batch_rows, check=False)
        if i >= args.warmup:
            rows[0] += int(batch_rows.shape[0])
            targets[0] += int(batch_rows.shape[0]) if targets_of is None else \
                int(targets_of[perm_host[b * batch : (b + 1) * batch]].sum())

    def start() -> None:
        before[0] = _weight_norm(trainer.model.parameters())

    med, wall, times = _timed(step, args.steps, args.warmup, device, start=start)
    measured = _measured(med, wall, times, rows=rows[0], n=n, before=before[0],
                         after=_weight_norm(trainer.model.parameters()))
    if args.profile:
        _profile(step, f"ours/{towers}/{batch}", device)
    loss = float(trainer.loss(perm[:batch]).detach())  # after training: finite and below log(B)
    measured.update(examples_per_s=targets[0] / wall, targets_timed=targets[0], batch_examples=batch,
                    targets_per_example=float(trainer.targets_per_example), user_tower=mcfg.user_tower)
    return {**measured, "final_loss": loss,
            "n_parameters": sum(p.numel() for p in trainer.model.parameters()), "loss_kernel": trainer.loss_kernel,
            "history_kernel": trainer.history_kernel, "cuda_graphs_asked": graphs,
            "cuda_graphs": trainer.graphed is not None and trainer.graphed.graph is not None,
            "graphs_off": trainer.graphs_off if graphs else None}


def _profile(step, name: str, device: torch.device, n: int = 5) -> None:
    """Print where the time of ``n`` steps goes: host (Python + launches) vs device, top operators."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for i in range(n):
            step(i)
        _sync(device)
    n_ops = sum(e.count for e in prof.key_averages() if e.device_type.name == "CPU" and e.key.startswith("aten::"))
    print(f"--- profile {name}: {n_ops / n:.0f} aten calls per step (nested ones included)")
    print(f"--- profile {name}: {(time.perf_counter() - t0) / n * 1e3:.2f} ms/step (profiled)")
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))


def bench_reference(data, *, batch: int, args, device: torch.device) -> dict[str, Any]:
    """Bare PyTorch: ID tables, dense Adam, float32 [B, B] logits + [B, B] duplicate mask."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    users_t = torch.as_tensor(data.train.user_idx, device=device)
    items_t = torch.as_tensor(data.train.item_idx, device=device)
    uemb = torch.nn.Embedding(data.n_users, args.dim).to(device)
    iemb = torch.nn.Embedding(data.n_items, args.dim).to(device)
    for e in (uemb, iemb):
        torch.nn.init.normal_(e.weight, std=0.1)
    opt = torch.optim.Adam([uemb.weight, iemb.weight], lr=1e-3)
    n = int(items_t.shape[0])
    perm = torch.randperm(n, device=device)
    n_batches = n // batch
    eye = torch.eye(batch, dtype=torch.bool, device=device)
    target = torch.arange(batch, device=device)

    def loss_of(rows: torch.Tensor) -> torch.Tensor:
        items = items_t[rows]
        q = F.normalize(uemb(users_t[rows]), dim=1)
        c = F.normalize(iemb(items), dim=1)
        logits = q @ c.T / 0.1  # [B, B] float32
        dup = (items[:, None] == items[None, :]) & ~eye  # [B, B] bool
        return F.cross_entropy(logits.masked_fill(dup, float("-inf")), target)

    rows = [0]
    before = [0.0]

    def step(i: int) -> None:
        b = i % n_batches
        batch_rows = perm[b * batch : (b + 1) * batch]
        opt.zero_grad(set_to_none=True)
        loss_of(batch_rows).backward()
        opt.step()
        rows[0] += int(batch_rows.shape[0]) if i >= args.warmup else 0

    def start() -> None:
        before[0] = _weight_norm([uemb.weight, iemb.weight])

    med, wall, times = _timed(step, args.steps, args.warmup, device, start=start)
    measured = _measured(med, wall, times, rows=rows[0], n=n, before=before[0],
                         after=_weight_norm([uemb.weight, iemb.weight]))
    with torch.no_grad():
        loss = float(loss_of(perm[:batch]))
    return {**measured, "final_loss": loss,
            "n_parameters": uemb.weight.numel() + iemb.weight.numel()}  # fmt: skip


def run_one(fn, device: torch.device, **kw) -> dict[str, Any]:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        out = fn(device=device, **kw)
        out["status"] = "ok"
        out["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    except torch.OutOfMemoryError:
        out = {"status": "oom"}
    except Exception as e:  # noqa: BLE001 - one failing configuration (e.g. --compile) must not lose the others
        out = {"status": f"error: {type(e).__name__}: {str(e)[:300]}"}
    return out


def tower_main(args, data, device: torch.device, gen_s: float) -> int:
    """``--user-towers``: examples/s of each user-tower kind (history_features towers, our trainer), same data,
    ``--repeat`` interleaved rounds (the order alternating); the ratio to the first kind (pool when given) taken
    within each round, medians quoted."""
    import statistics as st

    kinds = list(dict.fromkeys(args.user_towers))
    base = "pool" if "pool" in kinds else kinds[0]
    rows = []
    for rep in range(args.repeat):
        for batch in args.batch_sizes:
            for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                r = run_one(bench_ours, device, data=data, towers="history_features", batch=batch,
                            loss_kernel=args.loss_kernels[0], history_kernel=args.history_kernels[0], graphs=False,
                            args=args, user_tower=kind)  # fmt: skip
                r = {"impl": "ours", "towers": "history_features", "user_tower": kind, "batch": batch, "repeat": rep,
                     **r}
                rows.append(r)
                ok = r["status"] == "ok"
                print(f"repeat {rep + 1} {kind:<12} batch {batch:>6} ({r.get('batch_examples', '-')} examples): "
                      f"{r['examples_per_s'] if ok else float('nan'):>9.0f} examples/s  "
                      f"step {r['step_ms'] if ok else float('nan'):8.1f} ms  {r['status']}", flush=True)

    def ok_rows(kind: str, batch: int) -> list[dict[str, Any]]:
        return [r for r in rows if r["user_tower"] == kind and r["batch"] == batch and r["status"] == "ok"]

    summary = []
    print(f"\n{'user_tower':<12} {'batch':>6} {'examples/step':>13} {'targets/ex':>10} {'step ms':>9} "
          f"{'examples/s':>11} {'ratio to ' + base:>14}")
    for batch in args.batch_sizes:
        for kind in kinds:
            rs = ok_rows(kind, batch)
            if not rs:
                continue
            ratio = None
            base_of = {r["repeat"]: r["examples_per_s"] for r in ok_rows(base, batch)}
            pairs = [r["examples_per_s"] / base_of[r["repeat"]] for r in rs if r["repeat"] in base_of]
            if kind != base and pairs:
                ratio = st.median(pairs)  # within each repeat
            s = {"user_tower": kind, "batch": batch, "repeats": len(rs), "batch_examples": rs[0]["batch_examples"],
                 "targets_per_example": rs[0]["targets_per_example"],
                 "step_ms": st.median(r["step_ms"] for r in rs),
                 "examples_per_s": st.median(r["examples_per_s"] for r in rs),
                 "final_loss": st.median(r["final_loss"] for r in rs), f"examples_per_s_ratio_to_{base}": ratio}
            summary.append(s)
            print(f"{kind:<12} {batch:>6} {s['batch_examples']:>13} {s['targets_per_example']:>10.1f} "
                  f"{s['step_ms']:>9.1f} {s['examples_per_s']:>11.0f} "
                  f"{'' if ratio is None else f'{ratio:.2f}':>14}")
    result = {
        "device": str(device), "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
        "python": platform.python_version(), "threads": torch.get_num_threads(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data_gen_seconds": round(gen_s, 2),
        "note": "examples = targets trained: rows for the pooling tower, a window's real positions for the "
                "transformer (every position a query); batch = targets per step, as recsys train sizes it",
        "summary": summary, "results": rows,
    }
    from recsys.core.io import atomic_write_json

    out = args.out or RESULTS.with_name("train_bench_tower.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, result)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--n-users", type=int, default=1_000_000)
    ap.add_argument("--n-items", type=int, default=1_000_000)
    ap.add_argument("--n-interactions", type=int, default=20_000_000)
    ap.add_argument("--zipf", type=float, default=1.05, help="item popularity exponent: p_r ~ 1 / r^zipf")
    ap.add_argument("--dim", type=int, default=128, help="embedding and output size")
    ap.add_argument("--history-len", type=int, default=50)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--towers", nargs="+", default=["id_only", "history_features"],
                    choices=["id_only", "history_features"])  # fmt: skip
    ap.add_argument("--optimizer", default="rowwise_adagrad", choices=["rowwise_adagrad", "sparse_adam", "adamw"],
                    help="our embedding optimizer (adamw = dense, every row every step)")
    ap.add_argument("--chunk", type=int, default=8192, help="our loss_chunk_size (0 = plain softmax)")
    ap.add_argument("--loss-kernels", nargs="+", default=["auto"], choices=["auto", "torch", "triton"],
                    help="our train.loss_kernel: one 'ours' row per value (auto = the fused kernels on CUDA)")
    ap.add_argument("--history-kernels", nargs="+", default=["auto"], choices=["auto", "torch", "triton"],
                    help="our train.history_kernel (attention pooling): one 'ours' row per value and softmax "
                         "(auto = the fused kernels on CUDA when faster at the batch shape)")  # fmt: skip
    ap.add_argument("--compile", action="store_true", help="torch.compile our towers")
    ap.add_argument("--cuda-graphs", nargs="*", choices=["off", "on"], default=["off"],
                    help="train.cuda_graphs: our whole step as one CUDA graph (recorded per row: used, or why not); "
                         "one 'ours' row per value; the flag alone = on")  # fmt: skip
    ap.add_argument("--no-reference", action="store_true", help="skip the bare-PyTorch reference")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of our steps")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    ap.add_argument("--user-towers", nargs="+", choices=["pool", "transformer"],
                    help="instead of the table above: our history_features towers with each model.user_tower, "
                         "CPU examples/s (targets trained) side by side on the same data, --repeat times "
                         "interleaved; writes train_bench_tower.json unless --out")
    ap.add_argument("--repeat", type=int, default=3, help="--user-towers: interleaved repeats (medians quoted)")
    ap.add_argument("--out", type=Path, default=None, help="default benchmarks/results/train_bench.json "
                                                           "(train_bench_tower.json with --user-towers)")
    args = ap.parse_args(argv)
    # the trainer's kernel choices (self-checks, the pooling's timing at the batch shape) and graph capture, logged
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if max(args.batch_sizes) > args.n_interactions:
        ap.error(f"--batch-sizes must be <= --n-interactions ({args.n_interactions}), got {max(args.batch_sizes)}")

    t0 = time.perf_counter()
    data = make_data(n_users=args.n_users, n_items=args.n_items, n_interactions=args.n_interactions,
                     n_item_cats=1000, n_user_cats=100, zipf=args.zipf)  # fmt: skip
    gen_s = time.perf_counter() - t0
    if args.user_towers:
        return tower_main(args, data, device, gen_s)
    args.out = args.out or RESULTS
    rows = []
    for batch in args.batch_sizes:
        for towers in args.towers:
            for kernel in args.loss_kernels:
                for pool in args.history_kernels:
                    for graphs in args.cuda_graphs or ["on"]:
                        r = run_one(bench_ours, device, data=data, towers=towers, batch=batch, loss_kernel=kernel,
                                    history_kernel=pool, graphs=graphs == "on", args=args)  # fmt: skip
                        rows.append({"impl": "ours", "towers": towers, "batch": batch, "loss_kernel": kernel,
                                     "history_kernel": pool, **r})  # fmt: skip (r: the kernels actually used)
        if not args.no_reference:
            r = run_one(bench_reference, device, data=data, batch=batch, args=args)
            rows.append({"impl": "reference", "towers": "id_only", "batch": batch, **r})

    print(f"{'impl':<10} {'towers':<17} {'softmax':<7} {'pool':<6} {'batch':>6} {'step ms':>9} {'inter/s':>12} "
          f"{'peak MiB':>9} "
          f"{'loss':>7} status")  # fmt: skip
    for r in rows:
        ok = r["status"] == "ok"
        print(f"{r['impl']:<10} {r['towers']:<17} {r.get('loss_kernel', '-'):<7} {r.get('history_kernel', '-'):<6} "
              f"{r['batch']:>6} "
              f"{r['step_ms'] if ok else float('nan'):>9.2f} {r['interactions_per_s'] if ok else float('nan'):>12.0f} "
              f"{(r.get('peak_mem_mib') or float('nan')):>9.0f} {r['final_loss'] if ok else float('nan'):>7.3f} "
              f"{r['status']}{' (graph)' if r.get('cuda_graphs') else ''}"
              f"{' (no graph: ' + r['graphs_off'] + ')' if r.get('graphs_off') else ''}")  # fmt: skip
    by: dict[str, dict[str, Any]] = {}  # the fastest row of each implementation / towers / batch
    for r in rows:
        key = f"{r['impl']}/{r['towers']}/{r['batch']}"
        if key not in by or (r["status"] == "ok" and r["interactions_per_s"] > by[key].get("interactions_per_s", -1)):
            by[key] = r
    checks = {}
    for key, target in TARGETS.items():
        r = by.get(key)
        checks[key] = None if r is None or r["status"] != "ok" else r["interactions_per_s"] >= target
    for towers in args.towers:
        a, b = by.get(f"ours/{towers}/8192"), by.get(f"ours/{towers}/65536")
        if a and b and a["status"] == b["status"] == "ok":
            checks[f"ours/{towers}: 65536 >= 8192 throughput"] = b["interactions_per_s"] >= a["interactions_per_s"]
    result = {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data_gen_seconds": round(gen_s, 2),
        "results": rows,
        "targets_interactions_per_s": TARGETS,
        "target_checks": checks,  # meaningful on an H100 at full size only
        "imported_polars": "polars" in sys.modules,
        "imported_hnswlib": "hnswlib" in sys.modules,
    }
    from recsys.core.io import atomic_write_json

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
