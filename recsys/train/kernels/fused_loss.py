"""The in-batch softmax (InfoNCE) as fused Triton kernels: the ``[B, B + M]`` logits never reach device memory.

:func:`in_batch_softmax_fused` computes exactly what :func:`recsys.train.losses.in_batch_softmax_shard` computes (and so,
with ``row_offset=0``, :func:`recsys.train.losses.in_batch_softmax`): scaled scores, logQ correction, accidental-hit and
same-user masking, extra negatives, per-row losses, and gradients for the queries, the candidates, the temperature
and ``log_q``. It is written the way FlashAttention is: a tile of scores lives in registers, is corrected and masked
there, and meets the others only through an online log-sum-exp.

* forward: one program per (row block, column split) walks its columns once, keeping the running max, the running
  sum of exponentials and the positive's logit per row; a ``[splits, b]`` combine gives each row's log-sum-exp.
* backward, two kernels that recompute the scores instead of storing them (1 + 2 + 2 matrix products in all):
  ``d loss_i / d logit_ij = g_i (softmax_ij - [j = diagonal])``;
  ``dq`` per (row block, column split), ``dc`` and ``d log_q`` per (column block, row split), the temperature's
  gradient as per-block partial sums. Splits are summed by torch; nothing uses atomics, so results are
  deterministic.

Masks are computed from the id vectors inside the tile (no ``[B, B]`` boolean matrix anywhere). The matrix products
run in the towers' compute dtype (bf16 under CUDA autocast, as the chunked path does) with float32 accumulation;
everything after them (scale, logQ, ``-inf`` masking, exponentials) is float32.

Triton is needed (``pip install triton``; CUDA builds of torch ship it). On CPU the kernels run only under Triton's
interpreter (``TRITON_INTERPRET=1``, set before triton is imported), which is how the tests check them against the
torch implementation; training on CPU uses the torch path. :func:`self_check` runs the fused and the torch loss on a
small random problem on the target device, which is what the trainer does before it relies on the kernels.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from recsys.train import losses
from recsys.train.kernels._triton import INTERPRET, kernel_report

MAX_DIM = 256  # one tile holds a whole embedding row

__all__ = ["KernelConfig", "compile_report", "default_config", "in_batch_softmax_fused", "self_check", "supported"]


@dataclass(frozen=True)
class KernelConfig:
    """Tile shapes and launch options (the defaults are FlashAttention-like for d <= 128 on Hopper).

    ``splits`` = 0 picks a split count that gives each kernel at least ~2 programs per multiprocessor.
    """

    fwd_block_m: int = 64
    fwd_block_n: int = 64
    dq_block_m: int = 64
    dq_block_n: int = 64
    dc_block_m: int = 64
    dc_block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    splits: int = 0


def default_config(dim: int) -> KernelConfig:
    """The tiles for embedding width ``dim`` that keep every kernel in registers on sm_90 (:func:`compile_report`):
    64 x 64 with 4 warps up to d = 128; wider rows take 32-row dq and 32-column dc tiles with 8 warps."""
    return KernelConfig() if dim <= 128 else KernelConfig(dq_block_m=32, dc_block_n=32, num_warps=8)


# ------------------------------------------------------------------------------------------------------- kernels
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a @ b with float32 accumulation; float32 operands exactly (not tf32) when IEEE."""
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _tile_logits(
    s, inv_t, rm, rn, bias_c, item_r, item_c, user_r, user_c, offset, n_batch, n_cols,
    HAS_BIAS: tl.constexpr, CORRECT_POS: tl.constexpr, MASK_ITEM: tl.constexpr, MASK_EXTRA: tl.constexpr,
    MASK_USER: tl.constexpr,
):  # fmt: skip
    """Scores [BM, BN] -> (logits with logQ and masks applied, is-positive [BM, BN])."""
    diag = rn[None, :] == (rm[:, None] + offset)  # row i's positive is global column offset + i
    logit = s * inv_t
    if HAS_BIAS:
        if CORRECT_POS:
            logit = logit - bias_c[None, :]
        else:
            logit = logit - tl.where(diag, 0.0, bias_c[None, :])
    drop = rn[None, :] >= n_cols
    if MASK_ITEM:
        same = item_r[:, None] == item_c[None, :]
        if MASK_EXTRA:
            drop = drop | same
        else:
            drop = drop | (same & (rn[None, :] < n_batch))
    if MASK_USER:
        drop = drop | ((user_r[:, None] == user_c[None, :]) & (rn[None, :] < n_batch))
    drop = drop & (~diag)  # the positive is never masked
    return tl.where(drop, float("-inf"), logit), diag


