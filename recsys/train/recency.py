"""Signals of "now": how often each item was interacted with recently, how old it is, how much an event counts.

Logs drift: what people watch this month is not what they watched last year. Every time signal of recsys is
computed here, from events **strictly before** the moment it describes, so the same function serves training
(each example's own timestamp: no leakage from its future) and export (the end of the logs: what serving uses).

- :func:`window_counts`: per (item, t), the number of events of the item in ``[t - W, t)`` for each window W.
- :func:`item_time_features`: the item tower's time inputs: per window the item's log share of the window's events
  (relative to a uniform share), its log share of everything before t, and its log age in days.
- :func:`decay_weights`: per-event weights ``0.5 ** (age / half_life)``, age measured back from the end of the logs.
- :func:`choose_popularity_window` / :func:`recent_counts`: the popularity fallback's window, chosen on the newest
  slice of the fit events, and each item's events in it.

Timestamps are epoch milliseconds (int64), like every split file.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

_log = logging.getLogger(__name__)

DAY_MS = 86_400_000


class EventIndex:
    """Events (item rows, timestamps) sorted by (item, time), for counting an item's events before a time.

    One vectorised binary search per query: the key of an event is ``item * (R + 1) + rank`` where rank is its
    timestamp's position among the R distinct timestamps, so "events of item i before t" is the number of keys
    below ``i * (R + 1) + (distinct timestamps < t)``, minus the item's first position. Memory: ~24 bytes / event.
    """

    def __init__(self, item_idx: np.ndarray, ts: np.ndarray, n_items: int) -> None:
        item_idx = np.asarray(item_idx, dtype=np.int64)
        ts = np.asarray(ts, dtype=np.int64)
        if item_idx.shape != ts.shape:
            raise ValueError(f"`item_idx` and `ts` must have the same length, got {len(item_idx)} and {len(ts)}")
        if item_idx.size and (item_idx.min() < 0 or item_idx.max() >= n_items):
            raise ValueError(f"item rows must be in [0, {n_items}), got [{item_idx.min()}, {item_idx.max()}]")
        self.n_items = int(n_items)
        self.times, rank = np.unique(ts, return_inverse=True)  # distinct timestamps, sorted
        self._stride = np.int64(len(self.times) + 1)
        self._keys = np.sort(item_idx * self._stride + rank.astype(np.int64))
        self._start = np.searchsorted(self._keys, np.arange(n_items + 1, dtype=np.int64) * self._stride)
        self._total = np.searchsorted(np.sort(ts), self.times, side="left")  # events before each distinct time
        self.n_events = int(item_idx.size)

    def __len__(self) -> int:
        return self.n_events

    def count_before(self, items: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Per query: the number of events of ``items[j]`` with timestamp ``< t[j]``."""
        items = np.asarray(items, dtype=np.int64)
        r = np.searchsorted(self.times, np.asarray(t, dtype=np.int64), side="left")  # distinct times < t
        return np.searchsorted(self._keys, items * self._stride + r, side="left") - self._start[items]

    def total_before(self, t: np.ndarray) -> np.ndarray:
        """Per query: the number of events (any item) with timestamp ``< t``."""
        r = np.searchsorted(self.times, np.asarray(t, dtype=np.int64), side="left")
        return np.where(r < len(self.times), self._total[np.minimum(r, len(self.times) - 1)], self.n_events) \
            if len(self.times) else np.zeros(r.shape, dtype=np.int64)

    def first_ts(self, items: np.ndarray) -> np.ndarray:
        """Each item's first timestamp (int64 max when it has no event)."""
        items = np.asarray(items, dtype=np.int64)
        lo, hi = self._start[items], self._start[items + 1]
        out = np.full(items.size, np.iinfo(np.int64).max, dtype=np.int64)
        has = hi > lo
        out[has] = self.times[self._keys[lo[has]] - items[has] * self._stride]
        return out


def window_counts(index: EventIndex, items: np.ndarray, t: np.ndarray, windows_ms: Sequence[int]) -> np.ndarray:
    """``[n, len(windows_ms)]`` int64: events of ``items[j]`` in ``[t[j] - W, t[j])`` for each window W."""
    t = np.asarray(t, dtype=np.int64)
    now = index.count_before(items, t)
    return np.stack([now - index.count_before(items, t - int(w)) for w in windows_ms], axis=1) if len(windows_ms) \
        else np.zeros((len(t), 0), dtype=np.int64)


