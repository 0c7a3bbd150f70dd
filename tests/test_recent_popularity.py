"""The popularity fallback ranks by recent popularity, its window chosen at export on the fit logs' newest slice.

Hand-made logs where the answer is known: an item that was a hit only long ago ("old_hit") against one popular last
week ("new_hit"); a log whose best window is 7 days by construction; the vectorised scorer against
``recsys.core.metrics`` on a hand-worked case. Bundles are exported from a ``prepare``d log and an untrained run written
here (the towers do not matter to the fallback), so nothing is trained.
"""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from recsys.bundle import RECENT_POPULARITY, Bundle, BundleError
from recsys.core import schema
from recsys.core.data import read_interactions
from recsys.core.io import sha256_file
from recsys.core.metrics import ndcg_at_k, recall_at_k
from recsys.prepare import PrepareConfig, prepare
from recsys.publish import export
from recsys.retrieval import IndexConfig
from recsys.train.recency import (
    DAY_MS,
    POPULARITY_WINDOWS_DAYS,
    choose_popularity_window,
    popularity_order,
    ranking_scores,
    recent_counts,
)
from server.service import SOURCE_POPULARITY, recommend

torch.set_num_threads(1)

DAY_S = 86_400
T0 = 1_700_000_000  # epoch seconds of day 0
N_DAYS = 300  # the logs end on day 300
N_HITS, HIT_LIFE = 30, 30  # hit j is live on days [10 j, 10 j + 30)


# ------------------------------------------------------------------------------------------------ hand-made logs


def write_trending_logs(path: Path, *, seed: int = 0) -> None:
    """Raw logs (user_id, item_id, timestamp in s) with drifting popularity over 300 days.

    - 600 users, each active on one day, each picking 3 of the hits live that day ("what is popular now");
    - ``old_hit``: 150 users on days 0-30 (the biggest all-time count, nothing since);
    - ``new_hit``: 40 users over the last 7 days (a tenth of old_hit's all-time count).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(600):
        day = int(rng.integers(HIT_LIFE, N_DAYS))
        live = [j for j in range(N_HITS) if 10 * j <= day < 10 * j + HIT_LIFE]
        for j in rng.choice(live, size=min(3, len(live)), replace=False):
            rows.append((f"u{u}", f"hit{j}", T0 + day * DAY_S + int(rng.integers(DAY_S))))
    for u in range(150):
        rows.append((f"a{u}", "old_hit", T0 + int(rng.integers(0, HIT_LIFE * DAY_S))))
    for u in range(40):
        rows.append((f"b{u}", "new_hit", T0 + int(rng.integers((N_DAYS - 7) * DAY_S, N_DAYS * DAY_S))))
    rng.shuffle(rows)
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["user_id", "item_id", "timestamp"])
        w.writerows(rows)


def write_untrained_run(data: Path, run: Path) -> Path:
    """A run dir export accepts: random towers sized to ``data``, its final fit recorded as every split."""
    from safetensors.torch import save_file

    from recsys.train.config import FeatureSpec, ModelConfig
    from recsys.train.loop import final_fit_record
    from recsys.train.model import TwoTower

    n_users = pq.read_metadata(data / schema.USERS).num_rows
    n_items = pq.read_metadata(data / schema.ITEMS).num_rows
    torch.manual_seed(0)
    model = TwoTower(FeatureSpec(n_users=n_users, n_items=n_items),
                     ModelConfig(dim=8, embedding_dim=8, history_len=4)).eval()
    run.mkdir(parents=True)
    (run / schema.MODEL_JSON).write_text(json.dumps(model.model_json()))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(run / schema.MODEL_WEIGHTS))
    (run / schema.RUN_CONFIG).write_text(json.dumps({"data_dir": str(data)}))
    splits = [s for s, f in schema.SPLITS.items() if (data / f).is_file() and pq.read_metadata(data / f).num_rows]
    (run / schema.SUMMARY).write_text(json.dumps({"final_fit": final_fit_record(data, splits)}))
    return run


@pytest.fixture(scope="module")
def published(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(prepared dataset, version dir) of one export of the trending logs."""
    root = tmp_path_factory.mktemp("recent_pop")
    write_trending_logs(root / "logs.csv")
    prepare([root / "logs.csv"], root / "data", config=PrepareConfig(kcore_users=1, kcore_items=1))
    run = write_untrained_run(root / "data", root / "run")
    path = export(run, root / "models", index_cfg=IndexConfig(num_threads=1), evaluate_split=None)
    return root / "data", path


