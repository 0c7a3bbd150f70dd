"""The live catalogue (issue #18) on a real exported bundle: upsert / update / retire through the admin RPCs and the
delta in the models directory, attribute filters, restarts and replicas, refused deltas, the admin token.

The bundle is test_bundle's tiny clustered one: items i0..i63, cluster c = rows [16c, 16c + 16), attribute
``category`` = space / cooking / football / piano for clusters 0..3; users u0..u159, 40 per cluster.
"""

from __future__ import annotations

import json
import shutil
import time

import grpc
import numpy as np
import pytest
from test_server_helpers import code_of, running_server

from recsys.catalogue.delta import CatalogueLog, catalogue_dir
from recsys.catalogue.filters import Attributes, Condition, ItemFilter, parse_filter
from recsys.catalogue.live import LiveIndex, live_bundle
from recsys.retrieval import ExactIndex, HnswIndex, bitset, merge_topk, native_available
from recsys.v1 import recommender_pb2 as pb
from recsys.v1 import recommender_pb2_grpc as pb_grpc

test_bundle = pytest.importorskip("test_bundle")

AUTH = [("authorization", "Bearer s3cret")]
CATEGORIES = ["space", "cooking", "football", "piano"]


@pytest.fixture()
def models(tmp_path_factory, tmp_path):
    """A fresh models directory holding the exported tiny bundle as version v1 (LATEST)."""
    from recsys.publish import export

    _data, run = test_bundle.trained(tmp_path_factory)
    out = tmp_path / "models"
    export(run, out, index_cfg=test_bundle.index_cfg(), version="v1")
    return out


def _loader():
    from server.store import default_loader

    return default_loader


def _cluster_of(item_id: str) -> int:
    return int(item_id[1:]) // test_bundle.ITEMS_PER_CLUSTER


def _user(cluster: int, j: int = 0) -> str:
    return f"u{cluster * test_bundle.USERS_PER_CLUSTER + j}"


def _item(item_id: str, category: str) -> pb.ItemRecord:
    return pb.ItemRecord(item_id=item_id, attributes={"category": pb.StringSet(values=[category])})


def _ids(resp) -> list[str]:
    return [it.item_id for it in resp.items]


def _recommended_to(stub, item_id: str, cluster: int, users: int = 8) -> bool:
    """For at least 3/4 of ``users`` users of ``cluster``, ``item_id`` is in the answer ahead of every item of the
    other clusters: it ranks with the cluster's own items (each user has only a few of them left unseen)."""
    hits = []
    for j in range(users):
        got = _ids(stub.Recommend(pb.RecommendRequest(user_id=_user(cluster, j), k=50)))
        foreign = [p for p, t in enumerate(got) if t.startswith("i") and _cluster_of(t) != cluster]
        hits.append(item_id in got and got.index(item_id) < min(foreign, default=50))
    return float(np.mean(hits)) >= 0.75


