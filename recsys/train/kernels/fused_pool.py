"""The user tower's attention pooling over the history, fused with the history lookup (``train.history_kernel``).

The torch path (``recsys.train.model.AttentionPool`` after an ``nn.Embedding`` lookup) writes and reads the ``[B, N, E]``
history several times per step: the looked-up rows, ``rows + recency``, its bf16 copy, the key layer's output, its
tanh, the bf16 copy for the weighted sum, and as many again in the backward pass. At batch 8192 with 50 items of
width 128 each of those is 100-200 MB; together they are most of a step's memory traffic once the softmax is fused.

Here one kernel per direction, each reading the looked-up rows straight from the table:

* forward, a few users per program with each user's ``N`` rows in registers: gather the rows, ``x = row + recency``,
  ``z = x W^T + b`` (one ``[N, E] x [E, E]`` tensor-core product, bf16 operands under autocast),
  ``score = tanh(z) . query / sqrt(E)``, a masked softmax over the history and the weighted sum of the rows. It
  writes the pooled ``[B, E]`` and the ``[B, N]`` attention weights, nothing of size ``[B, N, E]``.
* backward, over the flattened ``[B * N]`` positions in tiles of 32 (no padding to a power of two): recompute ``x``
  and ``tanh(z)``, write ``d loss / d row`` (``[B * N, E]`` float32: the values of the table's sparse gradient, or
  summed into a dense one), and accumulate ``dW``, ``db``, ``d query`` and ``d recency`` (a one-hot product of
  positions) in registers across the program's tiles; one partial per program, summed by torch (no atomics:
  deterministic). Positions are independent because the softmax's per-user term ``sum_n att_n (row_n . g)`` is
  ``pooled . g``, taken from the forward's output.

Padding (item row -1) and empty histories behave as in the torch path: padded positions get no attention and a zero
gradient row (at table row 0, where the torch lookup of the clamped index puts it), an empty history pools to zeros.
Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests compare
them with the torch path.
"""

from __future__ import annotations

import math
import statistics
import time

import torch
import triton
import triton.language as tl
from torch import Tensor, nn

from recsys.train.kernels._triton import INTERPRET, kernel_report
from recsys.train.layers import AttentionPool

MAX_DIM = 128  # a [N, E] tile per user and the [E, E] key weights stay in registers / shared memory
MAX_HISTORY = 128
NUM_WARPS = 8  # both kernels: the [N, E] tiles with 4 warps spill at E = 128 (compile_report)

__all__ = ["attention_pool", "compile_report", "self_check", "supported", "timings"]


# ------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _cast(x, IEEE: tl.constexpr):
    """The products' operand dtype: float32 (exact products, IEEE) or bf16 (tensor cores)."""
    if IEEE:
        return x
    else:
        return x.to(tl.bfloat16)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with float32 accumulation; ``b`` is already in the operand dtype (:func:`_cast`)."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a.to(tl.bfloat16), b)


@triton.jit
def _rows_tile(TABLE, HIST, REC, wt, bk, r, pos, ok, re, ok_e, e, stride_t, IEEE: tl.constexpr):
    """History positions ``r`` (flat ``user * n + position``; recency row ``pos``) -> (valid [BM], looked-up rows
    h [BM, BE] float32, x = h + recency in the products' dtype, a = tanh(x W^T + b) [BM, BE])."""
    idx = tl.load(HIST + r, mask=ok, other=-1)
    valid = idx >= 0
    h = tl.load(TABLE + idx[:, None] * stride_t + re[None, :], mask=valid[:, None] & ok_e[None, :], other=0.0)
    h = h.to(tl.float32)
    # the recency rows are read again for every tile (from cache) rather than held in registers across the loop
    rec = tl.load(REC + pos[:, None] * e + re[None, :], mask=ok[:, None] & ok_e[None, :], other=0.0)
    x = _cast(h + rec, IEEE)
    z = _dot(x, wt, IEEE) + bk[None, :]
    a = 1.0 - 2.0 / (tl.exp(2.0 * z) + 1.0)  # tanh(z), finite at both ends
    return valid, h, x, a