def fallback_ids(bundle: Bundle) -> list[str]:
    """The whole catalogue as the popularity fallback serves it to a user nobody knows."""
    rec = recommend(bundle, user_id="nobody", k=bundle.n_items, allow_fallback=True)
    assert rec.source == SOURCE_POPULARITY and rec.fallback
    return rec.item_ids


def as_old_bundle(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as exported before recent popularity existed: no file, no checksum, no manifest key."""
    shutil.copytree(src, dst)
    (dst / RECENT_POPULARITY).unlink()
    m = json.loads((dst / "manifest.json").read_text())
    del m["files"][RECENT_POPULARITY], m["popularity"]
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


# ------------------------------------------------------------------------------------------------ serving


def test_fallback_ranks_last_weeks_hit_above_an_old_one(published):
    _, path = published
    b = Bundle.load(path)
    old, new = b.item_row("old_hit"), b.item_row("new_hit")
    assert b.item_popularity[old] == 150 > b.item_popularity[new] == 40  # all-time, old_hit wins
    w = b.popularity_window_days
    assert w is not None and w <= 60, f"a short window should win on drifting logs, got {w}"
    assert b.recent_popularity[old] == 0 and b.recent_popularity[new] > 0
    ids = fallback_ids(b)
    assert ids.index("new_hit") < ids.index("old_hit")
    # order: recent counts, ties by all-time counts, then row
    got = [b.item_row(i) for i in ids]
    key = [(-int(b.recent_popularity[r]), -int(b.item_popularity[r]), r) for r in got]
    assert key == sorted(key)


def test_export_records_the_window_and_load_round_trips(published):
    data, path = published
    m = json.loads((path / "manifest.json").read_text())
    pop = m["popularity"]
    assert pop["file"] == RECENT_POPULARITY and pop["splits"] == m["trained_on"]["splits"]
    # the file is checksummed like every other
    assert m["files"][RECENT_POPULARITY] == {"sha256": sha256_file(path / RECENT_POPULARITY),
                                             "size": (path / RECENT_POPULARITY).stat().st_size}
    choice = pop["choice"]
    assert [g["window_days"] for g in choice["grid"]] == list(POPULARITY_WINDOWS_DAYS)
    best = max(g["ndcg@20"] for g in choice["grid"])
    chosen = next(g for g in choice["grid"] if g["window_days"] == pop["window_days"])
    assert chosen["ndcg@20"] == best
    # ties go to the longer window: nothing longer scores as well
    longer = [g for g in choice["grid"] if g is not chosen and (g["window_days"] is None or (
        pop["window_days"] is not None and g["window_days"] > pop["window_days"]))]
    assert all(g["ndcg@20"] < best for g in longer)
    assert choice["newest_fraction"] == 0.2 and choice["future_events"] + choice["past_events"] == choice["events"]
    assert choice["users"] >= 50
    # the counts are the fit events in the last W days before their end, recomputed from the splits
    n_users, n_items = m["counts"]["n_users"], m["counts"]["n_items"]
    parts = [read_interactions(data / schema.SPLITS[s], n_users=n_users, n_items=n_items) for s in pop["splits"]]
    item_idx = np.concatenate([p.item_idx for p in parts])
    ts = np.concatenate([p.ts for p in parts])
    assert choice["events"] == ts.size and pop["end_ms"] == ts.max() + 1
    want = recent_counts(item_idx, ts, n_items=n_items, window_days=pop["window_days"], end=pop["end_ms"])
    b = Bundle.load(path)
    np.testing.assert_array_equal(b.recent_popularity, want)
    assert b.recent_popularity.dtype == np.int64 and not b.recent_popularity.flags.writeable
    assert b.popularity_window_days == pop["window_days"]
    np.testing.assert_array_equal(b.popular_items, popularity_order(want, b.item_popularity))
    from server.service import model_info

    assert pop["window_days"] is not None and model_info(b)["fallback_window_days"] == pop["window_days"]


def test_old_bundle_without_recent_counts_loads_and_ranks_all_time(published, tmp_path):
    _, path = published
    b = Bundle.load(as_old_bundle(path, tmp_path / "old"), verify=True)
    np.testing.assert_array_equal(b.recent_popularity, b.item_popularity)
    assert b.popularity_window_days is None
    from server.service import model_info

    assert model_info(b)["fallback_window_days"] == 0.0
    # exactly today's order: all-time counts, ties in vocabulary order
    np.testing.assert_array_equal(b.popular_items, np.argsort(-b.item_popularity, kind="stable"))
    ids = fallback_ids(b)
    assert ids.index("old_hit") < ids.index("new_hit")


def test_recent_counts_file_is_verified(published, tmp_path):
    _, path = published
    gone = shutil.copytree(path, tmp_path / "gone")
    (gone / RECENT_POPULARITY).unlink()  # still listed: a missing file, not an old bundle
    with pytest.raises(BundleError, match=r"recent_popularity\.npy: missing"):
        Bundle.load(gone)
    swapped = shutil.copytree(path, tmp_path / "swapped")
    counts = np.load(swapped / RECENT_POPULARITY)
    np.save(swapped / RECENT_POPULARITY, counts[::-1].copy())  # same size, other content
    with pytest.raises(BundleError, match=r"recent_popularity\.npy: sha256"):
        Bundle.load(swapped)
    unlisted = shutil.copytree(path, tmp_path / "unlisted")
    m = json.loads((unlisted / "manifest.json").read_text())
    del m["files"][RECENT_POPULARITY]  # the manifest still says a window was chosen
    (unlisted / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="`popularity` is recorded but recent_popularity.npy has no checksum"):
        Bundle.load(unlisted)


# ------------------------------------------------------------------------------------------------ the choice


def test_ranking_scores_hand_worked():
    order = np.array([3, 0, 1, 2, 4])
    # user 0 saw item 3 and wants item 1: its list is [0, 1, 2, 4] -> a hit at position 2
    # user 1 saw nothing and wants {4, 3}: [3, 0, 1, 2, 4] -> at k=2 one hit at position 1
    ndcg, recall, users = ranking_scores(order, np.array([0]), np.array([3]), np.array([0, 1, 1]),
                                         np.array([1, 4, 3]), k=2)
    u0 = 1 / math.log2(3)  # DCG 1/log2(3), IDCG 1
    u1 = 1 / (1 + 1 / math.log2(3))  # DCG 1, IDCG 1 + 1/log2(3)
    assert users == 2
    assert ndcg == pytest.approx((u0 + u1) / 2, rel=1e-9)
    assert recall == pytest.approx((1 + 0.5) / 2, rel=1e-9)
    # the same with recsys.core.metrics on explicit lists
    lists = [[0, 1, 2, 4], [3, 0, 1, 2, 4]]
    assert ndcg == pytest.approx(np.mean([ndcg_at_k(lists[0], {1}, 2), ndcg_at_k(lists[1], {4, 3}, 2)]))
    assert recall == pytest.approx(np.mean([recall_at_k(lists[0], {1}, 2), recall_at_k(lists[1], {4, 3}, 2)]))


def test_popularity_order_breaks_ties_by_all_time_then_row():
    # items 1 and 3 tie on 5 recent events; 3 has more all-time; 0 and 2 tie on both -> row order
    assert popularity_order(np.array([0, 5, 0, 5]), np.array([7, 6, 7, 9])).tolist() == [3, 1, 0, 2]


def seven_day_log() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(user, item, ts ms) where the 7-day window wins: the future (all at time F) wants items X.

    Before F: 20 "old" items (rows 0-19) with 10 events each ~200 days back, 5 items Y (rows 20-24) with 8 each
    8-13 days back, 5 items X (rows 25-29) with 4 each 4-6 days back; at F, 20 new users take every X item.
    Per window, X's positions in the ranking (old > Y > X on all-time counts):
      1, 3 days: nothing counts, all-time order -> X at 25-29, NDCG@20 0
      7 days: only X counts -> X at 0-4, NDCG@20 1
      14, 30, 60, 120 days: Y (8) above X (4) -> X at 5-9
      365 days, all time: the old items count again -> X at 25-29, 0
    """
    F = 1_000 * DAY_MS
    rows, user = [], 0
    for items, per_item, days in ((range(0, 20), 10, (195, 205)), (range(20, 25), 8, (8, 13)),
                                  (range(25, 30), 4, (4, 6))):
        for i in items:
            for e in range(per_item):
                day = days[0] + (days[1] - days[0]) * e / max(per_item - 1, 1)
                rows.append((user, i, F - int(day * DAY_MS)))
                user += 1
    for u in range(20):  # 100 future events of 360: the 20% quantile cut falls on F
        rows += [(user + u, i, F) for i in range(25, 30)]
    a = np.array(rows, dtype=np.int64)
    return a[:, 0], a[:, 1], a[:, 2]


def test_window_choice_finds_the_known_best_window():
    u, i, t = seven_day_log()
    choice = choose_popularity_window(u, i, t, n_items=30, min_events=100, min_users=10)
    assert choice["window_days"] == 7
    assert choice["cut_ms"] == t.max() and choice["future_events"] == 100 and choice["users"] == 20
    ndcg = {g["window_days"]: g["ndcg@20"] for g in choice["grid"]}
    worse = sum(1 / math.log2(p + 2) for p in range(5, 10)) / sum(1 / math.log2(p + 2) for p in range(5))
    assert ndcg == pytest.approx({1: 0.0, 3: 0.0, 7: 1.0, 14: worse, 30: worse, 60: worse, 120: worse,
                                  365: 0.0, None: 0.0}, rel=1e-9)
    assert all(g["recall@20"] == (1.0 if 7 <= (g["window_days"] or 1e9) <= 120 else 0.0) for g in choice["grid"])


def test_window_choice_ties_go_to_the_longer_window():
    u, i, t = seven_day_log()
    # with only tied windows, the longest wins
    assert choose_popularity_window(u, i, t, n_items=30, min_events=100, min_users=10,
                                    windows_days=(1, 3, None))["window_days"] is None
    assert choose_popularity_window(u, i, t, n_items=30, min_events=100, min_users=10,
                                    windows_days=(14, 30, 60, 120))["window_days"] == 120


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ("few_events", r"too few events to choose a window: 360 < 1000"),
        ("short_span", r"the past spans 0\.0\d+ days, less than the shortest window \(1 days\)"),
        ("few_users", r"too few users with future items to score a window: 20 < 50"),
        ("one_timestamp", r"the time cut leaves no past or no future"),
    ],
)
def test_window_choice_falls_back_to_all_time_and_says_why(change, reason):
    u, i, t = seven_day_log()
    kw = {"min_events": 100, "min_users": 10}
    if change == "few_events":
        kw.pop("min_events")
    elif change == "short_span":
        t = t.max() - (t.max() - t) // 100_000  # the same order squeezed into a few minutes
    elif change == "few_users":
        kw.pop("min_users")
    else:
        t = np.full_like(t, t.max())
    choice = choose_popularity_window(u, i, t, n_items=30, **kw)
    assert choice["window_days"] is None and "grid" not in choice
    assert re.search(reason, choice["reason"]), choice["reason"]


def test_window_choice_refuses_bad_arguments():
    u, i, t = seven_day_log()
    with pytest.raises(ValueError, match=r"`newest_fraction` must be in \(0, 1\), got 1.5"):
        choose_popularity_window(u, i, t, n_items=30, newest_fraction=1.5)
    with pytest.raises(ValueError, match=r"`windows_days` must be positive days or None"):
        choose_popularity_window(u, i, t, n_items=30, windows_days=(0, None))
