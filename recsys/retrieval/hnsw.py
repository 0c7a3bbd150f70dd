"""The HNSW index: the native extension (exclusion inside the graph walk) or the hnswlib package with
adaptive over-fetch, behind one class; its config and its file checks."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import struct
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from recsys.core.io import atomic_write_file
from recsys.retrieval import bitset
from recsys.retrieval._arrays import (
    IdMap,
    as_ids,
    as_matrix,
    check_k,
    check_metric,
    per_query,
    resolve_threads,
    topk_rows,
)
from recsys.retrieval._native import NativeSearch, present_exclusions
from recsys.retrieval._package import PackageSearch
from recsys.retrieval.exact import ExactIndex

if TYPE_CHECKING:
    from recsys.retrieval.partitions import Partitions

_NATIVE: Any = None
_NATIVE_ERROR: str | None = None


def _native_module() -> Any:
    """``recsys._hnsw`` or None when it was not built (install without a C++ compiler); imported on first use."""
    global _NATIVE, _NATIVE_ERROR
    if _NATIVE is None and _NATIVE_ERROR is None:
        try:
            from recsys import _hnsw  # compiled extension: optional (not built without a C++ compiler)

            _NATIVE = _hnsw
        except ImportError as e:
            _NATIVE_ERROR = str(e)
    return _NATIVE


def native_available() -> bool:
    """Whether the ``recsys._hnsw`` extension (in-search exclusion filter) is importable."""
    return _native_module() is not None



# ----------------------------------------------------------------------------------------------------------------
# config


SEARCH_PRECISIONS = ("bf16", "fp32")


class AllowWalk(NamedTuple):
    """How the native walk searches one allowed set (:meth:`HnswIndex.allow_walk`): ``width`` (:meth:`HnswIndex.allow_width`),
    ``near_width`` (the narrower width used when the query's neighbourhood holds the set's share; 0 = never,
    :attr:`HnswIndex.filter_near_fraction`), ``budget`` (:meth:`HnswIndex.allow_budget`), ``count`` (the set's size)."""

    width: int
    near_width: int
    budget: int
    count: int


@dataclasses.dataclass(frozen=True)
class IndexConfig:
    """HNSW build/search parameters (section ``[index]``); stored in the bundle manifest."""

    M: int = 16
    """Graph out-degree (hnswlib ``M``): memory ~ ``size * (4 * dim + 8 * M)`` bytes; 16 suits dim 32-128."""
    ef_construction: int = 200
    """Candidate-list size while building; higher = better graph, slower build (build time ~ linear in it)."""
    ef: int = 64
    """Candidate-list size at query time when not auto-tuned; the effective value is ``max(ef, k)``."""
    ef_filtered: int = 0
    """Candidate-list size of queries with an exclusion list (native filter) when not auto-tuned on exclusion
    queries; 0 = ``ef``. The effective value is ``max(ef, ef_filtered, k)``."""
    search_precision: str = "fp32"
    """How the graph is traversed (native extension only): ``"fp32"`` = hnswlib's own search over its float32
    vectors; ``"bf16"`` = over a bfloat16 copy of the vectors (2 cache lines per 64-d vector instead of 5; +2 bytes x
    dim per item of memory), candidates re-scored in float32 so results and scores match an exact re-ranking.
    Measured on trained-like embeddings (benchmarks/index_bench.py): equal recall at equal ef; ~14% faster single
    queries at dim 128, no faster at dim 64 (the default model dim)."""
    num_threads: int = -1
    """Threads for building and for batch queries; -1 = all cores. Single queries always use the caller's thread."""
    seed: int = 100
    """hnswlib's random seed for node levels (the build is still order-dependent with several threads)."""
    autotune: bool = True
    """Pick the smallest ef in ``autotune_efs`` whose Recall@``autotune_k`` vs exact reaches ``target_recall``."""
    target_recall: float = 0.99
    """Recall@k of HNSW against the exact search that the auto-tuned ef must reach."""
    autotune_k: int = 10
    """The k of the auto-tune recall."""
    autotune_queries: int = 1000
    """How many held-out query embeddings the auto-tune scores (fewer if fewer exist)."""
    autotune_efs: tuple[int, ...] = (10, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
    """The ef ladder the auto-tune tries, increasing."""
    partition_by: tuple[str, ...] = ()
    """Item attributes (features of the items file) to build one more graph per value of
    (:mod:`recsys.retrieval.partitions`): a filter on such an attribute (``category in {books}``, alone or ANDed
    with other conditions) then searches the graphs of its values instead of walking the whole index: 0.8-1.8x a
    plain query at p99 instead of 3.3-7.6x for a value holding 10% of the catalogue (benchmarks/index_bench.py). Costs
    about the main index's memory and build time again per attribute (more for a multi-valued one: an item is in
    the graph of each of its values); each graph's ``ef`` is auto-tuned like the main one."""
    partition_min_items: int = 0
    """Values of a ``partition_by`` attribute with this many items or fewer get no graph; 0 = the index's
    exact-scan switch (``16 * sqrt(n_items)``: ~5,000 of 100k), below which such a value is scanned exactly anyway.
    A filter on the attribute scans the items of its values without a graph (up to twice the switch in all;
    more walk the main index)."""

    def validate(self) -> None:
        if self.M < 2:
            raise ValueError(f"`index.M` must be >= 2, got {self.M}")
        if self.ef_construction < 1:
            raise ValueError(f"`index.ef_construction` must be >= 1, got {self.ef_construction}")
        if self.ef < 1:
            raise ValueError(f"`index.ef` must be >= 1, got {self.ef}")
        if self.ef_filtered < 0:
            raise ValueError(f"`index.ef_filtered` must be >= 0 (0 = ef), got {self.ef_filtered}")
        if self.search_precision not in SEARCH_PRECISIONS:
            raise ValueError(f"`index.search_precision` must be one of {SEARCH_PRECISIONS}, got {self.search_precision!r}")
        if self.num_threads == 0 or self.num_threads < -1:
            raise ValueError(f"`index.num_threads` must be -1 (all cores) or >= 1, got {self.num_threads}")
        if not 0.0 < self.target_recall <= 1.0:
            raise ValueError(f"`index.target_recall` must be in (0, 1], got {self.target_recall}")
        if self.autotune_k < 1:
            raise ValueError(f"`index.autotune_k` must be >= 1, got {self.autotune_k}")
        if self.autotune_queries < 1:
            raise ValueError(f"`index.autotune_queries` must be >= 1, got {self.autotune_queries}")
        if not self.autotune_efs or any(e < 1 for e in self.autotune_efs) or list(self.autotune_efs) != sorted(
            self.autotune_efs
        ):
            raise ValueError(f"`index.autotune_efs` must be increasing positive ints, got {list(self.autotune_efs)}")

        if any(not isinstance(a, str) or not a for a in self.partition_by):
            raise ValueError(f"`index.partition_by` must list attribute names, got {list(self.partition_by)}")
        if self.partition_min_items < 0:
            raise ValueError(f"`index.partition_min_items` must be >= 0 (0 = the exact-scan switch), got "
                             f"{self.partition_min_items}")

    def __post_init__(self) -> None:
        self.validate()



class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation).

    Plain acquire/release methods rather than context managers: the read side runs on every query.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers and self._writers_waiting:
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


# ----------------------------------------------------------------------------------------------------------------
# exact



_HNSW_HEADER = struct.Struct("<6QiI3QdQ")


def read_hnsw_header(path: str | Path) -> dict[str, Any]:
    """Parse an hnswlib index file's header (without handing the file to hnswlib)."""
    with open(path, "rb") as f:
        raw = f.read(_HNSW_HEADER.size)
    if len(raw) < _HNSW_HEADER.size:
        raise ValueError(f"{str(path)!r} is too short ({len(raw)} bytes) to be an hnswlib index")
    names = ("offset_level0", "max_elements", "count", "size_data_per_element", "label_offset", "offset_data",
             "max_level", "enterpoint", "maxM", "maxM0", "M", "mult", "ef_construction")
    return dict(zip(names, _HNSW_HEADER.unpack(raw), strict=True))


def check_hnsw_file(path: str | Path, *, dim: int, size: int | None = None) -> dict[str, Any]:
    """Refuse an hnswlib file whose header disagrees with ``dim`` / ``size`` or whose length is implausible.

    hnswlib's loader trusts the header (sizes, counts) and allocates/reads accordingly; this check bounds what it
    will do. It is not a substitute for the bundle's sha256 check.
    """
    path = Path(path)
    h = read_hnsw_header(path)
    file_size = path.stat().st_size
    where = f"hnswlib index {str(path)!r}"
    link0 = h["maxM0"] * 4 + 4  # level-0 links + their count (uint32 each)
    if not (2 <= h["M"] <= 4096 and h["maxM"] == h["M"] and h["maxM0"] == 2 * h["M"]):
        raise ValueError(f"{where}: implausible header M={h['M']} maxM={h['maxM']} maxM0={h['maxM0']}")
    if h["offset_level0"] != 0 or h["offset_data"] != link0:
        raise ValueError(f"{where}: implausible header offsets {h['offset_level0']}, {h['offset_data']}")
    if h["label_offset"] != link0 + 4 * dim or h["size_data_per_element"] != link0 + 4 * dim + 8:
        got_dim = (h["label_offset"] - link0) / 4
        raise ValueError(f"{where} holds vectors of dim {got_dim:g}, expected {dim}")
    count = h["count"]
    if size is not None and count != size:
        raise ValueError(f"{where} holds {count} items, expected {size}")
    if not 0 <= h["max_level"] <= 64 or (count and h["enterpoint"] >= count):
        raise ValueError(f"{where}: implausible header max_level={h['max_level']} enterpoint={h['enterpoint']}")
    # Level-0 block + one uint32 link-list length per item, plus upper-level links: levels are geometric with
    # p = 1/M, so their total stays far below one per item (2 * count is a bound not met in practice).
    lower = _HNSW_HEADER.size + count * (h["size_data_per_element"] + 4)
    upper = lower + (h["maxM"] * 4 + 4) * (2 * count + 64)
    if not lower <= file_size <= upper:
        raise ValueError(f"{where} is {file_size} bytes; {count} items of dim {dim} need {lower}..{upper}")
    return h








class HnswIndex(NativeSearch, PackageSearch):
    """Approximate top-k with hnswlib (space ``"ip"``; score = ``1 - distance`` = dot of unit vectors).

    ``vectors [size, dim]``, ``ids [size]`` int64 >= 0 (default ``0..size-1``, the item rows).

    ``native``: None (default) = the ``recsys._hnsw`` extension when it is built, else the hnswlib package;
    True = require the extension; False = the hnswlib package (over-fetch + post-filter). ``native_filter`` says
    which one runs. ``ef_filtered``: search width of rows with an exclusion list on the native path (the effective
    value is ``max(ef, ef_filtered)``; None = ``ef``); :func:`autotune_ef` tunes it. ``search_precision``: ``"fp32"``
    (default) runs hnswlib's own search; ``"bf16"`` traverses the graph over a bfloat16 copy of the vectors and
    re-scores the candidates in float32 (scores stay exact; see ``IndexConfig.search_precision``); the hnswlib
    package fallback is always ``"fp32"``.

    ``search(..., allow=words)``: the allowed-set filter (see :mod:`recsys.retrieval`, :meth:`allow_plan`,
    :meth:`allow_width`, :meth:`allow_budget`). Its exact scan (and the rows a filtered walk leaves short) uses an
    exact twin of the vectors, built on the first such search (``size x dim`` float32 of memory, a one-off copy);
    without the extension the allowed set above the switch costs one over-fetch of ~``ef / selectivity`` results
    (p50 ~7-9x a plain query at 10-30% of 100k, Recall@10 0.98-0.99), refetched wider or scanned exactly when that
    falls short, and the exact scan below it is numpy's gather + matmul (~1 ms per 1,000-3,000 random rows on the
    2-core box, several times the extension's scan).
    """

    # Above this share of the catalogue excluded, or when a row's fetch would exceed it, scan exactly instead.
    exact_fallback_fraction = 0.25
    # "adaptive": first fetch max(ef, k) results (free: hnswlib explores ef candidates anyway), then, if excluded
    # ids pushed the k-th kept result deep into the list, refetch wide enough for the tuned recall (see
    # _next_fetch). "full": fetch k + |exclude| at once (one call, but the search widens to match).
    overfetch = "adaptive"
    # A filtered search (allow=...) scans the allowed ids exactly when there are at most
    # filter_exact_scale * sqrt(size) of them; see allow_plan for the measurement behind 16.
    filter_exact_scale = 16.0
    # The filtered graph walk's width: ef_filtered * sqrt(selectivity), at least filter_ef_min (see allow_width).
    filter_ef_min = 48
    # The filtered walk gives up for the exact scan after scoring this many nodes per allowed id.
    filter_budget_factor = 1.0
    # The filtered walk narrows to this fraction of its width when the query's neighbourhood holds the set's share
    # (1.0 = never; see allow_walk).
    filter_near_fraction = 0.5

    def __init__(
        self,
        vectors: np.ndarray | None,
        ids: np.ndarray | None = None,
        *,
        metric: str = "cosine",
        M: int = 16,
        ef_construction: int = 200,
        ef: int = 64,
        num_threads: int = -1,
        seed: int = 100,
        dim: int | None = None,
        ef_filtered: int | None = None,
        native: bool | None = None,
        search_precision: str = "fp32",
    ) -> None:
        self.metric = check_metric(metric)
        if search_precision not in SEARCH_PRECISIONS:
            raise ValueError(f"`search_precision` must be one of {SEARCH_PRECISIONS}, got {search_precision!r}")
        if vectors is None:  # used by load(): an empty shell filled by hnswlib's loader
            if dim is None:
                raise ValueError("`dim` is required when `vectors` is None")
            vecs = np.zeros((0, dim), dtype=np.float32)
        else:
            vecs = as_matrix(vectors, dim, self.metric, name="vectors")
        self.dim = int(vecs.shape[1])
        if self.dim < 1:
            raise ValueError(f"`vectors` must have at least one column, got shape {vecs.shape}")
        if ef < 1:
            raise ValueError(f"`ef` must be >= 1, got {ef}")
        self.num_threads = resolve_threads(num_threads)
        self.M, self.ef_construction, self.seed = int(M), int(ef_construction), int(seed)
        self._ef = int(ef)
        self._ef_filtered = 0  # 0 = same as ef
        self.ef_filtered_table: list[dict[str, Any]] = []
        """The ``ef_filtered`` auto-tune rows when :func:`autotune_ef` was given exclusion lists."""
        if ef_filtered is not None:
            self.set_ef_filtered(ef_filtered)
        self._lock = _RWLock()
        self._exact_cache: ExactIndex | None = None
        self._exact_lock = threading.Lock()
        mod = None if native is False else _native_module()
        if native and mod is None:
            raise ImportError(f"`native=True` but the recsys._hnsw extension is not built ({_NATIVE_ERROR}); "
                              "reinstall with a C++ compiler: pip install -e .")
        self.native_filter: bool = mod is not None
        """True: exclusions are filtered inside the graph search (recsys._hnsw); False: hnswlib + over-fetch."""
        self._native = mod
        if mod is not None:
            self._index = mod.Index(self.dim)
        else:
            import hnswlib  # hnswlib: only the fallback when recsys._hnsw is not built

            self._index = hnswlib.Index(space="ip", dim=self.dim)
        n = vecs.shape[0]
        ids_arr = np.arange(n, dtype=np.int64) if ids is None else as_ids(ids, n, name="ids")
        self._idmap = IdMap(np.zeros(0, dtype=np.int64))
        if vectors is not None:
            self._index.init_index(max_elements=max(n, 1), M=self.M, ef_construction=self.ef_construction,
                                   random_seed=self.seed)
            if n:
                self._index.add_items(vecs, ids_arr, self.num_threads)
            self._idmap = IdMap(ids_arr)
            self._index.set_ef(self._ef)
        self.partitions: Partitions | None = None
        """One graph per value of an item attribute (:mod:`recsys.retrieval.partitions`), or None."""
        self.search_precision = "fp32"
        """The traversal in use: ``"bf16"`` or ``"fp32"`` (always ``"fp32"`` without the extension)."""
        self.set_search_precision(search_precision)

    def set_search_precision(self, precision: str) -> None:
        """Switch the traversal (``"bf16"`` builds the bfloat16 copy: ~2 x dim bytes per item, O(size x dim) time).

        Without the extension only ``"fp32"`` exists: asking for ``"bf16"`` then leaves ``"fp32"`` in place.
        """
        if precision not in SEARCH_PRECISIONS:
            raise ValueError(f"`search_precision` must be one of {SEARCH_PRECISIONS}, got {precision!r}")
        if not self.native_filter:
            return
        with self._lock.write():
            self._index.set_bf16(precision == "bf16")
            self.search_precision = precision

    @classmethod
    def from_config(cls, vectors: np.ndarray, ids: np.ndarray | None = None, *, metric: str = "cosine",
                    cfg: IndexConfig | None = None, native: bool | None = None) -> HnswIndex:
        cfg = cfg or IndexConfig()
        return cls(vectors, ids, metric=metric, M=cfg.M, ef_construction=cfg.ef_construction, ef=cfg.ef,
                   num_threads=cfg.num_threads, seed=cfg.seed, ef_filtered=cfg.ef_filtered or None, native=native,
                   search_precision=cfg.search_precision)

    # -- properties ----------------------------------------------------------------------------------------------

    @property
    def size(self) -> int:
        return int(self._idmap.ids.shape[0])

    @property
    def ids(self) -> np.ndarray:
        """``[size]`` int64 labels in insertion order."""
        return self._idmap.ids

    @property
    def ef(self) -> int:
        return self._ef

    def set_ef(self, ef: int) -> None:
        """Query-time candidate list size (the effective value is ``max(ef, k)``, hnswlib's rule).

        Leaves :attr:`ef_filtered` as set: the filtered width stays ``max(ef, ef_filtered)``.
        """
        if isinstance(ef, bool) or not isinstance(ef, (int, np.integer)) or ef < 1:
            raise ValueError(f"`ef` must be an integer >= 1, got {ef!r}")
        self._ef = int(ef)
        self._index.set_ef(self._ef)

    @property
    def ef_filtered(self) -> int:
        """Search width of rows with a non-empty exclusion list (native filter): ``max(ef, ef_filtered)``."""
        return max(self._ef, self._ef_filtered)

    def set_ef_filtered(self, ef: int | None) -> None:
        """Set the filtered search width (None = the plain ``ef``). Used by the native filter only."""
        if ef is None:
            self._ef_filtered = 0
            return
        if isinstance(ef, bool) or not isinstance(ef, (int, np.integer)) or ef < 1:
            raise ValueError(f"`ef_filtered` must be an integer >= 1, got {ef!r}")
        self._ef_filtered = int(ef)

    def __repr__(self) -> str:
        return (f"HnswIndex(size={self.size}, dim={self.dim}, metric={self.metric!r}, M={self.M}, "
                f"ef_construction={self.ef_construction}, ef={self._ef}, ef_filtered={self.ef_filtered}, "
                f"native_filter={self.native_filter}, search_precision={self.search_precision!r})")

    def params(self) -> dict[str, Any]:
        """Build/search parameters, for the bundle manifest (``ef_filtered``: pass it back to :meth:`load`)."""
        return {"metric": self.metric, "space": "ip", "dim": self.dim, "size": self.size, "M": self.M,
                "ef_construction": self.ef_construction, "ef": self._ef, "ef_filtered": self.ef_filtered,
                "seed": self.seed, "search_precision": self.search_precision}

    def index_bytes(self) -> int:
        """Size of the serialised index (≈ its memory), bytes."""
        return int(self._index.index_file_size())

    # -- vectors -------------------------------------------------------------------------------------------------

    def get_vectors(self, ids: np.ndarray) -> np.ndarray:
        """Stored vectors of ``ids`` (all must be in the index) -> ``[m, dim]`` float32."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.native_filter:
            return self._index.get_items(np.ascontiguousarray(ids))
        return np.ascontiguousarray(self._index.get_items(ids, return_type="numpy"), dtype=np.float32)

    def _exact(self) -> ExactIndex:
        """An exact twin over the same vectors, built on first need (fallback path) and dropped by add()."""
        ex = self._exact_cache
        if ex is None:
            with self._exact_lock:
                ex = self._exact_cache
                if ex is None:
                    ids = self._idmap.ids
                    ex = ExactIndex(self.get_vectors(ids), ids, metric=self.metric)
                    self._exact_cache = ex
        return ex

    # -- add -----------------------------------------------------------------------------------------------------

    def add(self, vectors: np.ndarray, ids: np.ndarray) -> None:
        """Insert new items ``vectors [m, dim]`` with new ``ids [m]`` without a rebuild (grows the capacity).

        Takes the write lock: waits for in-flight searches, blocks new ones until done.
        """
        new = as_matrix(vectors, self.dim, self.metric, name="vectors")
        new_ids = as_ids(ids, new.shape[0], name="ids")
        if not new_ids.size:
            return
        with self._lock.write():
            clash = new_ids[np.isin(new_ids, self._idmap.ids)]
            if clash.size:
                raise ValueError(f"`ids` already in the index: {clash[:10].tolist()}")
            need = self.size + new_ids.size
            cap = self._index.get_max_elements()
            if need > cap:
                # Grow geometrically so a stream of small adds doesn't resize (and copy) every time.
                self._index.resize_index(max(need, int(cap * 1.5)))
            self._index.add_items(new, new_ids, self.num_threads)
            self._idmap = IdMap(np.concatenate([self._idmap.ids, new_ids]))
            self._exact_cache = None

    # -- search --------------------------------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        k: int,
        *,
        exclude: Sequence[np.ndarray | None] | None = None,
        include: Sequence[np.ndarray | None] | None = None,
        allow: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-``k`` of ``queries [n, dim]`` -> ``(ids [n, k] int64, scores [n, k] float32)``.

        Same contract as :meth:`ExactIndex.search`: never an excluded id, only included ids when ``include[i]``
        is given, only allowed ids when ``allow`` (one packed bitset for the whole call,
        :mod:`recsys.retrieval.bitset`) is given, exactly ``k`` results whenever ``k`` candidates remain, else
        padding -1 / -inf. How ``allow`` is answered: see :meth:`allow_plan` (exact scan of the allowed ids, or
        the graph search filtered inside the walk at width :meth:`allow_width`; on the hnswlib-package fallback,
        over-fetch + post-filter instead of the in-walk filter).
        """
        if allow is not None:
            return self._search_allowed(queries, k, exclude, include, allow)
        if self.native_filter:
            return self._search_native(queries, k, exclude, include)
        k = check_k(k)
        q = as_matrix(queries, self.dim, self.metric, name="queries")
        n = q.shape[0]
        excl = per_query(exclude, n, name="exclude")
        incl = per_query(include, n, name="include")
        if excl is not None and all(e is None or not e.size for e in excl):
            excl = None  # nothing excluded anywhere: the one-call fast path
        if incl is not None and all(e is None for e in incl):
            incl = None
        self._lock.acquire_read()
        try:
            idmap = self._idmap
            size = idmap.ids.shape[0]
            if excl is None and incl is None and k <= size:
                # Fast path (the plain query): one hnswlib call, nothing to filter.
                try:
                    labels, dist = self._knn(q, k)
                    return labels.astype(np.int64, copy=False), 1.0 - dist
                except RuntimeError:
                    pass  # hnswlib found fewer than k (unreachable nodes): the general path falls back
            return self._search_general(q, k, excl, incl, idmap)
        finally:
            self._lock.release_read()

    def _search_allowed(
        self, queries: np.ndarray, k: int, exclude: Sequence[np.ndarray | None] | None,
        include: Sequence[np.ndarray | None] | None, allow: np.ndarray, count: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """A search with an allowed set, either backend (the plain paths stay as they were). A set said to lie
        within some :attr:`partitions` (:func:`bitset.within`) searches those partitions' graphs when
        :meth:`Partitions.plan` confirms it. ``count``: the allowed ids that are in this index, when the caller
        knows (a partition of a larger set)."""
        k = check_k(k)
        q = as_matrix(queries, self.dim, self.metric, name="queries")
        keys = bitset.within_of(allow)
        words = bitset.check(allow)
        n = q.shape[0]
        excl = per_query(exclude, n, name="exclude")
        incl = per_query(include, n, name="include")
        if incl is not None and all(e is None for e in incl):
            incl = None
        parts = self.partitions
        if keys is not None and parts is not None and incl is None:
            plan = parts.plan(words, keys, scan_limit=self.exact_scan_limit)
            if plan is not None:
                return parts.search(self, q, k, excl, words, plan)
        self._lock.acquire_read()
        try:
            if self.native_filter:
                return self._native_allowed(q, k, excl, incl, self._idmap, words, count)
            return self._search_general(q, k, excl, incl, self._idmap, words, count)
        finally:
            self._lock.release_read()

    def _scan(self, q: np.ndarray, k: int, excl: list[np.ndarray | None] | None,
              words: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Every row of ``q`` answered by the exact scan of the allowed ids ``words`` (checked) minus ``excl``,
        either backend (:mod:`recsys.retrieval.partitions` scans what lies outside its graphs)."""
        idmap = self._idmap
        ex = present_exclusions(excl, idmap, q.shape[0])
        rows = np.arange(q.shape[0])
        if self.native_filter:
            return self._scan_allowed(q, rows, k, ex, words, idmap)
        return self._exact().search_rows(q, rows, k, ex, words)

    def _score_include(
        self, q: np.ndarray, k: int, cand: np.ndarray, exclude: np.ndarray | None, words: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """An include-list row, scored exactly (both backends): ``q [dim]``, ``cand [m]`` included ids present in
        the index, ``exclude`` sorted ids or None, ``words`` the allowed set or None -> (ids [k], scores [k]),
        padded -1 / -inf."""
        if exclude is not None:
            cand = cand[~np.isin(cand, exclude)]
        if words is not None:
            cand = cand[bitset.contains(words, cand)]
        s = self.get_vectors(cand) @ q  # [m]
        pos, top = topk_rows(s[None, :], k)
        return np.where(pos[0] >= 0, cand[np.maximum(pos[0], 0)] if cand.size else -1, -1), top[0]

    def allow_plan(self, allow: np.ndarray, count: int | None = None) -> str:
        """How a search with the allowed set ``allow`` is answered: ``"exact"`` (score the allowed ids, no graph)
        when at most ``filter_exact_scale * sqrt(size)`` ids are allowed, else ``"graph"``. ``count``: the set's
        popcount when the caller has it (see :meth:`allow_walk`).

        Why sqrt(size): a graph walk restricted to a sparse allowed set has to look further for each allowed node
        (~``width / selectivity`` nodes weighed, ``width * size / count``), while the exact scan costs ~``count``:
        they cross at ``count ~ sqrt(c * width * size)``. Measured on this project's 2-core box (trained-like
        embeddings, dim 64, single queries; a sweep of both paths per selectivity, then benchmarks/index_bench.py
        ``--filtered``): the crossover sat near 5,000 allowed ids at 100k items (graph 0.3-0.7 ms vs scan 0.15-0.2
        ms at 3,000; graph 0.2-0.4 ms vs scan ~1 ms at 10,000) and near 10,000-16,000 at 1M, i.e. ``~16 *
        sqrt(size)``; with the two-hop walk (see :meth:`allow_width`) the 1M graph walk at 3% (30,000 ids) costs
        0.5-0.9 ms (p50-p90) against a 6-9 ms scan, so the switch stands. Below it the scan is also what keeps recall on
        attribute-like sets (whole clusters, often far from the query), and it is exact.
        """
        count = bitset.count(allow) if count is None else count
        return "exact" if count <= self.exact_scan_limit else "graph"

    @property
    def exact_scan_limit(self) -> float:
        """The exact-scan switch of :meth:`allow_plan`: ``filter_exact_scale * sqrt(size)`` allowed ids."""
        return self.filter_exact_scale * self.size ** 0.5

    def allow_walk(self, allow: np.ndarray, count: int | None = None) -> AllowWalk | None:
        """The native walk of the allowed set ``allow`` (:class:`AllowWalk`: :meth:`allow_width`, the near width,
        :meth:`allow_budget`, the set's size), or None when :meth:`allow_plan` scans it exactly; the set's popcount
        (``count`` when the caller has it) is taken once (in C++: ``bitset.count`` reads every word, ~20 us at 1M items, a third of a plain query).
        Native path only.

        The near width: before walking, the extension counts the allowed nodes among the two-hop neighbourhood of
        the node the greedy descent ends on (~500-1,000 list entries, a few microseconds). When that neighbourhood
        holds at least half the set's share of the catalogue, the allowed items are spread around the query (a
        random-like set, or the query inside an allowed region) and the walk keeps ``filter_near_fraction`` of
        its width (24 of 48): chosen in a one-off study on benchmarks/index_bench.py's trained-like data (dim 64)
        with its auto-tune queries, not the benchmark's: p50 / p99 at 10% random went 3.4x / 3.4x -> 2.3x / 2.5x a
        plain query at 100k and 3.1x / 3.1x -> 2.1x / 1.8x at 1M, Recall@10 0.999 -> 0.995 / 0.993 -> 0.979 (the
        benchmark's own run: the README's filtered-search table). When it
        holds less (an attribute-like set away from the query: the walk must find strays and far clusters), the
        full width stays: there width buys recall (0.915 at 24 vs 0.925 at 48 on such queries).
        """
        count = int(self._native.popcount(allow)) if count is None else count
        if self.allow_plan(allow, count) != "graph":
            return None
        width = self.allow_width(allow, count)
        near = math.ceil(width * self.filter_near_fraction) if self.filter_near_fraction < 1.0 else 0
        return AllowWalk(width, near if near < width else 0, self.allow_budget(allow, count), count)

    def allow_budget(self, allow: np.ndarray, count: int | None = None) -> int:
        """Nodes the native filtered walk may score before it gives up and the exact scan answers the row (0 = no
        limit): ``filter_budget_factor * count``, i.e. about what scanning the allowed ids costs. Above the switch a
        walk only runs out on sets far from the query (a genre unlike the user's), where walking through the
        disallowed nodes around the query would cost more than the scan."""
        if not self.filter_budget_factor:
            return 0
        count = bitset.count(allow) if count is None else count
        return max(1, int(self.filter_budget_factor * count))

    def allow_width(self, allow: np.ndarray, count: int | None = None) -> int:
        """The native filtered walk's width (the allowed nodes it keeps) for the allowed set ``allow``:
        ``ef_filtered * sqrt(selectivity)``, at least ``filter_ef_min`` (and at most ``ef_filtered``; the walk then
        uses ``max(width, k)``).

        The walk (``recsys/csrc/hnsw_ext.cpp``, ``Index::search_allowed``; after ACORN-1) scores allowed nodes
        only where it can, reaching the allowed neighbours of disallowed neighbours by reading their lists (two
        hops), and walks through disallowed nodes as hnswlib does only around the query (until ``width / 2``
        allowed nodes are kept) and where nothing allowed is within two hops. So, unlike hnswlib's filtered search
        (which scores ~``width / selectivity`` nodes), a width scores about what a plain search of that width
        scores: at 10% of the catalogue, 349 nodes at width 48 against 238 with everything allowed (100k), 345
        against 330 (1M). Widths measured (Recall@10 vs the exact filtered answer, trained-like dim 64, 100k-1M):
        32 kept 0.99 on random sets of 3-30% and 0.95-0.99 on whole-cluster sets, 48 0.99 / 0.955-0.99, 64 0.994 /
        0.96-0.99 at ~1.3x the time of 48. On the tests' isotropic clusters (dim 32) hnswlib's walk needed 64 on
        20-50% cluster sets: hence the floor of 48 (a tuned ``ef_filtered`` <= 48 is used as it is)."""
        count = bitset.count(allow) if count is None else count
        s = count / max(self.size, 1)
        return min(self.ef_filtered, max(self.filter_ef_min, math.ceil(self.ef_filtered * s ** 0.5)))

    # -- files ---------------------------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the index (hnswlib format, labels included) to ``path`` atomically (``recsys.core.io.atomic_write_file``)."""

        def write(tmp: Path) -> None:
            self._lock.acquire_read()
            try:
                self._index.save_index(str(tmp))
            finally:
                self._lock.release_read()

        atomic_write_file(path, write)

    @classmethod
    def load(
        cls,
        path: str | Path,
        *,
        dim: int,
        metric: str,
        size: int | None = None,
        ef: int = 64,
        ef_filtered: int | None = None,
        num_threads: int = -1,
        max_elements: int | None = None,
        native: bool | None = None,
        search_precision: str = "fp32",
    ) -> HnswIndex:
        """Load an index written by :meth:`save` (or by ``hnswlib.Index.save_index``, space ``"ip"``), after
        checking its header and length against ``dim``/``size``.

        ``metric`` is not stored in hnswlib's file: pass the bundle's; likewise ``ef`` / ``ef_filtered`` /
        ``search_precision`` (the manifest's ``params()``; "fp32" when absent: the traversal older bundles were
        tuned with). ``max_elements`` reserves room for adds.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"hnswlib index {str(path)!r} does not exist")
        h = check_hnsw_file(path, dim=dim, size=size)
        self = cls(None, metric=metric, ef=ef, num_threads=num_threads, dim=dim, M=h["M"],
                   ef_construction=h["ef_construction"], ef_filtered=ef_filtered, native=native,
                   search_precision=search_precision)  # the native side builds a bf16 copy as it loads
        count = h["count"]
        # Pass max_elements explicitly: otherwise hnswlib allocates the header's max_elements (untrusted).
        self._index.load_index(str(path), max(count, max_elements or 0, 1))
        if self._index.get_current_count() != count:
            raise ValueError(f"hnswlib index {str(path)!r}: loaded {self._index.get_current_count()} items, "
                             f"header says {count}")
        ids = np.asarray(self._index.get_ids_list(), dtype=np.int64)
        # Keep insertion-ish order stable: sort labels (the bundle's are item rows 0..n-1).
        self._idmap = IdMap(np.sort(ids))
        self._index.set_ef(self._ef)
        return self


# ----------------------------------------------------------------------------------------------------------------
