"""Building blocks of the towers: the MLP, the multi-valued code embedding, the attention pool over a history
(whose fused Triton twin is ``kernels.fused_pool``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def mlp(d_in: int, hidden: tuple[int, ...], d_out: int, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(d_in, h), nn.GELU(), nn.Dropout(dropout)]
        d_in = h
    layers.append(nn.Linear(d_in, d_out))
    return nn.Sequential(*layers)


class CodeEmbedding(nn.Embedding):
    """Categorical feature codes -> vectors; code 0 (missing / unknown) is a fixed zero vector that learns nothing.

    What ``nn.Embedding(padding_idx=0)`` does, written as a mask: with ``sparse=True`` a padding index makes the
    backward drop the padding entries through a boolean index (a host sync, which a CUDA graph cannot capture);
    here row 0 stays zero because its output is multiplied by 0, so its gradient is 0 too.
    """

    def forward(self, codes: Tensor) -> Tensor:
        return super().forward(codes) * (codes != 0).unsqueeze(-1).to(self.weight.dtype)


class AttentionPool(nn.Module):
    """Masked attention pooling: a learned query scores each history item (+ a learned recency embedding)."""

    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.recency = nn.Embedding(max_len, dim)  # position 0 = most recent item
        nn.init.zeros_(self.recency.weight)
        self.key = nn.Linear(dim, dim)
        self.query = nn.Parameter(torch.zeros(dim))
        # "triton": TwoTower.pool_history fuses the lookup and this pooling in training mode (recsys.train.kernels.fused_pool); set
        # by the trainer after a self-check on its device, never saved (evaluation and a loaded model pool with torch)
        self.kernel = "torch"

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """h [B, N, E] (oldest first, right-aligned), mask [B, N] bool -> [B, E]."""
        n = h.shape[1]
        rec = self.recency.weight[:n].flip(0)  # [N, E]: right-most column is the most recent item
        scores = torch.tanh(self.key(h + rec)) @ self.query / math.sqrt(h.shape[-1])  # [B, N]
        scores = scores.masked_fill(~mask, float("-inf"))
        w = torch.softmax(scores, dim=1)
        w = torch.nan_to_num(w, nan=0.0)  # rows with an empty history: all -inf -> nan -> 0 weights
        return torch.einsum("bn,bne->be", w, h)
