"""Baselines on block data where the right answer is known (implicit's checkerboard idea), plus top-k exclusion."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from recsys.evaluate.baselines import EASE, ItemKNN, Popularity, interaction_matrix, topk_excluding

N_BLOCKS, USERS_PER_BLOCK, ITEMS_PER_BLOCK = 3, 12, 8


def block_data(seed: int = 0) -> tuple[sp.csr_matrix, np.ndarray]:
    """Users of block b interact with all items of block b except one held-out item; returns (train, held_out)."""
    rng = np.random.default_rng(seed)
    users, items, held = [], [], []
    for b in range(N_BLOCKS):
        block_items = np.arange(b * ITEMS_PER_BLOCK, (b + 1) * ITEMS_PER_BLOCK)
        for u in range(b * USERS_PER_BLOCK, (b + 1) * USERS_PER_BLOCK):
            h = rng.choice(block_items)
            held.append(h)
            for i in block_items[block_items != h]:
                users.append(u)
                items.append(i)
    n_users, n_items = N_BLOCKS * USERS_PER_BLOCK, N_BLOCKS * ITEMS_PER_BLOCK
    return interaction_matrix(np.array(users), np.array(items), n_users=n_users, n_items=n_items), np.array(held)


@pytest.mark.parametrize("model", [ItemKNN(k=10, shrink=0.0), ItemKNN(k=ITEMS_PER_BLOCK - 1, shrink=5.0), EASE(l2=1.0)])
def test_collaborative_models_recover_the_held_out_block_item(model):
    train, held = block_data()
    model.fit(train)
    users = np.arange(train.shape[0])
    ids, scores = model.recommend(users, k=1)
    # the only unseen item of the user's own block is the best candidate
    np.testing.assert_array_equal(ids[:, 0], held)
    ids, scores = model.recommend(users, k=4)
    assert ids.shape == (len(users), 4) and ids.dtype == np.int64 and scores.dtype == np.float32
    assert (np.diff(scores, axis=1) <= 0).all()
    # nothing already seen is returned
    for u in users:
        assert not set(ids[u][ids[u] >= 0]) & set(train[u].indices)


def test_popularity_ranks_by_train_count_and_excludes_seen():
    # item counts: 0 -> 3, 1 -> 2, 2 -> 1, 3 -> 0
    train = interaction_matrix(np.array([0, 1, 2, 0, 1, 0]), np.array([0, 0, 0, 1, 1, 2]), n_users=4, n_items=4)
    pop = Popularity().fit(train)
    ids, scores = pop.recommend(np.array([3, 0, 2]), k=3)
    np.testing.assert_array_equal(ids[0], [0, 1, 2])
    np.testing.assert_array_equal(scores[0], [3, 2, 1])
    # user 0 saw 0, 1, 2: only item 3 is left, the rest is padding
    np.testing.assert_array_equal(ids[1], [3, -1, -1])
    assert scores[1, 0] == 0 and np.isneginf(scores[1, 1:]).all()
    np.testing.assert_array_equal(ids[2], [1, 2, 3])
    ids, _ = pop.recommend(np.array([0]), k=2, exclude_seen=False)
    np.testing.assert_array_equal(ids[0], [0, 1])


def test_recommend_scores_from_a_given_history_matrix():
    train, held = block_data()
    knn = ItemKNN(k=10, shrink=0.0).fit(train)
    # a user with an empty train row but one block-2 item in the given history gets block-2 items
    hist = sp.csr_matrix(([1.0], ([0], [2 * ITEMS_PER_BLOCK])), shape=train.shape)
    ids, _ = knn.recommend(np.array([0]), k=5, user_items=hist)
    assert set(ids[0]) <= set(range(2 * ITEMS_PER_BLOCK + 1, 3 * ITEMS_PER_BLOCK))


def test_itemknn_shrunk_cosine_by_hand_and_blocked_equals_unblocked():
    # items 0 and 1 share 2 of their users; |x0| = sqrt(3), |x1| = sqrt(2): cos = 2 / (sqrt(6) + shrink)
    train = interaction_matrix(np.array([0, 1, 2, 0, 1, 3]), np.array([0, 0, 0, 1, 1, 2]), n_users=4, n_items=3)
    knn = ItemKNN(k=2, shrink=1.0).fit(train)
    assert knn.similarity[0, 1] == pytest.approx(2 / (np.sqrt(6) + 1), rel=1e-6)
    assert knn.similarity[0, 0] == 0
    assert knn.similarity[1, 2] == 0  # never co-occur -> not stored
    big, _ = block_data(1)
    a = ItemKNN(k=5, shrink=2.0).fit(big).similarity
    b = ItemKNN(k=5, shrink=2.0, block_items=7).fit(big).similarity
    assert a.nnz <= big.shape[1] * 5
    np.testing.assert_allclose(a.toarray(), b.toarray(), rtol=1e-6)


def test_ease_matches_the_closed_form():
    rng = np.random.default_rng(3)
    x = (rng.random((30, 6)) < 0.4).astype(np.float64)
    ease = EASE(l2=2.0).fit(sp.csr_matrix(x))
    p = np.linalg.inv(x.T @ x + 2.0 * np.eye(6))
    b = np.eye(6) - p / np.diag(p)
    np.testing.assert_allclose(ease.weights, b, atol=1e-6)
    assert np.all(np.diag(ease.weights) == 0)


def test_ease_refuses_too_many_items():
    m = sp.csr_matrix((3, 50), dtype=np.float32)
    with pytest.raises(ValueError, match="n_items=50 is above max_items=40"):
        EASE(max_items=40).fit(m)


def test_topk_excluding_exact_with_ties_and_padding():
    scores = np.array(
        [
            [0.1, 0.9, 0.5, 0.9, -np.inf],
            [1.0, 2.0, 3.0, 4.0, 5.0],
        ],
        dtype=np.float32,
    )
    exclude = sp.csr_matrix(np.array([[0, 0, 1, 0, 0], [1, 1, 1, 0, 1]]))
    ids, top = topk_excluding(scores, 3, exclude)
    # row 0: 2 is excluded, 4 is -inf (not a candidate); the 0.9 tie is broken by the lower id
    np.testing.assert_array_equal(ids, [[1, 3, 0], [3, -1, -1]])
    np.testing.assert_array_equal(top[1, 1:], [-np.inf, -np.inf])
    ids, _ = topk_excluding(scores, 7, None)  # k above n_items pads
    np.testing.assert_array_equal(ids[1], [4, 3, 2, 1, 0, -1, -1])


def test_topk_excluding_equals_full_sort_on_random_data():
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((40, 300)).astype(np.float32)
    exclude = sp.random(40, 300, density=0.2, format="csr", random_state=1)
    ids, top = topk_excluding(scores, 25, exclude)
    masked = np.where(exclude.toarray() != 0, -np.inf, scores)
    want = np.argsort(-masked, axis=1, kind="stable")[:, :25]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_array_equal(top, np.take_along_axis(masked, want, axis=1))


def test_errors_name_the_parameter():
    with pytest.raises(ValueError, match=r"`item_idx` must be in \[0, 2\], got 3"):
        interaction_matrix(np.array([0]), np.array([3]), n_users=1, n_items=3)
    train, _ = block_data()
    with pytest.raises(ValueError, match=r"`user_rows` must be in \[0, 35\], got 99"):
        Popularity().fit(train).recommend(np.array([1, 99]), k=2)
    with pytest.raises(ValueError, match="`k` must be an integer >= 1, got 0"):
        topk_excluding(np.zeros((1, 3)), 0)
    with pytest.raises(ValueError, match=r"must not contain NaN \(row 0, item 1\)"):
        topk_excluding(np.array([[0.0, np.nan]]), 1)


def test_interaction_matrix_binary_unless_weighted():
    m = interaction_matrix(np.array([0, 0, 1]), np.array([2, 2, 0]), n_users=2, n_items=3)
    np.testing.assert_array_equal(m.toarray(), [[0, 0, 1], [1, 0, 0]])
    w = interaction_matrix(np.array([0, 0, 1]), np.array([2, 2, 0]), n_users=2, n_items=3, weights=[1.0, 2.5, 4.0])
    np.testing.assert_array_equal(w.toarray(), [[0, 0, 3.5], [4, 0, 0]])
