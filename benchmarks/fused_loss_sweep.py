"""Tile shapes of the fused in-batch softmax kernels (recsys.train.kernels.fused_loss) on a GPU, against the hardware floor.

For each batch size and :class:`recsys.train.kernels.fused_loss.KernelConfig`, times forward and forward + backward of
``in_batch_softmax_fused`` under bf16 autocast (item-id masking, same-user masking, logQ: the trainer's defaults)
with ``triton.testing.do_bench`` (median), next to the chunked torch softmax. The floor per step: 5 matrix products
of ``2 B^2 d`` flops (forward; dq: recompute + product; dc: recompute + product) at the measured bf16 matmul rate,
and 3 exponentials per logit. Prints a table and writes benchmarks/results/fused_loss_sweep.json.

    python benchmarks/fused_loss_sweep.py --batch-sizes 8192 65536 --dim 128
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "fused_loss_sweep.json"

CONFIGS = {  # name -> KernelConfig fields; registers / spills per kernel at d = 128: recsys.train.kernels.fused_loss.compile_report
    "64x64 w4 s3": {},  # the default; no spills
    "64x64 w4 s2": dict(num_stages=2),
    "64x64 w8 s3": dict(num_warps=8),  # no spills, fewer registers per thread
    "fwd128 w8 s3": dict(fwd_block_m=128, num_warps=8),  # the forward in 128-row tiles, no spills
    "128x32 w8 s3": dict(fwd_block_m=128, fwd_block_n=32, dq_block_m=128, dq_block_n=32, dc_block_m=32,
                         dc_block_n=128, num_warps=8),  # fmt: skip
    "64x32 w4 s3": dict(fwd_block_n=32, dq_block_n=32, dc_block_m=32),
    "128x128 w8 s2": dict(fwd_block_m=128, fwd_block_n=128, dq_block_m=128, dq_block_n=128, dc_block_m=128,
                          dc_block_n=128, num_warps=8, num_stages=2),  # fmt: skip  (dq / dc spill: a reference)
}


def _bench_ms(fn, dev: torch.device) -> float:
    """Median milliseconds of ``fn()``: triton's do_bench (CUDA events) on a GPU, a few wall-clock runs on CPU."""
    if dev.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, return_mode="median")
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def matmul_tflops(dev: torch.device) -> float:
    """The matmul ceiling, measured here (datasheet rates are leads): bf16 on a GPU, float32 on CPU."""
    n, dtype = (8192, torch.bfloat16) if dev.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    return 2 * n**3 / _bench_ms(lambda: a @ a, dev) / 1e9


def bench_batch(b: int, args: argparse.Namespace, tflops: float) -> list[dict]:
    from recsys.train.kernels.fused_loss import KernelConfig, in_batch_softmax_fused
    from recsys.train.losses import in_batch_softmax_chunked

    dev = torch.device(args.device)
    bf16 = dev.type == "cuda"
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(b, args.dim, generator=g), dim=1).to(dev).requires_grad_()
    c = torch.nn.functional.normalize(torch.randn(b, args.dim, generator=g), dim=1).to(dev).requires_grad_()
    items = (torch.randint(0, 10**6, (b,), generator=g) ** 2 // 10**6).to(dev)  # skewed: many duplicates
    users = torch.randint(0, b, (b,), generator=g).to(dev)
    log_q = torch.log_softmax(torch.randn(b, generator=g), 0).to(dev)
    kw = dict(temperature=0.05, item_ids=items, user_ids=users, log_q=log_q)
    floor_ms = 5 * 2 * b * b * args.dim / (tflops * 1e12) * 1e3

    def fwd_bwd(fn):
        q.grad = c.grad = None
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss = fn(q, c, **kw)
        loss.backward()
        return loss

    def fwd(fn):
        with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            return fn(q, c, **kw)

    def chunked(q_, c_, **k):
        return in_batch_softmax_chunked(q_, c_, chunk_size=min(args.chunk_size, b), **k)

    ref = fwd_bwd(chunked).item()
    ref_gq = q.grad.clone()
    variants = [("torch chunked", chunked, None)]
    for name in args.configs:
        cfg = KernelConfig(**CONFIGS[name])
        variants.append((name, lambda q_, c_, cfg=cfg, **k: in_batch_softmax_fused(q_, c_, config=cfg, **k), cfg))
    rows = []
    resources: dict[str, str] = {}
    if dev.type == "cuda":
        from recsys.train.kernels.fused_loss import compile_report

        for name, _fn, cfg in variants[1:]:  # registers / spill bytes per kernel, from the cubin
            try:
                rep = compile_report(cfg, dim=args.dim)
                resources[name] = " ".join(f"{r['name']}:{r['regs']}/{r['stack']}" for r in rep)
            except Exception as e:  # noqa: BLE001 - a report is a nicety; the timing below says what counts
                resources[name] = f"{type(e).__name__}"
    for name, fn, cfg in variants:
        try:
            loss = fwd_bwd(fn).item()
            err = max(abs(loss - ref) / abs(ref), float((q.grad - ref_gq).norm() / ref_gq.norm()))
            t_fwd = _bench_ms(lambda fn=fn: fwd(fn), dev)
            t_all = _bench_ms(lambda fn=fn: fwd_bwd(fn), dev)
            status = "ok"
        except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory) loses only itself
            err, t_fwd, t_all, status = float("nan"), float("nan"), float("nan"), f"{type(e).__name__}: {e}"[:200]
        rows.append({"batch": b, "dim": args.dim, "config": name, "kernel_config": asdict(cfg) if cfg else None,
                     "fwd_ms": t_fwd, "fwd_bwd_ms": t_all, "floor_ms": floor_ms, "rel_err": err,
                     "status": status, "regs/stack": resources.get(name)})  # fmt: skip
        print(f"{b:>6} {name:<14} {t_fwd:>8.3f} {t_all:>11.3f} {floor_ms:>9.3f} "
              f"{100 * floor_ms / t_all:>7.0f}% {err:>8.1e} {resources.get(name, '')} "
              f"{'' if status == 'ok' else status}", flush=True)  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    import triton

    from recsys.core.io import atomic_write_json

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[8192, 65536])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--chunk-size", type=int, default=8192, help="the torch chunked softmax's rows per block")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only as a smoke test under TRITON_INTERPRET=1")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: torch sees no CUDA GPU")
    tflops = matmul_tflops(dev)
    name = torch.cuda.get_device_name() if dev.type == "cuda" else "cpu"
    print(f"{name}: matmul {tflops:.1f} TFLOP/s; torch {torch.__version__}, triton {triton.__version__}")
    rows = []
    print(f"{'B':>6} {'config':<14} {'fwd ms':>8} {'fwd+bwd ms':>11} {'floor ms':>9} {'% floor':>8} {'rel err':>8} "
          "regs/spill bytes")
    for b in args.batch_sizes:
        rows += bench_batch(b, args, tflops)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, {"device": name, "torch": torch.__version__,
                                 "triton": triton.__version__, "matmul_tflops": tflops, "rows": rows})  # fmt: skip
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
