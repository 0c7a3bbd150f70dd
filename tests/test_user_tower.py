"""The request path's twins of the user tower (recsys.train.model.NumpyUserTower, recsys._hnsw.UserTower) against the
torch tower they copy, on every architecture option of the user tower."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from recsys.train.config import FeatureSpec, ModelConfig
from recsys.train.embed import pad_histories
from recsys.train.model import NumpyUserTower, TwoTower
from server import service

N_USERS, N_ITEMS = 300, 900

CONFIGS = {
    "default": ModelConfig(),
    "hidden (GELU)": ModelConfig(hidden=(96, 48)),
    "mean, no last item": ModelConfig(history_pooling="mean", last_item=False),
    "own history table, no user id": ModelConfig(share_history_embeddings=False, use_user_id=False),
    "no user features": ModelConfig(use_user_features=False, history_len=7),
    # [u, g, 0] / |[u, g]|: g of the known user's stored state, or of a new user's history length
    "score prior": ModelConfig(time_prior=True, history_len=20),
    # model.user_tower = "transformer": NumpyUserTower._encode and the native twin's encoder (recsys._hnsw.UserTower)
    "transformer": ModelConfig(user_tower="transformer", history_len=20),
    "transformer, 1 layer, 4 heads, hidden": ModelConfig(user_tower="transformer", transformer_layers=1,
                                                         transformer_heads=4, hidden=(48,)),
    "transformer, score prior, no user features": ModelConfig(user_tower="transformer", time_prior=True,
                                                              use_user_features=False, history_len=7),
}


def _model(cfg: ModelConfig) -> TwoTower:
    torch.manual_seed(0)
    spec = FeatureSpec(n_users=N_USERS, n_items=N_ITEMS, user_features={"age": 6, "tags": 9},
                       user_feature_widths={"tags": 3})
    codes = torch.cat([torch.randint(0, 6, (N_USERS, 1)), torch.randint(0, 9, (N_USERS, 3))], dim=1)
    codes[:10, 1:] = 0  # users without any tag: the multi-valued mean of nothing is zeros
    model = TwoTower(spec, cfg, user_feats=codes).eval()
    with torch.no_grad():  # trained-looking weights: recency, key and query are zeros at init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
        if model.user_now is not None:  # users' states differ (tenure, events): so do their g
            model.user_now.copy_(torch.rand(N_USERS, 2) * 4)
            model.prior_scale.fill_(3.0)  # the weight validation chose: the twins serve g times it
    return model


def _users(rng: np.random.Generator) -> tuple[np.ndarray, list[np.ndarray]]:
    rows = np.array([0, 5, -1, N_USERS - 1, 42, -1, 7], dtype=np.int64)
    lengths = (0, 80, 3, 1, 50, 0, 12)  # empty, longer than history_len, short, exactly history_len
    return rows, [rng.integers(0, N_ITEMS, n) for n in lengths]


def _twins(model: TwoTower) -> list:
    """The numpy twin and the native one (a pooling or a transformer tower alike)."""
    twin = NumpyUserTower(model)
    return [twin, service.NativeUserTower(twin)]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_twins_equal_the_torch_tower(name):
    model = _model(CONFIGS[name])
    rows, histories = _users(np.random.default_rng(1))
    with torch.no_grad():
        want = model.encode_users(torch.from_numpy(rows),
                                  torch.from_numpy(pad_histories(histories, max_len=model.cfg.history_len))).numpy()
    assert np.abs(want[0] - want[1]).max() > 0.1  # the users differ: a constant answer would fail
    for tower in _twins(model):
        got = tower(rows, histories)
        assert got.shape == want.shape and got.dtype == np.float32
        np.testing.assert_allclose(got, want, atol=2e-6, err_msg=type(tower).__name__)
        for i in range(len(rows)):  # one user at a time (the request path) gives the same rows
            np.testing.assert_allclose(tower(rows[i : i + 1], histories[i : i + 1]), want[i : i + 1], atol=2e-6)


@pytest.mark.parametrize("kind", ["pool", "transformer"])
def test_only_the_last_history_len_items_count_and_order_matters(kind):
    model = _model(ModelConfig(history_len=5, user_tower=kind))
    rng = np.random.default_rng(2)
    h = rng.integers(0, N_ITEMS, 9)
    for tower in _twins(model):
        a = tower(np.array([3]), [h])
        b = tower(np.array([3]), [np.concatenate(([1, 2, 3, 4], h[4:]))])  # older items than the last 5 changed
        np.testing.assert_array_equal(a, b)
        c = tower(np.array([3]), [h[::-1]])  # the same items, another order (recency / position, last item)
        assert np.abs(a - c).max() > 1e-3


def test_the_native_tower_refuses_rows_out_of_range():
    tower = _twins(_model(ModelConfig()))[1]
    with pytest.raises(ValueError, match="`items` must be in"):
        tower(np.array([0]), [np.array([N_ITEMS])])
    with pytest.raises(ValueError, match="`rows` must be in"):
        tower(np.array([N_USERS]), [np.array([1])])


def test_a_native_extension_without_the_encoder_refuses_a_transformer_with_type_error(monkeypatch):
    """server.service._build_tower serves with numpy when the native tower cannot be built (an extension built before
    the native transformer takes no ``encoder``: TypeError); a pooling tower's arrays carry no ``encoder``."""
    from recsys import _hnsw

    assert "encoder" not in NumpyUserTower(_model(ModelConfig())).arrays()
    twin = NumpyUserTower(_model(ModelConfig(user_tower="transformer", history_len=5)))
    assert twin.arrays()["encoder"] is not None

    def old_extension(*, encoder=None, **arrays):
        if encoder is not None:
            raise TypeError("__init__(): incompatible constructor arguments")
        return _hnsw.UserTower(**arrays)

    monkeypatch.setattr(_hnsw, "UserTower", old_extension)
    with pytest.raises(TypeError):
        service.NativeUserTower(twin)
