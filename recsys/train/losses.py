"""Contrastive retrieval losses: pure functions of embeddings (TF Recommenders ``Retrieval`` task style).

Convention, stated once: ``logits = q @ c.T / temperature`` (scale = 1 / temperature). Row ``i``'s positive is
column ``i``; every other column of the batch, plus any extra negatives, is a negative unless masked.

What the options do to row ``i`` of the ``[B, B + M]`` logit matrix:

* **Accidental hits** (``item_ids``): a column ``j != i`` holding the same item as row ``i``'s positive is not a
  negative; its logit becomes ``-inf`` so it drops out of the softmax (it gets no gradient). ``user_ids`` does the
  same for the same user's other positives in the batch. The diagonal is never masked, so every row keeps a finite
  logit and the loss stays finite.
* **logQ correction** (Yi et al. 2019, "Sampling-bias-corrected neural modeling for large corpus item
  recommendations"): ``logits[i, j] -= log_q[j]``, where ``log_q[j]`` is the log probability that candidate ``j``
  was drawn as a candidate. In-batch candidates are the batch's positives, so the trainer passes
  ``log_q = log(prob[item_idx])`` with ``prob`` from ``items.parquet`` (it sums to 1). Any constant added to every
  ``log_q`` (e.g. ``log B`` for expected counts) cancels in the softmax. ``log_q`` must be finite (prob > 0);
  values are not checked, to avoid a device sync per step. ``correct_positive=False`` leaves the
  positive's own logit uncorrected ("Correcting the LogQ Correction", RecSys 2025).
* **Extra negatives** ``extra_c [M, d]`` are appended as columns shared by the whole batch: mixed negative sampling
  (Yang et al. 2020: items drawn uniformly from the catalogue) or a MoCo-style queue of recent item embeddings
  (:class:`ItemEmbeddingQueue`). They carry their own ``extra_log_q``. For uniform samples that is
  ``log(1 / n_items)`` for every one: pass ``extra_log_q=-math.log(n_items)`` (a float broadcasts). To correct
  for the pool as a whole, :func:`mixed_log_q` gives the log probability under the mixture of the two samplers
  for both parts. ``extra_item_ids`` masks an extra negative equal to the row's positive item.

Masked logits use ``-inf`` on logits that are always float32 or wider: under bf16/fp16 autocast the score matmul
runs in low precision and is upcast before scaling, correction, masking and the log-sum-exp.

:func:`in_batch_softmax_chunked` computes the same loss (values and gradients) in row blocks with a hand-written
backward, so neither pass ever holds the full ``[B, B + M]`` float32 logits or a ``[B, B]`` boolean mask.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ItemEmbeddingQueue",
    "feature_dropout",
    "feature_dropout_ssl_loss",
    "in_batch_softmax",
    "in_batch_softmax_chunked",
    "in_batch_softmax_shard",
    "mixed_log_q",
]

_REDUCTIONS = ("mean", "sum", "none")


# --------------------------------------------------------------------------------------------------------------
# argument checks (shape/dtype only: nothing here reads tensor values, so no device sync)
# --------------------------------------------------------------------------------------------------------------


def _check_ids(name: str, ids: Tensor | None, n: int) -> None:
    if ids is None:
        return
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        got = ids.dtype if isinstance(ids, Tensor) else type(ids).__name__
        raise TypeError(f"`{name}` must be an integer tensor, got {got}")
    if ids.shape != (n,):
        raise ValueError(f"`{name}` must have shape [{n}], got {list(ids.shape)}")


def _check_vector(name: str, v: Tensor | None, n: int) -> None:
    if v is None:
        return
    if not isinstance(v, Tensor) or not v.dtype.is_floating_point:
        got = v.dtype if isinstance(v, Tensor) else type(v).__name__
        raise TypeError(f"`{name}` must be a floating-point tensor, got {got}")
    if v.shape != (n,):
        raise ValueError(f"`{name}` must have shape [{n}], got {list(v.shape)}")


def _check_temperature(temperature: float | Tensor) -> None:
    if isinstance(temperature, Tensor):
        if temperature.numel() != 1:
            raise ValueError(
                f"`temperature` must be a scalar, got a tensor of shape {list(temperature.shape)}"
            )
        return
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"`temperature` must be a float or a scalar tensor, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"`temperature` must be a finite float > 0, got {temperature}")


def _prepare(
    q: Tensor,
    c: Tensor,
    *,
    temperature: float | Tensor,
    item_ids: Tensor | None,
    user_ids: Tensor | None,
    log_q: Tensor | None,
    extra_c: Tensor | None,
    extra_item_ids: Tensor | None,
    extra_log_q: Tensor | float | None,
    weights: Tensor | None,
    reduction: str,
) -> _Prepared:
    """Validate the arguments shared by both variants and assemble the candidate columns.

    Nothing here reads tensor values, so there is no device sync. An empty ``extra_c`` (``M = 0``, e.g. a queue
    before its first enqueue) is dropped with its ids and log_q.
    """
    if q.ndim != 2 or c.ndim != 2:
        raise ValueError(f"`q` and `c` must be 2-D [B, d], got shapes {list(q.shape)} and {list(c.shape)}")
    if q.shape != c.shape:
        raise ValueError(
            f"`q` and `c` must have the same shape [B, d], got {list(q.shape)} and {list(c.shape)}"
        )
    if q.shape[0] == 0:
        raise ValueError("`q` and `c` must hold at least one row, got an empty batch")
    if not (q.dtype.is_floating_point and c.dtype.is_floating_point) or q.device != c.device:
        raise ValueError(
            f"`q` and `c` must be floating point on one device, got {q.dtype}/{q.device} and {c.dtype}/{c.device}"
        )
    b, d = q.shape
    _check_temperature(temperature)
    _check_ids("item_ids", item_ids, b)
    _check_ids("user_ids", user_ids, b)
    _check_vector("log_q", log_q, b)
    _check_vector("weights", weights, b)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
    if extra_c is None:
        for name, v in (("extra_item_ids", extra_item_ids), ("extra_log_q", extra_log_q)):
            if v is not None:
                raise ValueError(f"`{name}` was given without `extra_c`")
        return _Prepared(*_promote(q, c), log_q, None, 0)
    if extra_c.ndim != 2 or extra_c.shape[1] != d:
        raise ValueError(f"`extra_c` must have shape [M, {d}], got {list(extra_c.shape)}")
    if not extra_c.dtype.is_floating_point or extra_c.device != q.device:
        raise ValueError(
            f"`extra_c` must be floating point on `q`'s device {q.device}, got {extra_c.dtype}/{extra_c.device}"
        )
    m = extra_c.shape[0]
    _check_ids("extra_item_ids", extra_item_ids, m)
    if extra_item_ids is not None and item_ids is None:
        raise ValueError("`extra_item_ids` needs `item_ids` (the rows' positive items) to know what to mask")
    # Correcting one set of columns and not the other would tilt the softmax towards the uncorrected ones.
    if (log_q is None) != (extra_log_q is None):
        raise ValueError(
            "pass both `log_q` and `extra_log_q` or neither: logQ must correct in-batch and extra columns alike "
            f"(got log_q={'set' if log_q is not None else None}, "
            f"extra_log_q={'set' if extra_log_q is not None else None}); "
            "for uniformly sampled extras use extra_log_q=-math.log(n_items)"
        )
    if isinstance(extra_log_q, Tensor):
        _check_vector("extra_log_q", extra_log_q, m)
    elif extra_log_q is not None:
        if (
            isinstance(extra_log_q, bool)
            or not isinstance(extra_log_q, (int, float))
            or not math.isfinite(extra_log_q)
        ):
            raise ValueError(f"`extra_log_q` must be a [{m}] tensor or a finite float, got {extra_log_q!r}")
        extra_log_q = torch.full((m,), float(extra_log_q), dtype=log_q.dtype, device=q.device)
    if m == 0:
        return _Prepared(*_promote(q, c), log_q, None, 0)
    q, c, extra_c = _promote(q, c, extra_c)
    cands = torch.cat([c, extra_c], dim=0)  # [B + M, d]
    full_log_q = None if log_q is None else torch.cat([log_q, extra_log_q.to(log_q.dtype)])  # [B + M]
    return _Prepared(q, cands, full_log_q, extra_item_ids, m)


class _Prepared(NamedTuple):
    q: Tensor  # [B, d]
    cands: Tensor  # [B + M, d]: the batch's positives, then the extra negatives
    full_log_q: Tensor | None  # [B + M]
    extra_item_ids: Tensor | None  # [M]
    n_extra: int  # M


def _promote(*xs: Tensor) -> tuple[Tensor, ...]:
    """Cast to one floating dtype (towers may differ under autocast, queue entries may be stored in bf16)."""
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return tuple(x.to(dtype) for x in xs)


def _compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the score matmul runs in: the autocast dtype when autocast is on for ``x``'s device."""
    dev = x.device.type
    if x.dtype.is_floating_point and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return x.dtype