@triton.jit
def _dlogit(logit, diag, top, log_l, g, ok_r):
    """d loss_i / d logit_ij = g_i (softmax_ij - [j is i's positive]) (masked logits: softmax 0); rows past the end 0.

    softmax = exp((logit - top) - log_l), not exp(logit - lse): for the row's largest logit the first difference is
    exactly 0, so a near-certain row keeps float32 precision in ``softmax - 1`` (lse - logit would cancel)."""
    dl = g[:, None] * (tl.exp((logit - top[:, None]) - log_l[:, None]) - tl.where(diag, 1.0, 0.0))
    return tl.where(ok_r[:, None], dl, 0.0)


@triton.jit
def _load_rows(Q, ITEM, USER, STATS, G, rm, rd, b, d, stride, row_offset,
               MASK_ITEM: tl.constexpr, MASK_USER: tl.constexpr, WITH_GRAD: tl.constexpr):  # fmt: skip
    ok = rm < b
    q = tl.load(Q + rm[:, None] * stride + rd[None, :], mask=ok[:, None] & (rd[None, :] < d), other=0.0)
    item = rm
    user = rm
    if MASK_ITEM:
        item = tl.load(ITEM + row_offset + rm, mask=ok, other=0)
    if MASK_USER:
        user = tl.load(USER + row_offset + rm, mask=ok, other=0)
    if WITH_GRAD:
        top = tl.load(STATS + rm, mask=ok, other=0.0)  # STATS [2, b]: the row's max logit, log sum exp(logit - max)
        log_l = tl.load(STATS + b + rm, mask=ok, other=0.0)
        g = tl.load(G + rm, mask=ok, other=0.0)
    else:
        top = tl.zeros_like(rm).to(tl.float32)
        log_l = top
        g = top
    return ok, q, item, user, top, log_l, g


@triton.jit
def _load_cols(C, BIAS, ITEM, USER, rn, rd, n_cols, n_batch, d, stride,
               HAS_BIAS: tl.constexpr, MASK_ITEM: tl.constexpr, MASK_EXTRA: tl.constexpr,
               MASK_USER: tl.constexpr):  # fmt: skip
    ok = rn < n_cols
    c = tl.load(C + rn[:, None] * stride + rd[None, :], mask=ok[:, None] & (rd[None, :] < d), other=0.0)
    bias = rn.to(tl.float32)
    item = rn
    user = rn
    if HAS_BIAS:
        bias = tl.load(BIAS + rn, mask=ok, other=0.0)
    if MASK_ITEM:
        if MASK_EXTRA:
            item = tl.load(ITEM + rn, mask=ok, other=0)
        else:
            item = tl.load(ITEM + rn, mask=rn < n_batch, other=0)
    if MASK_USER:
        user = tl.load(USER + rn, mask=rn < n_batch, other=0)
    return ok, c, bias, item, user


