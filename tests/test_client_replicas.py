"""RecommenderClient over several replicas: real in-process servers on free ports serving the same fake bundle.

Requests are counted on each server through its own Prometheus registry (``recsys_requests_total`` by method and
code), so "which replica answered" is read from the servers, not inferred by the client.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time

import grpc
import pytest
from test_server_helpers import running_server, write_fake_version

from recsys.cli import main
from recsys.client import RecommenderClient, RecommenderError, RetryBudget, channel_target, service_config


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("models")
    write_fake_version(d, "v1", seed=1)
    return d


@pytest.fixture(scope="module")
def pair(models):
    """Two replicas serving v1, shared by the tests that do not stop one: (a, "127.0.0.1:PORT", b, ...)."""
    with running_server(models) as (a, ta), running_server(models) as (b, tb):
        yield a, ta, b, tb


def answered(app, code: str | None = None) -> int:
    """Recommend calls this server answered (with ``code``, or any)."""
    return int(sum(
        s.value for m in app.metrics.registry.collect() for s in m.samples
        if s.name == "recsys_requests_total" and s.labels["method"] == "Recommend"
        and (code is None or s.labels["code"] == code)
    ))


def wait_until(cond, *, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached within the deadline")
        time.sleep(0.01)


# ------------------------------------------------------------------------------------------------ target forms


def test_channel_target_forms():
    assert channel_target("10.0.0.1:50051, 10.0.0.2:50051") == "ipv4:10.0.0.1:50051,10.0.0.2:50051"
    assert channel_target(["10.0.0.1:1", "10.0.0.2:2"]) == "ipv4:10.0.0.1:1,10.0.0.2:2"
    assert channel_target("[::1]:1,[fe80::2]:2") == "ipv6:[::1]:1,[fe80::2]:2"
    for as_given in ("localhost:50051", "dns:///recsys-headless.recsys.svc.cluster.local:50051",
                     "ipv4:10.0.0.1:1,10.0.0.2:1", "unix:///tmp/recsys.sock"):
        assert channel_target(as_given) == as_given
    assert channel_target(["localhost:50051"]) == "localhost:50051"  # one address: as given, names allowed
    with pytest.raises(ValueError, match=r"`target`.*'localhost:2'.*dns:///NAME:PORT"):
        channel_target("10.0.0.1:1,localhost:2")  # a name in a list would be resolved once and go stale
    with pytest.raises(ValueError, match="`target`: every address .* got '10.0.0.2'"):
        channel_target("10.0.0.1:1,10.0.0.2")  # no port
    with pytest.raises(ValueError, match="all IPv4 or all IPv6"):
        channel_target("10.0.0.1:1,[::1]:1")
    with pytest.raises(ValueError, match="separated by commas"):
        channel_target("10.0.0.1:1,")
    with pytest.raises(ValueError, match="`tls_server_name`"):
        RecommenderClient("10.0.0.1:1,10.0.0.2:1", tls_ca=True)


def test_service_config_balances_retries_and_budgets():
    cfg = json.loads(service_config())
    assert cfg["loadBalancingConfig"] == [{"round_robin": {}}]
    assert cfg["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert cfg["retryThrottling"] == {"maxTokens": 100, "tokenRatio": 0.1}
    assert "hedgingPolicy" not in cfg["methodConfig"][0]
    assert json.loads(service_config(load_balancing="pick_first"))["loadBalancingConfig"] == [{"pick_first": {}}]
    assert "retryThrottling" not in json.loads(service_config(retry_budget=None))
    assert "retryThrottling" not in json.loads(service_config(max_attempts=1))  # nothing to throttle
    with pytest.raises(ValueError, match="`load_balancing` .* got 'random'"):
        service_config(load_balancing="random")
    with pytest.raises(ValueError, match="`max_tokens`"):
        RetryBudget(max_tokens=0)
    with pytest.raises(ValueError, match="`token_ratio`"):
        RetryBudget(token_ratio=0)


# ------------------------------------------------------------------------------------------------ two replicas


def test_round_robin_spreads_calls_and_pick_first_does_not(pair):
    a, ta, b, tb = pair
    before = answered(a), answered(b)
    with RecommenderClient(f"{ta},{tb}") as client:
        assert client.target == f"ipv4:{ta},{tb}"
        for _ in range(200):
            assert client.recommend("u5", k=3).model_version == "v1"
    on_a, on_b = answered(a) - before[0], answered(b) - before[1]
    # round_robin takes the connected replicas in turn: about 100 each (a few more on the first to connect)
    assert on_a >= 60 and on_b >= 60 and on_a + on_b == 200
    before = answered(a), answered(b)
    with RecommenderClient([ta, tb], load_balancing="pick_first") as client:
        for _ in range(100):
            client.recommend("u5", k=3)
    # one replica only (which one is the channel's: it may try both and keep the first that is ready)
    assert sorted((answered(a) - before[0], answered(b) - before[1])) == [0, 100]


@pytest.mark.parametrize("grace", [1.0, 0.0], ids=["drained", "abrupt"])
def test_calls_keep_succeeding_while_replicas_stop(models, grace):
    """Four callers over five replicas; four of them stop in turn mid-load, drained (``stop(grace)``, what
    SIGTERM does) or abrupt (``stop(0)``). No call fails: those in flight on a stopping replica, or that reached it
    as it stopped, end UNAVAILABLE or CANCELLED and are retried on another one; new calls go to the survivors.
    Without retrying CANCELLED, about one stop in three lost a call here (drained ones too), so four stops catch
    it most of the time; UNAVAILABLE is pinned deterministically by the tests below."""
    with contextlib.ExitStack() as stack:
        replicas = [stack.enter_context(running_server(models)) for _ in range(5)]
        apps = [app for app, _ in replicas]
        client = stack.enter_context(RecommenderClient([t for _, t in replicas], timeout=5.0))
        failures: list[grpc.StatusCode] = []
        after_stops = [0]  # successful calls started after the last stop returned
        all_stopped, done = threading.Event(), threading.Event()

        def caller() -> None:
            while not done.is_set():
                was_stopped = all_stopped.is_set()
                try:
                    client.recommend("u5", k=3)
                except RecommenderError as e:
                    failures.append(e.code)
                else:
                    if was_stopped:
                        after_stops[0] += 1  # a lost increment under the GIL race only makes the loop longer

        threads = [threading.Thread(target=caller) for _ in range(4)]
        for t in threads:
            t.start()
        try:
            for victim in apps[1:]:
                seen = answered(victim)
                wait_until(lambda v=victim, n=seen: answered(v) >= n + 20)  # it takes its share until it goes
                victim.stop(grace).wait(5)
            all_stopped.set()
            on_survivor = answered(apps[0])
            wait_until(lambda: after_stops[0] >= 200, timeout=10)
        finally:
            done.set()
            for t in threads:
                t.join(10)
        assert failures == []
        assert answered(apps[0]) - on_survivor >= 200  # everything after the stops went to the survivor


def test_call_cut_off_by_a_stopping_replica_is_retried_on_the_other(models, tmp_path):
    """A slow call is still running on replica ``slow`` when its grace runs out: the server cuts it off
    (UNAVAILABLE "Cancelling all calls"), and the read is retried on the other replica, which answers with its
    own version."""
    write_fake_version(tmp_path, "slow", delay_s=3.0)
    with running_server(models) as (_a, ta), running_server(tmp_path, warmup_queries=0) as (slow, ts):
        index = slow.store.current.index
        entered, search = threading.Event(), index.search

        def traced(*args, **kwargs):
            entered.set()
            return search(*args, **kwargs)

        index.search = traced
        result: list[object] = []
        with RecommenderClient([ts, ta], load_balancing="pick_first", timeout=10.0) as client:
            caller = threading.Thread(target=lambda: result.append(_outcome(client)))
            caller.start()
            assert entered.wait(5)  # the call is running on `slow`
            slow.stop(0.1)
            caller.join(10)
        assert result == ["v1"]


def _outcome(client: RecommenderClient) -> str:
    try:
        return client.recommend("u5", k=3).model_version
    except RecommenderError as e:
        return e.code.name


def test_unavailable_replica_is_retried_on_the_other(models, tmp_path):
    """A replica without a model answers UNAVAILABLE: round_robin + the retry policy send the call on to the
    other replica, so no caller sees it; without retries about half the calls fail (the check can fail)."""
    with running_server(models) as (a, ta), running_server(tmp_path) as (empty, te):
        with RecommenderClient(f"{ta},{te}") as client:
            for _ in range(40):
                assert client.recommend("u5", k=3).model_version == "v1"
        assert answered(empty, "UNAVAILABLE") >= 10 and answered(a, "OK") == 40
        failed = 0
        with RecommenderClient(f"{ta},{te}", max_attempts=1) as client:
            for _ in range(40):
                try:
                    client.recommend("u5", k=3)
                except RecommenderError as e:
                    assert e.code == grpc.StatusCode.UNAVAILABLE
                    failed += 1
        assert 10 <= failed <= 30


def test_retry_budget_stops_retries_when_everything_fails(tmp_path):
    """5 calls to a replica that only answers UNAVAILABLE, 4 attempts each: 20 attempts unthrottled. With a
    10-token budget a failed attempt takes a token and retries stop at 5 tokens left: the first call makes 4
    attempts (10 -> 6 tokens), the next one 1 (-> 5, not retried), and so on: 4 + 4 = 8."""
    with running_server(tmp_path) as (empty, target):
        for budget, want in ((None, 20), (RetryBudget(max_tokens=10, token_ratio=0.1), 8)):
            before = answered(empty)
            with RecommenderClient(target, retry_budget=budget) as client:
                for _ in range(5):
                    with pytest.raises(RecommenderError) as e:
                        client.recommend("u5", k=3)
                    assert e.value.code == grpc.StatusCode.UNAVAILABLE
            assert answered(empty) - before == want, budget


def test_dns_target_and_query_cli_take_the_same_targets(pair, capsys):
    a, ta, b, tb = pair
    port = ta.rsplit(":", 1)[1]
    before = answered(a), answered(b)
    with RecommenderClient(f"dns:///localhost:{port}") as client:
        assert client.target == f"dns:///localhost:{port}"
        for _ in range(3):
            assert client.recommend("u5", k=3).model_version == "v1"
    assert (answered(a) - before[0], answered(b) - before[1]) == (3, 0)
    for target in (f"dns:///localhost:{port}", f"{ta},{tb}"):
        assert main(["query", "recommend", "--target", target, "--user", "u5", "-k", "3"]) == 0
        assert len(json.loads(capsys.readouterr().out)["items"]) == 3
    assert main(["query", "info", "--target", f"{ta},{tb}", "--load-balancing", "pick_first"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == "v1"
    assert main(["query", "info", "--target", f"{ta},localhost:{port}"]) == 2
    assert "dns:///NAME:PORT" in capsys.readouterr().err
