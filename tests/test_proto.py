"""The committed generated code matches protos/, and the API documents every field."""

from __future__ import annotations

import re

from recsys import protogen


def test_generated_code_matches_proto():
    # Regenerates into a temp dir and compares (ignoring the generator-version lines).
    stale = protogen.drift()
    assert stale == [], f"generated code is stale, run `make proto`: {stale}"


def test_generated_stub_imports_our_pb2():
    from recsys.v1 import recommender_pb2, recommender_pb2_grpc

    assert recommender_pb2_grpc.recsys_dot_v1_dot_recommender__pb2 is recommender_pb2
    names = set(recommender_pb2.DESCRIPTOR.services_by_name)
    assert names == {"Recommender", "RecommenderAdmin"}
    rpcs = {m.name for m in recommender_pb2.DESCRIPTOR.services_by_name["Recommender"].methods}
    assert rpcs == {
        "Recommend", "BatchRecommend", "SimilarItems", "GetUserEmbeddings", "GetItemEmbeddings", "EmbedUser",
        "GetModelInfo",
    }


def test_every_field_message_and_rpc_is_commented():
    # Clients in other languages are written from protos/ alone: each declaration needs a comment line above it.
    lines = (protogen.PROTO_ROOT / protogen.PROTOS[0]).read_text().splitlines()
    decl = re.compile(r"^\s*(rpc \w+|(repeated |map<[^>]+> )?\w+ \w+ = \d+;|[A-Z_]+ = \d+;|service \w+|enum \w+)")
    missing = []
    for i, line in enumerate(lines):
        if decl.match(line) and not lines[i - 1].strip().startswith("//"):
            missing.append(f"line {i + 1}: {line.strip()}")
    assert missing == []
