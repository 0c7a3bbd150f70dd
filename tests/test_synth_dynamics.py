"""Time dynamics of the synthetic logs (issue #15): release times, item life curves, and what they do to a log.

The curves are checked by hand-worked values; the logs by what a time-aware recommender needs to see in them: the
popular items change over the period, counts over the last two weeks predict the next events far better than
all-time counts (with dynamics off they barely do), and the user's taste still adds to what is popular now.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys.core.config import from_dict
from recsys.prepare.synth import ITEM_KINDS, SynthConfig, _life_peak, _World, generate

DAY = 86_400
# the size of the synthetic data set of benchmarks/future_bench.py
BENCH = SynthConfig(events=200_000, users=4_000, items=2_000, seed=0)
EVERGREEN, SEASONAL, TRENDING, LIFE = (ITEM_KINDS.index(k) for k in ("evergreen", "seasonal", "trending", "life_cycle"))


class Log:
    """One generated log as integer codes: ``item`` / ``user`` [n] in time order, ``t`` [n] epoch seconds."""

    def __init__(self, d: Path) -> None:
        table = pa.concat_tables(pq.read_table(p) for p in sorted((d / "logs").glob("part-*.parquet")))
        items = pq.read_table(d / "items.parquet")
        self.item_ids = items["item_id"].to_pylist()
        pos = {x: i for i, x in enumerate(self.item_ids)}
        self.item = np.array([pos[x] for x in table["item_id"].to_pylist()])
        self.user = table["user_id"].combine_chunks().dictionary_encode().indices.to_numpy().astype(np.int64)
        self.t = table["timestamp"].to_numpy()
        cats = items["category"].to_pylist()
        names = sorted(set(cats))
        self.category = np.array([names.index(c) for c in cats])  # [n_items]

    def top(self, mask: np.ndarray, k: int) -> np.ndarray:
        counts = np.bincount(self.item[mask], minlength=len(self.item_ids))
        return np.argsort(-counts, kind="stable")[:k]

    def cuts(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(before, last two weeks before, two weeks after) masks at global cuts at 50%, 60%, ..., 90% of the time."""
        lo, hi = self.t.min(), self.t.max()
        out = []
        for f in (0.5, 0.6, 0.7, 0.8, 0.9):
            cut = lo + f * (hi - lo)
            before = self.t < cut
            out.append((before, before & (self.t >= cut - 14 * DAY), (self.t >= cut) & (self.t < cut + 14 * DAY)))
        return out


@pytest.fixture(scope="module")
def logs(tmp_path_factory) -> dict[bool, Log]:
    root = tmp_path_factory.mktemp("dynamics")
    out = {}
    for dynamics in (True, False):
        generate(root / str(dynamics), config=dataclasses.replace(BENCH, dynamics=dynamics))
        out[dynamics] = Log(root / str(dynamics))
    return out


def test_life_peak_is_the_maximum_of_the_life_curve():
    # rise 3 days, half-life 21 days: (1 - exp(-a / 3)) * exp(-ln2 a / 21) peaks at a = 3 ln(1 + 1 / x) = 7.22 days,
    # x = 3 ln2 / 21 = 0.0990, with the value 1 / (1 + x) * (1 + 1 / x) ** -x = 0.9099 * 0.7879 = 0.7170
    rise, rate = 3.0, math.log(2) / 21
    a = np.linspace(0, 60, 600_001)
    curve = -np.expm1(-a / rise) * np.exp(-rate * a)
    assert a[curve.argmax()] == pytest.approx(7.22, abs=0.01)
    assert _life_peak(np.array(rise), np.array(rate)) == pytest.approx(curve.max(), rel=1e-9)
    assert curve.max() == pytest.approx(0.7170, abs=1e-4)


