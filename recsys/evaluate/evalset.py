"""The evaluation set: a split's users, their relevant items, histories and exclusions, matched to a bundle by
external ID; the in-sample check; popularity segments."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from recsys.bundle import read_ragged
from recsys.core import schema
from recsys.core.data import Interactions, history_and_seen, read_interactions
from recsys.core.io import sha256_file

# item popularity segments: cumulative share of train interactions covered by the items ranked above
HEAD_SHARE, TORSO_SHARE = 0.5, 0.8


class InSampleError(ValueError):
    """The bundle's final fit trained on the interactions the evaluation would score."""


def in_sample_reason(bundle: Any, data_dir: str | Path, split: str) -> str | None:
    """Why scoring ``bundle`` on ``split`` of ``data_dir`` would score interactions its final fit trained on, or
    None. Matched by content (the split file's sha256 against each split the fit saw), so a copied or renamed
    dataset is caught too; bundles from before ``trained_on`` was recorded were fit on train + valid at most."""
    trained = bundle.manifest.get("trained_on") or {}
    path = Path(data_dir) / schema.SPLITS[split]
    sha = sha256_file(path)
    for name, h in (trained.get("split_sha256") or {}).items():
        if h == sha:
            return (f"bundle {bundle.version!r} was trained on these interactions: its final fit saw splits "
                    f"{trained.get('splits')} ({trained.get('rows')} rows) and {str(path)!r} is identical to the "
                    f"{name!r} split it trained on (sha256 {sha[:16]})")
    return None


@dataclass
class EvalSet:
    """One split of a prepared dataset, ready to score; every row index is in the dataset's own row space.

    ``users [m]`` data user rows evaluated; ``relevant`` / ``seen`` / ``history`` hold one item-row array per
    evaluated user (history oldest first). ``fit_matrix [n_users, n_items]`` binary CSR of the interactions
    before the split (baselines are fitted on it); ``seen_matrix`` the same rows as ``seen``.
    """

    data_dir: Path
    split: str
    manifest_sha256: str
    n_users: int
    n_items: int
    user_ids: np.ndarray
    item_ids: np.ndarray
    users: np.ndarray
    relevant: list[np.ndarray]
    seen: list[np.ndarray]
    history: list[np.ndarray]
    fit_matrix: Any
    seen_matrix: Any
    item_popularity: np.ndarray  # [n_items] train interaction counts
    item_segment: np.ndarray  # [n_items] 0 head, 1 torso, 2 tail
    new_items: np.ndarray  # [n_items] bool: first_ts after the train cutoff
    counts: dict[str, int]


def _str_ids(table: Any, col: str) -> np.ndarray:
    return np.asarray(table.column(col).to_pylist(), dtype=object)


def _group(user: np.ndarray, item: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """Pairs sorted by user -> CSR (offsets [n_users + 1], items)."""
    order = np.argsort(user, kind="stable")
    offsets = np.zeros(n_users + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=n_users), out=offsets[1:])
    return offsets, item[order]


@dataclass(frozen=True)
class _Split:
    """A split's interactions, what came before them, and the dataset's users / items tables."""

    users_t: Any
    items_t: Any
    train: Interactions
    target: Interactions  # the split's
    before: Interactions  # the interactions before the split: train, + valid for test

    @property
    def n_users(self) -> int:
        return self.users_t.num_rows

    @property
    def n_items(self) -> int:
        return self.items_t.num_rows


