"""Every kind of bad bundle is refused, and the old one keeps serving (issue #17).

One table of cases, each a way a version directory (or the ``LATEST`` pointer) can be wrong: a flipped byte in each
file, a truncated index, a manifest whose dim / metric / counts disagree with the arrays, a missing file, an extra
unlisted file, a symlink out of the models directory, ``LATEST`` leading out of the models directory or naming
nothing. For each:

* ``Bundle.load(..., verify=True)`` (following ``LATEST``) raises ``BundleError`` whose message names the file and
  the check, with the case's ``reason``;
* one running server that serves the good version ``good`` is pointed at it (``LATEST``): it keeps answering
  Recommend from ``good`` throughout and counts the refusal in ``recsys_bundles_refused_total{reason}``.

The good version is exported once (the tiny bundle of test_bundle.py); each case works on a copy.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from test_bundle import index_cfg, trained
from test_server_helpers import running_server

from recsys.bundle import BUNDLE_FILES, MANIFEST, REFUSAL_REASONS, Bundle, BundleError
from recsys.core import schema
from recsys.publish import export
from recsys.v1 import recommender_pb2 as pb
from recsys.v1 import recommender_pb2_grpc as pb_grpc

GOOD = "good"


def _copy(models: Path, name: str) -> Path:
    """A copy of the good version named ``name`` (its manifest says so, as an export's would)."""
    d = models / name
    shutil.copytree(models / GOOD, d)
    _edit_manifest(d, version=name)
    return d


def _edit_manifest(d: Path, **changes) -> None:
    m = json.loads((d / MANIFEST).read_text())
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            m[outer][inner] = value
        else:
            m[key] = value
    (d / MANIFEST).write_text(json.dumps(m))


def _flip(file: str) -> Callable[[Path, Path, str], str]:
    def tamper(models: Path, outside: Path, name: str) -> str:
        f = _copy(models, name) / file
        raw = bytearray(f.read_bytes())
        raw[len(raw) // 2] ^= 0xFF  # same size: only the checksum (or, for the manifest, its parse) can tell
        f.write_bytes(bytes(raw))
        return name

    return tamper


def _truncate_index(models, outside, name):
    f = _copy(models, name) / schema.INDEX_FILE
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return name


def _manifest(**changes):
    def tamper(models, outside, name):
        _edit_manifest(_copy(models, name), **changes)
        return name

    return tamper


def _missing(file: str):
    def tamper(models, outside, name):
        (_copy(models, name) / file).unlink()
        return name

    return tamper


def _extra_file(models, outside, name):
    (_copy(models, name) / "foo.bin").write_bytes(b"\0" * 16)
    return name


def _symlink_out(models, outside, name):
    d = _copy(models, name)
    target = outside / f"{name}-model.json"  # the very same bytes: the checksum alone would pass it
    shutil.copyfile(d / schema.MODEL_JSON, target)
    (d / schema.MODEL_JSON).unlink()
    (d / schema.MODEL_JSON).symlink_to(target)
    return name


def _outside_copy(models: Path, outside: Path, name: str) -> Path:
    """A good bundle outside the models directory, named ``name`` (what a pointer out of it would load)."""
    d = outside / name
    shutil.copytree(models / GOOD, d)
    _edit_manifest(d, version=name)
    return d


def _latest_dotdot(models, outside, name):
    _outside_copy(models, outside, name)
    return os.path.relpath(outside / name, models)  # ../outside/<name>


def _latest_absolute(models, outside, name):
    return str(_outside_copy(models, outside, name))


def _latest_symlinked_dir(models, outside, name):
    (models / name).symlink_to(_outside_copy(models, outside, name), target_is_directory=True)
    return name


def _latest_missing(models, outside, name):
    return name  # no such directory


# (id, tamper(models, outside, name) -> what LATEST then holds, reason, what the message must match)
CASES = [
    *[
        pytest.param(_flip(f), "checksum", rf"^{re.escape(f)}: sha256 is [0-9a-f]{{12}}\.\.\., manifest\.json says",
                     id=f"flip-{f}")
        for f in BUNDLE_FILES
    ],
    pytest.param(_flip(MANIFEST), "manifest_invalid", r"manifest\.json is not valid JSON", id=f"flip-{MANIFEST}"),
    pytest.param(_truncate_index, "truncated",
                 r"^index\.hnsw: size is \d+ bytes, manifest\.json says \d+ \(truncated\)", id="truncated-index"),
    pytest.param(_manifest(dim=32), "manifest_mismatch",
                 r"^item_embeddings\.npy: got float32 \(64, 64\), manifest says float32 \(64, 32\) \(manifest\.json",
                 id="manifest-dim"),
    pytest.param(_manifest(metric="dot"), "manifest_mismatch", r"^manifest\.json of .*: metric is 'dot'",
                 id="manifest-metric"),
    pytest.param(_manifest(**{"counts.n_items": 63}), "manifest_mismatch",
                 r"^item_embeddings\.npy: got float32 \(64, 64\), manifest says float32 \(63, 64\)",
                 id="manifest-n_items"),
    pytest.param(_manifest(**{"counts.n_users": 161}), "manifest_mismatch",
                 r"^user_embeddings\.npy: got float32 \(160, 64\), manifest says float32 \(161, 64\)",
                 id="manifest-n_users"),
    pytest.param(_missing(schema.SEEN), "missing_file", r"^seen\.parquet: missing from bundle", id="missing-seen"),
    pytest.param(_missing(schema.INDEX_FILE), "missing_file", r"^index\.hnsw: missing from bundle",
                 id="missing-index"),
    pytest.param(_missing(MANIFEST), "missing_file", r"^manifest\.json: missing", id="missing-manifest"),
    pytest.param(_extra_file, "extra_file", r"^foo\.bin: extra file not listed in manifest\.json", id="extra-file"),
    pytest.param(_symlink_out, "symlink",
                 r"^model\.json: is a symlink to .* \(outside the version directory and the models directory\)",
                 id="symlink-out-of-models"),
    pytest.param(_latest_dotdot, "latest_outside",
                 r"^LATEST: .* holds '\.\./.*', which is not a version name: a path outside the models directory",
                 id="latest-dotdot"),
    pytest.param(_latest_absolute, "latest_outside", r"^LATEST: .* holds '/.*', which is not a version name: a path",
                 id="latest-absolute"),
    pytest.param(_latest_symlinked_dir, "latest_outside",
                 r"^LATEST names '.*': '.*' is a symlink to '.*', outside the models directory",
                 id="latest-symlinked-dir"),
    pytest.param(_latest_missing, "latest_missing", r"^LATEST names '.*': version '.*' not found in",
                 id="latest-missing"),
]


def _publish(models: Path, latest: str) -> None:
    tmp = models / ".LATEST.tmp-test"
    tmp.write_text(latest + "\n")
    os.replace(tmp, models / schema.LATEST)


@pytest.fixture(scope="module")
def good_models(tmp_path_factory) -> Path:
    """A models directory holding one good version (``good``), LATEST -> it; read-only for the cases."""
    _data, run = trained(tmp_path_factory)
    models = tmp_path_factory.mktemp("bad_bundles") / "models"
    export(run, models, index_cfg=index_cfg(), version=GOOD, evaluate_split=None)
    return models


@pytest.mark.parametrize(("tamper", "reason", "match"), CASES)
def test_refused_at_load(good_models, tmp_path, tamper, reason, match):
    models = tmp_path / "models"
    shutil.copytree(good_models, models)
    outside = tmp_path / "outside"
    outside.mkdir()
    _publish(models, tamper(models, outside, "bad"))
    with pytest.raises(BundleError, match=match) as e:
        Bundle.load(models, verify=True)  # follows LATEST, as the server does
    assert e.value.reason == reason and reason in REFUSAL_REASONS
    Bundle.load(models / GOOD, verify=True)  # the case left the good version alone


@pytest.fixture(scope="module")
def server(good_models, tmp_path_factory):
    """One server on a copy of the good models directory, polling LATEST; the cases below point it elsewhere."""
    from server.store import default_loader

    models = tmp_path_factory.mktemp("served") / "models"
    shutil.copytree(good_models, models)
    outside = tmp_path_factory.mktemp("outside")
    with running_server(models, loader=default_loader, poll_s=0.02) as (app, target), \
            grpc.insecure_channel(target) as ch:
        stub = pb_grpc.RecommenderStub(ch)
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).version == GOOD
        yield app, stub, models, outside


@pytest.mark.parametrize(("tamper", "reason", "match"), CASES)
def test_server_refuses_and_keeps_serving(server, request, tamper, reason, match):
    app, stub, models, outside = server
    sample = app.metrics.registry.get_sample_value
    before = sample("recsys_bundles_refused_total", {"reason": reason})
    refused_before = sample("recsys_model_reloads_total", {"result": "refused"})
    assert before is not None  # every reason is exported from the start (at 0), so alerts see the first one
    name = "bad-" + re.sub(r"[^A-Za-z0-9._-]", "_", request.node.callspec.id)
    _publish(models, tamper(models, outside, name))
    versions, deadline = [], time.monotonic() + 20
    try:
        while sample("recsys_bundles_refused_total", {"reason": reason}) == before and time.monotonic() < deadline:
            versions.append(stub.Recommend(pb.RecommendRequest(user_id="u1", k=5), timeout=5).model_version)
        for _ in range(5):  # several polls after the refusal: still the good version, and not counted again
            time.sleep(0.02)
            versions.append(stub.Recommend(pb.RecommendRequest(user_id="u1", k=5), timeout=5).model_version)
        assert sample("recsys_bundles_refused_total", {"reason": reason}) == before + 1
        assert sample("recsys_model_reloads_total", {"result": "refused"}) == refused_before + 1
        assert set(versions) == {GOOD}  # every call answered (an error raises), all from the good version
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).version == GOOD
    finally:
        _publish(models, GOOD)


def test_server_refuses_a_copied_version_whose_manifest_names_another(server):
    """``cp -r good v2`` + LATEST -> v2 verifies, but its manifest says ``good``: refused, else every poll would
    reload it (the serving version never equals LATEST)."""
    app, stub, models, _outside = server
    sample = app.metrics.registry.get_sample_value
    before = sample("recsys_bundles_refused_total", {"reason": "manifest_mismatch"})
    shutil.copytree(models / GOOD, models / "copied")
    _publish(models, "copied")
    try:
        deadline = time.monotonic() + 20
        while sample("recsys_bundles_refused_total", {"reason": "manifest_mismatch"}) == before \
                and time.monotonic() < deadline:
            assert stub.Recommend(pb.RecommendRequest(user_id="u1", k=5), timeout=5).model_version == GOOD
        assert sample("recsys_bundles_refused_total", {"reason": "manifest_mismatch"}) == before + 1
        assert stub.GetModelInfo(pb.GetModelInfoRequest()).version == GOOD
    finally:
        _publish(models, GOOD)
