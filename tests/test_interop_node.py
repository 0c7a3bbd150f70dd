"""The wire API from another language: a Node.js client built from ``protos/`` alone (loaded at run time with
@grpc/proto-loader; no generated code, nothing from this package) against a real server.

Checks what a client in another language depends on: package/service/method names, field numbers and types,
enum names, repeated fields, metadata (the admin bearer token) and status codes with their details. Answers are
compared with the exact ones of the test bundle (``tests/test_server_helpers.py``).

Needs ``node`` and the client's two npm packages (``tests/interop/node/package.json``, installed on first use with
``npm ci`` from the npm registry); skipped when node is missing or the install cannot reach the registry.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from test_server_helpers import fake_loader, running_server, write_fake_version

ROOT = Path(__file__).resolve().parents[1]
CLIENT_DIR = ROOT / "tests" / "interop" / "node"
PROTOS = ROOT / "protos"


@pytest.fixture(scope="module")
def node_client() -> Path:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("node/npm not installed")
    if not (CLIENT_DIR / "node_modules" / "@grpc" / "grpc-js").is_dir():
        try:
            subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--silent"], cwd=CLIENT_DIR, check=True,
                           capture_output=True, timeout=180)
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"cannot install the node client's packages (npm registry unreachable?): {e}")
    return CLIENT_DIR / "client.js"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_fake_version(models, "v1", seed=3)
    with running_server(models) as (_app, target):
        yield target, fake_loader(models / "v1")


def run_node(client: Path, target: str, calls: list[dict]) -> list[dict]:
    proc = subprocess.run(["node", str(client), target, str(PROTOS)], input=json.dumps(calls), text=True,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out) == len(calls)
    return out


def test_node_client_gets_the_same_answers(node_client, served):
    target, bundle = served
    calls = [
        {"service": "Recommender", "method": "GetModelInfo"},
        {"service": "Recommender", "method": "Recommend", "request": {"user_id": "u5", "k": 7}},
        {"service": "Recommender", "method": "Recommend",
         "request": {"history_item_ids": ["i3", "i9", "nope"], "k": 4}},
        {"service": "Recommender", "method": "BatchRecommend", "request": {"user_ids": ["u1", "ghost", "u2"], "k": 3}},
        {"service": "Recommender", "method": "SimilarItems", "request": {"item_id": "i10", "k": 5}},
        {"service": "Recommender", "method": "GetItemEmbeddings", "request": {"item_ids": ["i2", "missing"]}},
        {"service": "Recommender", "method": "Recommend", "request": {"user_id": "stranger", "k": 3,
                                                                      "allow_fallback": True}},
        {"service": "RecommenderAdmin", "method": "ListModels", "metadata": {"authorization": "Bearer s3cret"}},
    ]
    info, known, hist, batch, similar, emb, fallback, models = run_node(node_client, target, calls)
    for r in (info, known, hist, batch, similar, emb, fallback, models):
        assert r["ok"], r

    assert info["response"]["version"] == "v1"

    resp = known["response"]
    assert [it["item_id"] for it in resp["items"]] == bundle.expected_top(bundle.user_embeddings[5], 7,
                                                                          exclude=[5, 6, 7])
    assert resp["source"] == "SOURCE_KNOWN_USER" and resp["model_version"] == "v1" and resp["fallback"] is False
    top = bundle.expected_top(bundle.user_embeddings[5], 1, exclude=[5, 6, 7])[0]
    assert resp["items"][0]["score"] == pytest.approx(
        float(bundle.item_embeddings[int(top[1:])] @ bundle.user_embeddings[5]), rel=1e-5)

    q = bundle.embed_history([np.array([3, 9])])[0]
    assert [it["item_id"] for it in hist["response"]["items"]] == bundle.expected_top(q, 4, exclude=[3, 9])
    assert hist["response"]["source"] == "SOURCE_HISTORY"
    assert hist["response"]["unknown_item_ids"] == ["nope"]

    users = batch["response"]["results"]
    assert [u["user_id"] for u in users] == ["u1", "ghost", "u2"]
    for u in users:
        if u["user_id"] == "ghost":
            assert u["found"] is False and u["items"] == []
        else:
            j = int(u["user_id"][1:])
            seen = [j, j + 1, j + 2]
            assert [it["item_id"] for it in u["items"]] == bundle.expected_top(bundle.user_embeddings[j], 3, seen)

    sim = [it["item_id"] for it in similar["response"]["items"]]
    assert sim == bundle.expected_top(bundle.item_embeddings[10], 5, exclude=[10])

    e = emb["response"]
    assert [x["id"] for x in e["embeddings"]] == ["i2"] and e["unknown_ids"] == ["missing"]
    assert e["embeddings"][0]["values"] == pytest.approx(bundle.item_embeddings[2].tolist(), rel=1e-6)

    assert fallback["response"]["fallback"] is True and fallback["response"]["source"] == "SOURCE_POPULARITY"
    assert [it["item_id"] for it in fallback["response"]["items"]] == ["i0", "i1", "i2"]

    assert [m["version"] for m in models["response"]["models"]] == ["v1"]
    assert models["response"]["serving_version"] == "v1"


def test_node_client_sees_status_codes_and_details(node_client, served):
    target, _bundle = served
    calls = [
        {"service": "Recommender", "method": "Recommend", "request": {"user_id": "u1", "k": 0}},
        {"service": "Recommender", "method": "Recommend", "request": {"user_id": "u1", "k": 10_000}},
        {"service": "Recommender", "method": "Recommend", "request": {"user_id": "stranger", "k": 3}},
        {"service": "RecommenderAdmin", "method": "ListModels"},
        {"service": "RecommenderAdmin", "method": "ListModels", "metadata": {"authorization": "Bearer wrong"}},
    ]
    k0, k_big, unknown, no_token, bad_token = run_node(node_client, target, calls)
    assert k0["codeName"] == "INVALID_ARGUMENT" and "k" in k0["details"] and "0" in k0["details"]
    assert k_big["codeName"] == "INVALID_ARGUMENT" and "10000" in k_big["details"]
    assert unknown["codeName"] == "NOT_FOUND" and "stranger" in unknown["details"]
    assert no_token["codeName"] == "UNAUTHENTICATED"
    assert bad_token["codeName"] == "UNAUTHENTICATED"