def _logit_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    # log-sum-exp, -inf masking and logQ in bf16/fp16 lose too much; float64 stays float64 for exact tests.
    return torch.float64 if compute_dtype == torch.float64 else torch.float32


def _correct_and_mask_(
    logits: Tensor,
    start: int,
    *,
    b: int,
    full_log_q: Tensor | None,
    correct_positive: bool,
    item_ids: Tensor | None,
    user_ids: Tensor | None,
    extra_item_ids: Tensor | None,
) -> Tensor:
    """Apply logQ and accidental-hit masking, in place, to the logits of rows ``start:start + r``.

    Args:
        logits: ``[r, B + M]`` scaled scores of rows ``start:start + r`` (float32/float64).
    Returns:
        ``logits``, modified in place: ``-= log_q`` (the diagonal too iff ``correct_positive``), masked
        columns set to ``-inf``. The masks are ``[r, B]`` / ``[r, M]`` blocks, never ``[B, B]`` unless ``r = B``.
    """
    r = logits.shape[0]
    rows = torch.arange(r, device=logits.device)
    diag = (rows, rows + start)  # row i's positive is column start + i
    if full_log_q is not None:
        lq = full_log_q.to(logits.dtype)
        logits.sub_(lq)
        if not correct_positive:
            logits[diag] += lq[start : start + r]
    hit = None
    for ids in (item_ids, user_ids):
        if ids is not None:
            eq = ids[start : start + r, None] == ids[None, :b]  # [r, B]
            hit = eq if hit is None else hit.logical_or_(eq)
    if hit is not None:
        hit[diag] = False  # never mask the positive
    extra_hit = None
    if extra_item_ids is not None:
        extra_hit = item_ids[start : start + r, None] == extra_item_ids[None, :]  # [r, M]
    if logits.requires_grad:
        # autograd turns an in-place op on a column view into a full-size gradient copy: mask the whole tensor
        m = logits.shape[1] - b
        if hit is not None and m:
            extra_hit = extra_hit if extra_hit is not None else hit.new_zeros(r, m)
            hit = torch.cat([hit, extra_hit], dim=1)
        elif hit is None and extra_hit is not None:
            hit = torch.cat([extra_hit.new_zeros(r, b), extra_hit], dim=1)
        if hit is not None:
            logits.masked_fill_(hit, float("-inf"))
        return logits
    if hit is not None:
        logits[:, :b].masked_fill_(hit, float("-inf"))
    if extra_hit is not None:
        logits[:, b:].masked_fill_(extra_hit, float("-inf"))
    return logits


