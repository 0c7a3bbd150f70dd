"""Chunked vs plain (vs fused) in-batch softmax at large batch: time (forward + backward) and peak extra memory.

Every variant gets the same inputs (L2-normalised q/c, duplicate item ids for masking, logQ, optional extra
negatives). Times are medians over ``--reps`` runs, measured side by side in this process. Peak memory is measured
per variant in a fresh subprocess: on CPU the rise of the peak RSS over the RSS after the inputs were built, on CUDA
``torch.cuda.max_memory_allocated`` over the allocation before the loss. On CUDA the fused Triton kernels
(recsys.train.kernels.fused_loss) are a third variant, and ``--bf16`` runs all of them under bf16 autocast, as training does.

    python benchmarks/loss_bench.py --batch-sizes 1024 4096 8192 --dim 64 --chunk-size 1024
    python benchmarks/loss_bench.py --device cuda --batch-sizes 8192 65536 --dim 128 --chunk-size 8192 --bf16 \
        --no-plain-above 16384

Writes benchmarks/results/loss_bench.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from recsys.core.io import atomic_write_json
from recsys.train.losses import in_batch_softmax, in_batch_softmax_chunked

RESULTS = Path(__file__).resolve().parent / "results" / "loss_bench.json"


def make_inputs(b: int, *, dim: int, extra: int, n_items: int, device: str, seed: int = 0) -> dict:
    """Random unit-norm towers, item ids drawn from ``n_items`` (so duplicates), unigram logQ."""
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1)
    items = torch.randint(0, n_items, (b,), generator=g)
    log_p = torch.log_softmax(torch.randn(n_items, generator=g), dim=0)
    kw = dict(
        q=q.to(device).requires_grad_(),
        c=c.to(device).requires_grad_(),
        temperature=0.05,
        item_ids=items.to(device),
        log_q=log_p[items].to(device),
    )
    if extra:
        e_items = torch.randint(0, n_items, (extra,), generator=g)
        kw["extra_c"] = torch.nn.functional.normalize(torch.randn(extra, dim, generator=g), dim=1).to(device)
        kw["extra_item_ids"] = e_items.to(device)
        kw["extra_log_q"] = torch.full(
            (extra,), -float(torch.log(torch.tensor(float(n_items)))), device=device
        )
    return kw


def run_once(variant: str, kw: dict, chunk_size: int, bf16: bool = False) -> tuple[float, torch.Tensor, torch.Tensor]:
    kw["q"].grad = None
    kw["c"].grad = None
    dev = kw["q"].device.type
    with torch.autocast(dev, dtype=torch.bfloat16, enabled=bf16):
        if variant == "plain":
            loss = in_batch_softmax(**kw)
        elif variant == "chunked":
            loss = in_batch_softmax_chunked(**kw, chunk_size=chunk_size)
        else:
            from recsys.train.kernels.fused_loss import in_batch_softmax_fused

            loss = in_batch_softmax_fused(**kw)
    loss.backward()
    return loss.item(), kw["q"].grad.clone(), kw["c"].grad.clone()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure_memory(variant: str, b: int, args: argparse.Namespace) -> float:
    """Peak extra memory (MiB) of one forward + backward of ``variant``; run in a fresh process."""
    torch.set_num_threads(args.threads)
    kw = make_inputs(b, dim=args.dim, extra=args.extra, n_items=args.n_items, device=args.device)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run_once(variant, kw, args.chunk_size, args.bf16)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    # warm the allocator/kernels on a tiny problem so the baseline includes torch's own startup memory
    run_once(variant, make_inputs(64, dim=args.dim, extra=0, n_items=args.n_items, device="cpu", seed=1), 16)
    # Linux: writing "5" to clear_refs resets the peak RSS (VmHWM) to the current RSS, so import-time peaks
    # do not hide the loss's own peak
    Path("/proc/self/clear_refs").write_text("5")
    before = _proc_status_kib("VmRSS")
    run_once(variant, kw, args.chunk_size)
    return (_proc_status_kib("VmHWM") - before) / 1024


def _proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field!r} line (peak RSS needs Linux)")


def memory_in_subprocess(variant: str, b: int, args: argparse.Namespace) -> float:
    cmd = [sys.executable, __file__, "--measure-memory", variant, "--batch-sizes", str(b)]
    cmd += ["--dim", str(args.dim), "--extra", str(args.extra), "--n-items", str(args.n_items)]
    cmd += ["--chunk-size", str(args.chunk_size), "--threads", str(args.threads), "--device", args.device]
    cmd += ["--bf16"] if args.bf16 else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return float(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 8192])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--extra", type=int, default=0, help="extra (mixed) negatives M shared by the batch")
    ap.add_argument("--n-items", type=int, default=50_000, help="catalogue size the item ids are drawn from")
    ap.add_argument("--chunk-size", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-memory", action="store_true", help="skip the per-variant memory subprocesses")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--bf16", action="store_true", help="under bf16 autocast (CUDA), as the trainer runs the loss")
    ap.add_argument("--no-plain-above", type=int, default=0,
                    help="skip the plain variant (full [B, B] logits) above this batch size (0 = never skip)")
    ap.add_argument("--measure-memory", choices=["plain", "chunked", "fused"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.measure_memory:
        print(f"{measure_memory(args.measure_memory, args.batch_sizes[0], args):.3f}")
        return 0

    torch.set_num_threads(args.threads)
    rows = []
    all_variants = ["plain", "chunked"] + (["fused"] if args.device.startswith("cuda") else [])
    header = f"{'B':>7} {'M':>6} {'chunk':>6} " + " ".join(f"{v + ' ms':>10}" for v in all_variants)
    header += " " + " ".join(f"{v + ' MiB':>11}" for v in all_variants) + f" {'|dloss|/loss':>13} {'max|dgrad|':>11}"
    print(header)
    for b in args.batch_sizes:
        variants = [v for v in all_variants if not (v == "plain" and args.no_plain_above and b > args.no_plain_above)]
        kw = make_inputs(b, dim=args.dim, extra=args.extra, n_items=args.n_items, device=args.device)
        times: dict[str, list[float]] = {v: [] for v in variants}
        results = {}
        for _ in range(args.reps):
            for variant in variants:  # interleaved so drift hits all alike
                _sync(args.device)
                t0 = time.perf_counter()
                results[variant] = run_once(variant, kw, args.chunk_size, args.bf16)
                _sync(args.device)
                times[variant].append(time.perf_counter() - t0)
        ref = results[variants[0]]  # the others against it (plain when it ran)
        row = {"batch_size": b, "extra": args.extra, "chunk_size": args.chunk_size, "reference": variants[0]}
        for v in all_variants:
            row[f"{v}_ms"] = 1000 * statistics.median(times[v]) if v in times else None
            row[f"{v}_mib"] = None
        others = [results[v] for v in variants[1:]]
        row["rel_loss_diff"] = max((abs(ref[0] - o[0]) / abs(ref[0]) for o in others), default=0.0)
        row["max_abs_grad_diff"] = max(
            (max((ref[1] - o[1]).abs().max().item(), (ref[2] - o[2]).abs().max().item()) for o in others), default=0.0
        )
        del kw, results
        if not args.no_memory:
            for v in variants:
                row[f"{v}_mib"] = memory_in_subprocess(v, b, args)
        rows.append(row)

        def num(v: float | None, fmt: str) -> str:
            return "-" if v is None else format(v, fmt)

        print(
            f"{b:>7} {args.extra:>6} {args.chunk_size:>6} "
            + " ".join(f"{num(row[f'{v}_ms'], '.2f'):>10}" for v in all_variants) + " "
            + " ".join(f"{num(row[f'{v}_mib'], '.0f'):>11}" for v in all_variants)
            + f" {row['rel_loss_diff']:>13.1e} {row['max_abs_grad_diff']:>11.1e}",
            flush=True,
        )
    meta = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "dim": args.dim,
        "n_items": args.n_items,
        "reps": args.reps,
        "timing": f"median of reps, forward + backward, {'bf16 autocast' if args.bf16 else 'float32'}",
        "memory": "peak RSS rise (CPU) / max_memory_allocated rise (CUDA) in a fresh process, MiB",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"meta": meta, "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