def test_each_kind_of_curve_has_its_shape():
    cfg = SynthConfig(items=400, users=10, clusters=4, popularity_floor=0.05)
    c = _World(cfg).curves
    kinds = np.bincount(c.kind, minlength=4)
    assert kinds.min() > 0 and kinds[LIFE] > kinds[EVERGREEN], kinds  # 10% / 10% / 10% / 70% of 400

    def w(i: int, t: float) -> float:
        return float(c.weight(np.array([i]), np.array([t]))[0])

    for i in range(cfg.items):  # at launch only the floor: the rise starts from 0 (and no spike before launch)
        assert w(i, c.release[i]) == pytest.approx(0.05 * c.peak[i], rel=1e-12)
    for i in c.of_kind[LIFE]:
        peak_age = c.rise[i] * math.log(1 + 1 / (c.rise[i] * c.rate[i]))
        assert w(i, c.release[i] + peak_age) == pytest.approx(c.peak[i], rel=1e-9)  # peak height = the Zipf weight
        long_after = c.release[i] + 60 * math.log(2) / c.rate[i]  # 60 half-lives
        assert w(i, long_after) == pytest.approx(0.05 * c.peak[i], rel=1e-9)
    for i in c.of_kind[EVERGREEN]:
        assert w(i, c.release[i] + 60 * c.rise[i]) == pytest.approx(c.peak[i], rel=1e-9)  # risen, and stays
    for i in c.of_kind[SEASONAL]:
        t = c.release[i] + 60 * c.rise[i] + c.period[i] * np.linspace(0, 1, 50)
        ws = c.weight(np.full(50, i), t)
        np.testing.assert_allclose(ws, c.weight(np.full(50, i), t + c.period[i]), rtol=1e-9)  # periodic
        assert ws.max() > 10 * ws.min()  # a real bump: exp(2 * 2) > 10 even for the weekly ones
    no_spike = copy.copy(c)
    no_spike.spike_amp = np.zeros_like(c.spike_amp)
    for i in c.of_kind[TRENDING]:
        since = np.linspace(0, 10, 1001) * DAY
        at = np.full(since.size, i)
        spike = c.weight(at, c.spike_at[i] + since) - no_spike.weight(at, c.spike_at[i] + since)
        # as high as an item of popularity rank 0..9 at its peak: (rank + 10) ** -1.2
        assert spike.max() == pytest.approx(c.spike_height[i], rel=1e-4)
        assert 19.0**-1.2 <= c.spike_height[i] <= 10.0**-1.2
        # rise 1 day, half-life 7 days: the spike peaks ln(1 + 7 / ln 2) = 2.41 days after it starts
        assert since[spike.argmax()] / DAY == pytest.approx(2.41, abs=0.02)


def test_no_event_before_its_item_is_released_and_items_launch_all_along(logs):
    log = logs[True]
    world = _World(BENCH)
    idx = {x: i for i, x in enumerate(world.item_ids.tolist())}
    w_item = np.array([idx[x] for x in log.item_ids])[log.item]  # the world's index of each event's item
    age = log.t - BENCH.start_ts - world.curves.release[w_item]
    assert age.min() >= 0
    first = np.full(BENCH.items, np.iinfo(np.int64).max)
    np.minimum.at(first, w_item, log.t - BENCH.start_ts)
    late = np.flatnonzero(world.curves.release > 0)
    assert 0.3 < late.size / BENCH.items < 0.5  # late_item_fraction 0.4: launches spread over the period
    seen = late[first[late] < np.iinfo(np.int64).max]
    assert seen.size > 0.9 * late.size
    # a launch is noticed: most late items have their first event within a week of it
    assert np.median(first[seen] - world.curves.release[seen]) < 7 * DAY


def test_same_seed_same_bytes_with_dynamics_and_dynamics_change_the_log(tmp_path):
    cfg = dataclasses.replace(BENCH, events=30_000, shard_events=7_000)  # shard boundaries inside days
    a, b = generate(tmp_path / "a", config=cfg), generate(tmp_path / "b", config=cfg)
    assert [f["sha256"] for f in a["files"]] == [f["sha256"] for f in b["files"]]
    assert a["counts"]["items_by_kind"] == b["counts"]["items_by_kind"]
    assert sum(a["counts"]["items_by_kind"].values()) == cfg.items
    off = generate(tmp_path / "off", config=dataclasses.replace(cfg, dynamics=False))
    assert off["files"][0]["sha256"] != a["files"][0]["sha256"] and "items_by_kind" not in off["counts"]
    # the catalogue and users do not depend on the dynamics
    assert [f["sha256"] for f in off["files"][-2:]] == [f["sha256"] for f in a["files"][-2:]]


