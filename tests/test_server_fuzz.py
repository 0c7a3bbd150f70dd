"""Property-based fuzz of request messages: random / unicode IDs, huge and negative k, 10,000-element lists.

The server may only answer OK, INVALID_ARGUMENT or NOT_FOUND: never INTERNAL, UNKNOWN, or a dead server.
"""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_server_helpers import code_of, running_server, write_fake_version

from recsys.v1 import recommender_pb2 as pb
from recsys.v1 import recommender_pb2_grpc as pb_grpc

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND}
INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
K = st.one_of(st.integers(-5, 60), INT32)
# real IDs, unicode (surrogates excluded: protobuf strings are valid UTF-8), empty and over-long ones
ID = st.one_of(
    st.sampled_from(["u0", "u7", "i1", "i42", "", "ghost", "x" * 33]),
    st.text(max_size=40),
    st.text(alphabet=st.characters(min_codepoint=0x80, max_codepoint=0x10FFFF, exclude_categories=("Cs",)),
            min_size=1, max_size=8),
)
# 10,000-element lists are generated cheaply as a block, mixed with small random ones
BIG = st.integers(0, 10_000).map(lambda n: [f"i{j % 150}" for j in range(n)])
IDS = st.one_of(st.lists(ID, max_size=6), BIG)


@pytest.fixture(scope="module")
def stub(tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    write_fake_version(models, "v1", seed=1)
    with running_server(models, max_message_bytes=8 * 1024 * 1024) as (_app, target), \
            grpc.insecure_channel(target) as ch:
        yield pb_grpc.RecommenderStub(ch)


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FUZZ
@given(user_id=ID, history=IDS, k=K, include_seen=st.booleans(), exclude=IDS, allowed=IDS, fallback=st.booleans())
def test_recommend_fuzz(stub, user_id, history, k, include_seen, exclude, allowed, fallback):
    req = pb.RecommendRequest(user_id=user_id, history_item_ids=history, k=k, include_seen=include_seen,
                              exclude_item_ids=exclude, allowed_item_ids=allowed, allow_fallback=fallback)
    code, details = code_of(stub.Recommend, req, timeout=10)
    assert code in ALLOWED, details


@FUZZ
@given(user_ids=IDS, k=K, exclude=IDS, allowed=IDS, fallback=st.booleans())
def test_batch_and_similar_fuzz(stub, user_ids, k, exclude, allowed, fallback):
    req = pb.BatchRecommendRequest(user_ids=user_ids, k=k, exclude_item_ids=exclude, allowed_item_ids=allowed,
                                   allow_fallback=fallback)
    code, details = code_of(stub.BatchRecommend, req, timeout=10)
    assert code in ALLOWED, details
    item = user_ids[0] if user_ids else ""
    code, details = code_of(stub.SimilarItems, pb.SimilarItemsRequest(item_id=item, k=k, exclude_item_ids=exclude,
                                                                        allowed_item_ids=allowed), timeout=10)
    assert code in ALLOWED, details


@FUZZ
@given(ids=IDS)
def test_embedding_rpcs_fuzz(stub, ids):
    for method, req in (
        (stub.GetUserEmbeddings, pb.GetUserEmbeddingsRequest(user_ids=ids)),
        (stub.GetItemEmbeddings, pb.GetItemEmbeddingsRequest(item_ids=ids)),
        (stub.EmbedUser, pb.EmbedUserRequest(history_item_ids=ids)),
    ):
        code, details = code_of(method, req, timeout=10)
        assert code in ALLOWED, details