@triton.jit
def _load_weights(WT, BK, QS, re, ok_e, e, IEEE: tl.constexpr):
    wt = _cast(tl.load(WT + re[:, None] * e + re[None, :], mask=ok_e[:, None] & ok_e[None, :], other=0.0),
               IEEE)  # [E_in, E_out], cast once for every user's product  # fmt: skip
    bk = tl.load(BK + re, mask=ok_e, other=0.0)
    qs = tl.load(QS + re, mask=ok_e, other=0.0)
    return wt, bk, qs


@triton.jit
def _fwd_kernel(
    TABLE, HIST, REC, WT, BK, QS, OUT, ATT,
    b, n, e, stride_t, users_per_prog,
    BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Per program: ``users_per_prog`` consecutive users -> pooled rows OUT [b, e], attention weights ATT [b, n]."""
    pid = tl.program_id(0)
    rn = tl.arange(0, BLOCK_N)
    re = tl.arange(0, BLOCK_E)
    ok_n = rn < n
    ok_e = re < e
    wt, bk, qs = _load_weights(WT, BK, QS, re, ok_e, e, IEEE)
    for i in range(0, users_per_prog):
        u = pid * users_per_prog + i
        ok_u = u < b
        valid, h, x, a = _rows_tile(TABLE, HIST, REC, wt, bk, u * n + rn, rn, ok_n & ok_u, re, ok_e, e, stride_t,
                                    IEEE)  # fmt: skip
        s = tl.where(valid, tl.sum(a * qs[None, :], 1), float("-inf"))
        top = tl.maximum(tl.max(s, 0), -1e30)  # finite for an empty history too: exp(-inf - top) = 0, not nan
        p = tl.where(valid, tl.exp(s - top), 0.0)  # an empty history: every p = 0, so every weight = 0
        att = p / tl.maximum(tl.sum(p, 0), 1e-30)
        tl.store(OUT + u * e + re, tl.sum(att[:, None] * h, 0), mask=ok_e & ok_u)
        tl.store(ATT + u * n + rn, att, mask=ok_n & ok_u)


@triton.jit
def _bwd_kernel(
    TABLE, HIST, REC, WT, W, BK, QS, ATT, G, GOUT, DH, DW, DB, DQ, DREC,
    n_rows, n, e, stride_t, rows_per_prog,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, IEEE: tl.constexpr,
):  # fmt: skip
    """Per program: ``rows_per_prog`` consecutive history positions of the flattened ``[b * n]`` history: d row
    (DH [b * n, e]) and the program's partial sums of dW [E_out, E_in], db, d(query * scale) and d recency [n, e]
    (DW / DB / DQ / DREC [programs, ...]).

    Positions are independent here: the softmax's backward needs the user's ``sum_n att_n (h_n . g)``, which is
    ``pooled . g`` (GOUT [b], from the forward's output), so tiles need not hold whole histories and nothing is
    padded to a power of two."""
    pid = tl.program_id(0)
    re = tl.arange(0, BLOCK_E)
    ok_e = re < e
    wt, bk, qs = _load_weights(WT, BK, QS, re, ok_e, e, IEEE)
    w = _cast(tl.load(W + re[:, None] * e + re[None, :], mask=ok_e[:, None] & ok_e[None, :], other=0.0),
              IEEE)  # [E_out, E_in]  # fmt: skip
    acc_w = tl.zeros([BLOCK_E, BLOCK_E], tl.float32)
    acc_rec = tl.zeros([BLOCK_N, BLOCK_E], tl.float32)
    acc_b = tl.zeros([BLOCK_E], tl.float32)
    acc_q = tl.zeros([BLOCK_E], tl.float32)
    rn = tl.arange(0, BLOCK_N)
    for step in range(0, rows_per_prog, BLOCK_M):
        r = pid * rows_per_prog + step + tl.arange(0, BLOCK_M)
        ok = r < n_rows
        u = r // n
        valid, h, x, a = _rows_tile(TABLE, HIST, REC, wt, bk, r, r % n, ok, re, ok_e, e, stride_t, IEEE)
        att = tl.load(ATT + r, mask=ok, other=0.0)
        g = tl.load(G + u[:, None] * e + re[None, :], mask=ok[:, None] & ok_e[None, :], other=0.0)  # user's d pooled
        ds = att * (tl.sum(h * g, 1) - tl.load(GOUT + u, mask=ok, other=0.0))  # d score; 0 where att = 0
        acc_q += tl.sum(ds[:, None] * a, 0)
        dz = ds[:, None] * qs[None, :] * (1.0 - a * a)  # [BM, BE]: d loss / d (x W^T + b)
        acc_b += tl.sum(dz, 0)
        dx = _dot(dz, w, IEEE)  # [BM, E_in]
        if IEEE:  # [E_out, E_in], accumulated inside the product
            acc_w = tl.dot(tl.trans(dz), x, acc_w, input_precision="ieee")
        else:
            acc_w = tl.dot(tl.trans(dz.to(tl.bfloat16)), x, acc_w)
        # d recency[p] += sum of this tile's dx at position p: a one-hot [positions, rows] product
        one_hot = tl.where(rn[:, None] == (r % n)[None, :], 1.0, 0.0)
        if IEEE:
            acc_rec = tl.dot(one_hot, dx, acc_rec, input_precision="ieee")
        else:
            acc_rec = tl.dot(one_hot, dx, acc_rec)  # tf32: dx keeps 10 mantissa bits, exact zeros stay zero
        tl.store(DH + r[:, None] * e + re[None, :], att[:, None] * g + dx, mask=ok[:, None] & ok_e[None, :])
    tl.store(DREC + pid * BLOCK_N * BLOCK_E + rn[:, None] * BLOCK_E + re[None, :], acc_rec)
    tl.store(DW + pid * BLOCK_E * BLOCK_E + re[:, None] * BLOCK_E + re[None, :], acc_w)
    tl.store(DB + pid * BLOCK_E + re, acc_b)
    tl.store(DQ + pid * BLOCK_E + re, acc_q)


# ------------------------------------------------------------------------------------------------------ launch
def _n_sm(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _blocks(n: int, e: int) -> tuple[int, int]:
    return max(16, triton.next_power_of_2(n)), max(16, triton.next_power_of_2(e))


BWD_BLOCK_M = 32  # positions per backward tile: 64 would spill at E = 128 (compile_report)


def _launch(n_work: int, programs_per_sm: int, device: torch.device, multiple: int = 1) -> tuple[int, int]:
    """(work items per program, a multiple of ``multiple``; programs): ~``programs_per_sm`` per multiprocessor."""
    per = max(1, triton.cdiv(n_work, programs_per_sm * _n_sm(device)))
    per = triton.cdiv(per, multiple) * multiple
    return per, triton.cdiv(n_work, per)


class _Pool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, table, hist, rec, key_w, key_b, query, sparse, ieee, num_warps):
        b, n = hist.shape
        e = table.shape[1]
        bn, be = _blocks(n, e)
        scale = 1.0 / math.sqrt(e)
        qs = (query.float() * scale).contiguous()
        wt = key_w.float().t().contiguous()  # [E_in, E_out]
        rec, bk = rec.float().contiguous(), key_b.float().contiguous()
        out = torch.empty(b, e, dtype=torch.float32, device=table.device)
        att = torch.empty(b, n, dtype=torch.float32, device=table.device)
        per, programs = _launch(b, 4, table.device)
        _fwd_kernel[(programs,)](table, hist, rec, wt, bk, qs, out, att, b, n, e, table.stride(0), per,
                                 BLOCK_N=bn, BLOCK_E=be, IEEE=ieee, num_warps=num_warps)  # fmt: skip
        ctx.save_for_backward(table, hist, rec, wt, key_w, bk, qs, att, out)
        ctx.meta = (sparse, ieee, num_warps, scale)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        table, hist, rec, wt, key_w, bk, qs, att, out = ctx.saved_tensors
        sparse, ieee, num_warps, scale = ctx.meta
        b, n = hist.shape
        e = table.shape[1]
        bn, be = _blocks(n, e)
        per, programs = _launch(b * n, 2, table.device, multiple=BWD_BLOCK_M)
        dev = table.device
        g = grad_out.float().contiguous()  # [b, e]
        g_out = (g * out).sum(1)  # [b]: sum_n att_n (row_n . g), the softmax backward's per-user term
        dh = torch.empty(b * n, e, dtype=torch.float32, device=dev)
        dw = torch.empty(programs, be, be, dtype=torch.float32, device=dev)
        db = torch.empty(programs, be, dtype=torch.float32, device=dev)
        dq = torch.empty(programs, be, dtype=torch.float32, device=dev)
        drec = torch.empty(programs, bn, be, dtype=torch.float32, device=dev)
        _bwd_kernel[(programs,)](table, hist, rec, wt, key_w.float().contiguous(), bk, qs, att, g, g_out, dh, dw,
                                 db, dq, drec, b * n, n, e, table.stride(0), per, BLOCK_M=BWD_BLOCK_M, BLOCK_N=bn,
                                 BLOCK_E=be, IEEE=ieee, num_warps=num_warps)  # fmt: skip
        idx = hist.clamp(min=0).reshape(-1)  # padded positions: zero rows at row 0, as the torch lookup gives
        dh = dh.to(table.dtype)
        if sparse:
            d_table = torch.sparse_coo_tensor(idx[None], dh, table.shape, check_invariants=False)  # no sync
        else:
            d_table = torch.zeros_like(table).index_add_(0, idx, dh)
        return (d_table, None, drec.sum(0)[:n, :e], dw.sum(0)[:e, :e].to(key_w.dtype), db.sum(0)[:e],
                dq.sum(0)[:e] * scale, None, None, None)  # fmt: skip


def supported(dim: int, history_len: int, device: torch.device, *, batch: int = 1) -> str | None:
    """None when the fused pooling can run for this width, history length and batch on ``device``, else why not."""
    if batch * history_len * dim >= 2**31:
        return f"batch x history x width = {batch * history_len * dim} is over the kernels' 32-bit offsets"
    if dim > MAX_DIM:
        return f"embedding width {dim} is over the fused pooling's {MAX_DIM}"
    if history_len > MAX_HISTORY:
        return f"history length {history_len} is over the fused pooling's {MAX_HISTORY}"
    if device.type != "cuda" and not INTERPRET:
        return f"the fused pooling runs on CUDA (or under TRITON_INTERPRET=1), not on {device.type}"
    return None


def attention_pool(table: nn.Embedding, history: Tensor, pool: nn.Module, *, num_warps: int | None = None) -> Tensor:
    """``pool(table(history.clamp(min=0)), history >= 0)`` for ``recsys.train.model.AttentionPool`` ``pool``, fused.

    Args:
        table: the history's embedding table (``[V, E]``; a ``sparse=True`` table gets a sparse gradient).
        history: ``[B, N]`` item rows, -1 = padding.
        pool: the attention pooling module (its ``recency``, ``key`` and ``query``).
    Returns:
        ``[B, E]`` float32. Under CUDA autocast the key layer's product takes bf16 operands (as the torch path's
        autocast Linear does); otherwise the products are float32.
    """
    b, n = history.shape
    e = table.weight.shape[1]
    why = supported(e, n, history.device, batch=b)
    if why:
        raise ValueError(f"attention_pool: {why}")
    if table.weight.dtype != torch.float32:
        raise ValueError(f"attention_pool: the fused pooling takes a float32 table, got {table.weight.dtype}")
    ieee = not (history.device.type == "cuda" and torch.is_autocast_enabled("cuda"))
    rec = pool.recency.weight[:n].flip(0)  # [N, E]: the right-most column is the most recent item
    warps = num_warps or NUM_WARPS
    return _Pool.apply(table.weight, history.contiguous(), rec, pool.key.weight, pool.key.bias, pool.query,
                       bool(table.sparse), ieee, warps)  # fmt: skip


# --------------------------------------------------------------------------------------------------- self check
def self_check(device: torch.device, *, dim: int, history_len: int, seed: int = 0) -> float:
    """Largest relative error of the fused pooling's output and gradients (table, key weights, query, recency)
    against the torch path on a random problem on ``device``, under the autocast training uses there."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, n_rows = 300, 500
    pool = AttentionPool(dim, history_len).to(device)
    with torch.no_grad():
        for p in pool.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    table = nn.Embedding(n_rows, dim).to(device)
    with torch.no_grad():
        table.weight.copy_(torch.randn(n_rows, dim, generator=g) * 0.1)
    hist = torch.randint(0, n_rows, (b, history_len), generator=g)
    lengths = torch.randint(0, history_len + 1, (b,), generator=g)  # right-aligned, some empty, some full
    hist = torch.where(torch.arange(history_len)[None, :] >= history_len - lengths[:, None], hist, -1).to(device)
    probe = torch.randn(b, dim, generator=g).to(device)
    outs = []
    for fused in (True, False):
        for p in (*pool.parameters(), table.weight):
            p.grad = None
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if fused:
                out = attention_pool(table, hist, pool)
            else:
                out = pool(table(hist.clamp(min=0)), hist >= 0)
        (out.float() * probe).sum().backward()
        outs.append([out.detach().float(), table.weight.grad, pool.key.weight.grad, pool.key.bias.grad,
                     pool.query.grad, pool.recency.weight.grad])  # fmt: skip
    worst = 0.0
    for a, ref in zip(outs[0], outs[1], strict=True):
        err = float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))
        worst = max(worst, err if math.isfinite(err) else math.inf)
    return worst