def _reduce(per_row: Tensor, weights: Tensor | None, reduction: str) -> Tensor:
    if weights is not None:
        w = weights.to(per_row.dtype)
        if reduction == "mean":
            return (per_row * w).sum() / w.sum()
        per_row = per_row * w
    if reduction == "mean":
        return per_row.mean()
    if reduction == "sum":
        return per_row.sum()
    return per_row


# --------------------------------------------------------------------------------------------------------------
# in-batch softmax
# --------------------------------------------------------------------------------------------------------------


def in_batch_softmax(
    q: Tensor,
    c: Tensor,
    *,
    temperature: float | Tensor,
    item_ids: Tensor | None = None,
    user_ids: Tensor | None = None,
    log_q: Tensor | None = None,
    correct_positive: bool = True,
    extra_c: Tensor | None = None,
    extra_item_ids: Tensor | None = None,
    extra_log_q: Tensor | float | None = None,
    weights: Tensor | None = None,
    reduction: str = "mean",
    score_bias: Tensor | None = None,
) -> Tensor:
    """In-batch sampled softmax (InfoNCE): cross-entropy of each row of ``q @ [c; extra_c].T / temperature``.

    Args:
        q: query (user tower) embeddings ``[B, d]``.
        c: candidate (item tower) embeddings ``[B, d]``; ``c[i]`` is row ``i``'s positive.
        temperature: float > 0 or a scalar tensor (learned temperature receives a gradient).
        item_ids: ``[B]`` item of each positive; other columns with the same item are masked in that row.
        user_ids: ``[B]`` user of each row; the same user's other positives are masked in that row.
        log_q: ``[B]`` log sampling probability of each in-batch candidate (logQ correction).
        correct_positive: subtract ``log_q[i]`` from the positive's own logit too (Yi et al.); False leaves it.
        extra_c: ``[M, d]`` extra negatives shared by every row (uniform samples, queue).
        extra_item_ids: ``[M]`` items of the extra negatives; an extra equal to row ``i``'s item is masked there.
        extra_log_q: ``[M]`` (or one float for all) log sampling probability of the extras; required with
            ``log_q`` when ``extra_c`` is given.
        weights: ``[B]`` per-example weights; ``mean`` becomes ``sum(w * loss) / sum(w)``.
        reduction: ``"mean"`` | ``"sum"`` | ``"none"`` (``[B]`` per-row losses, times ``weights`` if given).
        score_bias: ``[B, B + M]`` added to the scores before the temperature (``model.time_prior``: each
            candidate's prior as of each row's time); only this function takes it.

    Returns:
        A scalar, or ``[B]`` with ``reduction="none"``; float32 (float64 for float64 inputs).
    """
    p = _prepare(
        q, c, temperature=temperature, item_ids=item_ids, user_ids=user_ids, log_q=log_q, extra_c=extra_c,
        extra_item_ids=extra_item_ids, extra_log_q=extra_log_q, weights=weights, reduction=reduction,
    )  # fmt: skip
    b = p.q.shape[0]
    scores = p.q @ p.cands.T  # [B, B + M]; bf16 under autocast
    logits = scores.to(_logit_dtype(scores.dtype))
    if score_bias is not None:
        if tuple(score_bias.shape) != tuple(logits.shape):
            raise ValueError(f"`score_bias` must have shape {list(logits.shape)}, got {list(score_bias.shape)}")
        logits = logits + score_bias.to(logits.dtype)
    logits = logits / temperature
    logits = _correct_and_mask_(
        logits, 0, b=b, full_log_q=p.full_log_q, correct_positive=correct_positive, item_ids=item_ids,
        user_ids=user_ids, extra_item_ids=p.extra_item_ids,
    )  # fmt: skip
    per_row = F.cross_entropy(logits, torch.arange(b, device=q.device), reduction="none")  # [B]
    return _reduce(per_row, weights, reduction)


