"""Row-wise Adagrad's sparse update as two Triton kernels (``RowWiseAdagrad(fused=...)``).

The torch update (recsys.train.optim) is ~25 kernels per table, and it makes ~9 passes over the ``[n, E]`` gradient rows:
gather by the sort order, segment sums, gather the sums back, square, scale, scatter. At batch 8192 with 50-item
histories that is 409,600 rows (210 MB) per table per step. Here, after torch sorts the row indices and numbers the
segments (one per distinct row):

* ``_segment_sum``: each program takes ``BLOCK`` consecutive sorted entries, reads their gradient rows through the
  sort order, sums runs of the same segment with a segmented scan in registers, and adds one partial sum per segment
  and block to ``sums`` (atomics only where a segment crosses a block boundary or shares it, so a hot row repeated
  30,000 times costs ~30,000 / BLOCK atomic adds, not 30,000);
* ``_apply``: the first entry of each segment updates its row: ``G_r += mean(g_r ** 2)``,
  ``w_r -= lr * g_r / (sqrt(G_r) + eps)``. Each row is written by exactly one program lane.

The learning rate is read from a device tensor, so a CUDA graph that captured the step follows the schedule.
Without a GPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which is how the tests compare
them with the torch update.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl
from torch import Tensor

from recsys.train.kernels._triton import (
    INTERPRET,  # noqa: F401 - also patches the interpreter for NumPy >= 2.4
    kernel_report,
)
from recsys.train.segments import sorted_segments

BLOCK_ROWS = 32
log = logging.getLogger(__name__)


@triton.jit
def _seg_add(a_v, a_s, b_v, b_s):
    # segmented sum over entries sorted by segment: associative because equal segments are contiguous
    return b_v + tl.where(a_s == b_s, a_v, 0.0), b_s


@triton.jit
def _segment_sum(VALS, ORDER, SEG, SUMS, n, E, stride_v, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    j = pid * BLOCK + tl.arange(0, BLOCK)
    ok = j < n
    e = tl.arange(0, BLOCK_E)
    src = tl.load(ORDER + j, mask=ok, other=0)
    seg = tl.load(SEG + j, mask=ok, other=-1)
    v = tl.load(VALS + src[:, None] * stride_v + e[None, :], mask=ok[:, None] & (e[None, :] < E), other=0.0)
    seg2 = tl.broadcast_to(seg[:, None], (BLOCK, BLOCK_E))
    run, _ = tl.associative_scan((v.to(tl.float32), seg2), 0, _seg_add)  # [BLOCK, BLOCK_E] running segment sums
    nxt = tl.load(SEG + j + 1, mask=j + 1 < n, other=-1)
    last = ok & ((seg != nxt) | (tl.arange(0, BLOCK) == BLOCK - 1))  # the block's last entry of each segment
    tl.atomic_add(SUMS + seg[:, None] * BLOCK_E + e[None, :], run, mask=last[:, None] & (e[None, :] < E))


@triton.jit
def _apply(W, ACC, ROWS, SEG, SUMS, LR, n, E, stride_w, eps, BLOCK: tl.constexpr, BLOCK_E: tl.constexpr):
    pid = tl.program_id(0)
    j = pid * BLOCK + tl.arange(0, BLOCK)
    ok = j < n
    e = tl.arange(0, BLOCK_E)
    row = tl.load(ROWS + j, mask=ok, other=0)
    prev = tl.load(ROWS + j - 1, mask=ok & (j > 0), other=-1)
    first = ok & (row != prev)
    seg = tl.load(SEG + j, mask=ok, other=0)
    me = first[:, None] & (e[None, :] < E)
    g = tl.load(SUMS + seg[:, None] * BLOCK_E + e[None, :], mask=me, other=0.0)  # the row's summed gradient
    acc = tl.load(ACC + row, mask=first, other=0.0) + tl.sum(g * g, 1) / E
    tl.store(ACC + row, acc, mask=first)
    denom = tl.maximum(tl.sqrt(acc) + eps, 1e-30)  # a zero gradient with eps = 0: 0 / 0 otherwise
    lr = tl.load(LR)
    ptr = W + row[:, None] * stride_w + e[None, :]
    w = tl.load(ptr, mask=me, other=0.0)
    tl.store(ptr, (w.to(tl.float32) - lr * g / denom[:, None]).to(w.dtype), mask=me)


def rowwise_adagrad_update_(weight: Tensor, acc: Tensor, idx: Tensor, values: Tensor, *, lr: float | Tensor,
                            eps: float) -> None:  # fmt: skip
    """In place: the row-wise Adagrad update of ``weight [n_rows, E]`` / ``acc [n_rows]`` for the gradient rows
    ``values [n, E]`` at row indices ``idx [n]`` (repeats are summed first), as recsys.train.optim.RowWiseAdagrad does."""
    n, e = values.shape
    if n == 0:
        return
    rows, order, _, seg = sorted_segments(idx)  # the kernels find each run's first entry from ``rows`` themselves
    block_e = triton.next_power_of_2(e)
    sums = torch.zeros(n, block_e, dtype=torch.float32, device=values.device)  # one row per possible segment
    lr_t = lr.reshape(1).float() if isinstance(lr, Tensor) else torch.full((1,), float(lr), device=values.device)
    grid = (triton.cdiv(n, BLOCK_ROWS),)
    values = values.contiguous()
    _segment_sum[grid](values, order, seg, sums, n, e, values.stride(0), BLOCK=BLOCK_ROWS, BLOCK_E=block_e)
    _apply[grid](weight, acc, rows, seg, sums, lr_t, n, e, weight.stride(0), float(eps), BLOCK=BLOCK_ROWS,
                 BLOCK_E=block_e)  # fmt: skip








def compile_report(*, dim: int = 128, arch: int = 90) -> list[dict]:
    """:func:`recsys.train.kernels._triton.kernel_report` of both kernels for fp32 tables of width ``dim``."""
    ptrs = dict(VALS="*fp32", ORDER="*i64", SEG="*i64", SUMS="*fp32", W="*fp32", ACC="*fp32", ROWS="*i64",
                LR="*fp32")  # fmt: skip
    const = dict(BLOCK=BLOCK_ROWS, BLOCK_E=triton.next_power_of_2(dim))
    return [{"name": name, **kernel_report(fn, ptrs, const, arch=arch)}
            for name, fn in (("segment_sum", _segment_sum), ("apply", _apply))]