def n_time_features(windows_days: Sequence[float]) -> int:
    """How many columns :func:`item_time_features` returns for these windows."""
    return len(windows_days) + 2


def item_time_features(
    index: EventIndex, items: np.ndarray, t: np.ndarray, windows_days: Sequence[float]
) -> np.ndarray:
    """``[n, len(windows_days) + 2]`` float32: the time inputs of the item tower for item ``items[j]`` at ``t[j]``.

    Columns, from events strictly before ``t[j]`` only:
    - per window W: ``log((c + 1) / (T + 1) * n_items)``: the item's share of the window's T events (c of them
      its own), relative to a uniform share (0 = an average item; about ``-log(T)`` for an item without events);
    - the same over everything before ``t[j]`` (the all-time share);
    - ``log1p(age in days)``: days since the item's first event (0 for an item without one).
    """
    items = np.asarray(items, dtype=np.int64)
    t = np.asarray(t, dtype=np.int64)
    windows_ms = _windows_ms(windows_days)
    return _time_features(index, window_counts(index, items, t, windows_ms), _window_totals(index, t, windows_ms),
                          index.count_before(items, t), index.total_before(t), index.first_ts(items), t)


def _time_features(index: EventIndex, counts: np.ndarray, totals: np.ndarray, count_all: np.ndarray,
                   total_all: np.ndarray, first: np.ndarray, t: np.ndarray) -> np.ndarray:
    """:func:`item_time_features`' columns from their counts (numpy broadcasting: ``counts``/``totals`` ``[..., W]``,
    the others ``[...]``), so a grid of (time, item) pairs counts each time's totals and item's first event once."""
    shape = np.broadcast_shapes(counts.shape[:-1], totals.shape[:-1], np.shape(count_all), np.shape(first),
                                np.shape(t))
    out = np.empty((*shape, counts.shape[-1] + 2), dtype=np.float32)
    out[..., :-2] = _log_share(index, counts, totals)
    out[..., -2] = _log_share(index, count_all, total_all)
    age = np.where(first < t, (t - np.minimum(first, t)) / DAY_MS, 0.0)
    out[..., -1] = np.log1p(age)
    return out


def pair_time_features(
    index: EventIndex, items: np.ndarray, t: np.ndarray, windows_days: Sequence[float]
) -> np.ndarray:
    """``[len(t), len(items), T]`` float32: :func:`item_time_features` of every ``items[j]`` as of the start of the
    UTC day of every ``t[r]`` (``model.time_prior``'s training: each in-batch candidate as of each row's time).

    Day starts are at or before ``t[r]``, so every count is of events strictly before it; computing each distinct
    (day, item) pair once makes a batch's ``B x B`` pairs cost about (its distinct days) x (its distinct items).
    """
    items = np.asarray(items, dtype=np.int64)
    day = np.asarray(t, dtype=np.int64) // DAY_MS * DAY_MS
    days, day_of = np.unique(day, return_inverse=True)
    uitems, item_of = np.unique(items, return_inverse=True)
    windows_ms = _windows_ms(windows_days)
    pair_items, pair_t = np.tile(uitems, days.size), np.repeat(days, uitems.size)
    grid = _time_features(
        index,
        window_counts(index, pair_items, pair_t, windows_ms).reshape(days.size, uitems.size, -1),
        _window_totals(index, days, windows_ms)[:, None, :],
        index.count_before(pair_items, pair_t).reshape(days.size, uitems.size),
        index.total_before(days)[:, None],
        index.first_ts(uitems)[None, :],
        days[:, None],
    )
    return grid[day_of[:, None], item_of[None, :]]


N_USER_TIME_FEATURES = 2


def user_time_features(tenure_ms: np.ndarray, n_events: np.ndarray) -> np.ndarray:
    """``[n, 2]`` float32: a user's state at a moment, from their events strictly before it: ``log1p(days since
    their first event)`` (0 for a new user) and ``log1p(their number of events)``. A user who joined today rates
    the back catalogue; one who has been around for months rates what is new (``model.time_prior``)."""
    tenure = np.maximum(np.asarray(tenure_ms, dtype=np.int64), 0) / DAY_MS
    return np.stack([np.log1p(tenure), np.log1p(np.maximum(np.asarray(n_events, dtype=np.float64), 0))],
                    axis=1).astype(np.float32)


