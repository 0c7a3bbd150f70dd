"""benchmarks/rollout_bench.py, short: two ``recsys serve`` replicas under 8 callers while LATEST flips 4 times, A
is restarted after SIGTERM and B after SIGKILL; no failed call, k items, both versions, no caller going back.

The version rule itself (:func:`rollout_bench.check_versions`) is pinned first on hand-made sequences, so the
end-to-end test's "nothing went back" is a check that can fail.
"""

from __future__ import annotations

import importlib.util
import signal
import sys
from pathlib import Path

import pytest

test_bundle = pytest.importorskip("test_bundle")  # the tiny clustered dataset + training run, built once

_BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "rollout_bench.py"
_spec = importlib.util.spec_from_file_location("rollout_bench", _BENCH)
rb = importlib.util.module_from_spec(_spec)
sys.modules["rollout_bench"] = rb  # dataclasses look their module up here
_spec.loader.exec_module(rb)

Call, Flip = rb.Call, rb.Flip


def ok(t: float, version: str) -> Call:
    return Call(t, t + 0.002, "OK", version, 10)


# LATEST: v1 from the start, v2 written within [5.0, 5.1], back to v1 within [10.0, 10.1]; lag 1 s, so v1 may be
# served until 6.1 and v2 from 5.0 until 11.1
FLIPS = [Flip(5.0, 5.1, "v2"), Flip(10.0, 10.1, "v1")]


def check(*calls: Call) -> dict:
    return rb.check_versions(calls, "v1", FLIPS, lag_s=1.0)


def test_version_check_allows_the_reload_window_and_latest_going_back():
    # mid-reload the replicas disagree: a round-robin caller alternates old/new until both have swapped
    assert check(ok(1, "v1"), ok(5.3, "v2"), ok(5.5, "v1"), ok(5.9, "v2"), ok(8, "v2")) == {"went_back": [],
                                                                                            "stale": []}
    # LATEST itself went back to v1 at 10: v2 -> v1 after it is a rollback, not a regression
    assert check(ok(9, "v2"), ok(10.05, "v1"), ok(10.6, "v2"), ok(12, "v1")) == {"went_back": [], "stale": []}
    # a failed call has no version and breaks nothing
    assert check(ok(8, "v2"), Call(9, 9.5, "UNAVAILABLE", "", 0), ok(9.6, "v2")) == {"went_back": [], "stale": []}


def test_version_check_flags_going_back_and_stale_answers():
    # v2 -> v1 at t=8: LATEST had named v2 since 5.1 (+1 s lag): a regression
    assert check(ok(6, "v2"), ok(8, "v1"))["went_back"] == [{"t": 8, "from": "v2", "to": "v1"}]
    # still v1 at 9.5, though v1 stopped being LATEST at 5.1 and the flip back only comes at 10
    assert check(ok(9, "v2"), ok(9.5, "v1"))["went_back"] == [{"t": 9.5, "from": "v2", "to": "v1"}]
    # v2 before it was ever written is just as wrong
    assert check(ok(1, "v1"), ok(4, "v2"))["went_back"] == [{"t": 4, "from": "v1", "to": "v2"}]
    # a replica stuck on v1 long after the flip: no switch, but stale (reported apart)
    assert check(ok(1, "v1"), ok(7, "v1")) == {"went_back": [], "stale": [{"t": 7, "from": "v1", "to": "v1"}]}


def test_summary_attributes_failures_to_phases_and_fails_its_targets():
    marks = [("steady", 0.0), ("flips", 2.0), ("sigterm-restart", 4.0), ("sigkill-restart", 6.0)]
    callers = [
        [ok(1, "v1"), Call(4.5, 4.6, "UNAVAILABLE", "", 0), ok(6.5, "v1")],
        [Call(3.9, 4.2, "DEADLINE_EXCEEDED", "", 0), Call(6.3, 6.4, "UNAVAILABLE", "", 0), Call(7, 7.1, "OK", "v1", 9)],
    ]
    s = rb.summarize(callers, "v1", [], marks, 8.0, k=10, lag_s=1.0)
    assert (s["calls"], s["failed"]) == (6, 3)
    assert s["failures_by_code"] == {"UNAVAILABLE": 2, "DEADLINE_EXCEEDED": 1}
    assert s["failures_by_phase"] == {"steady": {}, "flips": {}, "sigterm-restart": {"UNAVAILABLE": 1,
                                                                                    "DEADLINE_EXCEEDED": 1},
                                      "sigkill-restart": {"UNAVAILABLE": 1}}
    assert s["sigterm_attributable_failures"] == 2  # the one that started at 3.9 overlaps the restart too
    assert s["wrong_k"] == 1
    assert s["targets"] == {"failed_share_le_0.1%": False, "no_failure_from_sigterm_restart": False,
                            "every_answer_has_k_items": False, "both_versions_answered": False,
                            "no_caller_version_goes_back": True}


@pytest.fixture(scope="module")
def two_versions(tmp_path_factory):
    """v1 and v2 exported from the tiny training run (same weights, two published versions), LATEST = v1."""
    from recsys.bundle import Bundle
    from recsys.publish import export, set_latest

    _data, run = test_bundle.trained(tmp_path_factory)
    models = tmp_path_factory.mktemp("rollout_models")
    for v in ("v1", "v2"):
        export(run, models, index_cfg=test_bundle.index_cfg(), version=v, evaluate_split=None)
    set_latest(models, "v1")
    return models, ["v1", "v2"], Bundle.load(models / "v1").user_ids.tolist()


def test_rollout_flips_and_restarts_under_load(two_versions, tmp_path):
    models, versions, users = two_versions
    # lag bound 0.2 + 1.0 s (reloads of this bundle measured 0.2-0.4 s on 2 busy cores); flips 2 s apart, so each
    # epoch has 0.8 s in which only its own version may answer
    schedule = rb.Schedule(steady_s=1.0, flips=4, flip_every_s=2.0, restart_s=1.5, duration_s=0.0)
    s = rb.run_rollout(models, versions, users, workdir=tmp_path, schedule=schedule, callers=8, k=10, poll_s=0.2,
                       grace_s=3.0, reload_s=1.0)
    report = {key: s[key] for key in ("calls", "failures_by_phase", "versions_seen", "went_back_examples",
                                      "stale_examples", "reload_lag_s")}
    assert s["calls"] >= 2000, report  # the load really ran (thousands of calls per second here)
    assert [p["phase"] for p in s["timeline"]["phases"]] == list(rb.PHASES)
    events = s["timeline"]["events"]
    assert events["sigterm_exit_status"] == 0  # drained and exited cleanly
    assert events["sigkill_exit_status"] == -signal.SIGKILL
    assert len(s["timeline"]["flips"]) == 4
    assert s["failed_share"] <= 0.001, report
    assert s["sigterm_attributable_failures"] == 0, report
    assert s["wrong_k"] == 0
    assert set(s["versions_seen"]) == {"v1", "v2"}, report
    assert s["went_back"] == 0, report
    assert all(s["targets"].values()), s["targets"]
