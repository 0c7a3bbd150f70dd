"""The bundle format is a public contract: a bundle exported by the code before the package reorganisation
(commit c3cec5e, flat ``recsys/``; tests/data/bundle_c3cec5e, 120 synthetic users x 80 items, dim 16) still loads,
verifies and serves with today's code, and today's towers reproduce the embeddings that code stored."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from recsys.bundle import Bundle
from recsys.retrieval import ExactIndex
from server import service

OLD = Path(__file__).parent / "data" / "bundle_c3cec5e"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Bundle:
    models = tmp_path_factory.mktemp("old_models")
    shutil.copytree(OLD, models, dirs_exist_ok=True)
    return Bundle.load(models, verify=True)  # every sha256 checked against the old manifest


def test_an_old_bundle_loads_and_verifies(bundle):
    assert bundle.version == "pre-packages-c3cec5e" and bundle.dim == 16 and bundle.metric == "cosine"
    assert bundle.n_items == bundle.item_embeddings.shape[0] and bundle.n_users == bundle.user_embeddings.shape[0]


def test_known_users_get_the_exact_answer_over_the_stored_embeddings(bundle):
    exact = ExactIndex(bundle.item_embeddings)
    for row in range(0, bundle.n_users, 7):
        seen = bundle.seen_items(row)
        want, _ = exact.search(bundle.user_embeddings[row : row + 1], 10, exclude=[seen])
        rec = service.recommend(bundle, user_id=str(bundle.user_ids[row]), k=10)
        assert rec.source == service.SOURCE_KNOWN_USER
        assert rec.item_ids == [str(bundle.item_ids[i]) for i in want[0] if i >= 0]


def test_todays_towers_reproduce_the_old_stored_user_embeddings(bundle):
    rows = np.arange(bundle.n_users, dtype=np.int64)
    histories = [bundle.history(int(r)) for r in rows]
    np.testing.assert_allclose(bundle.embed_users(rows, histories), bundle.user_embeddings, atol=1e-5)
    # and the request path's tower (native or numpy twin) agrees with them
    tower = service.user_tower(bundle)
    assert tower is not None
    np.testing.assert_allclose(tower(rows[:20], histories[:20]), bundle.user_embeddings[:20], atol=1e-5)