def test_upsert_update_retire_through_the_server(models):
    with running_server(models, loader=_loader(), max_k=50) as (_app, target), grpc.insecure_channel(target) as ch:
        stub, admin = pb_grpc.RecommenderStub(ch), pb_grpc.RecommenderAdminStub(ch)
        before = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (before.catalogue_size, before.catalogue_seq, list(before.attributes)) == (64, 0, ["category"])

        # a new item, "cooking" (cluster 1): embedded from its features alone, served at once to cluster-1 users
        resp = admin.UpsertItems(pb.UpsertItemsRequest(items=[_item("new1", "cooking")], change_id="c1"),
                                 metadata=AUTH)
        assert (resp.added, resp.updated, resp.applied, resp.catalogue_seq, resp.model_version) == (1, 0, True, 1, "v1")
        assert _recommended_to(stub, "new1", 1)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.catalogue_size, info.upserted_items, info.retired_items, info.catalogue_seq) == (65, 1, 0, 1)
        emb = stub.GetItemEmbeddings(pb.GetItemEmbeddingsRequest(item_ids=["new1"]))
        assert not emb.unknown_ids and abs(np.linalg.norm(emb.embeddings[0].values) - 1) < 1e-4
        sim = stub.SimilarItems(pb.SimilarItemsRequest(item_id="new1", k=5))
        assert np.mean([_cluster_of(t) == 1 for t in _ids(sim)]) >= 0.6

        # the same change ID again: answered from the delta, applied once
        again = admin.UpsertItems(pb.UpsertItemsRequest(items=[_item("new1", "cooking")], change_id="c1"),
                                  metadata=AUTH)
        assert (again.applied, again.catalogue_seq) == (False, 1)
        assert len(list(catalogue_dir(models, "v1").glob("*.json"))) == 1

        # an update moves it: now "piano" (cluster 3)
        upd = admin.UpsertItems(pb.UpsertItemsRequest(items=[_item("new1", "piano")]), metadata=AUTH)
        assert (upd.added, upd.updated, upd.catalogue_seq) == (0, 1, 2)
        assert _recommended_to(stub, "new1", 3) and not _recommended_to(stub, "new1", 1)

        # unknown values are reported (and encoded as missing); unknown attributes refused, naming the attribute
        odd = admin.UpsertItems(pb.UpsertItemsRequest(items=[_item("new2", "gardening")]), metadata=AUTH)
        assert [(u.item_id, u.attribute, u.value) for u in odd.unknown_values] == [("new2", "category", "gardening")]
        bad = pb.UpsertItemsRequest(items=[pb.ItemRecord(item_id="new3", attributes={"colour": pb.StringSet(
            values=["red"])})])
        code, details = code_of(admin.UpsertItems, bad, metadata=AUTH)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "colour" in details

        # retire a trained item that cluster-0 users get first, and the new one: gone from every RPC
        user = _user(0, 1)
        top = _ids(stub.Recommend(pb.RecommendRequest(user_id=user, k=5)))
        gone = top[0]
        ret = admin.RetireItems(pb.RetireItemsRequest(item_ids=[gone, "new1", "nope"]), metadata=AUTH)
        assert (ret.retired, list(ret.unknown_item_ids)) == (2, ["nope"])
        assert gone not in _ids(stub.Recommend(pb.RecommendRequest(user_id=user, k=50)))
        assert all(gone not in _ids(r) and "new1" not in _ids(r) for r in stub.BatchRecommend(
            pb.BatchRecommendRequest(user_ids=[_user(c, 2) for c in range(4)], k=50)).results)
        assert gone not in _ids(stub.SimilarItems(pb.SimilarItemsRequest(item_id=top[1], k=50)))
        fb = stub.Recommend(pb.RecommendRequest(user_id="stranger", k=50, allow_fallback=True))
        assert fb.fallback and gone not in _ids(fb) and len(fb.items) == 50
        # a retired item is still accepted as history and as SimilarItems' query item
        hist = stub.Recommend(pb.RecommendRequest(history_item_ids=[gone], k=5))
        assert not hist.unknown_item_ids and len(hist.items) == 5 and gone not in _ids(hist)
        assert len(stub.SimilarItems(pb.SimilarItemsRequest(item_id=gone, k=5)).items) == 5
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.catalogue_size, info.retired_items, info.catalogue_seq) == (64, 2, 4)

        # an upsert restores a retired item
        admin.UpsertItems(pb.UpsertItemsRequest(items=[_item("new1", "piano")]), metadata=AUTH)
        assert _recommended_to(stub, "new1", 3)

    # a restart (same models directory) serves the same catalogue
    with running_server(models, loader=_loader(), max_k=50) as (_app, target), grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.catalogue_seq, info.retired_items, info.catalogue_size) == (5, 1, 65)
        assert gone not in _ids(stub.Recommend(pb.RecommendRequest(user_id=user, k=50)))
        assert _recommended_to(stub, "new1", 3)


def test_two_replicas_agree_after_the_poll_interval(models):
    with running_server(models, loader=_loader(), poll_s=0.1) as (_a, t1), \
            running_server(models, loader=_loader(), poll_s=0.1) as (_b, t2), \
            grpc.insecure_channel(t1) as c1, grpc.insecure_channel(t2) as c2:
        s1, s2 = pb_grpc.RecommenderStub(c1), pb_grpc.RecommenderStub(c2)
        pb_grpc.RecommenderAdminStub(c1).UpsertItems(pb.UpsertItemsRequest(items=[_item("new1", "football")]),
                                                     metadata=AUTH)
        pb_grpc.RecommenderAdminStub(c1).RetireItems(pb.RetireItemsRequest(item_ids=["i33"]), metadata=AUTH)
        deadline = time.monotonic() + 10
        while s2.GetModelInfo(pb.GetModelInfoRequest()).catalogue_seq < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        req = pb.BatchRecommendRequest(user_ids=[_user(c, 3) for c in range(4)], k=20)
        a, b = s1.BatchRecommend(req), s2.BatchRecommend(req)
        assert [_ids(r) for r in a.results] == [_ids(r) for r in b.results]
        assert any("new1" in _ids(r) for r in b.results) and not any("i33" in _ids(r) for r in b.results)