def test_the_popular_items_change_over_the_period(logs):
    overlap = {}
    for dynamics, log in logs.items():
        lo, hi = log.t.min(), log.t.max()
        last = log.t >= lo + 0.9 * (hi - lo)
        overlap[dynamics] = len(set(log.top(last, 100)) & set(log.top(np.ones_like(last), 100))) / 100
    # measured at seed 0: 0.24 with dynamics, 0.63 without (late items and taste drift); seeds 1-4: 0.17-0.26, 0.57-0.69
    assert overlap[True] <= 0.4 and overlap[False] >= 0.55, overlap


def test_recent_popularity_predicts_the_next_events_only_with_dynamics(logs):
    hit = {}
    for dynamics, log in logs.items():
        for window, name in ((0, "all"), (1, "recent")):
            hit[dynamics, name] = np.mean([
                np.isin(log.item[after], log.top(masks[window], 20)).mean() for *masks, after in log.cuts()
            ])  # fmt: skip
    gain = {d: hit[d, "recent"] / hit[d, "all"] for d in (True, False)}
    # measured at seed 0, hit rate @20 of the two weeks after the cut: dynamics 0.070 (all time) -> 0.116 (last two
    # weeks), x1.66; static 0.123 -> 0.136, x1.10 (late items and taste drift); seeds 1-4: x1.47-2.25, x1.04-1.12
    assert gain[True] >= 1.4 and gain[False] <= 1.2, (gain, hit)
    assert hit[True, "recent"] < 0.3, hit  # strong, not perfect: most events are not among the 20 hits of the day


def test_taste_still_adds_to_what_is_popular_now(logs):
    # top-20 of the user's favourite category (taste) by recent counts beats either signal alone
    log = logs[True]
    n_items, n_users, n_cats = len(log.item_ids), log.user.max() + 1, log.category.max() + 1
    hit: dict[str, list[float]] = {"recent": [], "taste": [], "taste+recent": []}
    for before, recent, after in log.cuts():
        per_user = np.zeros((n_users, n_cats))
        np.add.at(per_user, (log.user[before], log.category[log.item[before]]), 1)
        known = per_user.sum(1)[log.user[after]] > 0
        users, items = log.user[after][known], log.item[after][known]
        favourite = per_user.argmax(1)[users]
        hit["recent"].append(np.isin(items, log.top(recent, 20)).mean())
        for name, mask in (("taste", before), ("taste+recent", recent)):
            counts = np.bincount(log.item[mask], minlength=n_items)
            order = np.lexsort((-counts, log.category))  # by category, then count
            top = np.stack([order[log.category[order] == c][:20] for c in range(n_cats)])  # [n_cats, 20]
            hit[name].append((top[favourite] == items[:, None]).any(1).mean())
    h = {k: float(np.mean(v)) for k, v in hit.items()}
    # measured at seed 0: recent 0.115, taste 0.186, taste + recent 0.232
    assert h["taste+recent"] > 1.15 * max(h["recent"], h["taste"]), h


def test_dynamics_fields_are_validated_by_name():
    with pytest.raises(ValueError, match=r"`synth.popularity_floor` must be in \[0, 1\], got 1.5"):
        from_dict(SynthConfig, {"popularity_floor": 1.5})
    with pytest.raises(ValueError, match="trending_share` must be <= 1, got 1.1"):
        from_dict(SynthConfig, {"evergreen_share": 0.6, "seasonal_share": 0.3, "trending_share": 0.2})
    with pytest.raises(ValueError, match="`synth.half_life_days` must be > 0, got 0.0"):
        from_dict(SynthConfig, {"half_life_days": 0.0})
    with pytest.raises(ValueError, match="`synth.backlog_days` must be >= 0, got -1.0"):
        from_dict(SynthConfig, {"backlog_days": -1.0})
    assert from_dict(SynthConfig, {"dynamics": False}).dynamics is False