@triton.jit
def _fwd_kernel(
    Q, C, INV_T, BIAS, ITEM, ITEM_C, USER, M_OUT, L_OUT, POS_OUT,
    b, n_cols, n_batch, offset, d, stride_q, stride_c, cols_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    HAS_BIAS: tl.constexpr, CORRECT_POS: tl.constexpr, MASK_ITEM: tl.constexpr, MASK_EXTRA: tl.constexpr,
    MASK_USER: tl.constexpr,
):  # fmt: skip
    """Per (row block, column split): running max, sum of exp(logit - max) and the positive's logit."""
    pid, split = tl.program_id(0), tl.program_id(1)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    # (no ``_`` names: Triton would treat one assigned again in the loop below as a loop-carried variable)
    ok_r, q, item_r, user_r, no_top, no_log_l, no_g = _load_rows(Q, ITEM, USER, Q, Q, rm, rd, b, d, stride_q, offset,
                                                                 MASK_ITEM, MASK_USER, False)  # fmt: skip
    inv_t = tl.load(INV_T)
    m_i = tl.full([BLOCK_M], -1e30, tl.float32)  # finite: a fully masked tile gives exp(-inf) = 0, not nan
    l_i = tl.zeros([BLOCK_M], tl.float32)
    pos = tl.zeros([BLOCK_M], tl.float32)
    lo = split * cols_per_split
    for step in range(0, cols_per_split, BLOCK_N):  # see _splits
        start = lo + step
        rn = start + tl.arange(0, BLOCK_N)
        ok_c, c, bias_c, item_c, user_c = _load_cols(C, BIAS, ITEM_C, USER, rn, rd, n_cols, n_batch, d, stride_c,
                                                     HAS_BIAS, MASK_ITEM, MASK_EXTRA, MASK_USER)  # fmt: skip
        s = _dot(q, tl.trans(c), IEEE)  # [BM, BN] float32
        logit, diag = _tile_logits(s, inv_t, rm, rn, bias_c, item_r, item_c, user_r, user_c, offset, n_batch,
                                   n_cols, HAS_BIAS, CORRECT_POS, MASK_ITEM, MASK_EXTRA, MASK_USER)  # fmt: skip
        m_new = tl.maximum(m_i, tl.max(logit, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logit - m_new[:, None]), 1)
        m_i = m_new
        pos += tl.sum(tl.where(diag, logit, 0.0), 1)
    out = split * b + rm
    tl.store(M_OUT + out, m_i, mask=ok_r)
    tl.store(L_OUT + out, l_i, mask=ok_r)
    tl.store(POS_OUT + out, pos, mask=ok_r)


@triton.jit
def _dq_kernel(
    Q, C, INV_T, BIAS, ITEM, ITEM_C, USER, STATS, G, DQ, DT,
    b, n_cols, n_batch, offset, d, stride_q, stride_c, cols_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    HAS_BIAS: tl.constexpr, CORRECT_POS: tl.constexpr, MASK_ITEM: tl.constexpr, MASK_EXTRA: tl.constexpr,
    MASK_USER: tl.constexpr, NEED_T: tl.constexpr,
):  # fmt: skip
    """Per (row block, column split): partial dq [BM, D] and the partial temperature gradient."""
    pid, split = tl.program_id(0), tl.program_id(1)
    rm = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    ok_r, q, item_r, user_r, top, log_l, g = _load_rows(Q, ITEM, USER, STATS, G, rm, rd, b, d, stride_q, offset,
                                                        MASK_ITEM, MASK_USER, True)  # fmt: skip
    inv_t = tl.load(INV_T)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    dt = tl.zeros([BLOCK_M], tl.float32)
    lo = split * cols_per_split
    for step in range(0, cols_per_split, BLOCK_N):  # see _splits
        start = lo + step
        rn = start + tl.arange(0, BLOCK_N)
        ok_c, c, bias_c, item_c, user_c = _load_cols(C, BIAS, ITEM_C, USER, rn, rd, n_cols, n_batch, d, stride_c,
                                                     HAS_BIAS, MASK_ITEM, MASK_EXTRA, MASK_USER)  # fmt: skip
        s = _dot(q, tl.trans(c), IEEE)
        logit, diag = _tile_logits(s, inv_t, rm, rn, bias_c, item_r, item_c, user_r, user_c, offset, n_batch,
                                   n_cols, HAS_BIAS, CORRECT_POS, MASK_ITEM, MASK_EXTRA, MASK_USER)  # fmt: skip
        dl = _dlogit(logit, diag, top, log_l, g, ok_r)
        if NEED_T:
            dt += tl.sum(dl * s, 1)
        acc += _dot((dl * inv_t).to(c.dtype), c, IEEE)
    tl.store(DQ + (split * b + rm)[:, None] * BLOCK_D + rd[None, :], acc, mask=ok_r[:, None])
    if NEED_T:
        tl.store(DT + split * tl.num_programs(0) + pid, tl.sum(dt, 0))