def test_a_tampered_or_out_of_order_delta_is_refused_and_the_catalogue_stays(models):
    with running_server(models, loader=_loader(), poll_s=0.05) as (app, target), grpc.insecure_channel(target) as ch:
        stub, admin = pb_grpc.RecommenderStub(ch), pb_grpc.RecommenderAdminStub(ch)
        admin.RetireItems(pb.RetireItemsRequest(item_ids=["i1"]), metadata=AUTH)
        # another writer's record 2 arrives with its bytes edited (a retire of i2 turned into one of i3)
        log = CatalogueLog(models, "v1")
        log.append("retire", [{"item_id": "i2"}], dim=64)
        f = catalogue_dir(models, "v1") / "00000002.json"
        rec = json.loads(f.read_text())
        rec["items"] = [{"item_id": "i3"}]
        f.write_text(json.dumps(rec))
        time.sleep(0.5)  # several polls
        info = stub.GetModelInfo(pb.GetModelInfoRequest())
        assert (info.catalogue_seq, info.retired_items) == (1, 1)
        sample = app.metrics.registry.get_sample_value
        assert sample("recsys_catalogue_refused_total", {"reason": "checksum"}) >= 1
        got = _ids(stub.Recommend(pb.RecommendRequest(history_item_ids=["i0"], k=50)))
        assert "i1" not in got and "i3" in got

    # a delta whose record 1 is gone (out of order: it starts at 2) is refused at load: the bundle serves alone
    (catalogue_dir(models, "v1") / "00000001.json").unlink()
    with running_server(models, loader=_loader()) as (_app, target), grpc.insecure_channel(target) as ch:
        info = pb_grpc.RecommenderStub(ch).GetModelInfo(pb.GetModelInfoRequest())
        assert (info.catalogue_seq, info.catalogue_size) == (0, 64)


