"""Data-parallel training: ``torchrun --nproc_per_node N -m recsys train ...`` (NCCL on GPUs, gloo on CPU).

How one step works with ``W`` ranks and a global batch of ``B`` rows (``train.batch_size``):

* Every rank draws the same global permutation of the epoch (a generator seeded from the seed, phase and epoch,
  so no RNG state has to agree between ranks) and takes its own contiguous ``b = B / W`` rows of each global batch.
* Each rank encodes its ``b`` queries and ``b`` candidates, then all-gathers the candidates (CLIP-style: the other
  ranks' rows arrive without history, its own slice is the local tensor with grad) plus their item IDs, user IDs,
  log_q and weights, so the negative pool is the whole global batch and accidental-hit masking and logQ are those
  of the global batch. Its loss is its rows of the global ``[B, B + M]`` softmax
  (:func:`recsys.train.losses.in_batch_softmax_shard`), scaled so that the *mean* over ranks of the gradients is the
  single-process gradient on the concatenated batch; the all-gather's backward sums the gradient that every
  rank's loss sends to a rank's candidates back to that rank.
* Gradients are averaged explicitly (:func:`sync_gradients`): one flat all-reduce of the dense parameters and an
  all-gather of the sparse embedding-row gradients (``nn.Embedding(sparse=True)``), which DDP's NCCL reducer does
  not support. Every rank then applies the same update, so the replicas stay identical without broadcasts.
* Rank 0 alone writes files (checkpoints, metrics, weights) and validates; the others wait for the result.
  Checkpoints hold global progress (epochs, steps of global batches, examples), so a run can resume with another
  world size as long as ``train.batch_size`` stays the same.

Multi-node: torchrun's rendezvous sets ``MASTER_ADDR`` / ``MASTER_PORT`` / ``RANK`` / ``WORLD_SIZE`` /
``LOCAL_RANK``; :func:`init_from_env` uses ``env://``.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "DistContext",
    "all_gather_nograd",
    "RankZeroEvaluator",
    "all_gather_with_grad",
    "epoch_seed",
    "init_from_env",
    "sync_gradients",
]


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in a data-parallel job; ``DistContext()`` is a single process (every op a no-op)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False
    """:func:`init_from_env` created the process group (so the trainer destroys it when done)."""

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: writes files, validates, logs."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (JSON-like values: metrics dicts, flags)."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_reduce_mean(self, t: Tensor) -> Tensor:
        """The mean of ``t`` over ranks (a new tensor; ``t`` itself is left alone)."""
        if not self.enabled:
            return t
        out = t.detach().clone()
        dist.all_reduce(out)
        return out / self.world_size

    def local_batch(self, global_batch: int) -> int:
        """Rows per rank of a global batch; it must split evenly so every rank's loss has the same shape."""
        if global_batch % self.world_size:
            raise ValueError(
                f"`train.batch_size` ({global_batch}) must be divisible by the world size ({self.world_size}) in "
                f"data-parallel training: every rank takes an equal shard of each global batch"
            )
        return global_batch // self.world_size

    def shard(self, rows: Tensor) -> Tensor:
        """This rank's contiguous slice of a global batch of row indices ``[B] -> [B / W]``."""
        if not self.enabled:
            return rows
        b = self.local_batch(rows.shape[0])
        return rows[self.rank * b : (self.rank + 1) * b]


