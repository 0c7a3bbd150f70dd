"""Time signals (recsys.train.recency) and the trainer's use of them: hand-worked rates and decays, no leakage from an
example's future, and a model with time inputs ranking last week's hit above a hit of long ago."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys.core import schema
from recsys.train.config import LossConfig, ModelConfig, TrainConfig
from recsys.train.model import TwoTower
from recsys.train.recency import (
    DAY_MS,
    EventIndex,
    cold_time_features,
    decay_weights,
    item_time_features,
    time_state,
    window_counts,
)

torch.set_num_threads(1)


def test_window_counts_and_features_by_hand():
    # item 0 at days 0, 5, 9, 10 (twice); item 1 at day 9; 3 items in the catalogue
    items = np.array([0, 0, 0, 0, 0, 1])
    ts = np.array([0, 5, 9, 10, 10, 9]) * DAY_MS
    index = EventIndex(items, ts, n_items=3)
    t = np.array([10 * DAY_MS, 10 * DAY_MS, 11 * DAY_MS, 10 * DAY_MS])
    q = np.array([0, 1, 0, 2])
    # strictly before t: at day 10 the two day-10 events of item 0 do not count yet
    np.testing.assert_array_equal(window_counts(index, q, t, [DAY_MS, 7 * DAY_MS]),
                                  [[1, 2], [1, 1], [2, 4], [0, 0]])
    f = item_time_features(index, q, t, [1, 7])
    # item 0 at day 10, 1-day window: 1 of the window's 2 events -> log(2/3 * 3); all-time: 3 of 4 -> log(4/5 * 3)
    assert f[0, 0] == pytest.approx(math.log(2 / 3 * 3), rel=1e-6)
    assert f[0, 1] == pytest.approx(math.log(3 / 4 * 3), rel=1e-6)  # 7 days: days 3..9 hold 2 of item 0's, 1 of 1's
    assert f[0, 2] == pytest.approx(math.log(4 / 5 * 3), rel=1e-6)
    assert f[0, 3] == pytest.approx(math.log1p(10.0), rel=1e-6)  # first event at day 0
    assert f[3, 3] == 0.0 and f[3, 2] == pytest.approx(math.log(1 / 5 * 3), rel=1e-6)  # no events: age 0
    np.testing.assert_allclose(cold_time_features(index, 10 * DAY_MS, [1, 7]), f[3], rtol=1e-6)


def test_decay_weights_by_hand():
    ts = np.array([100, 90, 70]) * DAY_MS
    np.testing.assert_allclose(decay_weights(ts, now=100 * DAY_MS, half_life_days=10), [1.0, 0.5, 0.125])
    np.testing.assert_array_equal(decay_weights(ts, now=100 * DAY_MS, half_life_days=0), [1.0, 1.0, 1.0])


def test_features_of_an_example_do_not_see_its_future():
    rng = np.random.default_rng(0)
    items = rng.integers(0, 20, 3000)
    ts = rng.integers(0, 200, 3000) * (DAY_MS // 4)
    per_event, _, _ = time_state(EventIndex(items, ts, 20), items, ts, [1, 7, 30])
    t_cut = int(np.quantile(ts, 0.6))
    early = np.flatnonzero(ts <= t_cut)
    # delete every event after the cut, and scramble the later events' items and times among themselves: the
    # features of the events up to the cut do not change
    for later_items, later_ts in ((None, None), (rng.permutation(items[ts > t_cut]), ts[ts > t_cut] + DAY_MS)):
        if later_items is None:
            keep = ts <= t_cut
            got = time_state(EventIndex(items[keep], ts[keep], 20), items[keep], ts[keep], [1, 7, 30])[0]
            np.testing.assert_array_equal(got, per_event[keep])
        else:
            items2, ts2 = items.copy(), ts.copy()
            items2[ts > t_cut], ts2[ts > t_cut] = later_items, later_ts
            got = time_state(EventIndex(items2, ts2, 20), items2, ts2, [1, 7, 30])[0]
            np.testing.assert_array_equal(got[early], per_event[early])
    # and they do see the past: the same item's features differ between two times
    assert len(np.unique(per_event[items == 3][:, -2])) > 10


# --------------------------------------------------------------------------------------------- in the trainer
N_ITEMS, N_USERS, SPAN_DAYS = 30, 120, 500
OLD, NEW = 0, 1  # OLD: everybody's hit 450-500 days before the end; NEW: the hit of the last 7 days


def _drifting(path: Path, seed: int = 0) -> Path:
    """A prepared dataset of two periods: users 0-59 active in days 0-60, where most also watched OLD; users
    60-119 active in the last 60 days, where half also watched NEW in the last week. Every other item is watched
    uniformly at any time. OLD has more events in all than NEW, so all-time counts favour it."""
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    rows = []
    for u in range(N_USERS):
        late = u >= N_USERS // 2
        lo = SPAN_DAYS - 60 if late else 0
        for d in np.sort(rng.uniform(lo, lo + 53, 10)):
            rows.append((u, int(rng.integers(2, N_ITEMS)), int(d * DAY_MS)))
        if not late and u % 6 != 0:
            rows.append((u, OLD, int(rng.uniform(53, 60) * DAY_MS)))
        if late and u % 2 == 0:
            rows.append((u, NEW, int(rng.uniform(SPAN_DAYS - 7, SPAN_DAYS) * DAY_MS)))
    rows.sort(key=lambda r: (r[0], r[2]))
    a = np.array(rows, dtype=np.int64)
    for split, mask in (("train", np.ones(len(a), bool)), ("valid", np.zeros(len(a), bool))):
        pq.write_table(pa.table({
            schema.USER_IDX: pa.array(a[mask, 0], pa.int32()), schema.ITEM_IDX: pa.array(a[mask, 1], pa.int32()),
            schema.TS: pa.array(a[mask, 2], pa.int64()), schema.WEIGHT: pa.array(np.ones(mask.sum()), pa.float32()),
        }), path / schema.SPLITS[split])  # fmt: skip
    counts = np.bincount(a[:, 1], minlength=N_ITEMS)
    assert counts[OLD] > counts[NEW]
    pq.write_table(pa.table({
        schema.ITEM_ID: [f"i{i}" for i in range(N_ITEMS)], schema.ITEM_IDX: pa.array(np.arange(N_ITEMS), pa.int32()),
        "n_train": pa.array(counts, pa.int32()), "prob": pa.array(counts / counts.sum(), pa.float64()),
        "first_ts": pa.array(np.zeros(N_ITEMS), pa.int64()),
    }), path / schema.ITEMS)  # fmt: skip
    pq.write_table(pa.table({
        schema.USER_ID: [f"u{u}" for u in range(N_USERS)], schema.USER_IDX: pa.array(np.arange(N_USERS), pa.int32()),
        "n_train": pa.array(np.bincount(a[:, 0], minlength=N_USERS), pa.int32()),
    }), path / schema.USERS)  # fmt: skip
    return path


def _train(data: Path, out: Path, *, time_features: bool, time_batches: bool = True) -> TwoTower:
    from recsys.train.loop import train

    m = ModelConfig(dim=16, embedding_dim=16, history_len=8, time_features=time_features)
    t = TrainConfig(batch_size=64, lr=0.01, epochs=12, progress=False, tensorboard=False, patience=0, refit=False,
                    time_batches=time_batches)
    lc = LossConfig(temperature=0.1, logq_frequencies="batch" if time_batches else "all_time")
    train(data, out, model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    return TwoTower.from_run(out)


@pytest.fixture(scope="module")
def drifting(tmp_path_factory) -> Path:
    return _drifting(tmp_path_factory.mktemp("drift") / "prepared")


def _margin(model: TwoTower) -> float:
    """score(NEW) - score(OLD) for a new user asked from a history of other items (the same for both periods)."""
    with torch.no_grad():
        items = model.encode_items(torch.arange(N_ITEMS))
        users = model.encode_users(torch.full((20,), -1), torch.randint(2, N_ITEMS, (20, 8),
                                                                         generator=torch.Generator().manual_seed(0)))
        s = users @ items.T
    return float((s[:, NEW] - s[:, OLD]).mean())


def test_time_inputs_rank_last_weeks_hit_above_an_old_one(drifting, tmp_path):
    # measured: NEW - OLD = 0.34 with time inputs, 0.10 without (same batching), -0.04 with neither
    with_time = _train(drifting, tmp_path / "time", time_features=True)
    without = _train(drifting, tmp_path / "plain", time_features=False)
    # the serving state is the end of the logs: NEW is hot, OLD has had nothing for over a year
    now = with_time.item_now.numpy()
    assert now[NEW, 1] > now[OLD, 1] + 2  # 7-day share
    assert _margin(with_time) > 0.2
    assert _margin(with_time) > _margin(without) + 0.1
    # the run's weights carry the end-of-logs state: a reload gives the same items
    again = TwoTower.from_run(tmp_path / "time")
    torch.testing.assert_close(again.item_now, with_time.item_now)


def test_time_batches_are_blocks_of_one_period(drifting):
    from recsys.core.data import load_prepared
    from recsys.train.loop import Trainer

    data = load_prepared(drifting)
    t = TrainConfig(batch_size=64, epochs=1, progress=False, tensorboard=False, time_batches=True)
    trainer = Trainer(data, model_cfg=ModelConfig(dim=8, embedding_dim=8, history_len=4), train_cfg=t,
                      loss_cfg=LossConfig(), device=torch.device("cpu"))
    trainer.build(seed=0)
    trainer.set_interactions(data.train)
    ts = data.train.ts[trainer.time_order.numpy()]
    assert np.all(np.diff(ts) >= 0)
    from recsys.train.loop import time_blocks

    n, bs = len(data.train), 64
    orders = [time_blocks(trainer.time_order, bs, n // bs, generator=torch.Generator().manual_seed(s)).numpy()
              for s in range(2)]
    rank = np.empty(n, dtype=np.int64)
    rank[trainer.time_order.numpy()] = np.arange(n)
    for order in orders:
        batches = rank[order].reshape(-1, bs)
        assert np.all(np.diff(batches, axis=1) == 1)  # each batch: consecutive rows in time
        assert len(np.unique(order)) >= n - 2 * bs  # an epoch still covers (almost) every row
        assert not np.all(np.diff(batches[:, 0]) > 0)  # the batches are not visited in time order
    assert not np.array_equal(orders[0], orders[1])  # other cut points and order every epoch


def test_half_life_decays_the_training_weights(drifting):
    from recsys.core.data import load_prepared
    from recsys.train.loop import Trainer

    data = load_prepared(drifting)
    t = TrainConfig(batch_size=64, epochs=1, progress=False, tensorboard=False, half_life_days=30)
    trainer = Trainer(data, model_cfg=ModelConfig(dim=8, embedding_dim=8, history_len=4), train_cfg=t,
                      loss_cfg=LossConfig(), device=torch.device("cpu"))
    trainer.build(seed=0)
    trainer.set_interactions(data.train)
    age = (data.train.ts.max() - data.train.ts) / DAY_MS
    np.testing.assert_allclose(trainer.t_weight.numpy(), data.train.weight * 0.5 ** (age / 30), rtol=1e-5)


def test_model_json_without_time_inputs_still_loads(drifting, tmp_path):
    import json

    model = _train(drifting, tmp_path / "old", time_features=False, time_batches=False)
    meta = json.loads((tmp_path / "old" / schema.MODEL_JSON).read_text())
    del meta["config"]["time_features"], meta["config"]["time_windows_days"]  # written before they existed
    old = TwoTower.from_model_json(meta)
    assert old.item_time is None and old.item_now is None
    old.load_state_dict(model.state_dict())