@triton.jit
def _dc_kernel(
    Q, C, INV_T, BIAS, ITEM, ITEM_C, USER, STATS, G, DC, DB,
    b, n_cols, n_batch, offset, d, stride_q, stride_c, rows_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, IEEE: tl.constexpr,
    HAS_BIAS: tl.constexpr, CORRECT_POS: tl.constexpr, MASK_ITEM: tl.constexpr, MASK_EXTRA: tl.constexpr,
    MASK_USER: tl.constexpr, NEED_BIAS: tl.constexpr,
):  # fmt: skip
    """Per (column block, row split): partial dc [BN, D] and d loss / d log_q."""
    pid, split = tl.program_id(0), tl.program_id(1)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rd = tl.arange(0, BLOCK_D)
    ok_c, c, bias_c, item_c, user_c = _load_cols(C, BIAS, ITEM_C, USER, rn, rd, n_cols, n_batch, d, stride_c,
                                                 HAS_BIAS, MASK_ITEM, MASK_EXTRA, MASK_USER)  # fmt: skip
    inv_t = tl.load(INV_T)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    db = tl.zeros([BLOCK_N], tl.float32)
    lo = split * rows_per_split
    for step in range(0, rows_per_split, BLOCK_M):  # see _splits
        start = lo + step
        rm = start + tl.arange(0, BLOCK_M)
        ok_r, q, item_r, user_r, top, log_l, g = _load_rows(Q, ITEM, USER, STATS, G, rm, rd, b, d, stride_q,
                                                            offset, MASK_ITEM, MASK_USER, True)  # fmt: skip
        s = _dot(q, tl.trans(c), IEEE)  # [BM, BN]
        logit, diag = _tile_logits(s, inv_t, rm, rn, bias_c, item_r, item_c, user_r, user_c, offset, n_batch,
                                   n_cols, HAS_BIAS, CORRECT_POS, MASK_ITEM, MASK_EXTRA, MASK_USER)  # fmt: skip
        dl = _dlogit(logit, diag, top, log_l, g, ok_r)
        if NEED_BIAS:
            if CORRECT_POS:
                db -= tl.sum(dl, 0)
            else:
                db -= tl.sum(tl.where(diag, 0.0, dl), 0)
        acc += _dot(tl.trans((dl * inv_t).to(q.dtype)), q, IEEE)  # [BN, D]
    tl.store(DC + (split * n_cols + rn)[:, None] * BLOCK_D + rd[None, :], acc, mask=ok_c[:, None])
    if NEED_BIAS:
        tl.store(DB + split * n_cols + rn, db, mask=ok_c)


