"""The live catalogue's change log (recsys.catalogue.delta): round trip, concurrent writers, idempotent change IDs,
tamper refusal (checksum / sequence / chain / version), the fold into a state, and pruning with the versions."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import threading
from pathlib import Path

import numpy as np
import pytest

from recsys.bundle import list_versions, prune
from recsys.bundle.versions import CATALOGUE_DIR
from recsys.catalogue import delta
from recsys.catalogue.delta import CatalogueError, CatalogueLog, CatalogueState, load_state, record_sha256
from recsys.core import schema

V1 = "20260101T000000Z-aaaaaa"
DIM = 8


def make_version(models: Path, name: str, *, created_at: str = "2026-01-01T00:00:00Z") -> None:
    (models / name).mkdir(parents=True)
    (models / name / "manifest.json").write_text(json.dumps({"version": name, "created_at": created_at}))


@pytest.fixture
def models(tmp_path) -> Path:
    models = tmp_path / "models"
    make_version(models, V1)
    return models


def unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def item(item_id: str, seed: int, **kw) -> dict:
    return {"item_id": item_id, "embedding": unit(seed), **kw}


def records(models: Path, version: str = V1) -> list[Path]:
    return sorted((models / CATALOGUE_DIR / version).glob("*.json"))


def rewrite(path: Path, edit) -> None:
    """Apply ``edit`` to the record's JSON and give it a valid checksum again (a forger who knows the format)."""
    rec = json.loads(path.read_text(encoding="utf-8"))
    edit(rec)
    rec["sha256"] = record_sha256(rec)
    path.write_text(delta.canonical_json(rec) + "\n", encoding="utf-8")


def test_append_read_round_trip_is_bit_exact(models):
    emb = unit(0)
    emb[0] = np.float32(1 / 3)  # not a short decimal: only an exact float32 -> JSON -> float32 keeps its bits
    emb /= np.linalg.norm(emb)
    log = CatalogueLog(models, V1)
    c1, created = log.append("upsert", [{"item_id": "a", "embedding": emb, "title": "Ça va",
                                          "features": {"genre": ["rock", "pop"], "year": "1999"},
                                          "unknown": [["genre", "pop"]]}], change_id="c-1", dim=DIM)
    c2, _ = log.append("retire", ["b"], dim=DIM)
    assert created and (c1.seq, c2.seq) == (1, 2) and c1.change_id == "c-1" and len(c2.change_id) == 32

    got = CatalogueLog(models, V1).read()  # a fresh reader: another replica
    assert [c.seq for c in got] == [1, 2] and [c.op for c in got] == ["upsert", "retire"]
    up = got[0].items[0]
    assert up.embedding.dtype == np.float32
    np.testing.assert_array_equal(up.embedding.view(np.uint32), emb.view(np.uint32))
    assert (up.item_id, up.title, up.features, up.unknown) == (
        "a", "Ça va", {"genre": ("rock", "pop"), "year": "1999"}, (("genre", "pop"),))
    assert got[1].item_ids == ("b",) and got[0].sha256 == c1.sha256 and got[0].created_at == c1.created_at

    # the file format: the sha256 field covers the canonical JSON without it; the chain links file bytes
    f1, f2 = records(models)
    assert [f.name for f in (f1, f2)] == ["00000001.json", "00000002.json"]
    r1, r2 = (json.loads(f.read_text(encoding="utf-8")) for f in (f1, f2))
    assert r1["sha256"] == record_sha256(r1) == c1.sha256 and r1["version"] == V1 and r1["format"] == 1
    assert r1["prev_sha256"] == "" and r2["prev_sha256"] == hashlib.sha256(f1.read_bytes()).hexdigest()
    assert r1["created_at"].endswith("Z") and r2["items"] == [{"item_id": "b"}]
    assert CatalogueLog(models, V1).read(after=1)[0].seq == 2 and log.last_seq() == 2


def _append_many(models: str, worker: int, n: int, barrier) -> None:
    log = CatalogueLog(models, V1)
    if barrier is not None:
        barrier.wait()
    for i in range(n):
        op = "upsert" if i % 3 else "retire"
        items = [item(f"w{worker}-{i}", i)] if op == "upsert" else [f"w{worker}-{i}"]
        log.append(op, items, change_id=f"w{worker}-{i}", dim=DIM)


