"""Ranking metrics against hand-worked numbers (LensKit style) and against each other."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.core.metrics import (
    average_precision_at_k,
    hit_rate_at_k,
    ndcg_at_k,
    ranking_metrics,
    recall_at_k,
    reciprocal_rank,
)

L2 = math.log2


def test_recall_hand_worked():
    # 1 and 3 of {1, 3, 5} are in the top 4
    assert recall_at_k([1, 2, 3, 4], [1, 3, 5], k=4) == pytest.approx(2 / 3)
    assert recall_at_k([1, 2, 3, 4], [1, 3, 5], k=2) == pytest.approx(1 / 3)
    assert recall_at_k([1, 2, 3, 4], [1, 3, 5], k=1) == pytest.approx(1 / 3)
    assert recall_at_k([2, 4], [1, 3, 5], k=2) == 0.0
    # strings work as ids too
    assert recall_at_k(["a", "b"], {"b"}, k=2) == 1.0


def test_ndcg_hand_worked():
    # hits at ranks 1 and 3: DCG = 1/log2(2) + 1/log2(4) = 1.5; ideal with 3 relevant in top 4: 1 + 1/log2(3) + 1/2
    expected = 1.5 / (1 + 1 / L2(3) + 0.5)
    assert ndcg_at_k([1, 2, 3, 4], [1, 3, 5], k=4) == pytest.approx(expected, rel=1e-12)
    # a single relevant item at rank 2: (1/log2(3)) / 1
    assert ndcg_at_k([7, 9, 8], [9], k=3) == pytest.approx(1 / L2(3))
    # ideal ranking scores 1
    assert ndcg_at_k([5, 6, 1], [5, 6], k=3) == pytest.approx(1.0)
    # k cuts the list: hit at rank 3 is outside k=2
    assert ndcg_at_k([1, 2, 3], [3], k=2) == 0.0


def test_mrr_map_hit_rate_hand_worked():
    assert reciprocal_rank([4, 2, 3, 1], [3, 1]) == pytest.approx(1 / 3)
    assert reciprocal_rank([4, 2, 3, 1], [3, 1], k=2) == 0.0
    assert reciprocal_rank([4, 2], [9]) == 0.0
    # hits at ranks 1 and 3 with 3 relevant, k=4: (1/1 + 2/3) / min(4, 3)
    assert average_precision_at_k([1, 2, 3, 4], [1, 3, 5], k=4) == pytest.approx((1 + 2 / 3) / 3)
    # k=2: one hit (rank 1), normaliser min(2, 3) = 2
    assert average_precision_at_k([1, 2, 3, 4], [1, 3, 5], k=2) == pytest.approx(0.5)
    assert hit_rate_at_k([1, 2, 3, 4], [3], k=3) == 1.0
    assert hit_rate_at_k([1, 2, 3, 4], [3], k=2) == 0.0


def test_padding_and_duplicates_never_count():
    # -1 is padding even when it sneaks into the relevant set
    assert recall_at_k([-1, -1, 2], [-1, 2], k=3) == 1.0
    assert recall_at_k([-1, -1], [3], k=2) == 0.0
    # a duplicated hit counts once
    assert recall_at_k([3, 3, 3], [3, 4], k=3) == pytest.approx(0.5)
    assert ndcg_at_k([3, 3], [3, 4], k=2) == pytest.approx(1 / (1 + 1 / L2(3)))
    assert math.isnan(recall_at_k([1, 2], [], k=2))
    with pytest.raises(ValueError, match="`k` must be an integer >= 1, got 0"):
        recall_at_k([1], [1], k=0)


def test_ranking_metrics_matches_hand_worked_means():
    topk = np.array([[1, 2, 3, 4], [7, 9, 8, -1], [5, 5, 6, -1]])
    relevant = [np.array([1, 3, 5]), np.array([9]), np.array([], dtype=np.int64)]  # user 3 has none: skipped
    m = ranking_metrics(topk, relevant, ks=(2, 4))
    assert m["recall@4"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["recall@2"] == pytest.approx((1 / 3 + 1) / 2)
    assert m["hit_rate@2"] == 1.0
    assert m["ndcg@4"] == pytest.approx((1.5 / (1 + 1 / L2(3) + 0.5) + 1 / L2(3)) / 2)
    assert m["mrr"] == pytest.approx((1 + 0.5) / 2)
    assert m["map@4"] == pytest.approx(((1 + 2 / 3) / 3 + 0.5) / 2)
    assert set(m) == {f"{n}@{k}" for n in ("recall", "ndcg", "hit_rate", "map") for k in (2, 4)} | {"mrr"}


def test_oracle_scores_one():
    rng = np.random.default_rng(0)
    relevant = [rng.choice(1000, size=rng.integers(1, 10), replace=False) for _ in range(50)]
    topk = np.full((50, 10), -1)
    for u, r in enumerate(relevant):
        topk[u, : r.size] = r
    m = ranking_metrics(topk, relevant, ks=(10,))
    assert m["recall@10"] == 1.0 and m["ndcg@10"] == pytest.approx(1.0) and m["mrr"] == 1.0
    assert m["map@10"] == pytest.approx(1.0)


def test_ranking_metrics_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"`ks` values \[10, 20, 50, 100\] exceed the 4 columns of `topk`"):
        ranking_metrics(np.zeros((1, 4), dtype=int), [np.array([1])])
    with pytest.raises(ValueError, match=r"one entry per row of `topk` \(got 2 and 1\)"):
        ranking_metrics(np.zeros((1, 4), dtype=int), [np.array([1]), np.array([2])], ks=(4,))
    with pytest.raises(ValueError, match="no user has a relevant item"):
        ranking_metrics(np.zeros((1, 4), dtype=int), [np.array([], dtype=int)], ks=(4,))


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(-1, 12), min_size=6, max_size=6),
            st.lists(st.integers(0, 12), min_size=1, max_size=5),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_vectorised_equals_per_user(rows):
    topk = np.array([r for r, _ in rows])
    relevant = [np.array(rel) for _, rel in rows]
    m = ranking_metrics(topk, relevant, ks=(1, 3, 6))
    for k in (1, 3, 6):
        for name, fn in (
            ("recall", recall_at_k),
            ("ndcg", ndcg_at_k),
            ("hit_rate", hit_rate_at_k),
            ("map", average_precision_at_k),
        ):
            want = np.mean([fn(list(r), set(rel), k) for r, rel in rows])
            assert m[f"{name}@{k}"] == pytest.approx(want, abs=1e-12), (name, k)
    assert m["mrr"] == pytest.approx(np.mean([reciprocal_rank(list(r), set(rel)) for r, rel in rows]))
