"""The towers -> the served embeddings: every item, every known user (stored history), or users from given
histories. One owner for the trainer's validation (:func:`item_vectors`, on the training device), export and
the bundle's request-time tower (numpy: :func:`embed_items`, :func:`embed_users`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np


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


def item_vectors(model: Any, *, device: Any = "cpu", batch_size: int = 8192) -> Any:
    """The served vector of every item row, on ``device``: ``[n_items, served_dim]`` float32 torch tensor
    (``TwoTower.encode_items`` in batches; eval mode and grad mode are the caller's business)."""
    import torch  # torch: not on the serving import path

    rows = torch.arange(model.n_items, device=device)
    return torch.cat([model.encode_items(rows[a : a + batch_size]).float()
                      for a in range(0, model.n_items, batch_size)])


def embed_items(model: Any, n_items: int, *, batch_size: int = 4096) -> np.ndarray:
    """Item tower over every item row: ``[n_items, dim]`` float32 numpy (:func:`item_vectors` on the CPU)."""
    import torch  # torch: not on the serving import path

    if n_items != model.n_items:
        raise ValueError(f"`n_items` must be the model's item count {model.n_items}, got {n_items}")
    with torch.inference_mode():
        return item_vectors(model, batch_size=batch_size).numpy()


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


def pad_histories(histories: Sequence[np.ndarray], *, max_len: int | None = None) -> np.ndarray:
    """Right-align ragged item-row lists into ``[n, N]`` int64, ``-1`` = padding; keeps the most recent ``max_len``."""
    lens = [len(h) for h in histories]
    n = max(lens, default=0)
    if max_len is not None:
        n = min(n, max_len)
    out = np.full((len(histories), max(n, 1)), -1, dtype=np.int64)
    for i, h in enumerate(histories):
        h = np.asarray(h, dtype=np.int64)[-n:] if n else np.asarray(h, dtype=np.int64)[:0]
        if len(h):
            out[i, out.shape[1] - len(h) :] = h
    return out