def mixed_log_q(log_p: Tensor, *, batch_size: int, n_uniform: int, n_items: int) -> Tensor:
    """Log probability of a candidate under mixed negative sampling (Yang et al. 2020).

    The pool mixes ``batch_size`` candidates drawn from the unigram distribution ``p`` (the batch's positives) with
    ``n_uniform`` drawn uniformly from ``n_items``, so one draw from the pool picks item ``j`` with probability
    ``(batch_size * p_j + n_uniform / n_items) / (batch_size + n_uniform)``. Apply it to both parts:
    ``log_q=mixed_log_q(log_p[batch_items], ...)``, ``extra_log_q=mixed_log_q(log_p[sampled_items], ...)``.

    Args:
        log_p: ``[n]`` log unigram probability of the items concerned (``log(prob)`` from ``items.parquet``).
    Returns:
        ``[n]`` log mixture probabilities, same dtype as ``log_p``.
    """
    for name, v in (("batch_size", batch_size), ("n_uniform", n_uniform), ("n_items", n_items)):
        if not isinstance(v, int) or v < 0:
            raise ValueError(f"`{name}` must be an int >= 0, got {v!r}")
    if n_items < 1 or batch_size + n_uniform < 1:
        raise ValueError(
            f"need n_items >= 1 and batch_size + n_uniform >= 1, got {n_items} and {batch_size + n_uniform}"
        )
    # log(B p + M / N) - log(B + M), via logaddexp so tiny p stays accurate
    parts = log_p + math.log(batch_size) if batch_size else torch.full_like(log_p, float("-inf"))
    if n_uniform:
        parts = torch.logaddexp(parts, torch.full_like(log_p, math.log(n_uniform / n_items)))
    return parts - math.log(batch_size + n_uniform)


# --------------------------------------------------------------------------------------------------------------
# chunked in-batch softmax: never materialises [B, B + M] logits
# --------------------------------------------------------------------------------------------------------------