def new_user_time_features(history_len: int) -> np.ndarray:
    """``[history_len + 1, 2]``: the state of a user the logs do not know, by the number of items in their request's
    history (row n: n items): no tenure, n events (:func:`user_time_features`)."""
    n = np.arange(int(history_len) + 1)
    return user_time_features(np.zeros_like(n), n)


def user_time_state(user_idx: np.ndarray, ts: np.ndarray, user_start: np.ndarray, n_users: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One training set's user states (rows grouped by user, by time within a user; ``user_start`` each row's
    user's first row): (per row as of its own time ``[n, 2]``, per user as of the end of the events
    ``[n_users, 2]``, a user without events: tenure 0, no events)."""
    user_idx, ts = np.asarray(user_idx, dtype=np.int64), np.asarray(ts, dtype=np.int64)
    rows = np.arange(len(ts), dtype=np.int64)
    first = ts[user_start] if len(ts) else ts
    per_row = user_time_features(ts - first, rows - user_start)
    end = int(ts.max()) + 1 if len(ts) else 0
    first_ts = np.full(n_users, end, dtype=np.int64)
    np.minimum.at(first_ts, user_idx, ts)
    return per_row, user_time_features(end - first_ts, np.bincount(user_idx, minlength=n_users))


def decay_weights(ts: np.ndarray, *, now: int, half_life_days: float) -> np.ndarray:
    """``0.5 ** ((now - ts) / half_life)`` as float32 (1 for an event at ``now``); all ones when
    ``half_life_days`` is 0 (no decay)."""
    ts = np.asarray(ts, dtype=np.int64)
    if half_life_days <= 0:
        return np.ones(ts.size, dtype=np.float32)
    age_days = np.maximum(int(now) - ts, 0) / DAY_MS
    return np.exp2(-age_days / float(half_life_days)).astype(np.float32)


def _windows_ms(windows_days: Sequence[float]) -> list[int]:
    return [int(round(float(d) * DAY_MS)) for d in windows_days]


def _window_totals(index: EventIndex, t: np.ndarray, windows_ms: Sequence[int]) -> np.ndarray:
    """``[n, len(windows_ms)]``: events of any item in ``[t[j] - W, t[j])``."""
    total = index.total_before(t)
    return np.stack([total - index.total_before(t - int(w)) for w in windows_ms], axis=-1) if len(windows_ms) \
        else np.zeros((*np.shape(t), 0), dtype=np.int64)


def _log_share(index: EventIndex, count: np.ndarray, total: np.ndarray) -> np.ndarray:
    """``log((count + 1) / (total + 1) * n_items)``: a share of ``total`` events relative to a uniform share."""
    return np.log((count + 1.0) / (total + 1.0) * index.n_items)


def cold_time_features(index: EventIndex, t: int, windows_days: Sequence[float]) -> np.ndarray:
    """``[len(windows_days) + 2]`` float32: :func:`item_time_features` of an item without any event, at ``t``."""
    t_arr = np.asarray([t], dtype=np.int64)
    totals = _window_totals(index, t_arr, _windows_ms(windows_days))
    return _time_features(index, np.zeros_like(totals), totals, np.zeros(1, dtype=np.int64),
                          index.total_before(t_arr), np.full(1, np.iinfo(np.int64).max), t_arr)[0]


def time_state(index: EventIndex, item_idx: np.ndarray, ts: np.ndarray, windows_days: Sequence[float]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The time inputs of one training set whose events ``index`` holds (``item_idx``, ``ts``): (per event as of
    its own time ``[n, T]``, per item as of the end of the events ``[n_items, T]``, an item without events at the
    end ``[T]``). The end is one ms after the newest event, so every event counts."""
    n_items = index.n_items
    end = int(np.max(ts)) + 1 if len(ts) else 0
    per_event = item_time_features(index, item_idx, ts, windows_days)
    now = item_time_features(index, np.arange(n_items), np.full(n_items, end, dtype=np.int64), windows_days)
    return per_event, now, cold_time_features(index, end, windows_days)


# ------------------------------------------------------------------------------------------------------------
# the popularity fallback: recent popularity, its window chosen on a global-time validation cut

