"""Hot reload: zero failed requests while the model swaps, versions never go backwards per client, a broken
bundle is refused while the old one keeps serving, and admin reload / rollback."""

from __future__ import annotations

import threading
import time

import grpc
from test_server_helpers import code_of, running_server, write_fake_version

from recsys.v1 import recommender_pb2 as pb
from recsys.v1 import recommender_pb2_grpc as pb_grpc

AUTH = [("authorization", "Bearer s3cret")]


def _wait(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return False


def test_hot_reload_under_load_then_refuse_broken_bundle(tmp_path):
    write_fake_version(tmp_path, "v1", seed=1)
    with running_server(tmp_path, poll_s=0.05) as (app, target), grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        stop = threading.Event()
        seen: list[list[str]] = [[] for _ in range(4)]
        failures: list[str] = []

        def client(i: int) -> None:
            while not stop.is_set():
                try:
                    resp = stub.Recommend(pb.RecommendRequest(user_id=f"u{i}", k=5), timeout=5)
                    seen[i].append(resp.model_version)
                    if len(resp.items) != 5:
                        failures.append(f"{len(resp.items)} items")
                except grpc.RpcError as e:
                    failures.append(e.code().name)

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        try:
            assert _wait(lambda: all(len(s) >= 5 for s in seen))
            write_fake_version(tmp_path, "v2", seed=2)  # publish: directory first, then LATEST
            assert _wait(lambda: all(s and s[-1] == "v2" for s in seen)), "watcher never switched to v2"
            n_before = [len(s) for s in seen]
            assert _wait(lambda: all(len(s) >= n + 5 for s, n in zip(seen, n_before, strict=True)))
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert failures == []
        order = {"v1": 1, "v2": 2}
        for s in seen:  # a client never sees the old model after the new one
            ranks = [order[v] for v in s]
            assert ranks == sorted(ranks) and ranks[0] == 1 and ranks[-1] == 2

        # a corrupted bundle is refused, logged and counted; v2 keeps serving; it is not retried every poll
        broken = write_fake_version(tmp_path, "v3", seed=3, latest=False)
        (broken / "fake.json").write_text("{not json")
        (tmp_path / "LATEST").write_text("v3\n")
        reloads = app.metrics.registry.get_sample_value
        assert _wait(lambda: reloads("recsys_model_reloads_total", {"result": "refused"}) == 1.0)
        time.sleep(0.3)  # several more polls
        assert reloads("recsys_model_reloads_total", {"result": "refused"}) == 1.0
        assert reloads("recsys_model_reloads_total", {"result": "ok"}) == 2.0
        assert reloads("recsys_model_version_info", {"version": "v2"}) == 1.0
        assert stub.Recommend(pb.RecommendRequest(user_id="u1", k=3)).model_version == "v2"
        admin = pb_grpc.RecommenderAdminStub(ch)
        code, details = code_of(admin.ReloadModel, pb.ReloadModelRequest(version="v3"), metadata=AUTH)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "'v3'" in details
        assert stub.Recommend(pb.RecommendRequest(user_id="u1", k=3)).model_version == "v2"


def test_admin_reload_named_version_and_list(tmp_path):
    write_fake_version(tmp_path, "v1", seed=1)
    write_fake_version(tmp_path, "v2", seed=2)
    with running_server(tmp_path) as (_app, target), grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        admin = pb_grpc.RecommenderAdminStub(ch)
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).version == "v2"
        r = admin.ReloadModel(pb.ReloadModelRequest(version="v1"), metadata=AUTH)  # rollback
        assert (r.previous_version, r.version, r.changed) == ("v2", "v1", True)
        r = admin.ReloadModel(pb.ReloadModelRequest(version="v1"), metadata=AUTH)
        assert (r.version, r.changed) == ("v1", False)
        assert stub.Recommend(pb.RecommendRequest(user_id="u1", k=3)).model_version == "v1"
        listed = admin.ListModels(pb.ListModelsRequest(), metadata=AUTH)
        assert listed.serving_version == "v1"
        # newest first, as the proto says
        assert [(m.version, m.latest, m.serving) for m in listed.models] == [("v2", True, False), ("v1", False, True)]
        code, _ = code_of(admin.ReloadModel, pb.ReloadModelRequest(version="v9"), metadata=AUTH)
        assert code == grpc.StatusCode.NOT_FOUND
        code, details = code_of(admin.ReloadModel, pb.ReloadModelRequest(version="../etc"), metadata=AUTH)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "`version`" in details
