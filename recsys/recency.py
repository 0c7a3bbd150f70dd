"""Signals of "now": how often each item was interacted with recently, how old it is, how much an event counts.

Logs drift: what people watch this month is not what they watched last year. Every time signal of recsys is
computed here, from events **strictly before** the moment it describes, so the same function serves training
(each example's own timestamp: no leakage from its future) and export (the end of the logs: what serving uses).

- :func:`window_counts`: per (item, t), the number of events of the item in ``[t - W, t)`` for each window W.
- :func:`item_time_features`: the item tower's time inputs: per window the item's log share of the window's events
  (relative to a uniform share), its log share of everything before t, and its log age in days.
- :func:`decay_weights`: per-event weights ``0.5 ** (age / half_life)``, age measured back from the end of the logs.

Timestamps are epoch milliseconds (int64), like every split file.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

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
    windows_ms = [int(round(float(d) * DAY_MS)) for d in windows_days]
    n = index.n_items
    out = np.empty((items.size, n_time_features(windows_days)), dtype=np.float32)
    before = index.count_before(items, t)
    total = index.total_before(t)
    for j, w in enumerate(windows_ms):
        c = before - index.count_before(items, t - w)
        tw = total - index.total_before(t - w)
        out[:, j] = np.log((c + 1.0) / (tw + 1.0) * n)
    out[:, -2] = np.log((before + 1.0) / (total + 1.0) * n)
    first = index.first_ts(items)
    age = np.where(first < t, (t - np.minimum(first, t)) / DAY_MS, 0.0)
    out[:, -1] = np.log1p(age)
    return out


def decay_weights(ts: np.ndarray, *, now: int, half_life_days: float) -> np.ndarray:
    """``0.5 ** ((now - ts) / half_life)`` as float32 (1 for an event at ``now``); all ones when
    ``half_life_days`` is 0 (no decay)."""
    ts = np.asarray(ts, dtype=np.int64)
    if half_life_days <= 0:
        return np.ones(ts.size, dtype=np.float32)
    age_days = np.maximum(int(now) - ts, 0) / DAY_MS
    return np.exp2(-age_days / float(half_life_days)).astype(np.float32)


def cold_time_features(index: EventIndex, t: int, windows_days: Sequence[float]) -> np.ndarray:
    """``[len(windows_days) + 2]`` float32: :func:`item_time_features` of an item without any event, at ``t``."""
    windows_ms = [int(round(float(d) * DAY_MS)) for d in windows_days]
    t_arr = np.asarray([t], dtype=np.int64)
    total = index.total_before(t_arr)
    cols = [np.log(1.0 / (total - index.total_before(t_arr - w) + 1.0) * index.n_items) for w in windows_ms]
    cols += [np.log(1.0 / (total + 1.0) * index.n_items), np.zeros(1)]
    return np.concatenate(cols).astype(np.float32)


def time_state(item_idx: np.ndarray, ts: np.ndarray, n_items: int, windows_days: Sequence[float]
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The time inputs of one training set: (per event as of its own time ``[n, T]``, per item as of the end of
    the events ``[n_items, T]``, an item without events at the end ``[T]``). The end is one ms after the newest
    event, so every event counts."""
    index = EventIndex(item_idx, ts, n_items)
    end = int(np.max(ts)) + 1 if len(ts) else 0
    per_event = item_time_features(index, item_idx, ts, windows_days)
    now = item_time_features(index, np.arange(n_items), np.full(n_items, end, dtype=np.int64), windows_days)
    return per_event, now, cold_time_features(index, end, windows_days)
