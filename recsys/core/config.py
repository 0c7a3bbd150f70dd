"""Config machinery shared by every stage.

Each stage owns a frozen dataclass (``PrepareConfig``, ``ModelConfig``, ``TrainConfig``, ...) whose fields carry a
docstring-style comment. One TOML file holds them all, one table per stage (``[prepare]``, ``[model]``,
``[train]``, ...). CLI overrides are ``section.field=value`` strings parsed as TOML values, so
``--set train.lr=0.003`` and ``--set prepare.kcore_users=5`` work the same way for every stage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override names an unknown field or holds a value of the wrong type."""


def read_toml(path: str | Path | None) -> dict[str, Any]:
    """Read a TOML file into a dict; ``None`` gives an empty dict."""
    if path is None:
        return {}
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None


def parse_overrides(overrides: Iterable[str]) -> dict[str, dict[str, Any]]:
    """Parse ``["train.lr=0.01", "model.dim=64"]`` into ``{"train": {"lr": 0.01}, "model": {"dim": 64}}``.

    Values are TOML literals; a bare word that is not valid TOML is taken as a string (``prepare.split=global``).
    """
    out: dict[str, dict[str, Any]] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        section, dot, field = key.strip().partition(".")
        if not sep or not dot or not section or not field:
            raise ConfigError(f"override must look like `section.field=value`, got {item!r}")
        try:
            value = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw.strip()
        out.setdefault(section, {})[field] = value
    return out


def merge(*layers: Mapping[str, Any]) -> dict[str, Any]:
    """Merge nested dicts; later layers win, tables are merged key by key."""
    out: dict[str, Any] = {}
    for layer in layers:
        for k, v in layer.items():
            if isinstance(v, Mapping) and isinstance(out.get(k), dict):
                out[k] = merge(out[k], v)
            else:
                out[k] = dict(v) if isinstance(v, Mapping) else v
    return out


def _check_type(cls_name: str, name: str, tp: Any, value: Any) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _check_type(cls_name, name, a, value)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"`{cls_name}.{name}` got {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"`{cls_name}.{name}` must be one of {list(args)}, got {value!r}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"`{cls_name}.{name}` must be a list, got {value!r}")
        inner = args[0] if args else Any
        return tuple(_check_type(cls_name, name, inner, v) for v in value)
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"`{cls_name}.{name}` must be a table, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{cls_name}.{name}` must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"`{cls_name}.{name}` must be an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{cls_name}.{name}` must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"`{cls_name}.{name}` must be a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: Mapping[str, Any] | None) -> T:
    """Build a frozen config dataclass from a dict, rejecting unknown fields and wrong types by name."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} for {cls.__name__}; known fields: {sorted(names)}")
    kwargs = {k: _check_type(cls.__name__, k, hints[k], v) for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if callable(validate):
        validate()
    return obj


def to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON/TOML-friendly dict of a config dataclass (tuples become lists)."""
    def conv(v: Any) -> Any:
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(cfg)


def load_section(
    cls: type[T], section: str, *, path: str | Path | None = None, overrides: Iterable[str] = ()
) -> T:
    """Load one stage's config: defaults < ``[section]`` of the TOML file < CLI ``section.field=value`` overrides."""
    file_layer = read_toml(path).get(section, {})
    over_layer = parse_overrides(overrides).get(section, {})
    return from_dict(cls, merge(file_layer, over_layer))


def dumps(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2, sort_keys=True)


def usable_cpus(cgroup_root: str | Path = "/sys/fs/cgroup") -> int:
    """CPU cores this process may actually use: the affinity mask, capped by a cgroup v2 CPU quota (a container's
    ``--cpus`` / Kubernetes CPU limit, rounded up), at least 1. ``os.cpu_count()`` reports the host's cores,
    which oversizes thread pools in containers."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = (Path(cgroup_root) / "cpu.max").read_text().split()[:2]
        if quota != "max" and int(period) > 0:
            n = min(n, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):  # no cgroup v2 limit readable: the affinity count stands
        pass
    return max(1, n)
