"""Optimizers for big embedding tables: update only the rows a batch touched.

Dense Adam over a ``[1M, 128]`` ID table reads and writes every row (and two moment tables of the same size) on
every step, although a batch of 8192 touches at most a few thousand rows per table; at that scale the optimizer,
not the model, is the step time. :class:`RowWiseAdagrad` (FBGEMM / TorchRec's ``EXACT_ROWWISE_ADAGRAD``) keeps one
accumulator per row (``[n_rows]`` float32, 1/128 of an Adam moment) and updates only the rows present in the
sparse gradient of an ``nn.Embedding(..., sparse=True)``.

The update is written with fixed-shape tensor ops only (sort, cumsum, index_add_): no ``coalesce`` and no
``unique``, whose output sizes depend on the data and would make the host wait for the device on every step.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

__all__ = ["RowWiseAdagrad", "segment_rows", "sorted_segments"]


def sorted_segments(idx: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Sort row indices and number their runs, with fixed shapes (no ``unique``, no host sync).

    Args:
        idx: ``[n]`` row indices, repeats allowed.
    Returns:
        ``(rows [n], order [n], first [n] bool, seg [n])``: ``rows = idx[order]`` sorted; ``first[j]`` marks the
        first entry of each distinct row; ``seg[j]`` is the number of ``rows[j]``'s run (0, 1, ...).
    """
    rows, order = torch.sort(idx)
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = rows[1:] != rows[:-1]
    seg = torch.cumsum(first, 0) - 1  # segments beyond the count are never referenced
    return rows, order, first, seg


def segment_rows(idx: Tensor, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sum the gradient rows of repeated indices, keeping fixed shapes.

    Args:
        idx: ``[n]`` row indices, repeats allowed (an uncoalesced sparse gradient's indices).
        values: ``[n, E]`` the matching gradient rows.
    Returns:
        ``(rows [n], total [n, E], first [n] bool)`` in sorted order: ``total[j]`` is the sum of every gradient
        row of ``rows[j]``; ``first[j]`` marks one representative per distinct row (the others must add nothing).
    """
    rows, order, first, seg = sorted_segments(idx)
    sv = values[order]  # [n, E]
    sums = torch.zeros_like(sv).index_add_(0, seg, sv)  # [n, E]
    return rows, sums[seg], first


def _choose_fused(device: torch.device) -> bool:
    """``fused=None``: the Triton kernels on CUDA when triton imports and they pass their self-check."""
    if device.type != "cuda":
        return False
    try:
        from recsys import triton_optim
    except ImportError:
        return False
    return triton_optim.choose(device)


class RowWiseAdagrad(torch.optim.Optimizer):
    """Row-wise Adagrad for embedding tables (sparse or dense gradients).

    For each row ``r`` with summed gradient ``g_r [E]`` in this step::

        G_r += mean(g_r ** 2)                       # one float32 accumulator per row
        w_r -= lr * g_r / (sqrt(G_r) + eps)

    Rows absent from the batch are not read or written. Adagrad's effective step shrinks as ``G_r`` grows, so it
    wants a learning rate about 10x Adam's (0.03-0.1 for cosine two-tower models).

    Args:
        params: the embedding weights ``[n_rows, E]`` (2-D).
        lr: learning rate: a float, or a 0-dim tensor on the parameters' device (a CUDA graph reads it in place).
        eps: added to ``sqrt(G_r)``.
        initial_accumulator_value: starting ``G_r`` (> 0 damps the first steps of rare rows).
        fused: sparse updates through the two Triton kernels of recsys.triton_optim (~9 kernels and 3 passes over
            the gradient rows per table instead of ~25 and 9). None = on CUDA when triton is installed and the
            kernels pass a self-check against this update on the device (else the torch update, with a warning).
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        *,
        lr: float = 0.05,
        eps: float = 1e-8,
        initial_accumulator_value: float = 0.0,
        fused: bool | None = None,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        if not eps >= 0:
            raise ValueError(f"`eps` must be >= 0, got {eps}")
        if initial_accumulator_value < 0:
            raise ValueError(f"`initial_accumulator_value` must be >= 0, got {initial_accumulator_value}")
        defaults = {"lr": lr, "eps": eps, "initial_accumulator_value": initial_accumulator_value}
        super().__init__(params, defaults)
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"RowWiseAdagrad takes 2-D embedding tables, got a parameter of shape "
                                     f"{list(p.shape)}")
        self.fused = fused  # None until the first sparse step decides (recsys.triton_optim.choose)

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch.optim signature
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps = group["lr"], group["eps"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "sum_sq" not in state:
                    state["sum_sq"] = torch.full(
                        (p.shape[0],), group["initial_accumulator_value"], dtype=torch.float32, device=p.device
                    )
                acc = state["sum_sq"]  # [n_rows]
                g = p.grad
                if g.is_sparse:
                    # nn.Embedding(sparse=True) gives one index per looked-up position: [1, n] and [n, E]
                    idx, vals = g._indices()[0], g._values()
                    if vals.dim() != 2:
                        raise ValueError(f"expected a row-sparse gradient with [n, {p.shape[1]}] values, got "
                                         f"values of shape {list(vals.shape)}")
                    if self.fused is None:
                        self.fused = _choose_fused(p.device)
                    if self.fused:
                        from recsys.triton_optim import rowwise_adagrad_update_

                        rowwise_adagrad_update_(p, acc, idx, vals, lr=lr, eps=eps)
                        continue
                    rows, total, first = segment_rows(idx, vals.float())
                    sq = total.pow(2).mean(1)  # [n]: the same value for every entry of one row
                    new_acc = acc[rows] + sq
                    acc.index_add_(0, rows, sq * first)  # counted once per distinct row
                    denom = (new_acc.sqrt() + eps).clamp_min(1e-30)  # a zero gradient with eps=0: 0 / 0 otherwise
                    step = total * torch.where(first, -lr / denom, 0.0)[:, None]  # [n, E]
                    p.index_add_(0, rows, step.to(p.dtype))
                else:
                    # dense gradient (e.g. a small table): rows with an all-zero gradient are left as they are
                    gf = g.float()
                    acc.add_(gf.pow(2).mean(1))
                    p.sub_((lr * gf / (acc.sqrt() + eps).clamp_min(1e-30)[:, None]).to(p.dtype))
        return loss
