"""ServeSettings: defaults < TOML [serve] < RECSYS_* environment < flags; bad values named."""

from __future__ import annotations

import pytest

from recsys.core.config import ConfigError
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


def test_workers_default_to_one_per_usable_core(tmp_path, monkeypatch):
    import os

    from recsys.core import config

    affinity = len(os.sched_getaffinity(0))
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a 1.5-CPU container limit -> 2 cores
    assert config.usable_cpus(tmp_path) == min(affinity, 2)
    (tmp_path / "cpu.max").write_text("max 100000\n")  # no limit: the affinity mask
    assert config.usable_cpus(tmp_path) == affinity
    assert config.usable_cpus(tmp_path / "missing") == affinity
    import server.settings as settings_mod

    monkeypatch.setattr(settings_mod, "usable_cpus", lambda: 1)
    assert ServeSettings().resolved_workers() == 2  # at least 2 even on one core
    monkeypatch.setattr(settings_mod, "usable_cpus", lambda: 6)
    assert ServeSettings().resolved_workers() == 6
    monkeypatch.setattr(settings_mod, "usable_cpus", lambda: 64)
    assert ServeSettings().resolved_workers() == 8  # a big host: more threads would only queue for the GIL
    assert ServeSettings(workers=3).resolved_workers() == 3
    with pytest.raises(ConfigError, match=r"`serve.workers` must be >= 0 \(0 = one per CPU core\), got -1"):
        load_settings(env={}, overrides={"workers": -1})


def test_settings_carry_every_request_limit():
    """`[serve]` has a field for each of `Limits`' (same name, same default) and hands them over by name."""
    import dataclasses

    from server.service import Limits
    from server.settings import ServeSettings

    assert ServeSettings().limits() == Limits()
    names = [f.name for f in dataclasses.fields(Limits)]
    custom = ServeSettings(**{n: 7 + i for i, n in enumerate(names)}).limits()
    assert [getattr(custom, n) for n in names] == [7 + i for i in range(len(names))]
