"""The serving model and its hot reload.

``ModelStore.current`` is the bundle answering requests. A request reads it ONCE at its start, so a swap (a
single reference assignment) never changes the model under a request in flight. New versions are loaded,
verified and warmed off the request path (by the watcher thread or an admin ReloadModel call); a bundle that fails
is refused, logged and counted (``recsys_model_reloads{result="refused"}`` and ``recsys_bundles_refused{reason}``,
the reason being ``BundleError.reason``), and the old one keeps serving. So is a ``LATEST`` that names no version
directory of ``models_dir`` (a path, a symlink leading out of it, a version that does not exist).

The live catalogue (recsys/catalogue/): what is served is the bundle with its version's catalogue delta applied
(``recsys.catalogue.live.live_bundle``). The watcher reads new delta records at each poll and swaps in the new
view the same way; upserts and retirements through the admin RPCs are written to the delta first, then applied
(so this server, its restarts and every other replica of the models directory converge on the same catalogue).
A delta that fails verification (checksum, sequence, chain) is refused, logged and counted
(``recsys_catalogue_refused``), and the catalogue stays as it was.
"""

from __future__ import annotations

import datetime as _dt
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from recsys.bundle import Bundle, BundleError, list_versions, read_latest, version_dir
from recsys.catalogue.changes import RetireResult, UpsertResult, retire_items, upsert_items
from recsys.catalogue.delta import CatalogueError, CatalogueLog, CatalogueState
from recsys.catalogue.live import live_bundle
from recsys.core import schema
from server import fastpath, service
from server.metrics import Metrics
from server.service import FailedPrecondition, InvalidArgument, NotFound

log = logging.getLogger("recsys.server.store")


def default_loader(path: Path) -> Any:
    """Load and verify a bundle directory (``recsys.bundle.Bundle.load``)."""
    return Bundle.load(path, verify=True)


def warm_up(bundle: Any, n: int, *, native: bool = True) -> None:
    """Run ``n`` of each query kind on a new bundle: first-touch page faults and lazy inits happen here, not on
    the first real request. Raises whatever the bundle raises (the bundle is then refused). ``native``: also build
    the native known-user Recommend (server/fastpath.py)."""
    service.prepared(bundle)  # the request path's cached views (100k str item IDs: ~10 ms), off the request path
    if native:
        fastpath.for_bundle(bundle)  # the native known-user Recommend (user ID map, item ID fields), likewise
    service.user_tower(bundle)  # the checked request-path user tower (native or numpy) of fresh-event requests
    if n <= 0:
        return
    k = min(10, int(bundle.n_items))
    for row in range(min(n, int(bundle.n_users))):
        service.recommend(bundle, user_id=str(bundle.user_ids[row]), k=k)
    for row in range(min(n, int(bundle.n_items))):
        service.similar_items(bundle, item_id=str(bundle.item_ids[row]), k=k)
    if bundle.n_items:
        vec = np.asarray(bundle.embed_history([np.arange(min(3, int(bundle.n_items)), dtype=np.int64)]))
        if vec.shape != (1, int(bundle.dim)) or not np.isfinite(vec).all():
            raise ValueError(f"embed_history returned shape {vec.shape} (expected (1, {bundle.dim})) or NaNs")