def test_items_command_changes_what_a_running_server_serves(models, tmp_path, capsys):
    from recsys.cli import main

    items = tmp_path / "new_items.csv"
    items.write_text("item_id,category\nnew9,football\nnew10,space\n")
    ids = tmp_path / "retire.txt"
    ids.write_text("i40\n\nnew10\n")
    with running_server(models, loader=_loader(), poll_s=0.1) as (_app, target), grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        assert main(["items", "upsert", "--models", str(models), "--items", str(items), "--change-id", "batch-1"]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (out["added"], out["updated"], out["seq"], out["version"]) == (2, 0, 1, "v1")
        assert main(["items", "retire", "--models", str(models), "--ids", str(ids)]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert (out["retired"], out["seq"]) == (2, 2)
        deadline = time.monotonic() + 10
        while stub.GetModelInfo(pb.GetModelInfoRequest()).catalogue_seq < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _recommended_to(stub, "new9", 2)
        got = _ids(stub.Recommend(pb.RecommendRequest(user_id=_user(2, 5), k=50)))
        assert "i40" not in got and "new10" not in got
        # a retry of the same batch changes nothing
        assert main(["items", "upsert", "--models", str(models), "--items", str(items), "--change-id", "batch-1"]) == 0
        assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["applied"] is False


def test_the_admin_token_guards_every_write(models):
    with running_server(models, loader=_loader()) as (_app, target), grpc.insecure_channel(target) as ch:
        admin = pb_grpc.RecommenderAdminStub(ch)
        for call, req in ((admin.UpsertItems, pb.UpsertItemsRequest(items=[_item("x", "space")])),
                          (admin.RetireItems, pb.RetireItemsRequest(item_ids=["i1"]))):
            for md in ((), [("authorization", "Bearer wrong")]):
                assert code_of(call, req, metadata=md)[0] == grpc.StatusCode.UNAUTHENTICATED
        assert not catalogue_dir(models, "v1").exists() or not list(catalogue_dir(models, "v1").glob("*.json"))


def test_filters_through_the_server(models):
    with running_server(models, loader=_loader(), max_k=50) as (_app, target), grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        space = pb.ItemFilter(all_of=[pb.AttributeCondition(attribute="category",
                                                            any_of=pb.StringSet(values=["space"]))])
        # a cluster-2 user filtered to "space": exactly k items, all from cluster 0 (none of them seen)
        resp = stub.Recommend(pb.RecommendRequest(user_id=_user(2), k=10, filter=space))
        assert len(resp.items) == 10 and all(_cluster_of(t) == 0 for t in _ids(resp))
        # exactly the 16 space items exist: k=20 gives 16
        assert len(stub.Recommend(pb.RecommendRequest(user_id=_user(2), k=20, filter=space)).items) == 16
        not_space = pb.ItemFilter(all_of=[pb.AttributeCondition(attribute="category",
                                                                none_of=pb.StringSet(values=["space", "piano"]))])
        batch = stub.BatchRecommend(pb.BatchRecommendRequest(user_ids=[_user(0), _user(3)], k=10, filter=not_space))
        assert all(_cluster_of(t) in (1, 2) for r in batch.results for t in _ids(r))
        assert all(len(r.items) == 10 for r in batch.results)
        sim = stub.SimilarItems(pb.SimilarItemsRequest(item_id="i20", k=5, filter=space))
        assert len(sim.items) == 5 and all(_cluster_of(t) == 0 for t in _ids(sim))
        fb = stub.Recommend(pb.RecommendRequest(user_id="stranger", k=5, allow_fallback=True, filter=space))
        assert fb.fallback and len(fb.items) == 5 and all(_cluster_of(t) == 0 for t in _ids(fb))
        bad = pb.ItemFilter(all_of=[pb.AttributeCondition(attribute="colour", any_of=pb.StringSet(values=["x"]))])
        code, details = code_of(stub.Recommend, pb.RecommendRequest(user_id=_user(0), k=5, filter=bad))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "'colour'" in details and "'category'" in details
        empty = pb.ItemFilter(all_of=[pb.AttributeCondition(attribute="category")])
        code, details = code_of(stub.Recommend, pb.RecommendRequest(user_id=_user(0), k=5, filter=empty))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "filter.all_of[0]" in details


def test_the_python_client_and_query_command(models, capsys):
    from recsys.cli import main
    from recsys.client import RecommenderClient

    with running_server(models, loader=_loader()) as (_app, target), \
            RecommenderClient(target, admin_token="s3cret") as client:
        rec = client.recommend(_user(1), k=5, filter=["category=piano"])
        assert len(rec.item_ids) == 5 and all(_cluster_of(t) == 3 for t in rec.item_ids)
        sim = client.similar_items("i3", k=3, filter=["category!=space"])
        assert all(_cluster_of(t) != 0 for t in sim.item_ids)
        up = client.upsert_items([{"item_id": "new5", "category": "space"}], change_id="client-1")
        assert (up["added"], up["applied"], up["catalogue_seq"]) == (1, True, 1)
        ret = client.retire_items(["new5", "ghost"])
        assert (ret["retired"], ret["unknown_item_ids"], ret["catalogue_seq"]) == (1, ["ghost"], 2)
        info = client.model_info()
        assert (info["catalogue_size"], info["upserted_items"], info["retired_items"]) == (64, 1, 1)
        with pytest.raises(TypeError, match="list of terms"):
            client.recommend(_user(1), filter="category=piano")
        assert main(["query", "recommend", "--target", target, "--user", _user(0), "-k", "4",
                     "--filter", "category=football"]) == 0
        got = json.loads(capsys.readouterr().out)
        assert len(got["items"]) == 4 and all(_cluster_of(it["item_id"]) == 2 for it in got["items"])


# ---- the pieces, on hand-made data -------------------------------------------------------------------------------


def _attributes() -> Attributes:
    # 6 items; genre multi-valued (codes: 1 comedy, 2 drama, 3 horror), year single-valued (1 "1985", 2 "1995",
    # 3 "2005", 4 "n/a"), kind single-valued with a missing value (0)
    genre = np.array([[1, 2], [2, 0], [3, 0], [1, 3], [0, 0], [2, 3]])
    year = np.array([1, 2, 3, 4, 2, 3])
    kind = np.array([1, 1, 2, 0, 2, 1])
    values = {"genre": {"comedy": 1, "drama": 2, "horror": 3}, "year": {"1985": 1, "1995": 2, "2005": 3, "n/a": 4},
              "kind": {"film": 1, "series": 2}}
    return Attributes({"genre": genre, "year": year, "kind": kind}, values, 6)


@pytest.mark.parametrize("terms, want", [
    (["genre=comedy"], [0, 3]),
    (["genre=comedy,horror"], [0, 2, 3, 5]),
    (["genre!=horror"], [0, 1, 4]),
    (["year>=1990"], [1, 2, 4, 5]),
    (["year<=1995"], [0, 1, 4]),
    (["year=1990..2000"], [1, 4]),
    (["genre=drama", "year>=2000"], [5]),
    (["kind=film"], [0, 1, 5]),
    (["kind!=film"], [2, 3, 4]),  # an item without a value satisfies none_of
    (["genre=western"], []),  # a value the bundle does not know matches nothing
])
def test_filters_on_every_attribute_kind(terms, want):
    words = _attributes().allowed(parse_filter(terms))
    assert bitset.ids(words).tolist() == want


def test_filter_errors_name_what_is_wrong():
    with pytest.raises(ValueError, match="'colour'.*'genre'"):
        _attributes().allowed(ItemFilter((Condition("colour", "any_of", ("red",)),)))
    with pytest.raises(ValueError, match="empty"):
        Condition("year", "range", low=2000, high=1990)
    with pytest.raises(ValueError, match="expected NAME"):
        parse_filter(["genre"])


def test_extended_attributes_encode_new_and_updated_items():
    # values are cleaned as prepare cleans them (stripped, blank list values dropped), the same rule as the encoder's
    a = _attributes().extended(8, np.array([1, 6]), [{"genre": [" horror", "western", " "]}, {"year": " 1995 "}])
    assert a.codes["genre"][1].tolist() == [3, 0] and a.codes["genre"][6].tolist() == [0, 0]
    assert a.codes["year"][6].tolist() == [2] and a.codes["year"][7].tolist() == [0]  # row 7: never upserted
    assert bitset.ids(a.allowed(parse_filter(["year=1995"]))).tolist() == [4, 6]


def test_merge_topk_keeps_the_best_k_of_both():
    ids, sc = merge_topk([(np.array([[3, 1, -1]]), np.array([[0.9, 0.5, -np.inf]], dtype=np.float32)),
                          (np.array([[7, 8, 9]]), np.array([[0.7, 0.6, 0.1]], dtype=np.float32))], 3)
    assert ids.tolist() == [[3, 7, 8]] and sc[0].tolist() == pytest.approx([0.9, 0.7, 0.6])
    # overlapping answers (an item in two partitions): counted once when asked, padded when short
    ids, sc = merge_topk([(np.array([[3, 1]]), np.array([[0.9, 0.5]], dtype=np.float32)),
                          (np.array([[3, -1]]), np.array([[0.9, -np.inf]], dtype=np.float32))], 3, unique=True)
    assert ids.tolist() == [[3, 1, -1]] and sc[0].tolist() == pytest.approx([0.9, 0.5, -np.inf])


@pytest.mark.parametrize("exclude_max", [4096, 0])  # masked graph rows as exclusions / as an allowed bitset
@pytest.mark.parametrize("native", [True, False])
def test_live_index_equals_exact_search_over_the_live_catalogue(native, exclude_max, monkeypatch):
    monkeypatch.setattr(LiveIndex, "EXCLUDE_MAX", exclude_max)
    if native and not native_available():
        pytest.skip("recsys._hnsw not built")
    rng = np.random.default_rng(0)
    n_base, dim = 2000, 16
    centers = rng.normal(size=(20, dim))
    base = centers[rng.integers(0, 20, n_base)] + 0.3 * rng.normal(size=(n_base, dim))
    base = (base / np.linalg.norm(base, axis=1, keepdims=True)).astype(np.float32)
    new = centers[rng.integers(0, 20, 50)] + 0.3 * rng.normal(size=(50, dim))
    new = (new / np.linalg.norm(new, axis=1, keepdims=True)).astype(np.float32)
    # 30 updated base rows + 20 new rows; 200 rows retired (some of them updated or new)
    delta_rows = np.concatenate([rng.choice(n_base, 30, replace=False), np.arange(n_base, n_base + 20)])
    n = n_base + 20
    live = np.ones(n, dtype=bool)
    live[rng.choice(n, 200, replace=False)] = False
    hnsw = HnswIndex(base, ef=200, native=native)
    index = LiveIndex(hnsw, n_items=n, live=bitset.from_mask(live), delta_rows=delta_rows, delta_vectors=new)
    full = np.concatenate([base, new[30:]])
    full[delta_rows[:30]] = new[:30]
    queries = full[rng.choice(n, 40)] + 0.1 * rng.normal(size=(40, dim)).astype(np.float32)
    allow_mask = rng.random(n) < 0.5
    excl = [rng.choice(n, 30, replace=False) for _ in range(40)]
    truth = ExactIndex(full[live], ids=np.flatnonzero(live))
    for allow in (None, bitset.from_mask(allow_mask)):
        got, _ = index.search(queries, 10, exclude=excl, allow=allow)
        want, _ = truth.search(queries, 10, exclude=excl, allow=allow)
        recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got.tolist(), want.tolist(), strict=True)])
        assert recall >= 0.97
        assert not np.isin(got, np.flatnonzero(~live)).any()
        if allow is not None:
            assert allow_mask[got].all()
        for i in range(3):  # the single-query path gives the batch's answer
            one, _ = index.search(queries[i : i + 1], 10, exclude=[excl[i]], allow=allow)
            assert one[0].tolist() == got[i].tolist()


