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

import logging
from collections.abc import Iterable

import torch
from torch import Tensor

from recsys.train.segments import segment_rows

log = logging.getLogger(__name__)

__all__ = ["RowWiseAdagrad"]






def _choose_fused(device: torch.device) -> bool:
    """``fused=None``: the Triton kernels on CUDA when triton imports and they pass their self-check."""
    if device.type != "cuda":
        return False
    try:
        from recsys.train.kernels import triton_optim  # noqa: F401 - triton is optional: imported only here
    except ImportError:
        return False
    return choose(device)


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
        fused: sparse updates through the two Triton kernels of recsys.train.kernels.triton_optim (~9 kernels and 3 passes over
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
        self.fused = fused  # None until the first sparse step decides (recsys.train.kernels.triton_optim.choose)

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
                        # triton: optional, imported on use
                        from recsys.train.kernels.triton_optim import rowwise_adagrad_update_

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


def self_check(device: torch.device, *, seed: int = 0) -> float:
    """Largest relative difference between the Triton kernels (``recsys.train.kernels.triton_optim``) and this
    module's torch update (weights and accumulators) after one step on a random problem with heavy repeats."""
    from recsys.train.kernels.triton_optim import rowwise_adagrad_update_  # triton: optional, imported on use

    g = torch.Generator().manual_seed(seed)
    n_rows, n, e = 300, 2000, 24
    idx = (torch.randint(0, n_rows, (n,), generator=g) ** 2 // n_rows).to(device)  # skewed: long segments
    vals = torch.randn(n, e, generator=g).to(device)
    w0 = torch.randn(n_rows, e, generator=g).to(device)
    p = torch.nn.Parameter(w0.clone())
    opt = RowWiseAdagrad([p], lr=0.1, initial_accumulator_value=0.01, fused=False)
    p.grad = torch.sparse_coo_tensor(idx[None], vals, (n_rows, e))
    opt.step()
    w, acc = w0.clone(), torch.full((n_rows,), 0.01, device=device)
    rowwise_adagrad_update_(w, acc, idx, vals, lr=0.1, eps=1e-8)
    dw_ref, dw = p.detach() - w0, w - w0
    err_w = float((dw - dw_ref).norm() / dw_ref.norm())
    acc_ref = opt.state[p]["sum_sq"]
    return max(err_w, float((acc - acc_ref).norm() / acc_ref.norm()))


_CHOICE: dict[str, bool] = {}


def choose(device: torch.device) -> bool:
    """Whether RowWiseAdagrad(fused=None) uses the kernels on ``device``: CUDA only, after :func:`self_check` passed
    (once per device and process); a failure to compile or a mismatch logs a warning and keeps the torch update."""
    key = str(device)
    if key not in _CHOICE:
        ok = False
        if device.type == "cuda":
            try:
                err = self_check(device)
                ok = err <= 1e-4
                if not ok:
                    log.warning("row-wise Adagrad kernels disagree with the torch update (relative error %.3g); "
                                "using torch", err)
            except Exception as e:  # any failure to compile or launch means: not on this machine
                log.warning("row-wise Adagrad kernels failed their self-check (%s: %s); using the torch update",
                            type(e).__name__, e)
        _CHOICE[key] = ok
    return _CHOICE[key]