class ModelStore:
    """Holds the serving bundle of ``models_dir`` and swaps in new versions."""

    def __init__(
        self,
        models_dir: str | Path,
        *,
        loader: Callable[[Path], Any] = default_loader,
        metrics: Metrics | None = None,
        warmup_queries: int = 8,
        on_change: Callable[[Any], None] | None = None,
        native_recommend: bool = True,
    ) -> None:
        self.models_dir = Path(models_dir)
        self._loader = loader
        self._metrics = metrics
        self._warmup = warmup_queries
        self._native = native_recommend
        self._on_change = on_change
        self.current: Any = None  # read without a lock: a reference read/assignment is atomic
        self.loaded_at: str = ""
        self._reload_lock = threading.Lock()  # one load at a time (watcher vs admin call)
        self._refused: set[str] = set()  # versions that failed; the watcher does not retry them
        self._missing: str | None = None  # the LATEST that named no directory, counted once (retried: it may appear)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._catalogue_error: str | None = None  # the last refused delta's message, logged once
        self._logs: dict[str, CatalogueLog] = {}  # the serving version's delta (it remembers what it verified)

    # ------------------------------------------------------------------ versions
    def latest_version(self) -> str | None:
        """The version named in ``MODELS_DIR/LATEST`` (unchecked: :meth:`reload` checks it through
        ``version_dir`` and counts a refusal), or None when there is none yet."""
        return read_latest(self.models_dir, check=False)

    def list_versions(self) -> list[dict[str, Any]]:
        """Versions in ``models_dir``, newest first (as ``ListModels`` promises; ``recsys.bundle.list_versions``
        lists oldest first)."""
        return [dict(v) for v in reversed(list_versions(self.models_dir))]

    # ------------------------------------------------------------------ loading
    def reload(self, version: str | None = None) -> tuple[str, str, bool]:
        """Load ``version`` (default: LATEST), verify and warm it, then swap it in.

        Returns (previous version, serving version, changed). Raises InvalidArgument for a malformed name,
        NotFound for a missing version, FailedPrecondition when the bundle is refused (old model keeps serving).
        The version directory is checked by ``recsys.bundle.version_dir`` (a ``LATEST`` holding a path or naming a
        symlink out of ``models_dir`` is refused), then loaded by the loader and warmed up.
        """
        with self._reload_lock:
            target = version or self.latest_version()
            if target is None:
                raise NotFound(f"no model yet: {str(self.models_dir / schema.LATEST)!r} does not exist")
            prev = self.current
            prev_version = "" if prev is None else str(prev.version)
            if prev is not None and prev_version == target:
                return prev_version, prev_version, False
            try:
                path = version_dir(self.models_dir, target, pointer=version is None)
            except BundleError as e:
                if e.reason != "latest_missing":
                    self._refuse(target, e.reason, e)
                if version is None and self._missing != target:  # a LATEST naming nothing: counted once
                    self._missing = target
                    self._count("refused", "latest_missing")
                    log.warning("not following %s: %s", schema.LATEST, e, extra={"version": target[:80]})
                raise NotFound(str(e)) from e
            except ValueError as e:
                raise InvalidArgument(f"`version` must be a version directory name, got {version[:80]!r}") from e
            t0 = time.perf_counter()
            try:
                bundle = self._loader(path)
            except Exception as e:
                self._refuse(target, e.reason if isinstance(e, BundleError) else "other", e)
            if str(bundle.version) != target:  # a copied directory: polling would reload it forever
                self._refuse(target, "manifest_mismatch", BundleError(
                    f"{schema.MANIFEST}: version is {str(bundle.version)[:80]!r}, its directory is {target[:80]!r}"))
            if isinstance(bundle, Bundle):
                bundle = self._with_catalogue(bundle, CatalogueState.empty())
            try:
                warm_up(bundle, self._warmup, native=self._native)
            except Exception as e:
                self._refuse(target, e.reason if isinstance(e, BundleError) else "warmup", e)
            self.current = bundle  # the swap: requests that start from now on see the new bundle
            self.loaded_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            self._refused.discard(target)
            self._missing = None
            self._count("ok")
            if self._metrics is not None:
                self._metrics.set_version(str(bundle.version), created_at=str(getattr(bundle, "created_at", "")),
                                          n_items=getattr(bundle, "n_items", None),
                                          n_users=getattr(bundle, "n_users", None))
            log.info(
                "serving model version %s (was %s), loaded in %.2fs", bundle.version, prev_version or "none",
                time.perf_counter() - t0, extra={"version": str(bundle.version)},
            )
            if self._on_change is not None:
                self._on_change(bundle)
            return prev_version, str(bundle.version), True

    def _refuse(self, target: str, reason: str, e: Exception) -> NoReturn:
        """Refuse ``target`` (not retried by the watcher), count and log it; the old model keeps serving."""
        self._refused.add(target)
        self._count("refused", reason)
        log.error("refused model version %s (%s): %s", target[:80], reason, e, extra={"version": target[:80]},
                  exc_info=True)
        raise FailedPrecondition(f"model version {target[:80]!r} was refused ({reason}): {e}") from e

    def _count(self, result: str, reason: str | None = None) -> None:
        """``recsys_model_reloads{result}``, and ``recsys_bundles_refused{reason}`` for a refusal."""
        if self._metrics is not None:
            self._metrics.reloads.labels(result).inc()
            if reason is not None:
                self._metrics.bundles_refused.labels(reason).inc()

    # ------------------------------------------------------------------ catalogue
    def _with_catalogue(self, view: Any, state: CatalogueState) -> Any:
        """``view`` (a bundle or a live view of one) with the delta records after ``state`` applied: a new view,
        or ``view`` itself when there are none. A delta that fails verification leaves ``state`` as it was."""
        base = getattr(view, "base", view)
        changes: list = []
        try:
            changes = self._log(str(base.version)).read(after=state.seq)
            if not changes and view is not base:
                return view
            new_state = state.apply(changes) if changes else state
        except (CatalogueError, OSError) as e:  # OSError: the delta cannot be read at all (permissions, a file)
            reason = e.reason if isinstance(e, CatalogueError) else "unreadable"
            if self._catalogue_error != str(e):
                self._catalogue_error = str(e)
                log.error("catalogue delta of %s refused (%s): %s; the catalogue stays at change %d", base.version,
                          reason, e, state.seq, extra={"version": str(base.version)})
                if self._metrics is not None:
                    self._metrics.catalogue_refused.labels(reason).inc()
            if view is not base:
                return view
            new_state = state
        else:
            self._catalogue_error = None
        attributes = getattr(view, "base_attributes", None)
        new = live_bundle(base, new_state, attributes=attributes)
        if changes:
            log.info("catalogue of %s at change %d: %d items, %d upserted, %d retired", base.version, new_state.seq,
                     new.catalogue.size, new.catalogue.upserted, new.catalogue.retired,
                     extra={"version": str(base.version)})
        return new

    def _log(self, version: str) -> CatalogueLog:
        log_ = self._logs.get(version)
        if log_ is None:
            self._logs = {version: CatalogueLog(self.models_dir, version)}  # the serving version's only
            log_ = self._logs[version]
        return log_

    def refresh_catalogue(self) -> bool:
        """Apply the serving version's new delta records (another replica's or a command's); True on a change."""
        with self._reload_lock:
            current = self.current
            return getattr(current, "catalogue_state", None) is not None and self._serve_catalogue(current)

    def upsert(self, rows: list[dict[str, Any]], *, change_id: str | None = None) -> UpsertResult:
        """Write an upsert to the serving version's delta and serve it (see recsys.catalogue.changes)."""
        return self._change(upsert_items, rows, change_id)

    def retire(self, item_ids: list[str], *, change_id: str | None = None) -> RetireResult:
        """Write a retirement to the serving version's delta and serve it."""
        return self._change(retire_items, item_ids, change_id)

    def _change(self, write: Callable[..., Any], payload: list[Any], change_id: str | None) -> Any:
        """One catalogue change: written to the delta (one writer at a time, never during a reload), then served.
        Errors: a refused delta -> FailedPrecondition, a delta that cannot be written (read-only or full volume)
        -> FailedPrecondition, bad input (an unknown attribute, a malformed change ID) -> InvalidArgument."""
        with self._reload_lock:
            current = self._catalogue_view()
            try:
                result = write(self.models_dir, current, payload, change_id=change_id,
                               log=self._log(str(current.version)))
            except CatalogueError as e:
                raise FailedPrecondition(str(e)) from e
            except OSError as e:
                raise FailedPrecondition(f"cannot write the catalogue delta in {str(self.models_dir)!r}: {e}") from e
            except ValueError as e:
                raise InvalidArgument(str(e)) from e
            self._serve_catalogue(current)
            return result

    def _catalogue_view(self) -> Any:
        current = self.current
        if current is None:
            raise service.Unavailable("no model loaded yet")
        if getattr(current, "catalogue_state", None) is None:
            raise FailedPrecondition(f"model {current.version} has no live catalogue (not a published bundle)")
        return current

    def _serve_catalogue(self, current: Any) -> bool:
        """Swap in ``current`` with the delta's new records applied (under the reload lock); True on a change."""
        new = self._with_catalogue(current, current.catalogue_state)
        if new is current:
            return False
        service.prepared(new)  # the request path's item-ID list, built off the request path
        self.current = new
        return True

    def poll_once(self) -> bool:
        """Load LATEST if it names a new version that was not refused before, else apply the serving version's
        new catalogue records; True when what is served changed."""
        latest = self.latest_version()
        current = self.current
        if current is not None and str(current.version) == latest:
            self._missing = None  # LATEST is back: a later dangling one is counted again
            return self.refresh_catalogue()
        if latest is None or latest in self._refused:
            return False
        try:
            return self.reload()[2]  # (re-reads LATEST: checked as a pointer, not as an admin's version name)
        except NotFound:  # a LATEST naming nothing: reload logged it (once); retried, it may appear
            return False
        except (FailedPrecondition, InvalidArgument) as e:
            log.warning("hot reload of %s failed: %s", latest[:80], e)
            return False

    # ------------------------------------------------------------------ watcher
    def start_watcher(self, poll_s: float) -> None:
        if poll_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._watch, args=(poll_s,), name="model-watcher", daemon=True)
        self._thread.start()

    def _watch(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            try:
                self.poll_once()
            except Exception:  # the watcher must survive anything a bundle throws at it
                self._count("error")
                log.exception("model watcher error")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