def test_live_bundle_without_changes_keeps_the_bundles_index(models):
    from recsys.bundle import Bundle
    from recsys.catalogue.delta import CatalogueState

    bundle = Bundle.load(models / "v1")
    view = live_bundle(bundle, CatalogueState.empty())
    assert view.index is bundle.index and view.n_items == bundle.n_items  # the native fast path still applies
    shutil.rmtree(models)


def test_a_new_version_says_it_does_not_carry_the_delta(models, tmp_path_factory):
    from recsys.bundle import Bundle
    from recsys.catalogue.changes import retire_items
    from recsys.publish import export

    retire_items(models, Bundle.load(models / "v1"), ["i1", "i2"])
    _data, run = test_bundle.trained(tmp_path_factory)
    path = export(run, models, index_cfg=test_bundle.index_cfg(), version="v2")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["catalogue"]["delta"] == {"carried": False, "previous_version": "v1", "previous_changes": 1}
    assert "prepare_config" in manifest["data"]  # (None here: the test dataset was written by hand)
    assert not catalogue_dir(models, "v2").exists()  # the new version starts with an empty delta


def test_an_unwritable_models_directory_refuses_the_change_and_serves_on(models):
    import os

    if os.geteuid() == 0:  # root writes anyway: make the catalogue directory a file instead
        (models / "catalogue").write_text("not a directory")
    else:
        models.chmod(0o555)
    try:
        with running_server(models, loader=_loader()) as (app, target), grpc.insecure_channel(target) as ch:
            admin, stub = pb_grpc.RecommenderAdminStub(ch), pb_grpc.RecommenderStub(ch)
            if os.geteuid() == 0:  # the delta could not even be read: refused, counted, the bundle serves alone
                sample = app.metrics.registry.get_sample_value
                assert sample("recsys_catalogue_refused_total", {"reason": "unreadable"}) >= 1
            code, details = code_of(admin.UpsertItems, pb.UpsertItemsRequest(items=[_item("x", "space")]),
                                    metadata=AUTH)
            assert code == grpc.StatusCode.FAILED_PRECONDITION and "catalogue" in details
            info = stub.GetModelInfo(pb.GetModelInfoRequest())
            assert (info.catalogue_seq, info.catalogue_size) == (0, 64)
            assert len(stub.Recommend(pb.RecommendRequest(user_id=_user(0), k=5)).items) == 5
    finally:
        models.chmod(0o755)


