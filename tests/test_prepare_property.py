"""Property: `prepare` never loses or duplicates an interaction.

For random small logs (bad rows, repeated pairs, unweighted events, k-core, every split), the manifest accounts for
every input row per reason, and each count matches an independent pure-Python computation.
"""

from __future__ import annotations

import csv
import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recsys.core import schema
from recsys.prepare import PrepareConfig, prepare, read_tables

EVENT_WEIGHTS = {"view": 1.0, "click": 2.0, "hover": 0.0}  # "share" is unlisted, hover weighs 0

row_st = st.tuples(
    st.sampled_from(["u1", "u2", "u3", "u4", "u5", None]),
    st.sampled_from(["a", "b", "c", "d", "e", "f", None]),
    st.one_of(st.integers(1_600_000_000, 1_600_000_040), st.sampled_from([None, "bad"])),
    st.sampled_from(["view", "view", "click", "hover", "share", None]),
)


def reference_kcore(pairs: set[tuple[str, str]], ku: int, ki: int) -> set[tuple[str, str]]:
    pairs = set(pairs)
    while True:
        cu = Counter(u for u, _ in pairs)
        ci = Counter(i for _, i in pairs)
        nxt = {(u, i) for u, i in pairs if cu[u] >= ku and ci[i] >= ki}
        if nxt == pairs:
            return pairs
        pairs = nxt


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.lists(row_st, min_size=1, max_size=40),
    dedupe=st.sampled_from(["first", "last", "sum"]),
    kcore=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    split=st.sampled_from(["last_fraction", "last_n", "global_time"]),
    drop_cold=st.booleans(),
)
def test_every_input_row_is_accounted_for(rows, dedupe, kcore, split, drop_cold):
    tmp = Path(tempfile.mkdtemp(prefix="prep-prop-"))
    try:
        log = tmp / "log.csv"
        with log.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["user_id", "item_id", "timestamp", "event"])
            for r in rows:
                w.writerow(["" if v is None else v for v in r])
        cfg = PrepareConfig(on_bad_rows="skip", event_weights=EVENT_WEIGHTS, dedupe=dedupe, kcore_users=kcore[0],
                            kcore_items=kcore[1], split=split, drop_cold=drop_cold, valid_frac=0.2, test_frac=0.2)
        # independent accounting
        rejected: Counter[str] = Counter()
        good = []
        for u, i, t, ev in rows:
            if u is None:
                rejected["null_user"] += 1
            elif i is None:
                rejected["null_item"] += 1
            elif t is None:
                rejected["null_time"] += 1
            elif t == "bad":
                rejected["bad_time"] += 1
            elif ev is None:
                rejected["null_event"] += 1
            else:
                good.append((u, i, t, ev))
        filtered: Counter[str] = Counter()
        kept_events = []
        for u, i, t, ev in good:
            if ev not in EVENT_WEIGHTS:
                filtered["unlisted_event"] += 1
            elif EVENT_WEIGHTS[ev] <= 0:
                filtered["nonpositive_weight"] += 1
            else:
                kept_events.append((u, i, t))
        pairs = {(u, i) for u, i, _ in kept_events}
        core = reference_kcore(pairs, *kcore)

        try:
            man = prepare([log], tmp / "out", config=cfg)
        except ValueError as e:
            # legitimate only when nothing survives, and the reference must agree
            assert "no interaction is left" in str(e) or "left no interaction" in str(e), e
            assert not core or (drop_cold and "is cold" in str(e))
            return

        r = man["rows"]
        assert r["rejected"] == dict(rejected)
        assert {k: v for k, v in r["filtered"].items() if k in ("unlisted_event", "nonpositive_weight") and v} == \
            dict(filtered)
        assert r["deduplicated"] == len(kept_events) - len(pairs)
        assert r["filtered"]["kcore_users"] + r["filtered"]["kcore_items"] == len(pairs) - len(core)
        assert r["kept"] == len(core)  # cold valid/test rows are kept, in the extra split
        assert r["extra"] == sum(r["extra_reasons"].values()) and (drop_cold or not r["extra"])
        assert r["input"] == len(rows) == (r["kept"] + r["deduplicated"] + sum(r["filtered"].values())
                                           + sum(r["rejected"].values()))
        assert r["kept"] == r["train"] + r["valid"] + r["test"] + r["extra"]

        data = read_tables(tmp / "out")
        users, items = data["users"][schema.USER_ID], data["items"][schema.ITEM_ID]
        out_pairs = []
        for s in ("train", "valid", "test", "extra"):
            out_pairs += [(users[u], items[i]) for u, i in data[s].select(schema.USER_IDX, schema.ITEM_IDX).iter_rows()]
        assert len(out_pairs) == len(set(out_pairs)) == r["kept"]  # no pair twice, across all splits
        assert set(out_pairs) <= core
        if r["rejected"]:
            assert data["rejects"].height == sum(r["rejected"].values())
        # no leakage in time: per user, train <= valid <= test
        frames = {s: data[s].group_by(schema.USER_IDX).agg(pl.col(schema.TS).min().alias("lo"),
                                                             pl.col(schema.TS).max().alias("hi"))
                  for s in ("train", "valid", "test")}
        for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
            j = frames[a].join(frames[b], on=schema.USER_IDX, suffix="_b")
            assert (j["hi"] <= j["lo_b"]).all(), (a, b)
        json.dumps(man)  # the manifest is plain JSON
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