def timings(device: torch.device, *, batch: int, history_len: int, dim: int, n_rows: int, sparse: bool,
            reps: int = 5) -> tuple[float, float]:
    """Median milliseconds of one forward + backward of the pooling at this shape on ``device``, (fused, torch),
    under the training autocast: what ``train.history_kernel = "auto"`` weighs before it picks the kernels."""
    g = torch.Generator(device="cpu").manual_seed(0)
    pool = AttentionPool(dim, history_len).to(device)
    table = nn.Embedding(n_rows, dim, sparse=sparse).to(device)
    hist = torch.randint(0, n_rows, (batch, history_len), generator=g).to(device)
    probe = torch.randn(batch, dim, generator=g).to(device)
    cuda = device.type == "cuda"

    def step(fused: bool) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            out = attention_pool(table, hist, pool) if fused else pool(table(hist.clamp(min=0)), hist >= 0)
        (out.float() * probe).sum().backward()
        table.weight.grad = None

    out = []
    for fused in (True, False):
        times = []
        for i in range(reps + 2):  # two warm-up calls (compiles, allocator)
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                step(fused)
                end.record()
                end.synchronize()
                ms = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                step(fused)
                ms = (time.perf_counter() - t0) * 1e3
            if i >= 2:
                times.append(ms)
        out.append(statistics.median(times))
    return out[0], out[1]


def compile_report(*, dim: int = 128, history_len: int = 50, ieee: bool = False, arch: int = 90) -> list[dict]:
    """:func:`recsys.train.kernels._triton.kernel_report` of both kernels (sm_90 by default) as training launches them."""
    ptrs = dict(TABLE="*fp32", HIST="*i64", REC="*fp32", WT="*fp32", W="*fp32", BK="*fp32", QS="*fp32",
                OUT="*fp32", ATT="*fp32", G="*fp32", GOUT="*fp32", DH="*fp32", DW="*fp32", DB="*fp32",
                DQ="*fp32", DREC="*fp32")  # fmt: skip
    bn, be = _blocks(history_len, dim)
    return [
        {"name": "forward", **kernel_report(_fwd_kernel, ptrs, dict(BLOCK_N=bn, BLOCK_E=be, IEEE=ieee),
                                            num_warps=NUM_WARPS, arch=arch)},
        {"name": "backward", **kernel_report(_bwd_kernel, ptrs, dict(BLOCK_M=BWD_BLOCK_M, BLOCK_N=bn, BLOCK_E=be,
                                                                     IEEE=ieee), num_warps=NUM_WARPS, arch=arch)},
    ]  # fmt: skip