def test_partition_by_builds_a_graph_per_value_that_filters_search(tmp_path_factory, tmp_path, monkeypatch):
    """index.partition_by: one checksummed graph per category in the bundle, loaded with it; a filter on the
    category searches those graphs (the main graph is not walked) with the answers of the main graph; a set that
    strays from its values (an item upserted into another category) walks the main graph; a tampered graph is
    refused."""
    from recsys.bundle import Bundle, BundleError
    from recsys.publish import export
    from recsys.retrieval import IndexConfig
    from server.service import allowed_by

    _data, run = test_bundle.trained(tmp_path_factory)
    plain_dir, parted_dir = tmp_path / "plain", tmp_path / "parted"
    export(run, plain_dir, index_cfg=test_bundle.index_cfg(), version="v1")
    export(run, parted_dir, index_cfg=IndexConfig(num_threads=1, partition_by=("category",), partition_min_items=1),
           version="v1")
    with pytest.raises(ValueError, match="'colour'.*'category'"):
        export(run, tmp_path / "bad", index_cfg=IndexConfig(num_threads=1, partition_by=("colour",)), version="v1")
    manifest = json.loads((parted_dir / "v1" / "manifest.json").read_text())
    entries = manifest["index"]["partitions"]
    assert sorted((e["attribute"], e["value"], e["count"]) for e in entries) == [("category", c, 16)
                                                                               for c in sorted(CATEGORIES)]
    assert all(e["file"] in manifest["files"] and e["ef"] >= 1 for e in entries)
    plain, parted = Bundle.load(plain_dir / "v1"), Bundle.load(parted_dir / "v1")
    assert plain.index.partitions is None and len(parted.index.partitions) == 4
    parted.index.filter_exact_scale = 0.0  # 16-item values: their graphs, not the exact scan of a tiny catalogue
    for key, part in parted.index.partitions.parts.items():  # each graph holds exactly its category's items
        assert sorted(int(r) for r in part.index.ids) == list(range(16 * CATEGORIES.index(key[1]),
                                                                    16 * CATEGORIES.index(key[1]) + 16))
    two = ItemFilter((Condition("category", "any_of", ("space", "piano")),))
    words = allowed_by(parted, two)
    assert bitset.within_of(words) == (("category", "space"), ("category", "piano"))
    assert bitset.within_of(allowed_by(plain, two)) is None
    q = plain.user_embeddings[:40]
    want = plain.index.search(q, 10, allow=allowed_by(plain, two))[0]
    walked = []
    original = HnswIndex._native_allowed if parted.index.native_filter else HnswIndex._search_general
    name = "_native_allowed" if parted.index.native_filter else "_search_general"

    def spy(self, *a, **kw):
        walked.append(self is parted.index)
        return original(self, *a, **kw)

    monkeypatch.setattr(HnswIndex, name, spy)
    got = parted.index.search(q, 10, allow=words)[0]
    assert not any(walked)  # the partitions answered (their own plain searches: no allowed walk at all)
    assert (np.sort(got, axis=1) == np.sort(want, axis=1)).mean() >= 0.97
    # i20 (cooking) upserted into "space": the live view's "space" set holds a row of the cooking graph, so it
    # strays from the hinted graphs and walks the main one; the answer has i20 (from the delta segment) first
    from recsys.catalogue.delta import CatalogueState, UpsertedItem

    vec = plain.item_embeddings[20].copy()
    state = CatalogueState(seq=1, dim=vec.shape[0], upserts={"i20": UpsertedItem(
        embedding=vec, features={"category": "space"}, title=None, unknown=(), seq=1)})
    view = live_bundle(parted, state)
    space = ItemFilter((Condition("category", "any_of", ("space",)),))
    live_words = allowed_by(view, space)
    assert bitset.within_of(live_words) == (("category", "space"),)
    assert parted.index.partitions.plan(bitset.check(live_words), [("category", "space")], scan_limit=0) is None
    walked.clear()
    ids = view.index.search(vec[None, :], 5, allow=live_words)[0][0]
    assert ids[0] == 20 and all(r == 20 or r < 16 for r in ids) and any(walked)
    # with the tiny catalogue's own switch (128 ids) the whole set is scanned exactly (a graph needs more)
    parted.index.filter_exact_scale = 16.0
    walked.clear()
    ids = view.index.search(vec[None, :], 5, allow=live_words)[0][0]
    assert ids[0] == 20 and all(r == 20 or r < 16 for r in ids) and not any(walked)
    # a tampered graph: refused by its checksum, like every bundle file
    f = parted_dir / "v1" / entries[0]["file"]
    f.write_bytes(f.read_bytes()[:-1] + b"\x01")
    with pytest.raises(BundleError, match=entries[0]["file"]):
        Bundle.load(parted_dir / "v1")
