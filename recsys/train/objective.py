"""The trainer's loss, chosen in one place: the in-batch softmax (:mod:`recsys.train.losses`), chunked or fused
(:mod:`recsys.train.kernels.fused_loss`), with the score prior's bias, on one process or as one rank's share of the
global batch under DDP (:mod:`recsys.train.distributed` gathers the candidates)."""

from __future__ import annotations

from functools import partial
from typing import Any

from torch import Tensor

from recsys.train import losses
from recsys.train.distributed import DistContext, all_gather_nograd, all_gather_with_grad


def contrastive_loss(
    q: Tensor,
    c: Tensor,
    *,
    ctx: DistContext,
    temperature: float | Tensor,
    items: Tensor,
    users: Tensor,
    log_q: Tensor | None,
    weights: Tensor | None,
    mask_items: bool,
    mask_users: bool,
    correct_positive: bool,
    extra_c: Tensor | None,
    extra_ids: Tensor | None,
    extra_log_q: Tensor | None,
    chunk_size: int = 0,
    fused: bool = False,
    score_bias: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The trainer's loss, chosen here: the plain, chunked or fused (Triton) in-batch softmax, with the score prior's
    bias, on one process; or one rank's rows against every rank's candidates under DDP (the candidates gathered
    with :mod:`recsys.train.distributed`).

    Args:
        q, c: ``[b, d]`` this rank's query / positive embeddings; ``items``, ``users``, ``log_q``, ``weights``
            ``[b]`` alike. ``extra_*``: this rank's extra negatives (uniform samples, queue), ``[M, d]`` / ``[M]``.
        chunk_size: > 0 computes the softmax in row blocks (no full ``[b, B + M]`` float32 logits).
        fused: use the Triton kernels of :mod:`recsys.train.kernels.fused_loss` (``chunk_size`` is then irrelevant).
        score_bias: ``[b, b + M]`` added to the scores (``model.time_prior``): one process, plain softmax only.
    Returns:
        ``(loss, c_all [B, d], items_all [B])``: the loss to backpropagate (with ``W`` ranks its mean over ranks is
        the single-process loss of the concatenated batch, and so are the averaged gradients), and the global
        batch's candidates and items (what a MoCo queue should enqueue, identically on every rank).
    """
    kw: dict[str, Any] = dict(
        temperature=temperature, log_q=log_q, correct_positive=correct_positive, extra_c=extra_c,
        extra_item_ids=extra_ids if mask_items else None, extra_log_q=extra_log_q,
    )  # fmt: skip
    if fused:
        from recsys.train.kernels.fused_loss import in_batch_softmax_fused as shard_loss  # triton: optional
    else:
        shard_loss = partial(losses.in_batch_softmax_shard, chunk_size=chunk_size)
    if score_bias is not None and (fused or chunk_size or ctx.enabled):
        raise ValueError("`model.time_prior` trains with the plain in-batch softmax on one process: set "
                         "`train.loss_kernel = \"torch\"` and `train.loss_chunk_size = 0`, and run without torchrun")
    if not ctx.enabled:
        kw.update(item_ids=items if mask_items else None, user_ids=users if mask_users else None, weights=weights)
        if score_bias is not None:
            return losses.in_batch_softmax(q, c, score_bias=score_bias, **kw), c, items
        if fused:
            return shard_loss(q, c, **kw), c, items
        if chunk_size:
            return losses.in_batch_softmax_chunked(q, c, chunk_size=chunk_size, **kw), c, items
        return losses.in_batch_softmax(q, c, **kw), c, items
    b, w = q.shape[0], ctx.world_size
    c_all = all_gather_with_grad(c, ctx)  # [B, d]: own slice keeps its grad
    items_all = all_gather_nograd(items, ctx)
    kw["log_q"] = None if log_q is None else all_gather_nograd(log_q, ctx)
    kw.update(item_ids=items_all if mask_items else None,
              user_ids=all_gather_nograd(users, ctx) if mask_users else None)  # fmt: skip
    total = shard_loss(q, c_all, row_offset=ctx.rank * b, weights=weights, reduction="sum", **kw)
    # global mean = sum over every rank's rows / (B or the global weight sum); times W so that the DDP *mean*
    # of the ranks' gradients (and losses) is the single-process gradient (and loss)
    denom = float(b * w) if weights is None else all_gather_nograd(weights.reshape(-1), ctx).sum()
    return total * w / denom, c_all, items_all
