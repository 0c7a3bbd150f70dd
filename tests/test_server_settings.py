"""ServeSettings: defaults < TOML [serve] < RECSYS_* environment < flags; bad values named."""

from __future__ import annotations

import pytest

from recsys.config import ConfigError
from server.settings import ServeSettings, load_settings


def test_precedence(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[serve]\nport = 6000\nmax_k = 200\nadmin_token = "from-file"\npoll_s = 5.0\n')
    env = {"RECSYS_MAX_K": "300", "RECSYS_ADMIN_TOKEN": "from-env", "RECSYS_LOG_REQUESTS": "true", "HOME": "/x"}
    s = load_settings(config=cfg, env=env, overrides={"port": 7000, "max_k": None})
    assert (s.port, s.max_k, s.admin_token, s.poll_s, s.log_requests) == (7000, 300, "from-env", 5.0, True)
    assert load_settings(env={}) == ServeSettings()


def test_bad_values_are_named(tmp_path):
    with pytest.raises(ConfigError, match="RECSYS_MAX_K must be int, got 'lots'"):
        load_settings(env={"RECSYS_MAX_K": "lots"})
    with pytest.raises(ConfigError, match=r"`serve.max_k` must be >= 1, got 0"):
        load_settings(env={}, overrides={"max_k": 0})
    with pytest.raises(ConfigError, match="tls_cert` and `serve.tls_key` go together"):
        load_settings(env={}, overrides={"tls_cert": str(tmp_path / "c.pem")})
    with pytest.raises(ConfigError, match="unknown field"):
        load_settings(env={}, overrides={"max_kk": 3})