def _check_complete_chain(models: Path, n: int) -> None:
    got = CatalogueLog(models, V1).read()  # verifies the checksums and the chain from seq 1
    assert [c.seq for c in got] == list(range(1, n + 1))
    assert sorted(c.change_id for c in got) == sorted(f"w{w}-{i}" for w in (0, 1) for i in range(n // 2))
    assert len(records(models)) == n


def test_seq_is_contiguous_with_two_threads_appending(models):
    barrier = threading.Barrier(2)
    threads = [threading.Thread(target=_append_many, args=(str(models), w, 50, barrier)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    _check_complete_chain(models, 100)


def test_seq_is_contiguous_with_two_processes_appending(models):
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_many, args=(str(models), w, 50, barrier)) for w in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    _check_complete_chain(models, 100)


def test_a_repeated_change_id_returns_the_first_record_and_writes_nothing(models):
    first, created = CatalogueLog(models, V1).append("upsert", [item("a", 1)], change_id="retry-me", dim=DIM)
    CatalogueLog(models, V1).append("retire", ["z"], dim=DIM)
    files = {f.name: f.read_bytes() for f in records(models)}
    # a client retrying after a timeout, through another process (a fresh log) and with a recomputed embedding
    again, created_again = CatalogueLog(models, V1).append("upsert", [item("a", 1)], change_id="retry-me", dim=DIM)
    assert created and not created_again
    assert (again.seq, again.sha256, again.created_at) == (first.seq, first.sha256, first.created_at)
    assert {f.name: f.read_bytes() for f in records(models)} == files
    with pytest.raises(ValueError, match="'retry-me' was already used by record 00000001.json"):
        CatalogueLog(models, V1).append("retire", ["a"], change_id="retry-me", dim=DIM)


def test_an_edited_record_is_a_checksum_error_naming_the_file(models):
    log = CatalogueLog(models, V1)
    log.append("upsert", [item("a", 1, features={"genre": "rock"})], dim=DIM)
    log.append("upsert", [item("b", 2, features={"genre": "rock"})], dim=DIM)
    path = records(models)[1]
    path.write_bytes(path.read_bytes().replace(b'"rock"', b'"jazz"'))
    for reader in (CatalogueLog(models, V1), log):  # a fresh reader, and one that had verified it before
        with pytest.raises(CatalogueError, match=r"00000002\.json.*\(checksum\)") as e:
            reader.read()
        assert e.value.reason == "checksum"


def test_a_deleted_middle_record_is_a_sequence_error(models):
    log = CatalogueLog(models, V1)
    for i in range(3):
        log.append("retire", [f"x{i}"], dim=DIM)
    records(models)[1].unlink()
    with pytest.raises(CatalogueError, match=r"record 00000002\.json is missing") as e:
        CatalogueLog(models, V1).read()
    assert e.value.reason == "sequence"


def test_a_deleted_last_record_is_a_sequence_error_for_a_reader_that_saw_it(models):
    log = CatalogueLog(models, V1)
    for i in range(2):
        log.append("retire", [f"x{i}"], dim=DIM)
    assert log.last_seq() == 2
    records(models)[1].unlink()
    with pytest.raises(CatalogueError, match="holds 1 records, but 2 were read") as e:
        log.read()
    assert e.value.reason == "sequence"
    with pytest.raises(CatalogueError, match="after seq 2 were asked for, but the log ends at seq 1"):
        CatalogueLog(models, V1).read(after=2)  # a caller whose state is ahead of the log


def test_a_rechecksummed_record_with_a_wrong_prev_sha256_is_a_chain_error(models):
    log = CatalogueLog(models, V1)
    for i in range(3):
        log.append("retire", [f"x{i}"], dim=DIM)
    rewrite(records(models)[1], lambda r: r.update(prev_sha256="0" * 64))
    with pytest.raises(CatalogueError, match=r"00000002\.json.*\(chain\)") as e:
        CatalogueLog(models, V1).read()
    assert e.value.reason == "chain"
    # rewritten with the right prev_sha256 but other contents: the *next* record's link breaks
    good = hashlib.sha256(records(models)[0].read_bytes()).hexdigest()
    rewrite(records(models)[1], lambda r: r.update(prev_sha256=good, items=[{"item_id": "forged"}]))
    with pytest.raises(CatalogueError, match=r"00000003\.json.*\(chain\)"):
        CatalogueLog(models, V1).read()


def test_a_record_of_another_version_is_a_version_error(models):
    CatalogueLog(models, V1).append("retire", ["x"], dim=DIM)
    v2 = "20260102T000000Z-bbbbbb"
    make_version(models, v2)
    (models / CATALOGUE_DIR / v2).mkdir()
    (models / CATALOGUE_DIR / v2 / "00000001.json").write_bytes(records(models)[0].read_bytes())
    with pytest.raises(CatalogueError, match=rf"belongs to version '{V1}', not '{v2}'") as e:
        CatalogueLog(models, v2).read()
    assert e.value.reason == "version"


def test_a_failed_read_returns_nothing_and_the_next_read_starts_where_the_last_good_one_ended(models):
    log = CatalogueLog(models, V1)
    log.append("retire", ["x1"], dim=DIM)
    log.append("retire", ["x2"], dim=DIM)
    assert [c.seq for c in log.read()] == [1, 2]
    CatalogueLog(models, V1).append("retire", ["x3"], dim=DIM)  # another writer
    path = records(models)[2]
    good = path.read_bytes()
    path.write_bytes(good.replace(b'"x3"', b'"x4"'))
    with pytest.raises(CatalogueError, match="checksum"):
        log.read(after=2)
    path.write_bytes(good)  # e.g. a half-synced copy that caught up
    assert [c.item_ids for c in log.read(after=2)] == [("x3",)]


def test_a_leftover_temp_file_is_ignored_and_the_next_writer_removes_it(models):
    log = CatalogueLog(models, V1)
    log.append("retire", ["x"], dim=DIM)
    leftover = models / CATALOGUE_DIR / V1 / ".00000002.json.tmp-dead0001"
    leftover.write_text('{"half": ')  # a writer killed before its rename
    assert [c.seq for c in CatalogueLog(models, V1).read()] == [1]
    change, _ = CatalogueLog(models, V1).append("retire", ["y"], dim=DIM)
    assert change.seq == 2 and not leftover.exists()
    assert [c.item_ids for c in CatalogueLog(models, V1).read()] == [("x",), ("y",)]


@pytest.mark.parametrize(
    ("op", "items", "kw", "message"),
    [
        ("upsert", [], {}, "at least one item"),
        ("upsert", [item("a", 1), item("a", 2)], {}, "item_id 'a' appears twice"),
        ("upsert", [item("", 1)], {}, "`item_id` must be a non-empty string"),
        ("upsert", [{"item_id": "a", "embedding": unit(1, 4)}], {}, "must have dim=8 values, got 4"),
        ("upsert", [{"item_id": "a", "embedding": unit(1) * 2}], {}, "must be L2-normalised .* got norm 2"),
        ("upsert", [{"item_id": "a", "embedding": np.full(DIM, np.nan)}], {}, "non-finite"),
        ("upsert", [{"item_id": "a", "embedding": unit(1), "color": "red"}], {}, r"unexpected keys \['color'\]"),
        ("upsert", [item("a", 1, features={"genre": 3})], {}, "feature 'genre' must map a name to a string"),
        ("delete", ["a"], {}, "`op` must be one of"),
        ("retire", ["a"], {"change_id": "a b"}, "`change_id` must match"),
    ],
)
def test_append_refuses_bad_items_and_writes_nothing(models, op, items, kw, message):
    with pytest.raises(ValueError, match=message) as e:
        CatalogueLog(models, V1).append(op, items, dim=DIM, **kw)
    assert not isinstance(e.value, CatalogueError)  # a bad request, not a bad log
    assert records(models) == []


def test_append_refuses_a_version_that_is_not_published(models):
    with pytest.raises(CatalogueError, match="version '20260109T000000Z-cccccc' is not in") as e:
        CatalogueLog(models, "20260109T000000Z-cccccc").append("retire", ["x"], dim=DIM)
    assert e.value.reason == "version"
    with pytest.raises(ValueError, match="`version` must be a version name"):
        CatalogueLog(models, "../elsewhere")


def test_an_append_waiting_for_the_lock_refuses_when_the_log_is_pruned_meanwhile(models, monkeypatch):
    CatalogueLog(models, V1).append("retire", ["x"], dim=DIM)
    waiting = threading.Event()
    real_flock = delta.fcntl.flock

    class _Fcntl:
        LOCK_EX = delta.fcntl.LOCK_EX

        @staticmethod
        def flock(fd, op):
            waiting.set()
            real_flock(fd, op)

    errors: list[BaseException] = []

    def append() -> None:
        try:
            CatalogueLog(models, V1).append("retire", ["y"], dim=DIM)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            errors.append(e)

    log_dir = models / CATALOGUE_DIR / V1
    with open(log_dir / ".lock") as held:
        real_flock(held.fileno(), delta.fcntl.LOCK_EX)  # as prune does before renaming the log away
        monkeypatch.setattr(delta, "fcntl", _Fcntl)
        t = threading.Thread(target=append)
        t.start()
        assert waiting.wait(10)
        log_dir.rename(log_dir.with_name(f".{V1}.deleting-1"))
    t.join(10)
    assert len(errors) == 1 and isinstance(errors[0], CatalogueError) and errors[0].reason == "version"
    assert not log_dir.exists()  # the appender did not write into a new log of its own


def _hand_log(models: Path):
    """c1 upsert a, b; c2 upsert c; c3 update a; c4 retire b and x (a base item); c5 upsert b again."""
    log = CatalogueLog(models, V1)
    log.append("upsert", [item("a", 1, title="A"), item("b", 2)], dim=DIM)
    log.append("upsert", [item("c", 3)], dim=DIM)
    log.append("upsert", [item("a", 11, title="A2")], dim=DIM)
    log.append("retire", ["b", "x"], dim=DIM)
    log.append("upsert", [item("b", 12, features={"genre": "pop"})], dim=DIM)
    return log.read()


def test_the_fold_rules(models):
    c1, c2, c3, c4, c5 = _hand_log(models)
    empty = CatalogueState.empty()
    s2 = empty.apply([c1, c2])
    assert list(s2.upserts) == ["a", "b", "c"] and s2.retired == frozenset() and (s2.n_upserted, s2.n_retired) == (3, 0)
    s3 = s2.apply([c3])  # an update replaces the entry in place: a stays first
    assert list(s3.upserts) == ["a", "b", "c"] and s3.upserts["a"].title == "A2" and s3.upserts["a"].seq == 3
    np.testing.assert_array_equal(s3.upserts["a"].embedding, unit(11))
    assert s2.upserts["a"].title == "A" and s2.seq == 2  # apply is pure: the old state is as it was
    s4 = s3.apply([c4])  # a retired upserted item keeps its data; a base item's retirement is recorded too
    assert s4.retired == {"b", "x"} and "b" in s4.upserts and (s4.n_upserted, s4.n_retired) == (2, 2)
    s5 = s4.apply([c5])  # an upsert restores a retired item, in its old position, with the new data
    assert s5.retired == {"x"} and list(s5.upserts) == ["a", "b", "c"] and (s5.n_upserted, s5.n_retired) == (3, 1)
    assert s5.upserts["b"].features == {"genre": "pop"} and s5.upserts["b"].seq == 5
    assert s5.seq == 5 and s5.dim == DIM
    assert load_state(models, V1).upserts.keys() == s5.upserts.keys() and load_state(models, V1).retired == {"x"}


def test_changes_out_of_order_or_applied_twice_are_refused_and_the_state_is_unchanged(models):
    c1, c2, c3, c4, c5 = _hand_log(models)
    state = CatalogueState.empty().apply([c1, c2])
    before = (state.seq, dict(state.upserts), state.retired)
    for bad in ([c4], [c1], [c2], [c3, c5], [c4, c3]):
        with pytest.raises(CatalogueError, match="does not follow the state at seq") as e:
            state.apply(bad)
        assert e.value.reason == "sequence"
        assert (state.seq, dict(state.upserts), state.retired) == before
    assert state.apply([c3, c4, c5]).seq == 5


def test_load_state_is_empty_without_a_log(models):
    state = load_state(models, V1)
    assert (state.seq, state.upserts, state.retired, state.n_upserted) == (0, {}, frozenset(), 0)
    assert CatalogueLog(models, V1).read() == [] and CatalogueLog(models, V1).last_seq() == 0


def test_list_versions_ignores_the_catalogue_dir(models):
    CatalogueLog(models, V1).append("retire", ["x"], dim=DIM)
    assert (models / CATALOGUE_DIR / V1).is_dir()
    assert [v["version"] for v in list_versions(models)] == [V1]


def test_prune_deletes_the_catalogue_of_pruned_versions_and_keeps_latests(models):
    names = [V1, "20260102T000000Z-bbbbbb", "20260103T000000Z-cccccc"]
    for i, n in enumerate(names[1:], start=2):
        make_version(models, n, created_at=f"2026-01-0{i}T00:00:00Z")
    for n in names:
        CatalogueLog(models, n).append("retire", [f"x-{n}"], dim=DIM)
    (models / schema.LATEST).write_text(names[0])
    # a killed prune's leftovers: a version deleted before its log, and a log renamed for deletion
    (models / CATALOGUE_DIR / "20251231T000000Z-dddddd").mkdir()
    (models / CATALOGUE_DIR / ".20251230T000000Z-eeeeee.deleting-4242").mkdir()
    assert prune(models, keep=1) == [names[1]]
    assert sorted(p.name for p in (models / CATALOGUE_DIR).iterdir()) == [names[0], names[2]]
    assert [v["version"] for v in list_versions(models)] == [names[0], names[2]]
    for n in (names[0], names[2]):
        assert [c.item_ids for c in CatalogueLog(models, n).read()] == [(f"x-{n}",)]
    with pytest.raises(CatalogueError, match="is not in"):  # the pruned version's log is not recreated
        CatalogueLog(models, names[1]).append("retire", ["y"], dim=DIM)
