"""Test-only helpers for the server tests: a Bundle-shaped stand-in with known answers, and a running server.

``FakeBundle`` is NOT a recsys module: it lives here so the servicer can be exercised with exact, hand-checkable
answers (exact search over random unit vectors) independently of the real exporter. ``tests/test_server_bundle.py``
runs the same server on a real exported bundle.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import numpy as np

from recsys.core import schema
from server.app import create_server
from server.settings import ServeSettings

N_USERS, N_ITEMS, DIM = 40, 120, 8


class FakeBundleError(ValueError):
    pass


class _ExactSearch:
    """Brute-force twin of the index interface: ids [n, k] int64, scores [n, k] float32, padded -1/-inf."""

    def __init__(self, vectors: np.ndarray, *, delay_s: float = 0.0, fail: bool = False) -> None:
        self.vectors = vectors
        self.delay_s = delay_s
        self.fail = fail

    def search(self, queries, k, *, exclude=None, include=None):
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.fail:
            raise RuntimeError("secret internal detail")
        scores = (np.asarray(queries, dtype=np.float32) @ self.vectors.T).astype(np.float32)  # [n, n_items]
        if exclude is not None:
            for i, ex in enumerate(exclude):
                if ex is not None and len(ex):
                    scores[i, np.asarray(ex, dtype=np.int64)] = -np.inf
        if include is not None:
            for i, inc in enumerate(include):
                if inc is not None:
                    outside = np.ones(scores.shape[1], dtype=bool)
                    outside[np.asarray(inc, dtype=np.int64)] = False
                    scores[i, outside] = -np.inf
        order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        top = np.take_along_axis(scores, order, axis=1)
        ids = np.where(np.isfinite(top), order, -1).astype(np.int64)
        pad = max(0, k - ids.shape[1])
        if pad:
            ids = np.pad(ids, ((0, 0), (0, pad)), constant_values=-1)
            top = np.pad(top, ((0, 0), (0, pad)), constant_values=-np.inf)
        return ids, top.astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


class FakeBundle:
    """Bundle-shaped: user ``u{j}`` / item ``i{j}``, random unit vectors from ``seed``; user j has seen items
    ``{j, j + 1, j + 2}`` (mod n_items), its history; popularity order = item row order; ``embed_history`` =
    normalised mean, ``embed_users`` = normalised (stored vector + mean)."""

    def __init__(self, path: Path, *, version: str, seed: int = 0, delay_s: float = 0.0, fail: bool = False):
        rng = np.random.default_rng(seed)
        self.path = Path(path)
        self.version = version
        self.created_at = "2024-01-01T00:00:00+00:00"
        self.manifest = {"version": version}
        self.dim, self.metric, self.n_users, self.n_items = DIM, "cosine", N_USERS, N_ITEMS
        self.tower_items = N_ITEMS  # every item is in the user tower's table (no live catalogue)
        self.item_ids = np.array([f"i{j}" for j in range(N_ITEMS)])
        self.user_ids = np.array([f"u{j}" for j in range(N_USERS)])
        self.item_embeddings = _unit(rng.normal(size=(N_ITEMS, DIM)))
        self.user_embeddings = _unit(rng.normal(size=(N_USERS, DIM)))
        self.index = _ExactSearch(self.item_embeddings, delay_s=delay_s, fail=fail)
        self.popular_items = np.arange(N_ITEMS, dtype=np.int64)
        self.evaluation = {"test": {"recall@20": 0.25, "n_users": 40}, "note": "text is dropped"}
        self._user_row = {u: i for i, u in enumerate(self.user_ids.tolist())}
        self._item_row = {t: i for i, t in enumerate(self.item_ids.tolist())}

    def user_row(self, user_id):
        return self._user_row.get(user_id)

    def item_row(self, item_id):
        return self._item_row.get(item_id)

    def item_rows(self, item_ids):
        rows = [self._item_row.get(t) for t in item_ids]
        return (np.array([r for r in rows if r is not None], dtype=np.int64),
                [t for t, r in zip(item_ids, rows, strict=True) if r is None])

    def seen_items(self, user_row):
        return (np.arange(3, dtype=np.int64) + user_row) % N_ITEMS

    def item_queries(self, rows):  # Bundle.item_queries without a score prior: the items' own vectors
        return self.item_embeddings[np.asarray(rows, dtype=np.int64)]

    def history(self, user_row):
        return self.seen_items(user_row)

    def embed_history(self, histories: Sequence[np.ndarray]) -> np.ndarray:
        return _unit(np.stack([self.item_embeddings[np.asarray(h)].mean(axis=0) for h in histories]))

    def embed_users(self, user_rows: np.ndarray, histories: Sequence[np.ndarray]) -> np.ndarray:
        """A stand-in tower: a known user's stored vector + the mean of the history items, normalised (a new user,
        row -1: ``embed_history``)."""
        out = [
            self.item_embeddings[np.asarray(h, dtype=np.int64)].mean(axis=0) + (self.user_embeddings[r] if r >= 0 else 0)
            for r, h in zip(np.asarray(user_rows).tolist(), histories, strict=True)
        ]
        return _unit(np.stack(out))

    # expected answers, computed independently of server.service
    def expected_top(self, query: np.ndarray, k: int, exclude: Sequence[int] = ()) -> list[str]:
        scores = self.item_embeddings @ query
        scores[list(exclude)] = -np.inf
        return [f"i{j}" for j in np.argsort(-scores, kind="stable")[:k]]


def write_fake_version(models_dir: Path, version: str, *, seed: int = 0, latest: bool = True, **opts) -> Path:
    """A version directory the fake loader understands (``fake.json``), optionally published in LATEST."""
    d = Path(models_dir) / version
    d.mkdir(parents=True, exist_ok=True)
    (d / "fake.json").write_text(json.dumps({"version": version, "seed": seed, **opts}))
    (d / schema.MANIFEST).write_text(json.dumps({"version": version, "created_at": f"2024-01-01T00:00:0{seed % 10}"}))
    if latest:
        (Path(models_dir) / schema.LATEST).write_text(version + "\n")
    return d


def fake_loader(path: Path) -> FakeBundle:
    """Loader with the real one's contract: verify, then build; a corrupted directory raises (is refused)."""
    try:
        meta = json.loads((Path(path) / "fake.json").read_text())
    except (OSError, ValueError) as e:
        raise FakeBundleError(f"{path}/fake.json: cannot be read: {e}") from e
    return FakeBundle(path, **meta)


def settings(models_dir: Path, **kw) -> ServeSettings:
    base = dict(models_dir=str(models_dir), poll_s=0.0, grace_s=1.0, warmup_queries=2, max_k=50, max_ids=100,
                max_history=50, max_id_length=32, workers=4, admin_token="s3cret")
    base.update(kw)
    return ServeSettings(**base)


@contextlib.contextmanager
def running_server(models_dir: Path, *, loader=fake_loader, **kw) -> Iterator[tuple[object, str]]:
    """A started server on a free local port: yields (RecommenderServer, "127.0.0.1:PORT")."""
    app, port = create_server("127.0.0.1:0", settings(models_dir, **kw), loader=loader)
    app.start()
    try:
        yield app, f"127.0.0.1:{port}"
    finally:
        app.stop(0).wait(5)


def code_of(fn, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    """(status code, details) of a stub call; OK and "" when it succeeds."""
    try:
        fn(*args, **kwargs)
    except grpc.RpcError as e:
        return e.code(), e.details() or ""
    return grpc.StatusCode.OK, ""