# Windows tried (days; None = all time); equal scores go to the longer window.
POPULARITY_WINDOWS_DAYS: tuple[float | None, ...] = (1, 3, 7, 14, 30, 60, 120, 365, None)
# The newest share of the fit events (by time) held out as the "future" the window is chosen on.
POPULARITY_NEWEST_FRACTION = 0.2
POPULARITY_K = 20
# Below these the choice is noise and the fallback keeps all-time counts (the manifest says why).
POPULARITY_MIN_EVENTS = 1000
POPULARITY_MIN_USERS = 50


def popularity_order(counts: np.ndarray, all_time: np.ndarray) -> np.ndarray:
    """Item rows ``[n_items]`` int64, most popular first: by ``counts``, ties by ``all_time``, then by row (the
    vocabulary order, itself most frequent first), so a short window with many zero counts is still deterministic
    and ends with the all-time favourites."""
    counts, all_time = np.asarray(counts, dtype=np.int64), np.asarray(all_time, dtype=np.int64)
    if counts.shape != all_time.shape:
        raise ValueError(f"`counts` and `all_time` must have the same shape (got {counts.shape} and {all_time.shape})")
    return np.lexsort((np.arange(counts.size), -all_time, -counts)).astype(np.int64)


def ranking_scores(
    order: np.ndarray, seen_users: np.ndarray, seen_items: np.ndarray, rel_users: np.ndarray, rel_items: np.ndarray,
    *, k: int,
) -> tuple[float, float, int]:
    """(NDCG@k, Recall@k, users scored) of one global ranking served to every user minus that user's seen items.

    ``order [n_items]``: item rows, best first. ``seen_*``: distinct (user, item) pairs skipped in the user's list;
    ``rel_*``: distinct relevant pairs, none of them seen. Conventions of :mod:`recsys.core.metrics` (recall over
    ``|relevant|``; users without relevant items left out). Vectorised: a relevant item's position in its user's
    list is its global rank minus the number of the user's seen items ranked above it.
    """
    n_items = len(order)
    rank = np.empty(n_items, dtype=np.int64)
    rank[order] = np.arange(n_items)
    if len(rel_users) == 0:
        return 0.0, 0.0, 0
    seen_keys = np.sort(np.asarray(seen_users, np.int64) * n_items + rank[np.asarray(seen_items, np.int64)])
    u, r = np.asarray(rel_users, np.int64), rank[np.asarray(rel_items, np.int64)]
    above = np.searchsorted(seen_keys, u * n_items + r) - np.searchsorted(seen_keys, u * n_items)
    pos = r - above  # 0-based position in the user's list
    hit = pos < k
    gain = np.where(hit, 1.0 / np.log2(np.minimum(pos, k) + 2.0), 0.0)
    _, inv, n_rel = np.unique(u, return_inverse=True, return_counts=True)
    dcg = np.bincount(inv, weights=gain, minlength=n_rel.size)
    hits = np.bincount(inv, weights=hit.astype(np.float64), minlength=n_rel.size)
    idcg = np.cumsum(1.0 / np.log2(np.arange(k) + 2.0))[np.minimum(n_rel, k) - 1]
    return float(np.mean(dcg / idcg)), float(np.mean(hits / n_rel)), int(n_rel.size)