def load_eval_set(
    data_dir: str | Path,
    split: str = "test",
    *,
    max_users: int | None = None,
    seed: int = 0,
    history_len: int | None = None,
) -> EvalSet:
    """Read a prepared dataset's split with its exclusion sets and histories (see the module docstring)."""
    # scipy: heavy, kept off `import recsys.evaluate`
    from recsys.evaluate.baselines import interaction_matrix

    d = Path(data_dir)
    s = _read_split(d, split)
    n_users, n_items = s.n_users, s.n_items
    (seen_off, seen_val), (hist_off, hist_val) = _seen_and_history(d, split, s.before, n_users=n_users,
                                                                   n_items=n_items, history_len=history_len)
    seen_matrix = interaction_matrix(
        np.repeat(np.arange(n_users), np.diff(seen_off)), seen_val, n_users=n_users, n_items=n_items
    )
    rel_off, rel_val, pairs = _relevant(s.target, seen_matrix, n_users=n_users, n_items=n_items,
                                        path=d / schema.SPLITS[split])
    users = _sample_users(np.flatnonzero(np.diff(rel_off) > 0), max_users=max_users, seed=seed)
    pop, cutoff, new_items = _item_stats(s.items_t, s.train, n_items=n_items)

    return EvalSet(
        data_dir=d,
        split=split,
        manifest_sha256=sha256_file(d / schema.MANIFEST) if (d / schema.MANIFEST).is_file() else "",
        n_users=n_users,
        n_items=n_items,
        user_ids=_str_ids(s.users_t, schema.USER_ID),
        item_ids=_str_ids(s.items_t, schema.ITEM_ID),
        users=users,
        relevant=[rel_val[rel_off[u] : rel_off[u + 1]] for u in users],
        seen=[seen_val[seen_off[u] : seen_off[u + 1]] for u in users],
        history=[hist_val[hist_off[u] : hist_off[u + 1]] for u in users],
        fit_matrix=interaction_matrix(s.before.user_idx, s.before.item_idx, n_users=n_users, n_items=n_items),
        seen_matrix=seen_matrix,
        item_popularity=pop,
        item_segment=popularity_segments(pop),
        new_items=new_items,
        counts={
            "split_users": pairs["split_users"],
            "users_with_relevant": int(np.count_nonzero(np.diff(rel_off))),
            "users_evaluated": int(users.size),
            "split_pairs": pairs["split_pairs"],
            "split_pairs_seen_before": pairs["split_pairs_seen_before"],
            "train_cutoff_ts": cutoff,
            "new_items": int(new_items.sum()),
        },
    )


def restrict_relevant(es: EvalSet, allowed: np.ndarray) -> EvalSet:
    """``es`` judged on the allowed items only (an item filter's view of the future).

    ``allowed [n_items]`` bool over dataset item rows. Each user's relevant items are cut to the allowed ones and
    users left with none are dropped (their ``seen`` / ``history`` with them); ``counts["users_evaluated"]`` is the
    number kept and ``counts["users_dropped_by_filter"]`` the number dropped. Nothing else changes: histories still
    hold every item (a filter restricts what is recommended, not what the user did).
    """
    allowed = np.asarray(allowed)
    if allowed.dtype != np.bool_ or allowed.shape != (es.n_items,):
        raise ValueError(f"`allowed` must be a bool mask of shape ({es.n_items},) (the dataset's items), got "
                         f"dtype {allowed.dtype} shape {allowed.shape}")
    relevant = [r[allowed[r]] for r in es.relevant]
    keep = np.array([len(r) > 0 for r in relevant], dtype=bool)
    idx = np.flatnonzero(keep).tolist()
    counts = {**es.counts, "users_evaluated": len(idx), "users_dropped_by_filter": int((~keep).sum())}
    return replace(es, users=es.users[keep], relevant=[relevant[i] for i in idx], seen=[es.seen[i] for i in idx],
                   history=[es.history[i] for i in idx], counts=counts)


def _read_split(d: Path, split: str) -> _Split:
    """Check ``split`` and the files it needs, then read the users / items tables, train, the split (which must
    hold interactions) and what came before it."""
    if split not in ("valid", "test"):
        raise ValueError(f"`split` must be 'valid' or 'test', got {split!r}")
    for name in (schema.USERS, schema.ITEMS, schema.TRAIN, schema.SPLITS[split]):
        if not (d / name).is_file():
            raise FileNotFoundError(f"prepared dataset {str(d)!r} has no {name}")
    users_t, items_t = pq.read_table(d / schema.USERS), pq.read_table(d / schema.ITEMS)
    n_users, n_items = users_t.num_rows, items_t.num_rows
    train = read_interactions(d / schema.TRAIN, n_users=n_users, n_items=n_items)
    target = read_interactions(d / schema.SPLITS[split], n_users=n_users, n_items=n_items)
    if len(target) == 0:
        raise ValueError(f"{str(d / schema.SPLITS[split])!r} holds no interactions: nothing to evaluate (was the "
                         f"dataset prepared with `prepare.{split}_frac = 0`?)")
    before = train
    if split == "test" and (d / schema.VALID).is_file():
        before = Interactions.concat(train, read_interactions(d / schema.VALID, n_users=n_users, n_items=n_items))
    return _Split(users_t=users_t, items_t=items_t, train=train, target=target, before=before)