def init_from_env(device: str | torch.device = "auto") -> tuple[DistContext, str | torch.device]:
    """Join the process group torchrun describes in the environment; a plain process gets ``DistContext()``.

    Returns the context and the device of this rank: ``cuda:LOCAL_RANK`` on a GPU job (``device`` ``"auto"`` or
    ``"cuda"``), else ``device`` unchanged. The backend is NCCL for CUDA and gloo for CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    dev_str = str(device)
    use_cuda = torch.cuda.is_available() and (dev_str == "auto" or dev_str.startswith("cuda"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    elif dev_str == "auto":
        device = "cpu"
    owns = not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", init_method="env://")
    if dist.get_world_size() != world:
        raise RuntimeError(f"process group has {dist.get_world_size()} ranks but WORLD_SIZE={world}")
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, owns_group=owns), device


def epoch_seed(seed: int, phase: str, epoch: int, rank: int = -1) -> int:
    """A 63-bit seed for (seed, phase, epoch[, rank]): rank -1 = shared by every rank (the permutation)."""
    h = hashlib.blake2b(f"{seed}/{phase}/{epoch}/{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 63) - 1)


# ------------------------------------------------------------------------------------------------- collectives
def all_gather_nograd(t: Tensor, ctx: DistContext) -> Tensor:
    """``[b, ...]`` on each rank -> ``[W * b, ...]`` in rank order (no gradient; equal shapes on every rank)."""
    if not ctx.enabled:
        return t
    t = t.detach().contiguous()
    parts = [torch.empty_like(t) for _ in range(ctx.world_size)]
    dist.all_gather(parts, t)
    return torch.cat(parts)


class _AllGatherGrad(torch.autograd.Function):
    """All-gather whose backward sums every rank's gradient of the gathered tensor and returns this rank's slice."""

    @staticmethod
    def forward(ctx, t: Tensor, rank: int, world: int) -> Tensor:
        ctx.rank, ctx.b = rank, t.shape[0]
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.contiguous())
        parts[rank] = t  # values only: autograd tracks the output as a whole
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.contiguous().clone()
        # an all-reduce works on gloo and NCCL alike (gloo has no reduce_scatter); [W * b, d] is small
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b], None, None


def all_gather_with_grad(t: Tensor, ctx: DistContext) -> Tensor:
    """``[b, d]`` -> ``[W * b, d]``; the gradient that any rank's loss sends to rank ``r``'s rows reaches rank ``r``.

    The output's backward all-reduces its gradient (sum over ranks) and keeps this rank's slice, so rank ``r``'s
    candidates get ``sum_k d loss_k / d c_r``, the term a single process would compute on the whole batch.
    """
    if not ctx.enabled:
        return t
    return _AllGatherGrad.apply(t, ctx.rank, ctx.world_size)


@torch.no_grad()
def sync_gradients(
    params: list[Tensor], ctx: DistContext, *, sparse_ids: frozenset[int] = frozenset(), equal_sparse_sizes: bool = True
) -> None:
    """Average the gradients of ``params`` over ranks, in place (the DDP mean).

    Dense gradients go through one flat all-reduce; sparse (row) gradients are all-gathered, their values divided
    by ``W``, and left uncoalesced (the embedding optimizers accept repeated rows). ``equal_sparse_sizes=False``
    first exchanges the sizes (one host sync) for steps whose lookup count differs between ranks.
    ``sparse_ids``: ``id()`` of the parameters with sparse gradients (to tell a missing one from a dense one).
    """
    if not ctx.enabled:
        return
    # every rank must hand the same list to the collectives: a parameter without a gradient here gets zeros
    for p in params:
        if p.grad is None:
            if id(p) in sparse_ids:
                if equal_sparse_sizes:
                    raise RuntimeError(
                        f"a sparse parameter of shape {list(p.shape)} has no gradient on rank {ctx.rank}; "
                        "call sync_gradients(..., equal_sparse_sizes=False) for such steps"
                    )
                p.grad = torch.sparse_coo_tensor(
                    torch.zeros(1, 0, dtype=torch.long, device=p.device),
                    torch.zeros(0, *p.shape[1:], dtype=p.dtype, device=p.device), p.shape,
                )
            else:
                p.grad = torch.zeros_like(p)
    dense = [p for p in params if not p.grad.is_sparse]
    if dense:
        flat = torch.cat([p.grad.reshape(-1) for p in dense])
        dist.all_reduce(flat)
        flat.div_(ctx.world_size)
        off = 0
        for p in dense:
            n = p.grad.numel()
            p.grad.copy_(flat[off : off + n].view_as(p.grad))
            off += n
    for p in params:
        g = p.grad
        if not g.is_sparse:
            continue
        idx, vals = g._indices(), g._values()  # [1, n], [n, E]
        if equal_sparse_sizes:
            all_idx, all_vals = all_gather_nograd(idx.t(), ctx).t(), all_gather_nograd(vals, ctx)
        else:
            all_idx, all_vals = _gather_ragged(idx.t(), vals, ctx)
            all_idx = all_idx.t()
        p.grad = torch.sparse_coo_tensor(all_idx, all_vals / ctx.world_size, g.shape)


def _gather_ragged(idx: Tensor, vals: Tensor, ctx: DistContext) -> tuple[Tensor, Tensor]:
    """All-gather ``[n_r, 1]`` / ``[n_r, E]`` of different ``n_r`` per rank (pads to the largest)."""
    n = torch.tensor([idx.shape[0]], device=idx.device)
    sizes = all_gather_nograd(n, ctx).tolist()
    m = max(sizes)
    pad_i = torch.zeros(m, idx.shape[1], dtype=idx.dtype, device=idx.device)
    pad_v = torch.zeros(m, vals.shape[1], dtype=vals.dtype, device=vals.device)
    pad_i[: idx.shape[0]], pad_v[: vals.shape[0]] = idx, vals
    gi, gv = all_gather_nograd(pad_i, ctx), all_gather_nograd(pad_v, ctx)
    keep = torch.cat([torch.arange(s, device=idx.device) + r * m for r, s in enumerate(sizes)])
    return gi[keep], gv[keep]


# ------------------------------------------------------------------------------------------------ trainer hooks
class RankZeroEvaluator:
    """Validation on rank 0 only; every rank gets rank 0's metrics (the others wait in the broadcast)."""

    def __init__(self, inner: Any, ctx: DistContext) -> None:
        self.inner, self.ctx = inner, ctx

    def __call__(self, model: torch.nn.Module, **kw: Any) -> dict[str, float]:
        metrics = self.inner(model, **kw) if self.ctx.is_main else None
        return self.ctx.broadcast_object(metrics)