def choose_popularity_window(
    user_idx: np.ndarray, item_idx: np.ndarray, ts: np.ndarray, *, n_items: int,
    windows_days: Sequence[float | None] = POPULARITY_WINDOWS_DAYS, newest_fraction: float = POPULARITY_NEWEST_FRACTION,
    k: int = POPULARITY_K, min_events: int = POPULARITY_MIN_EVENTS, min_users: int = POPULARITY_MIN_USERS,
) -> dict[str, Any]:
    """Choose the fallback's window W on the fit events ``[n]`` (epoch ms) themselves, forward in time.

    A global-time cut at the ``1 - newest_fraction`` quantile of ``ts`` (the retrain gate's rule): events from the
    cut on are the future, the others the past. For each W of ``windows_days`` (None = all time) items are ranked
    by their past events in ``[cut - W, cut)`` (:func:`popularity_order`, ties by past all-time counts), every user
    with a future item outside their past items gets that ranking minus their past items (as the server excludes
    seen items; new users included: they are who the fallback serves), and NDCG@k is scored on those future items.
    The best W wins, ties to the longer one. With fewer than ``min_events`` events, a cut that leaves no past or
    no future, a past shorter than the shortest window, or fewer than ``min_users`` users to score, W is all time
    and ``reason`` says why.

    Returns the manifest record: ``window_days`` (None = all time), ``reason``, the cut and, when a grid was
    scored, ``grid`` (per W: ``window_days``, ``ndcg@k``, ``recall@k``).
    """
    if not 0.0 < newest_fraction < 1.0:
        raise ValueError(f"`newest_fraction` must be in (0, 1), got {newest_fraction}")
    finite = sorted(float(w) for w in windows_days if w is not None)
    if any(w <= 0 for w in finite):
        raise ValueError(f"`windows_days` must be positive days or None (all time), got {list(windows_days)}")
    user_idx, item_idx, ts = (np.asarray(a, dtype=np.int64) for a in (user_idx, item_idx, ts))
    metric = f"ndcg@{k}"
    out: dict[str, Any] = {"window_days": None, "metric": metric, "newest_fraction": newest_fraction,
                           "events": int(ts.size)}

    def all_time(reason: str) -> dict[str, Any]:
        _log.info("popularity fallback: all-time counts (%s)", reason)
        return {**out, "reason": reason}

    if ts.size < min_events:
        return all_time(f"too few events to choose a window: {ts.size} < {min_events}")
    cut = int(np.quantile(ts, 1.0 - newest_fraction, method="lower"))
    past = ts < cut
    out.update(cut_ms=cut, past_events=int(past.sum()), future_events=int((~past).sum()))
    if past.all() or not past.any():
        return all_time("the time cut leaves no past or no future: too many events share one timestamp")
    span_days = (cut - int(ts[past].min())) / DAY_MS
    out["past_span_days"] = round(span_days, 3)
    if finite and span_days < finite[0]:
        return all_time(f"the past spans {span_days:.3g} days, less than the shortest window ({finite[0]:g} days)")

    # distinct (user, item) pairs: seen = past, relevant = future minus past
    seen = _distinct(user_idx[past] * n_items + item_idx[past])
    fut = _distinct(user_idx[~past] * n_items + item_idx[~past])
    rel = fut[~np.isin(fut, seen, assume_unique=True)]
    n_users = int(_distinct(rel // n_items).size)
    out["users"] = n_users
    if n_users < min_users:
        return all_time(f"too few users with future items to score a window: {n_users} < {min_users}")

    index = EventIndex(item_idx[past], ts[past], n_items)
    rows = np.arange(n_items)
    at = np.full(n_items, cut, dtype=np.int64)
    past_all = index.count_before(rows, at)
    grid = []
    for w in windows_days:  # counts in [cut - W, cut): the past's own "last W days"
        counts = past_all if w is None else window_counts(index, rows, at, [int(round(float(w) * DAY_MS))])[:, 0]
        ndcg, recall, _ = ranking_scores(popularity_order(counts, past_all), seen // n_items, seen % n_items,
                                         rel // n_items, rel % n_items, k=k)
        grid.append({"window_days": w, metric: ndcg, f"recall@{k}": recall})
    # the longest window first, so a tie keeps it; all time (None) counts as the longest
    by_length = sorted(grid, key=lambda g: -np.inf if g["window_days"] is None else -float(g["window_days"]))
    best = max(by_length, key=lambda g: g[metric])  # max returns the first of equal scores
    _log.info("popularity fallback: window %s days (%s %.4f on %d users)", best["window_days"], metric, best[metric],
             n_users)
    return {**out, "window_days": best["window_days"], "grid": grid,
            "reason": f"best {metric} on the newest {newest_fraction:.0%} of the fit events"}


def _distinct(a: np.ndarray) -> np.ndarray:
    """Sorted distinct values (sort-based: several times faster than ``np.unique``'s hashing on int64 keys)."""
    a = np.sort(a)
    return a[np.concatenate(([True], a[1:] != a[:-1]))] if a.size else a


def recent_counts(item_idx: np.ndarray, ts: np.ndarray, *, n_items: int, window_days: float | None, end: int
                  ) -> np.ndarray:
    """``[n_items]`` int64: each item's events in ``[end - W, end)`` (all before ``end`` for ``window_days=None``),
    the definition of :func:`recsys.train.recency.window_counts`."""
    item_idx, ts = np.asarray(item_idx, dtype=np.int64), np.asarray(ts, dtype=np.int64)
    keep = ts < end
    if window_days is not None:
        keep &= ts >= end - int(round(float(window_days) * DAY_MS))
    return np.bincount(item_idx[keep], minlength=n_items).astype(np.int64)