# ------------------------------------------------------------------------------------------------------ launcher
def _n_sm(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _splits(n_blocks: int, loop_len: int, block: int, cfg: KernelConfig, device: torch.device) -> tuple[int, int]:
    """(number of splits, items per split, a multiple of ``block``) for a loop of ``loop_len`` in ``n_blocks``
    programs: enough splits to give every multiprocessor ~2 programs, never a split of less than 4 blocks.

    The kernels loop ``range(0, per_split, BLOCK)`` from ``split * per_split``: bounds that are kernel arguments, not
    derived from a program id (the interpreter cannot ``range()`` over one). The last split may run past the end
    into fully masked tiles."""
    n_loop_blocks = triton.cdiv(loop_len, block)
    want = cfg.splits or max(1, math.ceil(2 * _n_sm(device) / n_blocks))
    splits = max(1, min(want, n_loop_blocks // 4 if not cfg.splits else n_loop_blocks))
    per = triton.cdiv(n_loop_blocks, splits) * block
    return triton.cdiv(loop_len, per), per


def _pointers(stand_in: Tensor, *optional: Tensor | None) -> tuple[Tensor, ...]:
    """The kernels' optional pointer arguments; an absent one becomes ``stand_in`` (never read: its flag is off)."""
    return tuple(stand_in if t is None else t for t in optional)


class _Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, cands, inv_t, bias, item_ids, col_item, user_ids, offset, n_batch, flags, cfg):
        b, d = q.shape
        n_cols = cands.shape[0]
        block_d = max(16, triton.next_power_of_2(d))
        ieee = q.dtype == torch.float32  # float32 towers: exact products, as torch's matmul does by default
        args = _pointers(inv_t, bias, item_ids, col_item, user_ids)
        n_rb = triton.cdiv(b, cfg.fwd_block_m)
        splits, per = _splits(n_rb, n_cols, cfg.fwd_block_n, cfg, q.device)
        part = torch.empty(3, splits, b, dtype=torch.float32, device=q.device)
        _fwd_kernel[(n_rb, splits)](
            q, cands, inv_t, *args, part[0], part[1], part[2],
            b, n_cols, n_batch, offset, d, q.stride(0), cands.stride(0), per,
            BLOCK_M=cfg.fwd_block_m, BLOCK_N=cfg.fwd_block_n, BLOCK_D=block_d, IEEE=ieee, **flags,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
        m, s, pos = part[0], part[1], part[2]
        top = m.amax(0)  # [b]: the row's largest logit
        log_l = torch.log((s * torch.exp(m - top)).sum(0))  # log sum exp(logit - top): >= 0, small when one dominates
        loss = (top - pos.sum(0)) + log_l  # lse - positive, without cancelling two large numbers
        ctx.save_for_backward(q, cands, inv_t, bias, item_ids, col_item, user_ids, torch.stack([top, log_l]))
        ctx.meta = (offset, n_batch, flags, cfg, block_d, ieee)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        q, cands, inv_t, bias, item_ids, col_item, user_ids, stats = ctx.saved_tensors
        offset, n_batch, flags, cfg, block_d, ieee = ctx.meta
        need_q, need_c, need_t, need_b = ctx.needs_input_grad[:4]
        b, d = q.shape
        n_cols = cands.shape[0]
        g = grad_loss.float().contiguous()
        args = _pointers(inv_t, bias, item_ids, col_item, user_ids)
        common = (b, n_cols, n_batch, offset, d, q.stride(0), cands.stride(0))
        launch = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
        dq = dc = dt = db = None
        if need_q or need_t:
            n_rb = triton.cdiv(b, cfg.dq_block_m)
            splits, per = _splits(n_rb, n_cols, cfg.dq_block_n, cfg, q.device)
            dq_part = torch.empty(splits, b, block_d, dtype=torch.float32, device=q.device)
            dt_part = torch.empty(splits, n_rb, dtype=torch.float32, device=q.device)
            _dq_kernel[(n_rb, splits)](
                q, cands, inv_t, *args, stats, g, dq_part, dt_part, *common, per,
                BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n, BLOCK_D=block_d, IEEE=ieee, **flags,
                NEED_T=bool(need_t), **launch,
            )  # fmt: skip
            dq = dq_part.sum(0)[:, :d].to(q.dtype) if need_q else None
            dt = dt_part.sum().reshape(inv_t.shape).to(inv_t.dtype) if need_t else None
        if need_c or need_b:
            n_cb = triton.cdiv(n_cols, cfg.dc_block_n)
            splits, per = _splits(n_cb, b, cfg.dc_block_m, cfg, q.device)
            dc_part = torch.empty(splits, n_cols, block_d, dtype=torch.float32, device=q.device)
            db_part = torch.empty(splits, n_cols, dtype=torch.float32, device=q.device)
            _dc_kernel[(n_cb, splits)](
                q, cands, inv_t, *args, stats, g, dc_part, db_part, *common, per,
                BLOCK_M=cfg.dc_block_m, BLOCK_N=cfg.dc_block_n, BLOCK_D=block_d, IEEE=ieee, **flags,
                NEED_BIAS=bool(need_b), **launch,
            )  # fmt: skip
            dc = dc_part.sum(0)[:, :d].to(cands.dtype) if need_c else None
            db = db_part.sum(0).to(bias.dtype) if need_b else None
        return dq, dc, dt, db, None, None, None, None, None, None, None


def supported(dim: int, device: torch.device) -> str | None:
    """None when the fused kernels can run at embedding width ``dim`` on ``device``, else why not (a sentence)."""
    if dim > MAX_DIM:
        return f"embedding width {dim} is over the fused kernels' {MAX_DIM}"
    if device.type != "cuda" and not INTERPRET:
        return f"the fused kernels run on CUDA (or under TRITON_INTERPRET=1), not on {device.type}"
    return None


def in_batch_softmax_fused(
    q: Tensor,
    c: Tensor,
    *,
    temperature: float | Tensor,
    row_offset: int = 0,
    item_ids: Tensor | None = None,
    user_ids: Tensor | None = None,
    log_q: Tensor | None = None,
    correct_positive: bool = True,
    extra_c: Tensor | None = None,
    extra_item_ids: Tensor | None = None,
    extra_log_q: Tensor | float | None = None,
    weights: Tensor | None = None,
    reduction: str = "mean",
    config: KernelConfig | None = None,
) -> Tensor:
    """:func:`recsys.train.losses.in_batch_softmax_shard` (``row_offset=0`` and ``b = B``: ``in_batch_softmax``), fused.

    Args:
        q: ``[b, d]`` queries: global rows ``row_offset .. row_offset + b - 1`` of a batch of ``B`` rows.
        c: ``[B, d]`` every row's positive, in global row order.
        item_ids, user_ids, log_q: ``[B]`` (global), as in :func:`recsys.train.losses.in_batch_softmax`.
        weights: ``[b]`` this shard's example weights.
        config: tile shapes / launch options (default: :func:`default_config` of the width).
    Returns:
        A scalar, or ``[b]`` with ``reduction="none"``; float32.
    """
    why = supported(q.shape[-1], q.device)
    if why:
        raise ValueError(f"in_batch_softmax_fused: {why}")
    p, q, cands = losses._prepare_shard(
        q, c, row_offset=row_offset, temperature=temperature, item_ids=item_ids, user_ids=user_ids, log_q=log_q,
        extra_c=extra_c, extra_item_ids=extra_item_ids, extra_log_q=extra_log_q, weights=weights, reduction=reduction,
    )  # fmt: skip
    n_batch = c.shape[0]
    compute = losses._compute_dtype(q)
    if compute not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"the fused kernels take float32/bfloat16/float16 towers, got {compute}")
    qc = q.to(compute).contiguous()
    cc = cands.to(compute).contiguous()
    if isinstance(temperature, Tensor):
        inv_t = (1.0 / temperature.float()).reshape(1)
    else:
        inv_t = torch.full((1,), 1.0 / float(temperature), dtype=torch.float32, device=q.device)
    bias = None if p.full_log_q is None else p.full_log_q.float().contiguous()
    mask_extra = p.extra_item_ids is not None
    col_item = None
    if item_ids is not None:
        col_item = torch.cat([item_ids, p.extra_item_ids.to(item_ids.dtype)]) if mask_extra else item_ids
        col_item = col_item.contiguous()
    flags = dict(HAS_BIAS=bias is not None, CORRECT_POS=bool(correct_positive), MASK_ITEM=item_ids is not None,
                 MASK_EXTRA=mask_extra, MASK_USER=user_ids is not None)  # fmt: skip
    per_row = _Fused.apply(
        qc, cc, inv_t, bias, None if item_ids is None else item_ids.contiguous(), col_item,
        None if user_ids is None else user_ids.contiguous(), row_offset, n_batch, flags,
        config or default_config(q.shape[1]),
    )  # fmt: skip
    return losses._reduce(per_row, weights, reduction)


def self_check(device: torch.device, *, dim: int, extra: int = 0, seed: int = 0, **options) -> float:
    """Relative error of the fused loss and its gradients against the torch implementation on a random problem.

    ``options``: the keyword flags the caller will use (``mask_items``, ``mask_users``, ``logq``,
    ``correct_positive``). Runs under the same autocast as training (bf16 on CUDA). Returns the largest of
    ``|fused - torch| / |torch|`` over the loss, dq and dc (inf when a value is not finite).
    """
    g = torch.Generator(device="cpu").manual_seed(seed)
    b = 384  # a few blocks in each direction, and a ragged last one
    q = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1).to(device)
    c = torch.nn.functional.normalize(torch.randn(b, dim, generator=g), dim=1).to(device)
    items = torch.randint(0, b // 3, (b,), generator=g).to(device)
    users = torch.randint(0, b // 4, (b,), generator=g).to(device)
    log_q = torch.log_softmax(torch.randn(b, generator=g), 0).to(device)
    kw = dict(temperature=0.07, item_ids=items if options.get("mask_items", True) else None,
              user_ids=users if options.get("mask_users", False) else None,
              log_q=log_q if options.get("logq", True) else None,
              correct_positive=options.get("correct_positive", True))  # fmt: skip
    if extra:
        kw["extra_c"] = torch.nn.functional.normalize(torch.randn(extra, dim, generator=g), dim=1).to(device)
        kw["extra_item_ids"] = torch.randint(0, b // 3, (extra,), generator=g).to(device) if kw["item_ids"] is not None \
            else None
        kw["extra_log_q"] = -math.log(1000.0) if kw["log_q"] is not None else None
    worst = 0.0
    outs = []
    for fn in (in_batch_softmax_fused, losses.in_batch_softmax):
        qq, cc = q.clone().requires_grad_(), c.clone().requires_grad_()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = fn(qq, cc, **kw)
        loss.backward()
        outs.append((loss.detach().float(), qq.grad.float(), cc.grad.float()))
    for a, ref in zip(outs[0], outs[1], strict=True):
        err = float((a - ref).norm() / ref.norm().clamp_min(1e-30))
        worst = max(worst, err if math.isfinite(err) else math.inf)
    return worst


def compile_report(
    config: KernelConfig | None = None, *, dtype: str = "bf16", dim: int = 128, arch: int = 90, **flags: bool
) -> list[dict]:
    """Compile the three kernels ahead of time for NVIDIA compute capability ``arch`` (no GPU needed) and read their
    resources and instructions from the cubin (:func:`recsys.train.kernels._triton.kernel_report`): one dict per kernel.

    ``flags``: the loss options as the kernels see them (HAS_BIAS, CORRECT_POS, MASK_ITEM, MASK_EXTRA, MASK_USER,
    NEED_T, NEED_BIAS); the defaults are the trainer's defaults.
    """
    cfg = config or default_config(dim)
    f = dict(HAS_BIAS=True, CORRECT_POS=False, MASK_ITEM=True, MASK_EXTRA=False, MASK_USER=True, NEED_T=False,
             NEED_BIAS=False)  # fmt: skip
    f.update(flags)
    tensor = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}[dtype]
    ptrs = dict(Q=tensor, C=tensor, INV_T="*fp32", BIAS="*fp32", ITEM="*i64", ITEM_C="*i64", USER="*i64",
                M_OUT="*fp32", L_OUT="*fp32", POS_OUT="*fp32", STATS="*fp32", G="*fp32", DQ="*fp32", DT="*fp32",
                DC="*fp32", DB="*fp32")  # fmt: skip
    masks = {k: f[k] for k in ("HAS_BIAS", "CORRECT_POS", "MASK_ITEM", "MASK_EXTRA", "MASK_USER")}
    block_d = max(16, triton.next_power_of_2(dim))
    kernels = (
        ("forward", _fwd_kernel, cfg.fwd_block_m, cfg.fwd_block_n, {}),
        ("dq", _dq_kernel, cfg.dq_block_m, cfg.dq_block_n, {"NEED_T": f["NEED_T"]}),
        ("dc", _dc_kernel, cfg.dc_block_m, cfg.dc_block_n, {"NEED_BIAS": f["NEED_BIAS"]}),
    )
    return [
        {"name": name, **kernel_report(fn, ptrs, dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, IEEE=dtype == "fp32",
                                                      **masks, **extra),
                                       num_warps=cfg.num_warps, num_stages=cfg.num_stages, arch=arch)}
        for name, fn, bm, bn, extra in kernels
    ]  # fmt: skip