def _seen_and_history(d: Path, split: str, before: Interactions, *, n_users: int, n_items: int,
                      history_len: int | None) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Exclusion sets and histories, each CSR (offsets, item rows): the prepared serving files for test (exactly
    what the bundle serves from), rebuilt from ``before`` (train alone) for valid (the prepared ones already contain
    the valid items)."""
    if split == "test" and (d / schema.SEEN).is_file() and (d / schema.HISTORY).is_file():
        seen = read_ragged(d / schema.SEEN, n_rows=n_users, what=f"{d / schema.SEEN}")
        hist = read_ragged(d / schema.HISTORY, n_rows=n_users, what=f"{d / schema.HISTORY}")
        return seen, hist
    # `before` is sorted by (user, ts): the same rule as the prepared files, over these rows
    (hist_off, hist_val), (seen_off, seen_val) = history_and_seen(
        before.user_idx, before.item_idx, n_users=n_users, n_items=n_items,
        history_len=max(len(before), 1) if history_len is None else history_len)
    return (seen_off, seen_val.astype(np.int64)), (hist_off, hist_val.astype(np.int64))


def _relevant(target: Interactions, seen_matrix: Any, *, n_users: int, n_items: int,
              path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """Each user's relevant items, CSR (offsets, item rows): the split's distinct items they had not seen before;
    with the split's user / pair / re-consumed pair counts. No user with one is an error."""
    pair = np.unique(target.user_idx * n_items + target.item_idx)
    pu, pi = pair // n_items, pair % n_items
    was_seen = np.asarray(seen_matrix[pu, pi]).ravel() > 0
    n_pairs, n_reseen = int(pair.size), int(was_seen.sum())
    pu, pi = pu[~was_seen], pi[~was_seen]
    rel_off, rel_val = _group(pu, pi, n_users)
    if not np.any(np.diff(rel_off) > 0):
        raise ValueError(
            f"{str(path)!r}: no user has a held-out item they had not seen before "
            f"({n_pairs} pairs, {n_reseen} re-consumed)"
        )
    counts = {"split_users": int(np.unique(target.user_idx).size), "split_pairs": n_pairs,
              "split_pairs_seen_before": n_reseen}
    return rel_off, rel_val, counts


def _sample_users(users: np.ndarray, *, max_users: int | None, seed: int) -> np.ndarray:
    """The users evaluated: all of ``users``, or ``max_users`` of them drawn with ``seed`` (sorted)."""
    if max_users is not None and users.size > max_users:
        users = np.sort(np.random.default_rng(seed).choice(users, size=max_users, replace=False))
    return users


def _item_stats(items_t: Any, train: Interactions, *, n_items: int) -> tuple[np.ndarray, int, np.ndarray]:
    """(popularity: train interactions per item, the train cutoff ts, new items: first seen after the cutoff)."""
    pop = (
        items_t.column("n_train").to_numpy().astype(np.int64)
        if "n_train" in items_t.column_names
        else np.bincount(train.item_idx, minlength=n_items)
    )
    cutoff = int(train.ts.max()) if len(train) else 0
    if "first_ts" in items_t.column_names:
        first_ts = items_t.column("first_ts").fill_null(0).to_numpy().astype(np.int64)
        new_items = first_ts > cutoff
    else:
        new_items = np.zeros(n_items, dtype=bool)
    return pop, cutoff, new_items


def popularity_segments(pop: np.ndarray, *, head: float = HEAD_SHARE, torso: float = TORSO_SHARE) -> np.ndarray:
    """``[n_items]`` segment per item: 0 head, 1 torso, 2 tail, by share of train interactions.

    Items are ranked by popularity; an item is head while the interactions of the items ranked above it cover
    less than ``head`` of the total, torso below ``torso``, tail after. ``[5, 3, 1, 1]`` -> head, torso, tail, tail.
    """
    pop = np.asarray(pop, dtype=np.float64)
    order = np.argsort(-pop, kind="stable")
    total = pop.sum()
    before = (np.cumsum(pop[order]) - pop[order]) / total if total > 0 else np.ones(pop.size)
    seg = np.where(before < head, 0, np.where(before < torso, 1, 2))
    out = np.empty(pop.size, dtype=np.int64)
    out[order] = seg
    return out


def popularity_percentile(pop: np.ndarray) -> np.ndarray:
    """``[n_items]`` in (0, 1]: share of items at most as popular (ties share the mean rank); 1 = most popular."""
    from scipy.stats import rankdata  # scipy: heavy, kept off `import recsys.evaluate`

    return rankdata(np.asarray(pop), method="average") / max(1, len(pop))
