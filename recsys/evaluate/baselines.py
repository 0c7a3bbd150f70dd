"""Classical recommenders to compare the two-tower model against: Popularity, ItemKNN, EASE.

All three share implicit's calling shape::

    model = ItemKNN(k=100, shrink=10).fit(user_items)            # csr [n_users, n_items]
    ids, scores = model.recommend(user_rows, k=20)                # [n, 20] int64, [n, 20] float32

``recommend`` scores each user from their row of ``user_items`` (by default the matrix the model was fitted on; pass
another matrix with the same row space, e.g. train+valid, to score from a longer history) and, with
``exclude_seen``, never returns an item of that row; with ``allowed`` (a ``[n_items]`` bool mask, e.g. an item
filter's) only allowed items are candidates. Rows are ranked exactly (no approximation); when fewer than ``k``
candidates remain the tail is padded with id ``-1`` and score ``-inf``.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

__all__ = ["EASE", "ItemKNN", "Popularity", "interaction_matrix", "topk_excluding"]

# Dense score blocks are capped at about this many cells (float32: ~32 MB), whatever n_items is.
_BLOCK_CELLS = 1 << 23


def interaction_matrix(
    user_idx: np.ndarray,
    item_idx: np.ndarray,
    *,
    n_users: int,
    n_items: int,
    weights: np.ndarray | None = None,
) -> sp.csr_matrix:
    """Build the ``[n_users, n_items]`` float32 CSR matrix of interactions.

    Without ``weights`` the matrix is binary (repeated pairs count once); with ``weights`` repeated pairs are summed.
    """
    user_idx = np.asarray(user_idx).ravel()
    item_idx = np.asarray(item_idx).ravel()
    if user_idx.shape != item_idx.shape:
        raise ValueError(
            f"`user_idx` and `item_idx` must have the same length (got {user_idx.size} and {item_idx.size})"
        )
    for name, arr, size in (("user_idx", user_idx, n_users), ("item_idx", item_idx, n_items)):
        if arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"`{name}` must be integers, got dtype {arr.dtype}")
        if arr.size and (arr.min() < 0 or arr.max() >= size):
            bad = arr[(arr < 0) | (arr >= size)][0]
            raise ValueError(f"`{name}` must be in [0, {size - 1}], got {bad}")
    if weights is None:
        data = np.ones(user_idx.size, dtype=np.float32)
    else:
        data = np.asarray(weights, dtype=np.float32).ravel()
        if data.shape != user_idx.shape:
            raise ValueError(f"`weights` must have one value per pair (got {data.size} and {user_idx.size})")
    m = sp.csr_matrix((data, (user_idx, item_idx)), shape=(n_users, n_items), dtype=np.float32)
    m.sum_duplicates()
    if weights is None:
        m.data[:] = 1.0
    m.sort_indices()
    return m


def topk_excluding(
    scores: np.ndarray, k: int, exclude: sp.csr_matrix | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` columns of each row of ``scores``, skipping the nonzero cells of ``exclude``.

    Args:
        scores: ``[n, n_items]`` float scores; ``-inf`` marks an item that is not a candidate. NaN is an error.
        k: results per row, ``>= 1``.
        exclude: ``[n, n_items]`` sparse matrix whose stored cells are removed from the candidates, or ``None``.

    Returns:
        ``(ids, scores)``, ``[n, k]`` int64 and float32, best first, ties broken by the lower id. Rows with fewer
        than ``k`` candidates end with id ``-1`` / score ``-inf``.
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"`scores` must be a 2-D array [n, n_items], got shape {scores.shape}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
    n, n_items = scores.shape
    if exclude is not None:
        exclude = sp.csr_matrix(exclude)
        if exclude.shape != scores.shape:
            raise ValueError(f"`exclude` must have the shape of `scores` {scores.shape}, got {exclude.shape}")
    ids = np.full((n, k), -1, dtype=np.int64)
    out = np.full((n, k), -np.inf, dtype=np.float32)
    if n == 0 or n_items == 0:
        return ids, out
    kk = min(k, n_items)
    block = max(1, _BLOCK_CELLS // n_items)
    for start in range(0, n, block):
        stop = min(n, start + block)
        s = np.array(scores[start:stop], dtype=np.float32)  # a copy: excluded cells are overwritten
        if np.isnan(s).any():
            r, c = np.argwhere(np.isnan(s))[0]
            raise ValueError(f"`scores` must not contain NaN (row {start + r}, item {c})")
        if exclude is not None:
            sub = exclude[start:stop]
            rows = np.repeat(np.arange(stop - start), np.diff(sub.indptr))
            s[rows, sub.indices] = -np.inf
        # argpartition finds the top kk in O(n_items) per row; only those kk are then sorted.
        if kk < n_items:
            part = np.argpartition(-s, kk - 1, axis=1)[:, :kk]  # [b, kk], unordered
        else:
            part = np.tile(np.arange(n_items), (stop - start, 1))
        part_scores = np.take_along_axis(s, part, axis=1)
        order = np.lexsort((part, -part_scores), axis=1)
        top = np.take_along_axis(part, order, axis=1)
        top_scores = np.take_along_axis(part_scores, order, axis=1)
        valid = top_scores > -np.inf
        ids[start:stop, :kk] = np.where(valid, top, -1)
        out[start:stop, :kk] = np.where(valid, top_scores, -np.inf)
    return ids, out


class _Base:
    """Shared fit-matrix bookkeeping and the blocked ``recommend`` loop; subclasses implement ``_scores``."""

    user_items: sp.csr_matrix | None = None

    @property
    def n_items(self) -> int:
        if self.user_items is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted; call fit(user_items) first")
        return self.user_items.shape[1]

    def _set_fit_matrix(self, user_items: sp.spmatrix) -> sp.csr_matrix:
        if not sp.issparse(user_items) or user_items.ndim != 2:
            raise ValueError(f"`user_items` must be a scipy sparse matrix [n_users, n_items], got {type(user_items)}")
        m = sp.csr_matrix(user_items, dtype=np.float32)
        m.sort_indices()
        self.user_items = m
        return m

    def _scores(self, history: sp.csr_matrix) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def recommend(
        self,
        user_rows: np.ndarray,
        k: int,
        *,
        user_items: sp.spmatrix | None = None,
        exclude_seen: bool = True,
        allowed: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` items for each user row.

        Args:
            user_rows: ``[n]`` row indices into ``user_items``.
            k: results per user, ``>= 1``.
            user_items: ``[n_users, n_items]`` matrix giving each user's history (scored from, and excluded when
                ``exclude_seen``); defaults to the matrix passed to ``fit``.
            exclude_seen: drop the items of the user's row from the candidates.
            allowed: ``[n_items]`` bool, True = may be recommended (an item filter); None = every item. A
                disallowed item is scored ``-inf`` before the top-``k``, so it is never returned.

        Returns:
            ``(ids [n, k] int64, scores [n, k] float32)``, best first; ``-1`` / ``-inf`` pad rows with fewer
            than ``k`` candidates.
        """
        n_items = self.n_items
        hist_all = self.user_items if user_items is None else sp.csr_matrix(user_items, dtype=np.float32)
        if hist_all.shape[1] != n_items:
            raise ValueError(f"`user_items` must have {n_items} columns (the fitted n_items), got {hist_all.shape[1]}")
        rows = np.asarray(user_rows).ravel()
        if rows.size and not np.issubdtype(rows.dtype, np.integer):
            raise ValueError(f"`user_rows` must be integers, got dtype {rows.dtype}")
        if rows.size and (rows.min() < 0 or rows.max() >= hist_all.shape[0]):
            bad = rows[(rows < 0) | (rows >= hist_all.shape[0])][0]
            raise ValueError(f"`user_rows` must be in [0, {hist_all.shape[0] - 1}], got {bad}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
        if allowed is not None:
            allowed = np.asarray(allowed)
            if allowed.dtype != np.bool_ or allowed.shape != (n_items,):
                raise ValueError(f"`allowed` must be a bool mask of shape ({n_items},) (the fitted n_items), got "
                                 f"dtype {allowed.dtype} shape {allowed.shape}")
        ids = np.empty((rows.size, k), dtype=np.int64)
        scores = np.empty((rows.size, k), dtype=np.float32)
        block = max(1, _BLOCK_CELLS // max(1, n_items))
        for start in range(0, rows.size, block):
            hist = hist_all[rows[start : start + block]]
            s = self._scores(hist)
            if allowed is not None:
                s = np.where(allowed, s, np.float32(-np.inf))  # [b, n_items]; a new array (s may be a view)
            ids[start : start + block], scores[start : start + block] = topk_excluding(
                s, k, hist if exclude_seen else None
            )
        return ids, scores


class Popularity(_Base):
    """Most-interacted items first (sum of the fitted matrix per item), the same list for every user."""

    def fit(self, user_items: sp.spmatrix) -> Popularity:
        m = self._set_fit_matrix(user_items)
        self.item_counts = np.asarray(m.sum(axis=0), dtype=np.float32).ravel()  # [n_items]
        return self

    def _scores(self, history: sp.csr_matrix) -> np.ndarray:
        return np.broadcast_to(self.item_counts, (history.shape[0], self.item_counts.size))


class ItemKNN(_Base):
    """Item-item nearest neighbours with shrunk cosine similarity.

    ``sim(i, j) = x_i . x_j / (|x_i| |x_j| + shrink)`` over the item columns of the fitted matrix; each item keeps
    its ``k`` most similar other items (a sparse ``[n_items, n_items]`` matrix), and a user's score for item ``j`` is
    ``sum over history items i of sim(i, j)``. Similarities are computed ``block`` items at a time, so memory is
    ``O(block * n_items + n_items * k)``, safe for 50k+ items.
    """

    def __init__(self, k: int = 100, shrink: float = 10.0, *, block_items: int | None = None) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"`k` must be an integer >= 1, got {k!r}")
        if not shrink >= 0:
            raise ValueError(f"`shrink` must be >= 0, got {shrink!r}")
        if block_items is not None and block_items < 1:
            raise ValueError(f"`block_items` must be >= 1, got {block_items!r}")
        self.k = k
        self.shrink = float(shrink)
        self.block_items = block_items

    def fit(self, user_items: sp.spmatrix) -> ItemKNN:
        m = self._set_fit_matrix(user_items)
        n_items = m.shape[1]
        xt = m.T.tocsr()  # [n_items, n_users]
        norms = np.sqrt(np.asarray(xt.multiply(xt).sum(axis=1), dtype=np.float64).ravel())  # [n_items]
        kk = min(self.k, max(n_items - 1, 0))
        block = self.block_items or max(1, _BLOCK_CELLS // max(1, n_items))
        rows, cols, vals = [], [], []
        for start in range(0, n_items, block):
            stop = min(n_items, start + block)
            dots = (xt[start:stop] @ m).toarray()  # [b, n_items] co-occurrence
            sim = dots / (norms[start:stop, None] * norms[None, :] + self.shrink + 1e-12)
            sim[np.arange(stop - start), np.arange(start, stop)] = 0.0  # an item is not its own neighbour
            if kk == 0:
                continue
            nb = np.argpartition(-sim, kk - 1, axis=1)[:, :kk]  # [b, kk]
            nv = np.take_along_axis(sim, nb, axis=1)
            keep = nv > 0
            rows.append(np.repeat(np.arange(start, stop), kk)[keep.ravel()])
            cols.append(nb[keep])
            vals.append(nv[keep].astype(np.float32))
        if rows:
            r, c, v = np.concatenate(rows), np.concatenate(cols), np.concatenate(vals)
        else:
            r = c = np.zeros(0, dtype=np.int64)
            v = np.zeros(0, dtype=np.float32)
        self.similarity = sp.csr_matrix((v, (r, c)), shape=(n_items, n_items), dtype=np.float32)  # row i: i's kNN
        return self

    def _scores(self, history: sp.csr_matrix) -> np.ndarray:
        return (history @ self.similarity).toarray()


class EASE(_Base):
    """Embarrassingly Shallow Autoencoder (Steck 2019): a closed-form item-item weight matrix.

    ``P = (X^T X + l2 I)^-1``, ``B = I - P / diag(P)`` (column ``j`` divided by ``P_jj``), so ``diag(B) = 0``;
    scores are ``X_u B``. The inverse is dense ``[n_items, n_items]`` (float64 while solving), so fitting refuses
    more than ``max_items`` items.
    """

    def __init__(self, l2: float = 500.0, *, max_items: int = 40_000) -> None:
        if not l2 > 0:
            raise ValueError(f"`l2` must be > 0, got {l2!r}")
        self.l2 = float(l2)
        self.max_items = int(max_items)

    def fit(self, user_items: sp.spmatrix) -> EASE:
        n_items = user_items.shape[1]
        if n_items > self.max_items:
            gib = 8 * n_items**2 / 2**30
            raise ValueError(
                f"EASE needs a dense n_items x n_items inverse; n_items={n_items} is above max_items="
                f"{self.max_items} (~{gib:.1f} GiB in float64). Use ItemKNN, or raise max_items if memory allows."
            )
        m = self._set_fit_matrix(user_items)
        gram = (m.T @ m).toarray().astype(np.float64)  # [n_items, n_items]
        gram[np.diag_indices_from(gram)] += self.l2
        p = np.linalg.inv(gram)
        b = p / (-np.diag(p))[None, :]
        b[np.diag_indices_from(b)] = 0.0
        self.weights = b.astype(np.float32)  # [n_items, n_items]
        return self

    def _scores(self, history: sp.csr_matrix) -> np.ndarray:
        return np.asarray(history @ self.weights)