class _ChunkedSoftmax(torch.autograd.Function):
    """Per-row InfoNCE losses ``[b]`` of rows ``offset:offset + b`` of a ``[B, B + M]`` softmax, in row blocks.

    Row ``i`` of ``q`` is global row ``offset + i``, whose positive is candidate column ``offset + i``; the whole
    batch is ``offset=0, n_batch=b`` (:func:`in_batch_softmax_chunked`), one data-parallel shard any other slice
    (:func:`in_batch_softmax_shard`). Memory: forward keeps only the row log-sum-exp ``[b]``; each pass holds a few
    ``[chunk, B + M]`` buffers at a time. The backward is written out: ``d loss_i / d logits_ij = g_i (softmax_ij -
    [j = offset + i])``, then the chain rule through ``logits = q c^T / t - log_q``.
    """

    @staticmethod
    def forward(
        ctx, q, cands, temperature, full_log_q, item_ids, user_ids, extra_item_ids, correct_positive, chunk,
        offset, n_batch,
    ):  # fmt: skip
        compute_dtype = _compute_dtype(q)
        ctx.compute_dtype, ctx.correct_positive, ctx.chunk = compute_dtype, correct_positive, chunk
        ctx.offset, ctx.n_batch = offset, n_batch
        logit_dtype = _logit_dtype(compute_dtype)
        b = q.shape[0]
        inv_t = 1.0 / temperature.detach().to(logit_dtype).reshape(())
        qc, cc = q.detach().to(compute_dtype), cands.detach().to(compute_dtype)
        opts = dict(b=n_batch, full_log_q=full_log_q, correct_positive=correct_positive, item_ids=item_ids,
                    user_ids=user_ids, extra_item_ids=extra_item_ids)  # fmt: skip
        out = torch.empty(b, dtype=logit_dtype, device=q.device)
        lse = torch.empty(b, dtype=logit_dtype, device=q.device)
        with torch.autocast(q.device.type, enabled=False):
            for start in range(0, b, chunk):
                stop = min(start + chunk, b)
                logits = (qc[start:stop] @ cc.T).to(logit_dtype).mul_(inv_t)  # [r, B + M]
                _correct_and_mask_(logits, offset + start, **opts)
                lse[start:stop] = torch.logsumexp(logits, dim=1)
                rows = torch.arange(stop - start, device=q.device)
                out[start:stop] = lse[start:stop] - logits[rows, rows + offset + start]
        ctx.save_for_backward(q, cands, temperature, full_log_q, item_ids, user_ids, extra_item_ids, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, cands, temperature, full_log_q, item_ids, user_ids, extra_item_ids, lse = ctx.saved_tensors
        need_q, need_c, need_t, need_lq = ctx.needs_input_grad[:4]
        compute_dtype, logit_dtype, offset = ctx.compute_dtype, lse.dtype, ctx.offset
        b, n_cols = q.shape[0], cands.shape[0]
        inv_t = 1.0 / temperature.detach().to(logit_dtype).reshape(())
        qc, cc = q.detach().to(compute_dtype), cands.detach().to(compute_dtype)
        opts = dict(b=ctx.n_batch, full_log_q=full_log_q, correct_positive=ctx.correct_positive, item_ids=item_ids,
                    user_ids=user_ids, extra_item_ids=extra_item_ids)  # fmt: skip
        grad_out = grad_out.to(logit_dtype)
        grad_q = torch.empty(q.shape, dtype=compute_dtype, device=q.device) if need_q else None
        grad_c = torch.zeros(cands.shape, dtype=logit_dtype, device=q.device) if need_c else None
        grad_t = torch.zeros((), dtype=logit_dtype, device=q.device)
        grad_lq = torch.zeros(n_cols, dtype=logit_dtype, device=q.device) if need_lq else None
        with torch.autocast(q.device.type, enabled=False):
            for start in range(0, b, ctx.chunk):
                stop = min(start + ctx.chunk, b)
                scores = (qc[start:stop] @ cc.T).to(logit_dtype)  # [r, B + M]
                logits = scores * inv_t if need_t else scores.mul_(inv_t)
                _correct_and_mask_(logits, offset + start, **opts)
                g = logits.sub_(lse[start:stop, None]).exp_()  # softmax; masked columns are 0
                rows = torch.arange(stop - start, device=q.device)
                cols = rows + offset + start
                g[rows, cols] -= 1.0
                g.mul_(grad_out[start:stop, None])  # d loss / d logits
                if need_t:
                    grad_t -= torch.dot(g.reshape(-1), scores.reshape(-1)) * inv_t * inv_t
                if need_lq:
                    grad_lq -= g.sum(0)
                    if not ctx.correct_positive:
                        grad_lq[cols] += g[rows, cols]
                gs = g.mul_(inv_t).to(compute_dtype)  # d loss / d scores
                if need_q:
                    grad_q[start:stop] = gs @ cc
                if need_c:
                    grad_c += (gs.T @ qc[start:stop]).to(logit_dtype)
        return (
            grad_q.to(q.dtype) if need_q else None,
            grad_c.to(cands.dtype) if need_c else None,
            grad_t.to(temperature.device, temperature.dtype).reshape(temperature.shape) if need_t else None,
            grad_lq.to(full_log_q.dtype) if need_lq else None,
            None, None, None, None, None, None, None,
        )  # fmt: skip


def in_batch_softmax_chunked(
    q: Tensor,
    c: Tensor,
    *,
    temperature: float | Tensor,
    item_ids: Tensor | None = None,
    user_ids: Tensor | None = None,
    log_q: Tensor | None = None,
    correct_positive: bool = True,
    extra_c: Tensor | None = None,
    extra_item_ids: Tensor | None = None,
    extra_log_q: Tensor | float | None = None,
    weights: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = 1024,
) -> Tensor:
    """:func:`in_batch_softmax` computed ``chunk_size`` rows at a time, forward and backward.

    Same arguments, values and gradients as :func:`in_batch_softmax`. Peak extra memory is a few ``[chunk_size,
    B + M]`` blocks instead of the full ``[B, B + M]`` logits (plus their softmax and mask) that autograd would
    keep; the backward recomputes each block's scores (one more matmul) instead of storing them. Measured on CPU
    at B = 8192, d = 64, chunk 1024 (benchmarks/loss_bench.py): 78 MiB instead of 834 MiB, and 0.64x the time.

    Args:
        chunk_size: rows per block, >= 1.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be an int >= 1, got {chunk_size!r}")
    p = _prepare(
        q, c, temperature=temperature, item_ids=item_ids, user_ids=user_ids, log_q=log_q, extra_c=extra_c,
        extra_item_ids=extra_item_ids, extra_log_q=extra_log_q, weights=weights, reduction=reduction,
    )  # fmt: skip
    if not isinstance(temperature, Tensor):
        dtype = _logit_dtype(_compute_dtype(p.q))
        temperature = torch.full((), float(temperature), dtype=dtype, device=q.device)  # a fill: capturable
    per_row = _ChunkedSoftmax.apply(
        p.q, p.cands, temperature, p.full_log_q, item_ids, user_ids, p.extra_item_ids, correct_positive, chunk_size,
        0, p.q.shape[0],
    )  # fmt: skip
    return _reduce(per_row, weights, reduction)


# --------------------------------------------------------------------------------------------------------------
# one shard of a global in-batch softmax (data parallel: this rank's queries against every rank's candidates)
# --------------------------------------------------------------------------------------------------------------


def _prepare_shard(q: Tensor, c: Tensor, *, row_offset: int, weights: Tensor | None,
                   **kw) -> tuple[_Prepared, Tensor, Tensor]:  # fmt: skip
    """:func:`_prepare` for one shard's queries ``q [b, d]`` against the global batch ``c [B, d]``: checks ``q``,
    ``row_offset`` and ``weights [b]``; returns the prepared candidate side and ``q`` / candidates in one dtype."""
    # the candidate side is validated as a B-row batch (q stands in for nothing there)
    p = _prepare(c, c, weights=None, **kw)
    n_batch = c.shape[0]
    if q.ndim != 2 or q.shape[1] != c.shape[1] or q.shape[0] == 0:
        raise ValueError(f"`q` must have shape [b >= 1, {c.shape[1]}], got {list(q.shape)}")
    b = q.shape[0]
    if isinstance(row_offset, bool) or not isinstance(row_offset, int) or not 0 <= row_offset <= n_batch - b:
        raise ValueError(f"`row_offset` must be an int in [0, {n_batch - b}] (B={n_batch}, b={b}), got {row_offset!r}")
    _check_vector("weights", weights, b)
    q, cands = _promote(q, p.cands)
    return p, q, cands


def in_batch_softmax_shard(
    q: Tensor,
    c: Tensor,
    *,
    row_offset: int,
    temperature: float | Tensor,
    item_ids: Tensor | None = None,
    user_ids: Tensor | None = None,
    log_q: Tensor | None = None,
    correct_positive: bool = True,
    extra_c: Tensor | None = None,
    extra_item_ids: Tensor | None = None,
    extra_log_q: Tensor | float | None = None,
    weights: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int = 0,
) -> Tensor:
    """Rows ``row_offset : row_offset + b`` of :func:`in_batch_softmax` over a global batch of ``B`` rows.

    Data-parallel training: each rank holds ``b`` of the ``B`` queries but every rank's candidates (all-gathered),
    so the negative pool is the global batch while the logits are only ``[b, B + M]``. Summing the per-row losses
    of every shard gives exactly the single-process loss on the concatenated batch. With ``row_offset=0`` and
    ``b = B`` this is :func:`in_batch_softmax` (``chunk_size=0``) or :func:`in_batch_softmax_chunked`.

    Args:
        q: ``[b, d]`` this shard's queries (global rows ``row_offset .. row_offset + b - 1``).
        c: ``[B, d]`` every row's positive, in global row order.
        row_offset: global index of ``q``'s first row.
        item_ids, user_ids, log_q: ``[B]`` global, as in :func:`in_batch_softmax`.
        weights: ``[b]`` this shard's example weights; ``mean`` divides by their sum (a data-parallel caller
            wanting the global weighted mean uses ``reduction="sum"`` and divides by the global sum itself).
        chunk_size: rows per block (hand-written backward, never the full ``[b, B + M]`` logits); 0 = one block
            through autograd.
    Returns:
        A scalar, or ``[b]`` with ``reduction="none"``.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 0:
        raise ValueError(f"`chunk_size` must be an int >= 0, got {chunk_size!r}")
    p, q, cands = _prepare_shard(
        q, c, row_offset=row_offset, temperature=temperature, item_ids=item_ids, user_ids=user_ids, log_q=log_q,
        extra_c=extra_c, extra_item_ids=extra_item_ids, extra_log_q=extra_log_q, weights=weights, reduction=reduction,
    )  # fmt: skip
    n_batch = c.shape[0]
    if chunk_size:
        if not isinstance(temperature, Tensor):
            temperature = torch.full((), float(temperature), dtype=_logit_dtype(_compute_dtype(q)), device=q.device)
        per_row = _ChunkedSoftmax.apply(
            q, cands, temperature, p.full_log_q, item_ids, user_ids, p.extra_item_ids, correct_positive, chunk_size,
            row_offset, n_batch,
        )  # fmt: skip
        return _reduce(per_row, weights, reduction)
    scores = q @ cands.T  # [b, B + M]; bf16 under autocast
    logits = scores.to(_logit_dtype(scores.dtype)) / temperature
    logits = _correct_and_mask_(
        logits, row_offset, b=n_batch, full_log_q=p.full_log_q, correct_positive=correct_positive,
        item_ids=item_ids, user_ids=user_ids, extra_item_ids=p.extra_item_ids,
    )  # fmt: skip
    target = torch.arange(row_offset, row_offset + q.shape[0], device=q.device)
    per_row = F.cross_entropy(logits, target, reduction="none")  # [b]
    return _reduce(per_row, weights, reduction)


