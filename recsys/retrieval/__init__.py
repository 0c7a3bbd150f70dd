"""Retrieval (package ``recsys.retrieval``): indexes an exact twin (``ExactIndex``) and HNSW (``HnswIndex``, hnswlib) behind one interface.

Both answer ``ids, scores = index.search(queries [n, d], k, exclude=..., include=...)`` with ``ids [n, k] int64``
and ``scores [n, k] float32``, best first; every ANN answer can be checked against the exact one (hnswlib's
``BFIndex`` habit).

Geometry (named once, read from the bundle)
-------------------------------------------
``metric="cosine"``: vectors and queries are L2-normalised *by the index* (a non-unit input is normalised, an
all-zero or non-finite row is refused with its row number), and the score is their dot product, i.e. the cosine.
The towers already output unit vectors, so this is a no-op up to float error, but it means a caller can never
serve a raw dot product against a cosine-trained model by accident. HNSW uses hnswlib space ``"ip"`` whose
*distance* is ``1 - dot``, so ``score = 1 - distance`` -- never the distance itself.
``metric="dot"``: the same space without normalisation (kept for models trained with a plain dot product).

Exclusion rule (shared by serving and evaluation through :func:`retrieve`)
--------------------------------------------------------------------------
``exclude[i]`` (a user's seen items and the request's exclusions) never appears in row ``i``; ``include[i]``
restricts row ``i`` to those ids. The answer holds exactly ``k`` results whenever at least ``k`` candidates
remain, otherwise it is padded with id ``-1`` / score ``-inf``.

HNSW, native filter (``HnswIndex.native_filter``, the default when the ``recsys._hnsw`` extension is built): the
exclusion happens *inside* the graph search (recsys/csrc/hnsw_ext.cpp: hnswlib 0.8.0's own search with a
``BaseFilterFunctor`` over the row's excluded labels). The walk goes through excluded nodes but keeps only
allowed ones, so one search at width ``ef_filtered`` returns the top-``k`` allowed items, whatever the exclusion
list's length. Rows whose exclusion covers more than ``exact_fallback_fraction`` of the catalogue, and rows the
graph answers short although ``k`` candidates remain, are scanned exactly.

HNSW without the extension (``native_filter`` False: no compiler where the package was installed) falls back to
the hnswlib package with adaptive over-fetch and post-filtering, not a Python filter callback (one GIL round trip
per visited node):

1. fetch ``max(ef, k)`` results -- free, hnswlib explores ``max(ef, k)`` candidates whatever ``k`` is -- and
   drop the excluded ones;
2. if fewer than ``k`` remain, or the k-th kept one sits so deep in the list that the search was too narrow for
   the tuned recall (ef was tuned for the top ``k``), fetch again wider (see ``HnswIndex._next_fetch``), at most
   ``(k + |exclude|) * ef / k`` -- ``k + |exclude|`` always leaves ``k`` -- and
3. scan exactly over the remaining candidates when the exclusion covers a large share of the catalogue
   (``exact_fallback_fraction``) or hnswlib cannot return enough neighbours.

``HnswIndex.overfetch = "full"`` instead fetches ``k + |exclude|`` at once (one call, but as wide as the exclusion
list: ~8x a plain query for 500 seen items, where the adaptive rule is ~1-4x; see benchmarks/index_bench.py).
An include-list of ``m`` items is answered by exact scoring of those ``m`` vectors (cheaper and exact, whatever
``m`` is relative to the graph).

Allowed set (a request's attribute filter: ``allow=``)
------------------------------------------------------
``search(..., allow=words)`` (both indexes, :func:`retrieve`, :func:`retrieve_one`) returns only ids allowed by
one packed bitset shared by every query of the call (:mod:`recsys.retrieval.bitset`: bit ``i & 63`` of word
``i >> 6``; combine filters with numpy ``&`` / ``|`` / ``& ~``). The rule becomes: top-``k`` of the ids allowed AND
not excluded AND in the include-list, exactly ``k`` whenever ``k`` exist, else padding. ``HnswIndex`` answers it
one of two ways (:meth:`HnswIndex.allow_plan`): at most ``filter_exact_scale * sqrt(size)`` allowed ids (16 x:
~5k of 100k, 16k of 1M, the measured crossover) are scored exactly (the extension's ``scan_allowed`` reads the
bitset directly); more go through the graph with the filter (allowed AND not excluded) inside the walk at width
:meth:`HnswIndex.allow_width`: a walk over the allowed nodes that reaches past disallowed neighbours by reading
their neighbour lists (two hops, after ACORN-1) instead of scoring them, so it scores about what a plain search
scores, that narrows to half its width when the query's neighbourhood holds the set's share of allowed items
(:meth:`HnswIndex.allow_walk`), and that gives up for the exact scan once it has scored as many nodes as there are
allowed ids (far-away attribute sets). Without the extension, allowed sets above the switch are over-fetched (~``ef / selectivity``
results) and post-filtered. The cost and the recall of each, measured: benchmarks/index_bench.py ``--filtered``.

Threads
-------
``search`` is safe to call from many threads at once (both backends release the GIL during the search and are
re-entrant). ``add`` is not safe against concurrent ``knn_query``/``resize_index`` in hnswlib, so ``HnswIndex``
guards it with a readers-writer lock: searches share the lock, ``add`` takes it exclusively (in-flight searches
finish first, new ones wait). ``ExactIndex.add`` is copy-on-write (searches see the old or the new arrays, never a
mix). ``set_ef`` changes a value every search reads; it is a plain store (a search racing it uses either ef).
Batches use ``num_threads`` threads (hnswlib's ParallelFor); a single query always runs on the calling thread
(spawning threads for one query costs more than the query). The exact scan uses BLAS, which starts its own thread pool: inside a
threaded server wrap calls in :func:`blas_threads` ``(1)`` so N request threads don't each start N BLAS threads.

Files
-----
``HnswIndex.save`` writes hnswlib's format (the same file from either backend: ``recsys._hnsw`` is compiled from
the headers of the hnswlib version the project depends on) through a temporary file + rename. ``HnswIndex.load``
must be told the expected ``dim``/``metric`` (and ideally ``size``): hnswlib index files are not safe to load
untrusted (the loader trusts the header), so the header is parsed and the file size checked for plausibility first. The bundle
verifies the file's sha256 before that.
"""

from recsys.retrieval import bitset
from recsys.retrieval._arrays import METRICS, UNIT_SQ_TOL, blas_threads, merge_topk, topk_rows
from recsys.retrieval._package import REFETCH_SLACK, search_width
from recsys.retrieval.exact import ExactIndex
from recsys.retrieval.hnsw import (
    SEARCH_PRECISIONS,
    HnswIndex,
    IndexConfig,
    check_hnsw_file,
    native_available,
    read_hnsw_header,
)
from recsys.retrieval.retrieve import merge_exclusions, retrieve, retrieve_one
from recsys.retrieval.tune import autotune_ef, recall_vs_exact

__all__ = [
    "METRICS",
    "REFETCH_SLACK",
    "SEARCH_PRECISIONS",
    "UNIT_SQ_TOL",
    "ExactIndex",
    "HnswIndex",
    "IndexConfig",
    "autotune_ef",
    "bitset",
    "blas_threads",
    "check_hnsw_file",
    "merge_exclusions",
    "merge_topk",
    "native_available",
    "read_hnsw_header",
    "recall_vs_exact",
    "retrieve",
    "retrieve_one",
    "search_width",
    "topk_rows",
]
