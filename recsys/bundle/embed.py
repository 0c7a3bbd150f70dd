"""The towers -> the served embeddings: every item, every known user (stored history), or users from given
histories; one owner for export and the bundle's request-time tower."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from recsys.bundle.files import pad_histories


def _torch_embed(model: Any, fn: str, batches: Iterator[tuple[Any, ...]], *, n: int, dim: int) -> np.ndarray:
    import torch  # torch: not on the serving import path

    out = np.empty((n, dim), dtype=np.float32)
    pos = 0
    with torch.inference_mode():
        for args in batches:
            z = getattr(model, fn)(*(torch.as_tensor(a) for a in args))
            z = z.detach().to("cpu", torch.float32).numpy()
            out[pos : pos + len(z)] = z
            pos += len(z)
    if pos != n:
        raise RuntimeError(f"{fn} produced {pos} rows, expected {n}")
    return out


def served_dim(model: Any) -> int:
    """The size of the vectors a model's bundle stores and its index searches: the towers' ``dim``, plus the score
    prior's dimensions (``model.time_prior``, ``TwoTower.out_dim``)."""
    return int(getattr(model, "out_dim", model.dim))


def embed_items(model: Any, n_items: int, *, batch_size: int = 4096) -> np.ndarray:
    """Item tower over every item row: ``[n_items, dim]`` float32."""

    def batches() -> Iterator[tuple[np.ndarray]]:
        for s in range(0, n_items, batch_size):
            yield (np.arange(s, min(s + batch_size, n_items), dtype=np.int64),)

    return _torch_embed(model, "encode_items", batches(), n=n_items, dim=served_dim(model))


def embed_users(
    model: Any,
    user_rows: np.ndarray,
    histories: Sequence[np.ndarray],
    *,
    max_history: int | None = None,
    batch_size: int = 2048,
) -> np.ndarray:
    """User tower: ``user_rows [n]`` (-1 = unknown user) + histories (item rows, oldest first) -> ``[n, dim]``."""
    user_rows = np.asarray(user_rows, dtype=np.int64)
    if len(user_rows) != len(histories):
        raise ValueError(f"user_rows and histories must have the same length (got {len(user_rows)} and {len(histories)})")

    def batches() -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for s in range(0, len(user_rows), batch_size):
            e = min(s + batch_size, len(user_rows))
            yield user_rows[s:e], pad_histories(histories[s:e], max_len=max_history)

    return _torch_embed(model, "encode_users", batches(), n=len(user_rows), dim=served_dim(model))
