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


class CausalBlock(nn.Module):
    """One pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` (GELU, width 4E)."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, allowed: Tensor) -> Tensor:
        """x [B, N, E], allowed [B, 1, N, N] bool (query i may read key j) -> [B, N, E]."""
        b, n, e = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, e // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(  # [B, H, N, E/H]
            qkv[0], qkv[1], qkv[2], attn_mask=allowed, dropout_p=self.drop.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, e)))
        return x + self.drop(self.ff(self.norm2(x)))


class CausalEncoder(nn.Module):
    """A causal transformer over a right-aligned history: the output at position i reads items 0..i only.

    Histories are item rows oldest first, right-aligned, -1 = pad (``recsys.train.embed.pad_histories``). Position
    embeddings count from the sequence's first real item (0), so how much padding a batch adds changes nothing. A pad
    position reads only itself (its output is never used; it keeps the softmax of an all-pad prefix defined).
    """

    def __init__(self, dim: int, max_len: int, *, layers: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.position = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList([CausalBlock(dim, heads, dropout) for _ in range(layers)])
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, h: Tensor, mask: Tensor) -> Tensor:
        """h [B, N, E] item embeddings, mask [B, N] bool (False = pad) -> [B, N, E] one output per position."""
        n = h.shape[1]
        n_pad = n - mask.sum(1, keepdim=True)  # [B, 1]
        pos = (torch.arange(n, device=h.device)[None, :] - n_pad).clamp(min=0)  # [B, N]
        x = self.drop(h + self.position(pos))
        eye = torch.eye(n, dtype=torch.bool, device=h.device)
        causal = torch.ones(n, n, dtype=torch.bool, device=h.device).tril()
        allowed = (causal[None] & mask[:, None, :]) | eye[None]  # [B, N, N]: earlier real items, and itself
        allowed = allowed[:, None]  # [B, 1, N, N]: one mask for every head
        for block in self.blocks:
            x = block(x, allowed)
        return self.norm(x)
