"""The quick evaluation export runs before publishing (a small sample of validation users, exact vs HNSW)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from recsys.core.metrics import ranking_metrics
from recsys.evaluate.evalset import load_eval_set
from recsys.evaluate.run import DEFAULT_KS, ann_recall, check_k, finite, search_all


def quick_evaluation(
    *,
    user_emb: np.ndarray,
    exact: Any,
    ann: Any,
    data_dir: str | Path,
    split: str = "test",
    ks: Sequence[int] = DEFAULT_KS,
    max_users: int = 5000,
    seed: int = 0,
) -> dict[str, Any]:
    """The evaluation summary stored in a bundle's manifest at export: two-tower exact + HNSW metrics on ``split``.

    ``user_emb [n_users, dim]`` are the exported known-user embeddings (same vocabulary as ``data_dir``).
    """
    es = load_eval_set(data_dir, split, max_users=max_users, seed=seed)
    ks = sorted({min(check_k(k), es.n_items) for k in ks})
    q = user_emb[es.users]

    ex = search_all(exact, q, ks[-1], seen=es.seen)
    an = search_all(ann, q, ks[-1], seen=es.seen)
    m_ex = ranking_metrics(ex, es.relevant, ks)
    m_an = ranking_metrics(an, es.relevant, ks)
    return finite({
        "split": split,
        "n_users": int(len(es.users)),
        **m_ex,
        "hnsw": m_an,
        **ann_recall(an, ex, ks),
    })