# --------------------------------------------------------------------------------------------------------------
# MoCo-style queue of recent item embeddings
# --------------------------------------------------------------------------------------------------------------


class ItemEmbeddingQueue:
    """Ring buffer of the most recent ``size`` item embeddings, used as extra negatives (He et al. 2020, MoCo).

    Entries are detached on the way in, so no gradient ever flows into the queue; they were computed by an older
    item tower, which is why the queue should stay small relative to how fast the tower moves.

    Usage in a training step (after the loss, so a batch is never its own negative)::

        emb, ids = queue.tensors()
        loss = in_batch_softmax(q, c, temperature=t, item_ids=items, extra_c=emb, extra_item_ids=ids,
                                log_q=log_q, extra_log_q=queue.log_q())
        queue.enqueue(c, items, log_q=log_q)

    Args:
        size: capacity ``M`` (>= 1).
        dim: embedding width ``d``.
        device: where the buffers live; None = the device of the first enqueued batch.
        dtype: buffer dtype; None = the dtype of the first enqueued batch.
    """

    def __init__(
        self,
        size: int,
        dim: int,
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        for name, v in (("size", size), ("dim", dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"`{name}` must be an int >= 1, got {v!r}")
        self.size = size
        self.dim = dim
        self._device = None if device is None else torch.device(device)
        self._dtype = dtype
        self._emb: Tensor | None = None  # [size, dim]
        self._ids: Tensor | None = None  # [size] int64
        self._log_q: Tensor | None = None  # [size], only once a batch came with log_q
        self._ptr = 0  # next slot to write
        self._count = 0  # filled slots
        if self._device is not None and self._dtype is not None:
            self._allocate(self._device, self._dtype)

    def _allocate(self, device: torch.device, dtype: torch.dtype) -> None:
        self._emb = torch.zeros(self.size, self.dim, device=device, dtype=dtype)
        self._ids = torch.full((self.size,), -1, dtype=torch.long, device=device)

    def __len__(self) -> int:
        return self._count

    @property
    def device(self) -> torch.device | None:
        return None if self._emb is None else self._emb.device

    def reset(self) -> None:
        """Empty the queue (e.g. when the item tower changed too much for old entries to be useful)."""
        self._ptr = 0
        self._count = 0
        self._log_q = None

    @torch.no_grad()
    def enqueue(self, emb: Tensor, ids: Tensor, *, log_q: Tensor | None = None) -> None:
        """Append a batch, overwriting the oldest entries.

        Args:
            emb: ``[B, dim]`` item embeddings (detached here).
            ids: ``[B]`` item ids (to mask a queued copy of a row's own positive).
            log_q: ``[B]`` log sampling probabilities of these items, kept for :meth:`log_q`. Give it always or
                never: a queue cannot mix corrected and uncorrected entries.
        """
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise ValueError(f"`emb` must have shape [B, {self.dim}], got {list(emb.shape)}")
        n = emb.shape[0]
        _check_ids("ids", ids, n)
        _check_vector("log_q", log_q, n)
        if self._count and (log_q is None) != (self._log_q is None):
            raise ValueError(
                f"`log_q` must be given for every batch or for none; the queue holds {self._count} entries "
                f"{'with' if self._log_q is not None else 'without'} log_q and this batch has "
                f"{'none' if log_q is None else 'some'}"
            )
        if self._emb is None:
            self._allocate(self._device or emb.device, self._dtype or emb.dtype)
        if log_q is not None and self._log_q is None:
            self._log_q = torch.zeros(self.size, dtype=log_q.dtype, device=self._emb.device)
        if n == 0:
            return
        if n > self.size:  # only the newest `size` rows survive anyway
            emb, ids = emb[-self.size :], ids[-self.size :]
            log_q = None if log_q is None else log_q[-self.size :]
            n = self.size
        slots = (self._ptr + torch.arange(n, device=self._emb.device)) % self.size
        self._emb[slots] = emb.detach().to(self._emb.device, self._emb.dtype)
        self._ids[slots] = ids.to(self._ids.device, torch.long)
        if log_q is not None:
            self._log_q[slots] = log_q.detach().to(self._log_q.device, self._log_q.dtype)
        self._ptr = (self._ptr + n) % self.size
        self._count = min(self._count + n, self.size)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """The filled entries: ``(emb [M, dim], ids [M])``, ``M = len(self)`` (0 before the first enqueue)."""
        if self._emb is None:
            dev = self._device or torch.device("cpu")
            return (
                torch.zeros(0, self.dim, device=dev, dtype=self._dtype or torch.float32),
                torch.zeros(0, dtype=torch.long, device=dev),
            )
        return self._emb[: self._count], self._ids[: self._count]

    def log_q(self) -> Tensor | None:
        """``[M]`` log sampling probabilities of the filled entries, or None if batches came without ``log_q``."""
        return None if self._log_q is None else self._log_q[: self._count]


# --------------------------------------------------------------------------------------------------------------
# self-supervised feature-dropout loss (Yao et al. 2021)
# --------------------------------------------------------------------------------------------------------------


def feature_dropout(codes: Tensor, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Zero each feature code independently with probability ``p`` (code 0 = missing): one augmented view.

    The trainer's SSL views (``TwoTower.item_views``) draw their input masks with it, on a ``[B, inputs]`` matrix
    of ones (ID, each feature, title): a zeroed entry drops that input's embedding from the view.

    Args:
        codes: ``[B, F]`` integer feature codes.
        p: drop probability in ``[0, 1]``.
        generator: optional ``torch.Generator`` on ``codes``' device, for reproducible views.
    Returns:
        ``[B, F]`` copy of ``codes`` with the dropped entries set to 0.
    """
    if not isinstance(codes, Tensor) or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        got = codes.dtype if isinstance(codes, Tensor) else type(codes).__name__
        raise TypeError(f"`codes` must be an integer tensor, got {got}")
    if codes.ndim != 2:
        raise ValueError(f"`codes` must have shape [B, F], got {list(codes.shape)}")
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"`p` must be a float in [0, 1], got {p!r}")
    # always one draw per entry, p = 0 included: the trainer's random stream does not depend on the value of p
    drop = torch.rand(codes.shape, generator=generator, device=codes.device) < p
    return codes.masked_fill(drop, 0)


def feature_dropout_ssl_loss(
    z1: Tensor, z2: Tensor, *, temperature: float | Tensor, item_ids: Tensor | None = None
) -> Tensor:
    """Symmetric InfoNCE between two augmented views of the same items (SimCLR-style, Yao et al. 2021).

    ``z1[i]`` and ``z2[i]`` (two feature-dropout views of item ``i``) are a positive pair; the other items' views
    in the other tensor are negatives. The loss is the mean of the ``z1 -> z2`` and ``z2 -> z1`` directions.

    Args:
        z1: ``[B, d]`` item-tower output of view 1 (L2-normalised, as the tower returns it).
        z2: ``[B, d]`` item-tower output of view 2.
        temperature: float > 0 or scalar tensor (logits = z1 @ z2.T / temperature).
        item_ids: optional ``[B]``; the same item appearing twice in the batch is not its own negative.
    Returns:
        Scalar loss.
    """
    a = in_batch_softmax(z1, z2, temperature=temperature, item_ids=item_ids)
    b = in_batch_softmax(z2, z1, temperature=temperature, item_ids=item_ids)
    return 0.5 * (a + b)
