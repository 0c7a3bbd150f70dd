// recsys._hnsw: hnswlib 0.8.0's HierarchicalNSW<float> (inner-product space) with the exclusion filter done
// INSIDE the graph search.
//
// Why not the hnswlib Python package: its only filter is a Python callback (one GIL round trip per visited
// node), so recsys.retrieval had to over-fetch k + |exclude| and post-filter; a trained model ranks a user's seen
// items near the top, so the fetch -- and the search width -- grew ~10x. Here each query's excluded labels
// become an hnswlib::BaseFilterFunctor (a bitset over labels, or a sorted array + binary search when the labels
// are too large for a bitset): the search walks *through* excluded nodes but keeps only allowed ones, so the
// result holds the top-k allowed items at the cost of roughly one plain query.
//
// Files are hnswlib's own format (HierarchicalNSW::saveIndex / loadIndex from the same headers): an index saved
// here loads in `hnswlib.Index(space="ip")` and vice versa.
//
// Threads: knn(), add_items() and KnownUserRecommender.recommend() release the GIL. Searches share the index's
// readers-writer lock (Index::mu_) and are re-entrant (hnswlib's searches share no mutable state but the
// visited-list pool, which is locked); add_items(), resize_index(), load_index() and set_bf16() take it
// exclusively. Distances are hnswlib's `ip` distance, 1 - dot.
//
// A request's allowed set (recsys.retrieval.bitset: uint64 words over labels) gets its own walk:
// knn(..., allow=words) ANDs it with the row's exclusion (AllowFilter) and walks the allowed nodes, reaching past
// disallowed ones through their neighbour lists (Index::search_allowed, after ACORN-1); scan_allowed() is the
// exact scan of a small allowed set that recsys.retrieval.hnsw.allow_plan switches to. Nodes are renumbered so
// that internal id = label when the labels are 0..n-1 (Index::renumber_by_label): the walk then tests a node
// with one bit.
//
// Two serving accelerations live here too: the bf16 traversal copy (Bf16Copy, search_bf16) and the known-user
// Recommend from request bytes to response bytes (KnownUserRecommender).

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include <cmath>
#include <cstdlib>
#include <queue>
#include <shared_mutex>
#include <string_view>
#include <unordered_map>

#if defined(__x86_64__) || defined(_M_X64)
// GCC 12's AVX-512 headers trip their own -Wuninitialized (the _mm512_undefined_* pass-through operands): a known
// false positive, silenced for the header only (the state that counts is the one where the header is parsed).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>
#pragma GCC diagnostic pop
#define RECSYS_X86 1
#endif

#include "hnswlib/hnswlib.h"

namespace py = pybind11;

namespace {

using hnswlib::labeltype;
using hnswlib::tableint;
using Alg = hnswlib::HierarchicalNSW<float>;

// Bitsets are used while the largest excluded label stays below this (8 MiB of bits per search thread);
// larger labels fall back to the sorted array.
constexpr uint64_t kMaxBitsetLabel = uint64_t(1) << 26;

// hnswlib's ParallelFor (python_bindings/bindings.cpp, borrowed from nmslib): ids [start, end) over numThreads
// threads pulling from a shared counter; the first exception stops the loop and is rethrown on the caller.
template <class Function>
void ParallelFor(size_t start, size_t end, size_t numThreads, Function fn) {
    if (numThreads <= 1) {
        for (size_t id = start; id < end; id++) fn(id, 0);
        return;
    }
    std::vector<std::thread> threads;
    std::atomic<size_t> current(start);
    std::exception_ptr lastException = nullptr;
    std::mutex lastExceptMutex;
    for (size_t threadId = 0; threadId < numThreads; ++threadId) {
        threads.push_back(std::thread([&, threadId] {
            while (true) {
                size_t id = current.fetch_add(1);
                if (id >= end) break;
                try {
                    fn(id, threadId);
                } catch (...) {
                    std::unique_lock<std::mutex> lock(lastExceptMutex);
                    lastException = std::current_exception();
                    current = end;
                    break;
                }
            }
        }));
    }
    for (auto &thread : threads) thread.join();
    if (lastException) std::rethrow_exception(lastException);
}

// Excluded labels of one query as a bitset over label values (set before the search, cleared after: the cost is
// O(|exclude|), not O(max label)).
class ExcludeBitset : public hnswlib::BaseFilterFunctor {
 public:
    const uint64_t *words = nullptr;
    uint64_t n_bits = 0;
    bool operator()(labeltype id) override {
        return id >= n_bits || !((words[id >> 6] >> (id & 63)) & 1u);
    }
};

// Excluded labels of one query as a sorted array, checked by binary search.
class ExcludeSorted : public hnswlib::BaseFilterFunctor {
 public:
    const uint64_t *begin = nullptr;
    const uint64_t *end = nullptr;
    bool operator()(labeltype id) override { return !std::binary_search(begin, end, uint64_t(id)); }
};

// The request's allowed set (a bitset over labels, shared by every row of a knn call: recsys.retrieval.bitset)
// AND the row's exclusion filter when it has one, for Index::search_allowed. Labels at or past n_bits are not
// allowed. `budget`: how many nodes the walk may score before it gives up -- an allowed set far from the query
// makes the walk pass through many disallowed nodes before it holds `width` allowed ones, which can cost more
// than scoring the allowed ids outright; the row is then discarded (`gave_up`) and the caller scans the allowed
// ids exactly.
struct AllowFilter {
    const uint64_t *words = nullptr;
    uint64_t n_bits = 0;
    hnswlib::BaseFilterFunctor *exclude = nullptr;
    uint64_t budget = std::numeric_limits<uint64_t>::max();
    // `count`: the set's size; `near_width`: the narrower width the walk uses when the query's neighbourhood holds
    // the set's share (see Index::search_allowed; 0 = always `width`).
    uint64_t count = 0;
    size_t near_width = 0;
    bool gave_up = false;
    bool allows(uint64_t label) const {
        if (label >= n_bits || !((words[label >> 6] >> (label & 63)) & 1u)) return false;
        return !exclude || (*exclude)(labeltype(label));
    }
};

// Nodes the calling thread's last filtered walk scored (Index::search_allowed; module function last_walk_scored):
// a machine-independent measure of the walk's work for the tests and benchmarks/index_bench.py.
thread_local uint64_t walk_scored = 0;

// Per-thread filter buffers, kept across calls so a single query (the serving path, on the caller's thread)
// allocates nothing: the bitset is all-zero between rows (each row clears the words it set, see ClearBits).
std::vector<uint64_t> &thread_bitset() {
    thread_local std::vector<uint64_t> words;
    return words;
}

std::vector<uint64_t> &thread_sorted() {
    thread_local std::vector<uint64_t> labels;
    return labels;
}

// Clears the words a row set in the thread's bitset, also when the search throws.
struct ClearBits {
    std::vector<uint64_t> *words = nullptr;
    const int64_t *begin = nullptr;
    const int64_t *end = nullptr;
    ~ClearBits() {
        if (!words) return;
        for (const int64_t *p = begin; p != end; ++p)
            if (*p >= 0) (*words)[uint64_t(*p) >> 6] = 0;
    }
};

[[noreturn]] void value_error(const std::string &msg) { throw py::value_error(msg); }

// A C-contiguous float32 [n, dim] array, refused otherwise (the Python side converts; this side never copies).
const float *check_matrix(const py::array &a, const char *name, int dim, size_t *rows) {
    if (a.ndim() != 2)
        value_error(std::string("`") + name + "` must be 2-D [n, " + std::to_string(dim) + "], got " +
                    std::to_string(a.ndim()) + " dimensions");
    if (!py::isinstance<py::array_t<float>>(a) || a.dtype().kind() != 'f' || a.itemsize() != 4)
        value_error(std::string("`") + name + "` must be float32, got dtype " +
                    std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style))
        value_error(std::string("`") + name + "` must be C-contiguous (use np.ascontiguousarray)");
    if (a.shape(1) != dim)
        value_error(std::string("`") + name + "` must have " + std::to_string(dim) + " columns (the index dim), got " +
                    std::to_string(a.shape(1)));
    *rows = size_t(a.shape(0));
    return static_cast<const float *>(a.data());
}

// A C-contiguous int64 1-D array.
const int64_t *check_int64(const py::array &a, const char *name, size_t *len) {
    if (a.ndim() != 1)
        value_error(std::string("`") + name + "` must be 1-D, got " + std::to_string(a.ndim()) + " dimensions");
    if (a.dtype().kind() != 'i' || a.itemsize() != 8)
        value_error(std::string("`") + name + "` must be int64, got dtype " + std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style))
        value_error(std::string("`") + name + "` must be C-contiguous");
    *len = size_t(a.shape(0));
    return static_cast<const int64_t *>(a.data());
}

// A 1-D C-contiguous uint64 array (a bitset's words), refused otherwise.
const uint64_t *check_words(const py::array &a, const char *name, size_t *len) {
    if (a.ndim() != 1)
        value_error(std::string("`") + name + "` must be a 1-D uint64 bitset, got " + std::to_string(a.ndim()) +
                    " dimensions");
    if (a.dtype().kind() != 'u' || a.itemsize() != 8)
        value_error(std::string("`") + name + "` must be a uint64 bitset, got dtype " + std::string(py::str(a.dtype())));
    if (!(a.flags() & py::array::c_style))
        value_error(std::string("`") + name + "` must be C-contiguous");
    *len = size_t(a.shape(0));
    return static_cast<const uint64_t *>(a.data());
}

// The usable bits of an allowed bitset of `n_words` words: -1 = all of them, else in [0, 64 x n_words].
uint64_t check_allow_bits(int64_t allow_bits, size_t n_words) {
    if (allow_bits < -1 || (allow_bits >= 0 && uint64_t(allow_bits) > 64 * uint64_t(n_words)))
        value_error("`allow_bits` must be -1 (all the words' bits) or in [0, 64 x " + std::to_string(n_words) +
                    "], got " + std::to_string(allow_bits));
    return allow_bits < 0 ? 64 * uint64_t(n_words) : uint64_t(allow_bits);
}

// Per-query exclusion lists in CSR form (labels + offsets [rows + 1]), checked; both None = no exclusion. The
// arrays are held so the pointers stay valid while the GIL is released.
struct Exclusions {
    py::array labels_arr, offsets_arr;
    const int64_t *labels = nullptr, *offsets = nullptr;
};

Exclusions check_exclusions(const py::object &exclude_labels, const py::object &exclude_offsets, size_t rows) {
    Exclusions e;
    if (exclude_labels.is_none() != exclude_offsets.is_none())
        value_error("`exclude_labels` and `exclude_offsets` must both be given or both be None");
    if (exclude_labels.is_none()) return e;
    e.labels_arr = py::array(exclude_labels);
    e.offsets_arr = py::array(exclude_offsets);
    size_t n_ex = 0, n_off = 0;
    e.labels = check_int64(e.labels_arr, "exclude_labels", &n_ex);
    e.offsets = check_int64(e.offsets_arr, "exclude_offsets", &n_off);
    const int64_t *off = e.offsets;
    if (n_off != rows + 1)
        value_error("`exclude_offsets` must hold n + 1 = " + std::to_string(rows + 1) + " offsets, got " +
                    std::to_string(n_off));
    if (off[0] != 0 || size_t(off[rows]) != n_ex)
        value_error("`exclude_offsets` must start at 0 and end at len(exclude_labels) = " + std::to_string(n_ex) +
                    ", got " + std::to_string(off[0]) + ".." + std::to_string(off[rows]));
    for (size_t i = 0; i < rows; i++)
        if (off[i + 1] < off[i])
            value_error("`exclude_offsets` must be non-decreasing, got " + std::to_string(off[i]) + " then " +
                        std::to_string(off[i + 1]) + " at " + std::to_string(i));
    return e;
}

size_t resolve_threads(int num_threads) {
    if (num_threads <= 0) {
        unsigned hc = std::thread::hardware_concurrency();
        return hc ? hc : 1;
    }
    return size_t(num_threads);
}


// ---------------------------------------------------------------------------------------------------------------
// bf16 traversal copy.
//
// A graph search is bound by memory latency, not arithmetic: at 100k x 64 a query's ~1,000 distance evaluations
// each touch a vector that is (mostly) not in cache, and hnswlib's vectors sit inside 396-byte element records
// (links | vector | label), 5 cache lines each. The copy below keeps every vector again as bfloat16 (the top 16
// bits of the float32, rounded to nearest even) in its own 64-byte-aligned array in internal-id order: 2 cache
// lines per 64-d vector, all of which are prefetched before the distances of a node's neighbours are computed.
// The query stays float32. The search keeps the `width` best allowed candidates by bf16 distance and re-scores
// the best of them in float32 from hnswlib's own vectors, so returned distances are exact. Labels come from a
// compact internal-id -> label array (hnswlib keeps them in a third cache line of the element record).

inline uint16_t to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    return uint16_t(u >> 16);
}

inline float from_bf16(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

float dot_bf16_scalar(const float *q, const uint16_t *v, size_t dim) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    size_t d = 0;
    for (; d + 4 <= dim; d += 4) {
        s0 += q[d] * from_bf16(v[d]);
        s1 += q[d + 1] * from_bf16(v[d + 1]);
        s2 += q[d + 2] * from_bf16(v[d + 2]);
        s3 += q[d + 3] * from_bf16(v[d + 3]);
    }
    for (; d < dim; d++) s0 += q[d] * from_bf16(v[d]);
    return (s0 + s1) + (s2 + s3);
}

#ifdef RECSYS_X86
// Compiled for these instruction sets whatever -march says (a portable build still gets them), picked at run time.
// 8 bf16 values -> 8 floats (a bf16 is the top half of a float32)
__attribute__((target("avx2"))) inline __m256 bf16x8(const uint16_t *v) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(v)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

__attribute__((target("avx"))) inline float hsum256(__m256 a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_shuffle_ps(h, h, 1));
    return _mm_cvtss_f32(h);
}

__attribute__((target("avx512f"))) float dot_bf16_avx512(const float *q, const uint16_t *v, size_t dim) {
    __m512 acc = _mm512_setzero_ps();
    size_t d = 0;
    for (; d + 16 <= dim; d += 16) {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(v + d)));
        acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), _mm512_castsi512_ps(_mm512_slli_epi32(w, 16)), acc);
    }
    // (not _mm512_reduce_add_ps: GCC 12's header trips its own -Wuninitialized there)
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1));
    float s = hsum256(_mm256_add_ps(_mm512_castps512_ps256(acc), hi));
    for (; d < dim; d++) s += q[d] * from_bf16(v[d]);
    return s;
}

__attribute__((target("avx2,fma"))) float dot_bf16_avx2(const float *q, const uint16_t *v, size_t dim) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();  // two chains: FMA latency
    size_t d = 0;
    for (; d + 16 <= dim; d += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), bf16x8(v + d), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d + 8), bf16x8(v + d + 8), acc1);
    }
    if (d + 8 <= dim) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + d), bf16x8(v + d), acc0);
        d += 8;
    }
    float s = hsum256(_mm256_add_ps(acc0, acc1));
    for (; d < dim; d++) s += q[d] * from_bf16(v[d]);
    return s;
}
#endif

using DotBf16 = float (*)(const float *, const uint16_t *, size_t);

DotBf16 pick_dot_bf16() {
#ifdef RECSYS_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f")) return dot_bf16_avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return dot_bf16_avx2;
#endif
    return dot_bf16_scalar;
}

const DotBf16 dot_bf16 = pick_dot_bf16();

const char *dot_bf16_isa() {
#ifdef RECSYS_X86
    if (dot_bf16 == dot_bf16_avx512) return "avx512f";
    if (dot_bf16 == dot_bf16_avx2) return "avx2+fma";
#endif
    return "scalar";
}

inline void prefetch(const void *p) {
#ifdef RECSYS_X86
    _mm_prefetch(static_cast<const char *>(p), _MM_HINT_T0);
#else
    __builtin_prefetch(p);
#endif
}

struct FreeDeleter {
    void operator()(void *p) const { std::free(p); }
};

// The bf16 copy of an index's vectors, in internal-id order.
struct Bf16Copy {
    std::unique_ptr<uint16_t[], FreeDeleter> vec;
    size_t stride = 0;           // uint16 per row: dim rounded up to 32 (rows start on 64-byte lines)
    size_t rows = 0;
    float max_norm = 0;  // largest float32 vector norm: bounds the bf16 rounding error of a dot product

    const uint16_t *row(tableint id) const { return vec.get() + size_t(id) * stride; }

    // Rebuilds the copy from the index's float32 vectors (all rows: cheap next to building the graph).
    void rebuild(const Alg &alg, size_t dim) {
        size_t n = alg.cur_element_count;
        size_t st = (dim + 31) / 32 * 32;
        size_t bytes = std::max<size_t>(n * st * sizeof(uint16_t), 64);
        void *mem = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!mem) throw std::bad_alloc();
        std::unique_ptr<uint16_t[], FreeDeleter> v(static_cast<uint16_t *>(mem));
        std::memset(v.get(), 0, bytes);
        double top = 0;
        for (size_t i = 0; i < n; i++) {
            const float *x = reinterpret_cast<const float *>(alg.getDataByInternalId(tableint(i)));
            uint16_t *o = v.get() + i * st;
            double sq = 0;
            for (size_t d = 0; d < dim; d++) {
                o[d] = to_bf16(x[d]);
                sq += double(x[d]) * double(x[d]);
            }
            top = std::max(top, sq);
        }
        max_norm = float(std::sqrt(top) * (1 + 1e-6));
        vec = std::move(v);
        stride = st;
        rows = n;
    }

    void clear() {
        vec.reset();
        rows = stride = 0;
        max_norm = 0;
    }
};

// One query of the exact scan (scan_allowed; the known-user recommender's scan beside partition graphs): every
// label of `words` below `bits` (row i of `x` [*, dim] is label i) except the sorted `excluded` ones, scored by
// hnswlib's inner-product distance -> the top-k into l / d, nearest first, ties by lower label, -1 / +inf padded.
void scan_row(const float *x, int dim, const uint64_t *words, uint64_t bits, const float *qi, size_t k,
              const std::vector<int64_t> &excluded, int64_t *l, float *d) {
    using Pair = std::pair<float, int64_t>;
    thread_local std::vector<Pair> best;
    best.clear();
    hnswlib::InnerProductSpace space{size_t(dim)};
    hnswlib::DISTFUNC<float> dist = space.get_dist_func();
    void *param = space.get_dist_func_param();
    const size_t row_bytes = size_t(dim) * sizeof(float);
    const size_t words_used = size_t((bits + 63) / 64);
    // Ids are batched across words (a sparse set holds < 1 id per word) so that a batch's rows are all being
    // fetched before the first is scored: the scan is bound by memory latency, not arithmetic.
    constexpr int kBatch = 64;
    int64_t ids[kBatch + 64];
    int n = 0;
    auto score_batch = [&]() {
        for (int j = 0; j < n; j++) {
            const char *r = reinterpret_cast<const char *>(x + size_t(ids[j]) * size_t(dim));
            for (size_t o = 0; o < row_bytes; o += 64) prefetch(r + o);
        }
        for (int j = 0; j < n; j++) {
            const int64_t id = ids[j];
            if (!excluded.empty() && std::binary_search(excluded.begin(), excluded.end(), id)) continue;
            const float dd = dist(qi, x + size_t(id) * size_t(dim), param);
            const Pair p(dd, id);
            if (best.size() < k) {
                best.push_back(p);
                std::push_heap(best.begin(), best.end());
            } else if (p < best.front()) {
                std::pop_heap(best.begin(), best.end());
                best.back() = p;
                std::push_heap(best.begin(), best.end());
            }
        }
        n = 0;
    };
    for (size_t w = 0; w < words_used; w++) {
        uint64_t word = words[w];
        if (w + 1 == words_used && bits % 64) word &= (uint64_t(1) << (bits % 64)) - 1;
        while (word) {
            ids[n++] = int64_t(w * 64 + size_t(__builtin_ctzll(word)));
            word &= word - 1;
        }
        if (n >= kBatch) score_batch();
    }
    score_batch();
    std::sort(best.begin(), best.end());
    for (size_t j = 0; j < k; j++) {
        l[j] = j < best.size() ? best[j].second : -1;
        d[j] = j < best.size() ? best[j].first : std::numeric_limits<float>::infinity();
    }
}

// The exact scan of an allowed set (the filtered search's exact-scan switch, recsys.retrieval.hnsw.allow_plan):
// row i of `vectors` [size, dim] float32 is label i, and every allowed label below `size` is scored by hnswlib's own
// inner-product distance (1 - dot), straight from the bitset's words (no id list, no gathered copy; each word's
// rows are prefetched before they are scored). Per query: top-k nearest first, ties by lower label, -1 / +inf
// padded; `exclude_labels` + `exclude_offsets`: CSR lists (any order) of labels that row must not return.
py::tuple scan_allowed(const py::array &vectors, const py::array &queries, size_t k, const py::array &allow,
                       int64_t allow_bits, py::object exclude_labels, py::object exclude_offsets, int num_threads) {
    if (k < 1) value_error("`k` must be >= 1, got " + std::to_string(k));
    if (vectors.ndim() != 2)
        value_error("`vectors` must be 2-D [size, dim], got " + std::to_string(vectors.ndim()) + " dimensions");
    const int dim = int(vectors.shape(1));
    if (dim < 1) value_error("`vectors` must have at least one column");
    size_t size = 0, rows = 0, n_words = 0;
    const float *x = check_matrix(vectors, "vectors", dim, &size);
    const float *q = check_matrix(queries, "queries", dim, &rows);
    const uint64_t *words = check_words(allow, "allow", &n_words);
    const uint64_t bits = std::min<uint64_t>(check_allow_bits(allow_bits, n_words), size);
    const Exclusions excl = check_exclusions(exclude_labels, exclude_offsets, rows);
    const int64_t *ex = excl.labels, *off = excl.offsets;
    py::array_t<int64_t> labels_out({rows, k});
    py::array_t<float> dist_out({rows, k});
    int64_t *lo = labels_out.mutable_data();
    float *dout = dist_out.mutable_data();
    size_t threads = resolve_threads(num_threads);
    if (rows <= threads * 4) threads = 1;
    {
        py::gil_scoped_release release;
        ParallelFor(0, rows, threads, [&](size_t row, size_t) {
            thread_local std::vector<int64_t> excluded;
            excluded.clear();
            if (ex) {
                excluded.assign(ex + off[row], ex + off[row + 1]);
                std::sort(excluded.begin(), excluded.end());
            }
            scan_row(x, dim, words, bits, q + row * size_t(dim), k, excluded, lo + row * k, dout + row * k);
        });
    }
    return py::make_tuple(labels_out, dist_out);
}

class Index {
 public:
    explicit Index(int dim) : dim_(dim), space_(dim > 0 ? size_t(dim) : 1) {
        if (dim < 1) value_error("`dim` must be >= 1, got " + std::to_string(dim));
    }

    void init_index(size_t max_elements, size_t M, size_t ef_construction, size_t random_seed) {
        if (alg_) throw std::runtime_error("the index is already initialised");
        if (M < 2) value_error("`M` must be >= 2, got " + std::to_string(M));
        alg_.reset(new Alg(&space_, std::max<size_t>(max_elements, 1), M, ef_construction, random_seed));
        alg_->ef_ = ef_;
        labels_.clear();
    }

    // Searches (knn, KnownUserRecommender) share this lock; everything that changes the graph or the bf16 copy
    // takes it exclusively, so the extension is safe to use from several threads on its own.
    mutable std::shared_mutex mu_;

    void load_index(const std::string &path, size_t max_elements) {
        std::unique_lock<std::shared_mutex> lock(mu_);
        // hnswlib trusts the file's header: recsys.retrieval.check_hnsw_file validates it before this is called.
        std::unique_ptr<Alg> alg(new Alg(&space_, path, false, max_elements, false));
        if (alg->label_offset_ - alg->offsetData_ != size_t(dim_) * sizeof(float))
            value_error("index file " + path + " holds vectors of dim " +
                        std::to_string((alg->label_offset_ - alg->offsetData_) / sizeof(float)) + ", expected " +
                        std::to_string(dim_));
        alg_ = std::move(alg);
        alg_->ef_ = ef_;
        renumber_by_label();
        labels_.clear();
        sync_labels();
        if (use_bf16_) bf16_.rebuild(*alg_, size_t(dim_));
        else bf16_.clear();
    }

    // Traverse the graph with the bf16 copy (true) or hnswlib's float32 vectors (false, hnswlib's own search).
    void set_bf16(bool on) {
        std::unique_lock<std::shared_mutex> lock(mu_);
        if (on && alg_) bf16_.rebuild(*alg_, size_t(dim_));
        if (!on) bf16_.clear();
        use_bf16_ = on;
    }

    bool bf16() const { return use_bf16_; }

    void save_index(const std::string &path) { inited().saveIndex(path); }

    void resize_index(size_t new_size) {
        std::unique_lock<std::shared_mutex> lock(mu_);
        inited().resizeIndex(new_size);
    }

    void set_ef(size_t ef) {
        if (ef < 1) value_error("`ef` must be >= 1, got " + std::to_string(ef));
        ef_ = ef;
        if (alg_) alg_->ef_ = ef;
    }

    size_t ef() const { return ef_; }
    int dim() const { return dim_; }
    size_t M() const { return inited().M_; }
    size_t ef_construction() const { return inited().ef_construction_; }
    size_t max_elements() const { return inited().max_elements_; }
    size_t current_count() const { return inited().cur_element_count; }
    size_t index_file_size() const { return inited().indexFileSize(); }

    // data [n, dim] float32 C-contiguous, labels [n] int64 >= 0. Parallel over rows like hnswlib's binding.
    void add_items(const py::array &data, const py::array &labels, int num_threads) {
        Alg &alg = inited();
        size_t rows = 0, n_labels = 0;
        const float *x = check_matrix(data, "data", dim_, &rows);
        const int64_t *ids = check_int64(labels, "labels", &n_labels);
        if (n_labels != rows)
            value_error("`labels` must hold one label per row (" + std::to_string(rows) + "), got " +
                        std::to_string(n_labels));
        for (size_t i = 0; i < rows; i++)
            if (ids[i] < 0) value_error("`labels` must be >= 0, got " + std::to_string(ids[i]) + " at " + std::to_string(i));
        if (alg.cur_element_count + rows > alg.max_elements_)
            value_error("adding " + std::to_string(rows) + " items to " + std::to_string(alg.cur_element_count) +
                        " exceeds max_elements " + std::to_string(alg.max_elements_) + " (resize_index first)");
        size_t threads = resolve_threads(num_threads);
        if (rows <= threads * 4) threads = 1;  // hnswlib's rule: threads cost more than a few inserts
        size_t start = 0;
        py::gil_scoped_release release;
        std::unique_lock<std::shared_mutex> lock(mu_);
        const bool first_fill = alg.cur_element_count == 0;
        if (alg.cur_element_count == 0 && rows) {
            // The first point becomes the entry point: insert it alone so parallel inserts find a graph.
            alg.addPoint(x, labeltype(ids[0]));
            start = 1;
        }
        ParallelFor(start, rows, threads, [&](size_t row, size_t) {
            alg.addPoint(x + row * size_t(dim_), labeltype(ids[row]));
        });
        if (first_fill) renumber_by_label();  // labels_ is still empty: sync_labels reads the new order
        sync_labels();
        // new rows, and rows whose label was re-added (hnswlib updates those in place): rebuild the whole copy
        if (use_bf16_) bf16_.rebuild(alg, size_t(dim_));
    }

    // labels [m] int64 (all present) -> [m, dim] float32.
    py::array_t<float> get_items(const py::array &labels) const {
        const Alg &alg = inited();
        size_t m = 0;
        const int64_t *ids = check_int64(labels, "labels", &m);
        py::array_t<float> out({m, size_t(dim_)});
        float *o = out.mutable_data();
        for (size_t i = 0; i < m; i++) {
            tableint internal;
            {
                std::unique_lock<std::mutex> lock(alg.label_lookup_lock);
                auto it = alg.label_lookup_.find(labeltype(ids[i]));
                if (ids[i] < 0 || it == alg.label_lookup_.end() || alg.isMarkedDeleted(it->second))
                    throw py::key_error("label " + std::to_string(ids[i]) + " is not in the index");
                internal = it->second;
            }
            std::memcpy(o + i * size_t(dim_), alg.getDataByInternalId(internal), sizeof(float) * size_t(dim_));
        }
        return out;
    }

    // All labels, in internal-id (insertion) order.
    py::array_t<int64_t> get_ids_list() const {
        const Alg &alg = inited();
        size_t n = alg.cur_element_count;
        py::array_t<int64_t> out(n);
        int64_t *o = out.mutable_data();
        for (size_t i = 0; i < n; i++) o[i] = int64_t(alg.getExternalLabel(tableint(i)));
        return out;
    }

    // queries [n, dim] float32 C-contiguous; top-k per row -> (labels [n, k] int64, distances [n, k] float32),
    // nearest first, padded with -1 / +inf when fewer than k (allowed) items are found. `ef` = search width
    // (hnswlib uses max(ef, k)); 0 = the index's ef. `exclude_labels` + `exclude_offsets` [n + 1]: CSR lists of
    // labels row i must not return (any order, repeats and unknown labels allowed), or None for no exclusion.
    // `bitset`: non-zero (default) = a bitset over labels when the row's largest label is below MAX_BITSET_LABEL,
    // else (and with 0) a sorted array + binary search. The bitset is faster (benchmarks/index_bench.py).
    // `ef_filtered`: the search width of rows with a non-empty exclusion list, and of every row when `allow` is
    // given (0 = `ef`). `allow`: None, or the allowed set shared by all rows, a uint64 bitset over labels (bit
    // i & 63 of word i >> 6 = label i allowed; recsys.retrieval.bitset) of `allow_bits` bits (-1 = 64 x words;
    // labels at or past it are not allowed): rows return only allowed, non-excluded labels. `allow_budget`: with
    // `allow`, the nodes a row's walk may score before it gives up (see AllowFilter; 0 = no limit); a row
    // that gave up comes back empty (-1 / +inf), for the caller's exact scan. `allow_count` / `allow_near_width`:
    // the set's size and the narrower width a row's walk keeps where the query's neighbourhood holds the set's
    // share (see Index::search_allowed; 0 = never narrow).
    py::tuple knn(const py::array &queries, size_t k, size_t ef, py::object exclude_labels,
                  py::object exclude_offsets, int num_threads, int bitset, size_t ef_filtered, py::object allow,
                  int64_t allow_bits, uint64_t allow_budget, uint64_t allow_count, size_t allow_near_width) {
        const Alg &alg = inited();
        if (k < 1) value_error("`k` must be >= 1, got " + std::to_string(k));
        size_t rows = 0;
        const float *q = check_matrix(queries, "queries", dim_, &rows);
        const Exclusions excl = check_exclusions(exclude_labels, exclude_offsets, rows);
        const int64_t *ex = excl.labels, *off = excl.offsets;
        const uint64_t *aw = nullptr;
        uint64_t n_allow = 0;
        py::array allow_arr;
        if (!allow.is_none()) {
            if (!py::isinstance<py::array>(allow))
                value_error("`allow` must be None or a uint64 bitset (numpy array), got " +
                            std::string(py::str(py::type::of(allow))));
            allow_arr = py::reinterpret_borrow<py::array>(allow);
            size_t n_words = 0;
            aw = check_words(allow_arr, "allow", &n_words);
            n_allow = check_allow_bits(allow_bits, n_words);
        }
        py::array_t<int64_t> labels_out({rows, k});
        py::array_t<float> dist_out({rows, k});
        int64_t *lo = labels_out.mutable_data();
        float *dout = dist_out.mutable_data();
        size_t threads = resolve_threads(num_threads);
        if (rows <= threads * 4) threads = 1;  // one query (the serving path) runs on the calling thread
        {
            py::gil_scoped_release release;
            std::shared_lock<std::shared_mutex> lock(mu_);
            ParallelFor(0, rows, threads, [&](size_t row, size_t) {
                const int64_t *eb = ex ? ex + off[row] : nullptr, *ee = ex ? ex + off[row + 1] : nullptr;
                search_row(alg, q + row * size_t(dim_), k, ef, ef_filtered, eb, ee, bitset, lo + row * k,
                           dout + row * k, aw, n_allow, allow_budget, allow_count, allow_near_width);
            });
        }
        return py::make_tuple(labels_out, dist_out);
    }

    const Alg &alg() const { return inited(); }

    // One query: top-k labels/distances nearest first, -1 / +inf padded. [eb, ee): labels it must not return (any
    // order, repeats and negatives allowed; empty = no filter). Search width max(ef, k), 0 = the index's ef; with
    // a filter max(ef_filtered, k), 0 = that ef. `allow` (null = everything): the allowed set's words, `allow_bits`
    // bits, ANDed with the exclusion. Caller holds mu_ (shared) and no GIL.
    void search_row(const Alg &alg, const float *qi, size_t k, size_t ef, size_t ef_filtered,
                    const int64_t *eb, const int64_t *ee, int bitset, int64_t *l, float *d,
                    const uint64_t *allow = nullptr, uint64_t allow_bits = 0, uint64_t allow_budget = 0,
                    uint64_t allow_count = 0, size_t allow_near_width = 0) const {
        const size_t width = std::max(ef ? ef : ef_, k);
        const size_t width_filtered = std::max(ef_filtered ? ef_filtered : (ef ? ef : ef_), k);
        hnswlib::BaseFilterFunctor *filter = nullptr;
        ExcludeBitset fb;
        ExcludeSorted fs;
        ClearBits clear;
        if (eb != ee) {
            uint64_t top = 0;  // largest label + 1 (negative labels never match: skipped)
            for (const int64_t *p = eb; p != ee; ++p)
                if (*p >= 0) top = std::max(top, uint64_t(*p) + 1);
            if (bitset != 0 && top <= kMaxBitsetLabel) {
                std::vector<uint64_t> &w = thread_bitset();
                if (w.size() < (top + 63) / 64) w.resize((top + 63) / 64, 0);
                clear.words = &w;
                clear.begin = eb;
                clear.end = ee;
                for (const int64_t *p = eb; p != ee; ++p)
                    if (*p >= 0) w[uint64_t(*p) >> 6] |= uint64_t(1) << (uint64_t(*p) & 63);
                fb.words = w.data();
                fb.n_bits = top;
                filter = &fb;
            } else {
                std::vector<uint64_t> &s = thread_sorted();
                s.clear();
                for (const int64_t *p = eb; p != ee; ++p)
                    if (*p >= 0) s.push_back(uint64_t(*p));
                std::sort(s.begin(), s.end());
                fs.begin = s.data();
                fs.end = s.data() + s.size();
                filter = &fs;
            }
        }
        AllowFilter fa;
        AllowFilter *pa = nullptr;
        if (allow) {
            fa.words = allow;
            fa.n_bits = allow_bits;
            fa.exclude = filter;
            if (allow_budget) fa.budget = allow_budget;
            fa.count = allow_count;
            fa.near_width = allow_near_width ? std::max(allow_near_width, k) : 0;
            pa = &fa;
            filter = nullptr;  // search_allowed asks fa, which asks the exclusion
        }
        const size_t w = (filter || pa) ? width_filtered : width;
        size_t got = (use_bf16_ && bf16_.rows == alg.cur_element_count && !alg.num_deleted_)
                         ? search_bf16(alg, bf16_, labels_.data(), identity_, size_t(dim_), qi, k, w, filter, pa, l, d)
                         : search_one(alg, labels_.data(), identity_, qi, k, w, filter, pa, l, d);
        if (fa.gave_up) got = 0;
        for (size_t j = got; j < k; j++) {
            l[j] = -1;
            d[j] = std::numeric_limits<float>::infinity();
        }
    }

 private:
    using Pair = std::pair<float, tableint>;  // (distance, internal id)

    // A visited list from hnswlib's pool, returned when the search ends (also when it throws).
    struct VisitedGuard {
        const Alg &alg;
        hnswlib::VisitedList *vl;
        explicit VisitedGuard(const Alg &a) : alg(a), vl(a.visited_list_pool_->getFreeVisitedList()) {}
        ~VisitedGuard() { alg.visited_list_pool_->releaseVisitedList(vl); }
    };

    // Node `id`'s layer-0 neighbour list: `size` internal ids from `ids`.
    struct Links {
        const tableint *ids;
        size_t size;
    };
    static Links links0(const Alg &alg, tableint id) {
        hnswlib::linklistsizeint *ll = alg.get_linklist0(id);
        return {reinterpret_cast<const tableint *>(ll + 1), size_t(alg.getListCount(ll))};
    }

    // The nodes of a farthest-on-top heap into `out`, nearest first (the heap is left empty).
    static void drain_nearest_first(std::priority_queue<Pair> &top, std::vector<Pair> &out) {
        out.clear();
        for (; !top.empty(); top.pop()) out.push_back(top.top());
        std::reverse(out.begin(), out.end());
    }

    // Prefetches node `id`'s float32 vector (every line of it, the last byte too: rows need not start on a line).
    static void prefetch_vector(const Alg &alg, tableint id) {
        const char *x = alg.getDataByInternalId(id);
        for (size_t o = 0; o < alg.data_size_; o += 64) prefetch(x + o);
        prefetch(x + alg.data_size_ - 1);
    }

    // hnswlib's greedy descent from the entry point through the upper layers to the layer-0 starting node.
    // `dist(id)`: distance of the query to node `id`; `prefetch(id)`: called for a node's neighbours before any
    // of their distances is computed.
    template <class Dist, class Prefetch>
    static tableint descend(const Alg &alg, Dist dist, Prefetch prefetch_node) {
        tableint cur = alg.enterpoint_node_;
        float curdist = dist(cur);
        for (int level = alg.maxlevel_; level > 0; level--) {
            bool changed = true;
            while (changed) {
                changed = false;
                unsigned int *data = (unsigned int *)alg.get_linklist(cur, level);
                int size = alg.getListCount(data);
                tableint *datal = (tableint *)(data + 1);
                for (int i = 0; i < size; i++) prefetch_node(datal[i]);
                for (int i = 0; i < size; i++) {
                    tableint cand = datal[i];
                    if (cand > alg.max_elements_) throw std::runtime_error("cand error");
                    float d = dist(cand);
                    if (d < curdist) {
                        curdist = d;
                        cur = cand;
                        changed = true;
                    }
                }
            }
        }
        return cur;
    }

    // The search of an allowed set (knn(allow=...)): hnswlib's greedy descent, then a layer-0 walk that scores
    // allowed nodes only, where it can. Leaves up to `width` allowed nodes in `out`, nearest first; a walk that
    // scores more than allow.budget nodes stops and sets allow.gave_up. `lab`: labels by internal id (`identity`:
    // they are the internal ids, see renumber_by_label); `dist(id)` / `prefetch_row(id)`: the query's distance to a
    // node / a prefetch of its vector. The number of nodes scored is left in walk_scored.
    //
    // The walk follows ACORN-1 (Patel et al., "ACORN: Performant and Predicate-Agnostic Search Over Vector
    // Embeddings and Structured Data", SIGMOD 2024). hnswlib's filtered search scores every node it passes and
    // walks through the disallowed ones, so at selectivity s it scores ~1/s times the nodes of a plain search.
    // Here an expanded allowed node's allowed neighbours are scored and its disallowed ones are not: their own
    // neighbour lists are read instead and the allowed nodes there scored (the two-hop expansion that keeps the
    // allowed subgraph connected), until the node has met maxM0 (2M, a plain node's fan-out) allowed nodes,
    // visited or not (ACORN's truncation: it bounds the lists read per node; counting only new nodes measured
    // ~25% slower at 30% allowed for +0.001-0.004 Recall@10). Reading lists and testing bits is cheap next to
    // scoring vectors.
    //
    // Pure two-hop walks lose recall on allowed sets that are not spread over the catalogue (an attribute such as
    // a genre: allowed items sit in clusters away from the query, plus strays near it that two hops from other
    // allowed items do not reach; measured Recall@10 0.87-0.94 at 10% of 100k-1M, benchmarks/index_bench.py).
    // So disallowed nodes are still walked through as hnswlib does -- scored, and their disallowed neighbours too
    // -- while fewer than width / 2 allowed nodes are kept (the walk's first steps around the query, where those
    // strays are), and whenever an expanded node has nothing new allowed within two hops while fewer than `width`
    // are kept (the walk starts among disallowed nodes). The walk ends as hnswlib's: when the nearest open
    // candidate is farther than the width-th kept node.
    //
    // With allow.near_width (and allow.count, the set's size): before walking, the allowed nodes in the two-hop
    // neighbourhood of the descent's end are counted; when they are at least half the set's share of that
    // neighbourhood (allowed items spread around the query) the walk keeps near_width nodes instead of `width`
    // -- there a narrower walk loses little recall, while a query away from the set needs the full width to find
    // the strays and far clusters (numbers: HnswIndex.allow_walk).
    template <class Dist, class PrefetchRow>
    static void search_allowed(const Alg &alg, const int64_t *lab, bool identity, Dist dist,
                               PrefetchRow prefetch_row, AllowFilter &allow, size_t width, std::vector<Pair> &out) {
        const bool deletions = alg.num_deleted_ != 0;
        auto allowed = [&](tableint id) {
            return allow.allows(identity ? uint64_t(id) : uint64_t(lab[id])) &&
                   !(deletions && alg.isMarkedDeleted(id));
        };
        const size_t fan = alg.maxM0_;
        const size_t list_bytes = alg.size_links_level0_;
        auto prefetch_list = [&](tableint id) {
            const char *l = reinterpret_cast<const char *>(alg.get_linklist0(id));
            for (size_t o = 0; o < list_bytes; o += 64) prefetch(l + o);
        };
        // todo: at most maxM0 -- a node's allowed neighbours and two-hop finds stop at `fan` met, and the
        // disallowed neighbours are added only beside the allowed ones of the same (at most maxM0-long) list or
        // when nothing was found
        thread_local std::vector<tableint> todo, hop;
        if (todo.size() < alg.maxM0_ + 1) todo.resize(alg.maxM0_ + 1);
        if (hop.size() < alg.maxM0_ + 1) hop.resize(alg.maxM0_ + 1);
        const tableint start = descend(alg, dist, [&](tableint id) { prefetch_row(id); });
        if (allow.near_width && allow.near_width < width && allow.count) {
            // The start's two-hop neighbourhood: allowed nodes in it / nodes in it, against the set's share.
            const Links first = links0(alg, start);
            for (size_t j = 0; j < first.size; j++) prefetch_list(first.ids[j]);
            size_t met = first.size, hit = 0;
            for (size_t j = 0; j < first.size; j++) {
                hit += allowed(first.ids[j]);
                const Links second = links0(alg, first.ids[j]);
                met += second.size;
                for (size_t i = 0; i < second.size; i++) hit += allowed(second.ids[i]);
            }
            if (2 * double(hit) * double(alg.cur_element_count) >= double(allow.count) * double(met))
                width = allow.near_width;
        }
        const float d0 = dist(start);
        uint64_t scored = 1;
        std::priority_queue<Pair> top;   // kept allowed nodes, farthest on top
        std::priority_queue<Pair> cand;  // open candidates as (-dist, id)
        VisitedGuard vg(alg);
        hnswlib::vl_type *visited = vg.vl->mass;
        const hnswlib::vl_type tag = vg.vl->curV;
        float lower = std::numeric_limits<float>::max();
        if (allowed(start)) {
            top.emplace(d0, start);
            lower = d0;
        }
        cand.emplace(-d0, start);
        visited[start] = tag;
        while (!cand.empty()) {
            const Pair best = cand.top();
            if (-best.first > lower && top.size() >= width) break;
            cand.pop();
            const Links links = links0(alg, best.second);
            size_t n = 0, nh = 0, found = 0;  // found: allowed nodes met, visited or not (ACORN's truncation)
            for (size_t j = 0; j < links.size; j++) {
                const tableint v = links.ids[j];
                if (allowed(v)) {
                    found++;
                    if (visited[v] == tag) continue;
                    visited[v] = tag;
                    todo[n++] = v;
                    prefetch_row(v);
                } else if (visited[v] != tag) {
                    hop[nh++] = v;
                    prefetch_list(v);
                }
            }
            // through: expand as hnswlib does (score the disallowed neighbours, which may be walked through)
            bool through = 2 * top.size() < width && !allowed(best.second);
            for (size_t h = 0; !through && h < nh && found < fan; h++) {
                const Links second = links0(alg, hop[h]);
                for (size_t j = 0; j < second.size && found < fan; j++) {
                    const tableint w = second.ids[j];
                    if (!allowed(w)) continue;
                    found++;
                    if (visited[w] == tag) continue;
                    visited[w] = tag;
                    todo[n++] = w;
                    prefetch_row(w);
                }
            }
            if (n == 0 && top.size() < width) through = true;
            const size_t n_allowed = n;
            if (through)
                for (size_t h = 0; h < nh; h++) {
                    visited[hop[h]] = tag;
                    todo[n++] = hop[h];
                    prefetch_row(hop[h]);
                }
            scored += n;
            if (scored > allow.budget) {
                allow.gave_up = true;
                break;
            }
            for (size_t i = 0; i < n; i++) {
                const tableint id = todo[i];
                const float d = dist(id);
                if (top.size() < width || d < lower) {
                    cand.emplace(-d, id);
                    prefetch(alg.get_linklist0(cand.top().second));
                    if (i < n_allowed) {
                        top.emplace(d, id);
                        if (top.size() > width) top.pop();
                        lower = top.top().first;
                    }
                }
            }
        }
        walk_scored = scored;
        drain_nearest_first(top, out);
    }

    // hnswlib's HierarchicalNSW::searchKnn with the search width as an argument (hnswlib reads the shared ef_,
    // which would make a per-call ef racy) and without its metric counters (atomics shared by all threads).
    // Writes up to k results nearest first; returns how many.
    // `allow`: search_allowed instead of hnswlib's search; `lab`: labels by internal id.
    static size_t search_one(const Alg &alg, const int64_t *lab, bool identity, const float *q, size_t k, size_t width,
                             hnswlib::BaseFilterFunctor *filter, AllowFilter *allow, int64_t *labels, float *dists) {
        if (alg.cur_element_count == 0) return 0;
        auto dist = [&](tableint id) {
            return alg.fstdistfunc_(q, alg.getDataByInternalId(id), alg.dist_func_param_);
        };
        if (allow) {
            thread_local std::vector<Pair> kept;
            search_allowed(alg, lab, identity, dist, [&](tableint id) { prefetch_vector(alg, id); }, *allow, width,
                           kept);
            const size_t n = std::min(k, kept.size());
            for (size_t j = 0; j < n; j++) {
                dists[j] = kept[j].first;
                labels[j] = lab[kept[j].second];
            }
            return n;
        }
        tableint cur = descend(alg, dist, [](tableint) {});
        auto top = (!alg.num_deleted_ && !filter)
                       ? alg.searchBaseLayerST<true>(cur, q, width, filter)
                       : alg.searchBaseLayerST<false>(cur, q, width, filter);
        while (top.size() > k) top.pop();
        size_t n = top.size();
        for (size_t j = n; j-- > 0;) {  // the heap pops farthest first
            dists[j] = top.top().first;
            labels[j] = lab[top.top().second];
            top.pop();
        }
        return n;
    }

    // The search of search_one over the bf16 copy (see Bf16Copy): the same greedy descent and the same layer-0
    // best-first search as hnswlib's searchBaseLayerST (stop when the nearest open candidate is farther than the
    // width-th allowed result), except that (1) a node's unvisited neighbours are collected and all their vector
    // lines prefetched before any of their distances is computed, (2) distances are bf16 dots, (3) the filter is
    // asked with the label from the compact array. Then all (up to width) allowed candidates kept are re-scored
    // in float32 and the best k of them returned, nearest first.
    static size_t search_bf16(const Alg &alg, const Bf16Copy &c, const int64_t *lab, bool identity, size_t dim, const float *q,
                              size_t k, size_t width, hnswlib::BaseFilterFunctor *filter, AllowFilter *allow,
                              int64_t *labels, float *dists) {
        if (alg.cur_element_count == 0) return 0;
        const size_t lines = (dim * sizeof(uint16_t) + 63) / 64;
        auto dist = [&](tableint id) { return 1.0f - dot_bf16(q, c.row(id), dim); };
        auto prefetch_row = [&](tableint id) {
            const char *r = reinterpret_cast<const char *>(c.row(id));
            for (size_t l = 0; l < lines; l++) prefetch(r + 64 * l);
        };
        double qsq = 0;
        for (size_t d = 0; d < dim; d++) qsq += double(q[d]) * double(q[d]);
        const float qnorm = float(std::sqrt(qsq));
        thread_local std::vector<Pair> cands, best;  // the walk's kept nodes, nearest (by bf16) first
        cands.clear();
        best.clear();
        if (allow) {
            search_allowed(alg, lab, identity, dist, prefetch_row, *allow, width, cands);
        } else {
            const tableint cur = descend(alg, dist, [&](tableint id) { prefetch(c.row(id)); });
            const float curdist = dist(cur);
            thread_local std::vector<Pair> top_buf, cand_buf;
            thread_local std::vector<tableint> todo;
            top_buf.clear();
            cand_buf.clear();
            std::priority_queue<Pair, std::vector<Pair>> top(std::less<Pair>(), std::move(top_buf));  // farthest on top
            std::priority_queue<Pair, std::vector<Pair>> cand(std::less<Pair>(), std::move(cand_buf));  // (-dist, id)
            if (todo.size() < alg.maxM0_ + 1) todo.resize(alg.maxM0_ + 1);
            VisitedGuard vg(alg);
            hnswlib::vl_type *visited = vg.vl->mass;
            const hnswlib::vl_type tag = vg.vl->curV;

            float lower = std::numeric_limits<float>::max();
            if (!filter || (*filter)(labeltype(lab[cur]))) {
                lower = curdist;
                top.emplace(curdist, cur);
            }
            cand.emplace(-curdist, cur);
            visited[cur] = tag;
            while (!cand.empty()) {
                Pair best_open = cand.top();
                if (-best_open.first > lower && top.size() >= width) break;
                cand.pop();
                const int *data = (const int *)alg.get_linklist0(best_open.second);
                size_t size = alg.getListCount((hnswlib::linklistsizeint *)data);
                size_t n = 0;
                for (size_t j = 1; j <= size; j++) {
                    tableint id = tableint(data[j]);
                    if (visited[id] == tag) continue;
                    visited[id] = tag;
                    todo[n++] = id;
                    prefetch_row(id);
                }
                for (size_t i = 0; i < n; i++) {
                    tableint id = todo[i];
                    float d = dist(id);
                    if (top.size() < width || lower > d) {
                        cand.emplace(-d, id);
                        prefetch(alg.get_linklist0(cand.top().second));
                        if (!filter || (*filter)(labeltype(lab[id]))) {
                            top.emplace(d, id);
                            if (top.size() > width) top.pop();
                            lower = top.top().first;
                        }
                    }
                }
            }
            drain_nearest_first(top, cands);
        }

        // Re-score in float32, nearest-by-bf16 first, and stop once no remaining candidate can beat the k-th exact
        // distance: rounding to bf16 moves each element by at most 2^-8 of itself, so a bf16 dot is within
        // 2^-8 * |q| * |v| of the float32 one (Cauchy-Schwarz), plus float32 accumulation slack. Equivalent to
        // re-scoring every candidate, at the cost of usually k + a few (near-ties reorder under bf16: a true top-k
        // item can sit well below rank k in the bf16 order, which a fixed window would miss).
        const float err = float((1.0 / 256 + 1e-5) * double(qnorm) * double(c.max_norm) + 1e-6);
        const size_t ahead = k + 4;
        for (size_t i = 0; i < std::min(ahead, cands.size()); i++) prefetch_vector(alg, cands[i].second);
        for (size_t i = 0; i < cands.size(); i++) {
            if (best.size() == k && cands[i].first - err > best.front().first) break;
            if (i + ahead < cands.size()) prefetch_vector(alg, cands[i + ahead].second);
            tableint id = cands[i].second;
            float d = alg.fstdistfunc_(q, alg.getDataByInternalId(id), alg.dist_func_param_);
            if (best.size() < k) {
                best.emplace_back(d, id);
                std::push_heap(best.begin(), best.end());
            } else if (d < best.front().first) {
                std::pop_heap(best.begin(), best.end());
                best.back() = Pair(d, id);
                std::push_heap(best.begin(), best.end());
            }
        }
        std::sort(best.begin(), best.end());
        const size_t n = best.size();
        for (size_t j = 0; j < n; j++) {
            dists[j] = best[j].first;
            labels[j] = lab[best[j].second];
        }
        return n;
    }

    // labels_[i] = the label of internal id i. hnswlib keeps a label inside its node's block, lines away from the
    // node's links; the filtered walk asks about the labels of nodes it never scores, so it reads them here.
    // New rows are appended (a re-added label keeps its internal id: hnswlib updates that row in place).
    // identity_: every label equals its internal id (see renumber_by_label), so the walk reads no label.
    void sync_labels() {
        const Alg &alg = *alg_;
        const size_t n = alg.cur_element_count, old = labels_.size();
        if (old == 0) identity_ = true;
        labels_.resize(n);
        for (size_t i = old; i < n; i++) {
            labels_[i] = int64_t(alg.getExternalLabel(tableint(i)));
            identity_ = identity_ && labels_[i] == int64_t(i);
        }
    }

    // Renumbers the nodes so that each internal id equals its label, when the labels are exactly 0..n-1 (the
    // bundle's item rows): the filtered walk then tests a node against the allowed set (a bitset over labels) with
    // one bit and no label lookup, which at 1M items is a cache miss per neighbour-of-neighbour. hnswlib numbers
    // nodes in insertion order, which parallel inserts shuffle. Moves every node's level-0 block and rewrites every
    // link (levels, upper-level lists, the label map and the entry point follow); the graph, and so every search
    // result, is unchanged, and the file saved afterwards is in label order. Returns whether anything moved.
    // Caller holds mu_ exclusively (or owns the index alone).
    bool renumber_by_label() {
        Alg &alg = *alg_;
        const size_t n = alg.cur_element_count;
        if (n == 0 || alg.num_deleted_) return false;
        std::vector<tableint> to(n);
        std::vector<char> taken(n, 0);
        bool identity = true;
        for (size_t i = 0; i < n; i++) {
            const labeltype l = alg.getExternalLabel(tableint(i));
            if (l >= n || taken[l]) return false;
            taken[l] = 1;
            to[i] = tableint(l);
            identity = identity && l == i;
        }
        if (identity) return false;
        const size_t es = alg.size_data_per_element_;
        char *mem = static_cast<char *>(std::malloc(alg.max_elements_ * es));
        if (!mem) throw std::bad_alloc();
        auto relink = [&](hnswlib::linklistsizeint *ll) {
            const size_t count = alg.getListCount(ll);
            tableint *links = reinterpret_cast<tableint *>(ll + 1);
            for (size_t j = 0; j < count; j++) links[j] = to[links[j]];
        };
        for (size_t i = 0; i < n; i++) {
            char *dst = mem + size_t(to[i]) * es;
            std::memcpy(dst, alg.data_level0_memory_ + i * es, es);
            relink(reinterpret_cast<hnswlib::linklistsizeint *>(dst + alg.offsetLevel0_));
            for (int level = 1; level <= alg.element_levels_[i]; level++) relink(alg.get_linklist(tableint(i), level));
        }
        std::vector<char *> lists(n);
        std::vector<int> levels(n);
        for (size_t i = 0; i < n; i++) {
            lists[to[i]] = alg.linkLists_[i];
            levels[to[i]] = alg.element_levels_[i];
        }
        for (size_t i = 0; i < n; i++) {
            alg.linkLists_[i] = lists[i];
            alg.element_levels_[i] = levels[i];
        }
        std::free(alg.data_level0_memory_);
        alg.data_level0_memory_ = mem;
        for (auto &kv : alg.label_lookup_) kv.second = tableint(kv.first);
        alg.enterpoint_node_ = to[alg.enterpoint_node_];
        return true;  // the caller rebuilds what follows internal order (labels_, the bf16 copy)
    }

    Alg &inited() const {
        if (!alg_) throw std::runtime_error("the index is not initialised (call init_index or load_index)");
        return *alg_;
    }

    int dim_;
    size_t ef_ = 10;
    bool use_bf16_ = false;
    Bf16Copy bf16_;
    std::vector<int64_t> labels_;
    bool identity_ = false;
    hnswlib::InnerProductSpace space_;
    std::unique_ptr<Alg> alg_;
};


// ---------------------------------------------------------------------------------------------------------------
// The serving hot path in one call: a serialized recsys.v1.RecommendRequest for a known user (user_id, k, and
// optionally include_seen / allow_fallback; no lists) -> the serialized RecommendResponse, byte for byte what the
// Python path (server.service.recommend + the servicer) answers: the user's stored embedding, a search that skips
// the user's seen items, scores 1 - distance, item IDs, the model version, source = SOURCE_KNOWN_USER.
// Anything else -- another field, an unknown or too-long user ID, k out of range, a user whose exclusion is large
// enough for the exact scan, fewer than k results, a query row that is not unit length for cosine -- returns None
// and the caller takes the Python path, which owns every error message. Built once per bundle (Python keeps the
// arrays it is given alive); the GIL is released for the parse, the lookup and the search.

bool read_varint(const uint8_t *&p, const uint8_t *end, uint64_t &v) {
    v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
        if (p >= end) return false;
        uint8_t b = *p++;
        v |= uint64_t(b & 0x7f) << shift;
        if (!(b & 0x80)) return true;
    }
    return false;
}

void write_varint(std::string &out, uint64_t v) {
    while (v >= 0x80) {
        out.push_back(char(uint8_t(v) | 0x80));
        v >>= 7;
    }
    out.push_back(char(v));
}

// A float32 C-contiguous 2-D array [rows, cols] (cols checked when >= 0); a null pointer for 0 rows.
const float *f32_matrix(const py::array &a, const char *name, long cols, size_t *rows) {
    if (a.ndim() != 2 || a.dtype().kind() != 'f' || a.itemsize() != 4 || !(a.flags() & py::array::c_style))
        value_error(std::string("`") + name + "` must be a C-contiguous float32 2-D array");
    if (cols >= 0 && a.shape(1) != cols)
        value_error(std::string("`") + name + "` must have " + std::to_string(cols) + " columns, got " +
                    std::to_string(a.shape(1)));
    *rows = size_t(a.shape(0));
    return static_cast<const float *>(a.data());
}

// A float32 C-contiguous 1-D array of ``len`` entries.
const float *f32_vector(const py::array &a, const char *name, size_t len) {
    if (a.ndim() != 1 || a.dtype().kind() != 'f' || a.itemsize() != 4 || !(a.flags() & py::array::c_style) ||
        size_t(a.shape(0)) != len)
        value_error(std::string("`") + name + "` must be a C-contiguous float32 array of " + std::to_string(len) +
                    " entries");
    return static_cast<const float *>(a.data());
}

#if defined(__GNUC__) || defined(__clang__)
// 8 floats as one value (GCC / Clang vector extension): one AVX register with -march=native, two SSE ones without
typedef float f32x8 __attribute__((vector_size(32)));
inline f32x8 load8(const float *p) {
    f32x8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void store8(float *p, f32x8 v) { std::memcpy(p, &v, sizeof v); }

// Rows r..r+R-1 of matmul below, columns o0 <= o < o1: blocks of 16 columns (then 8) accumulate in registers over
// k, each row of W loaded once for the R rows; the last columns (fewer than 8) one by one.
template <size_t R>
void matmul_rows(const float *X, size_t ldx, size_t in, const float *W, size_t ldw, const float *b, size_t o0,
                 size_t o1, float *Y, size_t ldy) {
    size_t o = o0;
    for (; o + 16 <= o1; o += 16) {
        f32x8 acc[R][2];
        for (size_t i = 0; i < R; i++) acc[i][0] = load8(b + o), acc[i][1] = load8(b + o + 8);
        for (size_t k = 0; k < in; k++) {
            const f32x8 w0 = load8(W + k * ldw + o), w1 = load8(W + k * ldw + o + 8);
            for (size_t i = 0; i < R; i++) {
                const float v = X[i * ldx + k];
                acc[i][0] += v * w0;
                acc[i][1] += v * w1;
            }
        }
        for (size_t i = 0; i < R; i++) store8(Y + i * ldy + o, acc[i][0]), store8(Y + i * ldy + o + 8, acc[i][1]);
    }
    for (; o + 8 <= o1; o += 8) {
        f32x8 acc[R];
        for (size_t i = 0; i < R; i++) acc[i] = load8(b + o);
        for (size_t k = 0; k < in; k++) {
            const f32x8 w0 = load8(W + k * ldw + o);
            for (size_t i = 0; i < R; i++) acc[i] += X[i * ldx + k] * w0;
        }
        for (size_t i = 0; i < R; i++) store8(Y + i * ldy + o, acc[i]);
    }
    for (; o < o1; o++)
        for (size_t i = 0; i < R; i++) {
            float acc = b[o];
            for (size_t k = 0; k < in; k++) acc += X[i * ldx + k] * W[k * ldw + o];
            Y[i * ldy + o] = acc;
        }
}
#else
template <size_t R>
void matmul_rows(const float *X, size_t ldx, size_t in, const float *W, size_t ldw, const float *b, size_t o0,
                 size_t o1, float *Y, size_t ldy) {
    for (size_t i = 0; i < R; i++) {
        float *y = Y + i * ldy;
        for (size_t o = o0; o < o1; o++) y[o] = b[o];
        for (size_t k = 0; k < in; k++) {
            const float v = X[i * ldx + k];
            const float *w = W + k * ldw;
            for (size_t o = o0; o < o1; o++) y[o] += v * w[o];
        }
    }
}
#endif

// Y[r, o] = b[o] + sum_k X[r, k] W[k, o] for rows r < n and columns o0 <= o < o1: X [n, in] (row stride ldx),
// W [in, ldw] row-major (the transposed nn.Linear weight: unit stride over the outputs), Y's columns indexed like
// W's (row stride ldy); 6 rows at a time (12 of the 16 AVX registers accumulate). Y must not overlap X.
void matmul(const float *X, size_t ldx, size_t n, size_t in, const float *W, size_t ldw, const float *b, size_t o0,
            size_t o1, float *Y, size_t ldy) {
    size_t r = 0;
    for (; r + 6 <= n; r += 6) matmul_rows<6>(X + r * ldx, ldx, in, W, ldw, b, o0, o1, Y + r * ldy, ldy);
    for (; r + 2 <= n; r += 2) matmul_rows<2>(X + r * ldx, ldx, in, W, ldw, b, o0, o1, Y + r * ldy, ldy);
    for (; r < n; r++) matmul_rows<1>(X + r * ldx, ldx, in, W, ldw, b, o0, o1, Y + r * ldy, ldy);
}

// nn.LayerNorm over the last dim (biased variance, in double): rows n of X [n, e] -> Y [n, e]
void layer_norm(const float *X, size_t n, size_t e, const float *w, const float *b, float eps, float *Y) {
    for (size_t r = 0; r < n; r++) {
        const float *x = X + r * e;
        float *y = Y + r * e;
        double mu = 0, var = 0;
        for (size_t c = 0; c < e; c++) mu += x[c];
        mu /= double(e);
        for (size_t c = 0; c < e; c++) var += (x[c] - mu) * (x[c] - mu);
        const float m = float(mu), inv = float(1.0 / std::sqrt(var / double(e) + double(eps)));
        for (size_t c = 0; c < e; c++) y[c] = (x[c] - m) * inv * w[c] + b[c];
    }
}

// nn.GELU (exact): x * Phi(x), in place
void gelu(float *y, size_t n) {
    for (size_t o = 0; o < n; o++) y[o] = 0.5f * y[o] * (1.0f + std::erf(y[o] * 0.70710678118654752f));
}

// The user tower of recsys.model.TwoTower (``encode_users`` in eval mode) on the arrays of
// ``recsys.model.NumpyUserTower`` -- the same math in the same order, one user at a time, without the GIL:
// the request path's tower (fresh events of a known user, a new user's history). server.service checks it
// against the torch tower when a bundle loads and serves with it only when they agree.
//   x      = user_id[row] + sum of the user's feature embeddings (a multi-valued feature: the mean of its codes
//            present; code 0 embeds to zero); zeros for a new user (row -1)
//   pooled = attention: softmax_i(tanh(h_i W_key^T + rec_key[steps back of i]) . query) weighted sum of h_i
//            (query pre-scaled by 1/sqrt(E)); mean: the mean of h_i; zeros for an empty history;
//            transformer (``encoder``, model.user_tower = "transformer", recsys.train.layers.CausalEncoder): the
//            encoder's output at the last position over h_i + position[i] (i counted from the first item used),
//            causal pre-norm blocks, the last block on the last position alone; zeros for an empty history
//   z      = [x, pooled, (h_last)] -> Linear (-> GELU -> Linear)* -> L2-normalised
//   with a score prior (model.time_prior): [z, g, 0] / sqrt(1 + |g|^2), g the user's row of ``prior_known`` or,
//            for a new user, the row of ``prior_new`` for the number of history items used
// h_i: the history table's rows of the last ``history_len`` items of the user's history, oldest first.
class UserTower {
 public:
    UserTower(py::array table, py::array user_id, py::list features, py::array user_feats, py::object pool,
              bool last_item, py::list layers, int history_len, py::object prior, py::object encoder)
        : last_item_(last_item), history_len_(history_len > 0 ? size_t(history_len) : 0) {
        if (history_len < 1) value_error("`history_len` must be >= 1, got " + std::to_string(history_len));
        keep_ = py::list();
        keep_.append(table);
        table_ = f32_matrix(table, "table", -1, &n_items_);
        e_ = size_t(table.shape(1));
        size_t rows = 0;
        uid_ = f32_matrix(user_id, "user_id", long(e_), &rows);
        keep_.append(user_id);
        if (user_feats.ndim() != 2 || user_feats.dtype().kind() != 'i' || user_feats.itemsize() != 8 ||
            !(user_feats.flags() & py::array::c_style))
            value_error("`user_feats` must be a C-contiguous int64 2-D array");
        n_users_ = size_t(user_feats.shape(0));
        n_cols_ = size_t(user_feats.shape(1));
        if (rows != 0 && rows != n_users_)
            value_error("`user_id` must have one row per user (" + std::to_string(n_users_) + "), got " +
                        std::to_string(rows));
        has_uid_ = rows != 0;
        codes_ = static_cast<const int64_t *>(user_feats.data());
        keep_.append(user_feats);
        for (auto f : features) {
            auto t = f.cast<py::tuple>();
            py::array w = t[0].cast<py::array>();
            Feature feat;
            feat.w = f32_matrix(w, "feature weight", long(e_), &feat.card);
            feat.start = t[1].cast<size_t>();
            feat.width = t[2].cast<size_t>();
            if (feat.start + feat.width > n_cols_) value_error("a feature's columns lie outside `user_feats`");
            keep_.append(w);
            feats_.push_back(feat);
        }
        if (!pool.is_none()) {
            auto t = pool.cast<py::tuple>();
            py::array wk = t[0].cast<py::array>(), rk = t[1].cast<py::array>(), q = t[2].cast<py::array>();
            wk_ = f32_matrix(wk, "w_key", long(e_), &rows);
            if (rows != e_) value_error("`w_key` must be [E, E]");
            rk_ = f32_matrix(rk, "rec_key", long(e_), &rows);
            if (rows < history_len_) value_error("`rec_key` must have a row per history position");
            if (q.ndim() != 1 || size_t(q.shape(0)) != e_ || q.dtype().kind() != 'f' || q.itemsize() != 4)
                value_error("`query` must be float32 [E]");
            q_ = static_cast<const float *>(q.data());
            keep_.append(wk);
            keep_.append(rk);
            keep_.append(q);
        }
        size_t in = (last_item ? 3 : 2) * e_;
        in_ = in;
        for (auto l : layers) {
            auto t = l.cast<py::tuple>();
            py::array w = t[0].cast<py::array>(), b = t[1].cast<py::array>();
            Layer layer;
            size_t r = 0;
            layer.w = f32_matrix(w, "layer weight", -1, &r);
            if (r != in) value_error("a layer's input size does not match the previous output");
            layer.in = in;
            layer.out = size_t(w.shape(1));
            if (b.ndim() != 1 || size_t(b.shape(0)) != layer.out || b.dtype().kind() != 'f' || b.itemsize() != 4)
                value_error("a layer's bias must be float32 [out]");
            layer.b = static_cast<const float *>(b.data());
            keep_.append(w);
            keep_.append(b);
            layers_.push_back(layer);
            in = layer.out;
        }
        if (layers_.empty()) value_error("`layers` must hold at least one (weight, bias)");
        // model.user_tower = "transformer": (position [>= history_len, E], blocks, (final_w, final_b, final_eps)),
        // a block (ln1_w, ln1_b, ln1_eps, qkv_wT [E, 3E], qkv_b, proj_wT [E, E], proj_b, ln2_w, ln2_b, ln2_eps,
        // ff1_wT [E, F], ff1_b, ff2_wT [F, E], ff2_b, heads)
        if (!encoder.is_none()) {
            if (!pool.is_none()) value_error("`pool` and `encoder` exclude each other");
            auto t = encoder.cast<py::tuple>();
            if (t.size() != 3) value_error("`encoder` must be (position, blocks, final norm)");
            py::array pos = t[0].cast<py::array>();
            position_ = f32_matrix(pos, "position", long(e_), &rows);
            if (rows < history_len_) value_error("`position` must have a row per history position");
            keep_.append(pos);
            auto vec = [&](py::handle h, const char *name, size_t len) {
                py::array a = h.cast<py::array>();
                keep_.append(a);
                return f32_vector(a, name, len);
            };
            auto mat = [&](py::handle h, const char *name, size_t r, size_t c) {
                py::array a = h.cast<py::array>();
                size_t got = 0;
                const float *p = f32_matrix(a, name, long(c), &got);
                if (got != r) value_error(std::string("`") + name + "` must have " + std::to_string(r) + " rows");
                keep_.append(a);
                return p;
            };
            for (auto item : t[1].cast<py::list>()) {
                auto bt = item.cast<py::tuple>();
                if (bt.size() != 15) value_error("an encoder block must be a tuple of 15 entries");
                Block B;
                B.ln1_w = vec(bt[0], "ln1_w", e_);
                B.ln1_b = vec(bt[1], "ln1_b", e_);
                B.eps1 = bt[2].cast<float>();
                B.qkv_w = mat(bt[3], "qkv_w", e_, 3 * e_);
                B.qkv_b = vec(bt[4], "qkv_b", 3 * e_);
                B.proj_w = mat(bt[5], "proj_w", e_, e_);
                B.proj_b = vec(bt[6], "proj_b", e_);
                B.ln2_w = vec(bt[7], "ln2_w", e_);
                B.ln2_b = vec(bt[8], "ln2_b", e_);
                B.eps2 = bt[9].cast<float>();
                py::array f1 = bt[10].cast<py::array>();
                if (f1.ndim() != 2) value_error("`ff1_w` must be [E, F]");
                B.ff = size_t(f1.shape(1));
                B.ff1_w = mat(bt[10], "ff1_w", e_, B.ff);
                B.ff1_b = vec(bt[11], "ff1_b", B.ff);
                B.ff2_w = mat(bt[12], "ff2_w", B.ff, e_);
                B.ff2_b = vec(bt[13], "ff2_b", e_);
                long heads = bt[14].cast<long>();
                if (heads < 1 || e_ % size_t(heads) != 0) value_error("`heads` must divide E");
                B.heads = size_t(heads);
                blocks_.push_back(B);
            }
            if (blocks_.empty()) value_error("`encoder` must hold at least one block");
            auto fin = t[2].cast<py::tuple>();
            if (fin.size() != 3) value_error("the encoder's final norm must be (weight, bias, eps)");
            norm_w_ = vec(fin[0], "final_w", e_);
            norm_b_ = vec(fin[1], "final_b", e_);
            norm_eps_ = fin[2].cast<float>();
        }
        dim_ = tower_dim_ = in;
        // model.time_prior: (g of every known user [n_users, K], g of a new user by history length [L + 1, K]);
        // the output is then [u, g, 0] / sqrt(1 + |g|^2) (TwoTower.served_users)
        if (!prior.is_none()) {
            auto t = prior.cast<py::tuple>();
            py::array gk = t[0].cast<py::array>(), gn = t[1].cast<py::array>();
            g_known_ = f32_matrix(gk, "prior_known", -1, &rows);
            rank_ = size_t(gk.shape(1));
            if (rows != n_users_) value_error("`prior_known` must have one row per user");
            g_new_ = f32_matrix(gn, "prior_new", long(rank_), &rows);
            if (rows != history_len_ + 1) value_error("`prior_new` must have history_len + 1 rows");
            keep_.append(gk);
            keep_.append(gn);
            dim_ = tower_dim_ + rank_ + 1;
        }
    }

    size_t dim() const { return dim_; }
    size_t n_users() const { return n_users_; }
    size_t n_items() const { return n_items_; }

    // One user: row (-1 = new) with the history a (oldest first) followed by b; out [dim]. Rows are valid.
    void embed_one(int64_t row, const int64_t *a, size_t na, const int64_t *b, size_t nb, float *out) const {
        const size_t e = e_, total = na + nb, n = std::min(total, history_len_);
        thread_local std::vector<float> z, y, scores, key;
        thread_local std::vector<const float *> h;
        z.assign(in_, 0.0f);
        float *x = z.data(), *pooled = z.data() + e;
        h.resize(n);
        for (size_t i = 0; i < n; i++) {
            size_t idx = total - n + i;
            h[i] = table_ + size_t(idx < na ? a[idx] : b[idx - na]) * e;
        }
        if (row >= 0) {
            if (has_uid_) std::memcpy(x, uid_ + size_t(row) * e, e * sizeof(float));
            const int64_t *codes = codes_ + size_t(row) * n_cols_;
            for (const Feature &f : feats_) {
                if (f.width == 1) {
                    int64_t c = codes[f.start];
                    if (c != 0) {
                        const float *w = f.w + size_t(c) * e;
                        for (size_t d = 0; d < e; d++) x[d] += w[d];
                    }
                    continue;
                }
                y.assign(e, 0.0f);
                size_t cnt = 0;
                for (size_t j = 0; j < f.width; j++) {
                    int64_t c = codes[f.start + j];
                    if (c == 0) continue;
                    cnt++;
                    const float *w = f.w + size_t(c) * e;
                    for (size_t d = 0; d < e; d++) y[d] += w[d];
                }
                const float den = float(std::max<size_t>(cnt, 1));
                for (size_t d = 0; d < e; d++) x[d] += y[d] / den;
            }
        }
        if (n > 0 && !blocks_.empty()) {
            encode(h.data(), n, pooled);
        } else if (n > 0 && wk_ != nullptr) {
            scores.resize(n);
            key.resize(e);
            float top = -std::numeric_limits<float>::infinity();
            for (size_t i = 0; i < n; i++) {
                const float *rk = rk_ + (n - 1 - i) * e;  // recency row: steps back from the most recent item
                std::memcpy(key.data(), rk, e * sizeof(float));
                const float *hi = h[i];
                for (size_t j = 0; j < e; j++) {
                    const float v = hi[j];
                    const float *w = wk_ + j * e;
                    for (size_t o = 0; o < e; o++) key[o] += v * w[o];
                }
                float s = 0;
                for (size_t o = 0; o < e; o++) s += std::tanh(key[o]) * q_[o];
                scores[i] = s;
                top = std::max(top, s);
            }
            float sum = 0;
            for (size_t i = 0; i < n; i++) sum += (scores[i] = std::exp(scores[i] - top));
            for (size_t i = 0; i < n; i++) {
                const float w = scores[i] / sum;
                for (size_t d = 0; d < e; d++) pooled[d] += w * h[i][d];
            }
        } else if (n > 0) {
            for (size_t i = 0; i < n; i++)
                for (size_t d = 0; d < e; d++) pooled[d] += h[i][d];
            for (size_t d = 0; d < e; d++) pooled[d] /= float(n);
        }
        if (last_item_ && n > 0) std::memcpy(z.data() + 2 * e, h[n - 1], e * sizeof(float));
        for (size_t l = 0; l < layers_.size(); l++) {
            const Layer &L = layers_[l];
            y.resize(L.out);
            matmul(z.data(), L.in, 1, L.in, L.w, L.out, L.b, 0, L.out, y.data(), L.out);
            if (l + 1 < layers_.size()) gelu(y.data(), L.out);
            z.swap(y);
        }
        double sq = 0;
        for (size_t o = 0; o < tower_dim_; o++) sq += double(z[o]) * double(z[o]);
        const float norm = std::max(float(std::sqrt(sq)), 1e-12f);
        for (size_t o = 0; o < tower_dim_; o++) out[o] = z[o] / norm;
        if (rank_ == 0) return;
        const float *g = row >= 0 ? g_known_ + size_t(row) * rank_ : g_new_ + n * rank_;
        float gg = 0;
        for (size_t k = 0; k < rank_; k++) gg += g[k] * g[k];
        const float scale = 1.0f / std::sqrt(1.0f + gg);
        for (size_t o = 0; o < tower_dim_; o++) out[o] *= scale;
        for (size_t k = 0; k < rank_; k++) out[tower_dim_ + k] = g[k] * scale;
        out[tower_dim_ + rank_] = 0.0f;
    }

    // CausalEncoder in eval mode at the last position (NumpyUserTower._encode for one user, who has no pads): the
    // n items' rows h, oldest first -> out [E]. Every block but the last runs on all n positions (later blocks
    // read them as keys and values); the last block's queries, its MLP and the final norm, on the last one alone.
    void encode(const float *const *h, size_t n, float *out) const {
        const size_t e = e_, e3 = 3 * e_;
        thread_local std::vector<float> X, Y, QKV, KT, A, F, S;
        X.resize(n * e);
        Y.resize(n * e);
        QKV.resize(n * e3);
        KT.resize(n * e);
        A.resize(n * e);
        S.resize(n);
        for (size_t i = 0; i < n; i++) {
            const float *p = position_ + i * e, *hi = h[i];
            float *x = X.data() + i * e;
            for (size_t c = 0; c < e; c++) x[c] = hi[c] + p[c];
        }
        float *x = X.data();  // the rows still computed: all n, then the last one alone in the last block
        size_t m = n;
        for (size_t j = 0; j < blocks_.size(); j++) {
            const Block &B = blocks_[j];
            const bool last = j + 1 == blocks_.size();
            const size_t t0 = last ? n - 1 : 0, d = e / B.heads;
            const float scale = 1.0f / std::sqrt(float(d));
            layer_norm(X.data(), n, e, B.ln1_w, B.ln1_b, B.eps1, Y.data());
            if (last) {  // keys and values of every position, the query of the last one
                matmul(Y.data(), e, n, e, B.qkv_w, e3, B.qkv_b, e, e3, QKV.data(), e3);
                matmul(Y.data() + t0 * e, e, 1, e, B.qkv_w, e3, B.qkv_b, 0, e, QKV.data() + t0 * e3, e3);
            } else {
                matmul(Y.data(), e, n, e, B.qkv_w, e3, B.qkv_b, 0, e3, QKV.data(), e3);
            }
            for (size_t i = 0; i < n; i++) {  // keys transposed: KT[c, i], so the scores are a unit-stride axpy
                const float *k = QKV.data() + i * e3 + e;
                for (size_t c = 0; c < e; c++) KT[c * n + i] = k[c];
            }
            for (size_t t = t0; t < n; t++) {  // query t reads the positions 0..t
                const float *q = QKV.data() + t * e3;
                float *a = A.data() + (t - t0) * e;
                for (size_t hd = 0; hd < B.heads; hd++) {
                    float *s = S.data();
                    for (size_t i = 0; i <= t; i++) s[i] = 0.0f;
                    for (size_t c = hd * d; c < (hd + 1) * d; c++) {
                        const float qc = q[c];
                        const float *kt = KT.data() + c * n;
                        for (size_t i = 0; i <= t; i++) s[i] += qc * kt[i];
                    }
                    float top = -std::numeric_limits<float>::infinity();
                    for (size_t i = 0; i <= t; i++) top = std::max(top, s[i] *= scale);
                    float sum = 0;
                    for (size_t i = 0; i <= t; i++) sum += (s[i] = std::exp(s[i] - top));
                    const float inv = 1.0f / sum;
                    float *ah = a + hd * d;
                    for (size_t c = 0; c < d; c++) ah[c] = 0.0f;
                    for (size_t i = 0; i <= t; i++) {
                        const float p = s[i] * inv;
                        const float *v = QKV.data() + i * e3 + 2 * e + hd * d;
                        for (size_t c = 0; c < d; c++) ah[c] += p * v[c];
                    }
                }
            }
            if (last) {
                x = X.data() + t0 * e;
                m = 1;
            }
            matmul(A.data(), e, m, e, B.proj_w, e, B.proj_b, 0, e, Y.data(), e);  // x += a W_proj + b
            for (size_t i = 0; i < m * e; i++) x[i] += Y[i];
            F.resize(m * B.ff);
            layer_norm(x, m, e, B.ln2_w, B.ln2_b, B.eps2, Y.data());
            matmul(Y.data(), e, m, e, B.ff1_w, B.ff, B.ff1_b, 0, B.ff, F.data(), B.ff);
            gelu(F.data(), m * B.ff);
            matmul(F.data(), B.ff, m, B.ff, B.ff2_w, e, B.ff2_b, 0, e, Y.data(), e);
            for (size_t i = 0; i < m * e; i++) x[i] += Y[i];
        }
        layer_norm(x, 1, e, norm_w_, norm_b_, norm_eps_, out);
    }

    // rows [n] int64 (-1 = new user), histories as CSR: offsets [n + 1], items [offsets[n]] -> [n, dim] float32
    py::array_t<float> embed(const py::array &rows, const py::array &offsets, const py::array &items) const {
        size_t n = 0, n_off = 0, n_val = 0;
        const int64_t *r = check_int64(rows, "rows", &n);
        const int64_t *off = check_int64(offsets, "offsets", &n_off);
        const int64_t *val = check_int64(items, "items", &n_val);
        if (n_off != n + 1 || off[0] != 0 || size_t(off[n]) != n_val)
            value_error("`offsets` must hold len(rows) + 1 offsets from 0 to len(items)");
        for (size_t i = 0; i < n; i++) {
            if (r[i] < -1 || r[i] >= int64_t(n_users_))
                value_error("`rows` must be in [-1, " + std::to_string(n_users_) + "), got " + std::to_string(r[i]));
            if (off[i + 1] < off[i]) value_error("`offsets` must not decrease");
        }
        for (size_t j = 0; j < n_val; j++)
            if (val[j] < 0 || val[j] >= int64_t(n_items_))
                value_error("`items` must be in [0, " + std::to_string(n_items_) + "), got " + std::to_string(val[j]));
        py::array_t<float> out({n, dim_});
        float *o = out.mutable_data();
        {
            py::gil_scoped_release release;
            for (size_t i = 0; i < n; i++)
                embed_one(r[i], val + off[i], size_t(off[i + 1] - off[i]), nullptr, 0, o + i * dim_);
        }
        return out;
    }

 private:
    struct Feature {
        const float *w = nullptr;
        size_t card = 0, start = 0, width = 1;
    };
    struct Layer {
        const float *w = nullptr, *b = nullptr;  // w: [in, out] (the transposed nn.Linear weight)
        size_t in = 0, out = 0;
    };
    struct Block {  // CausalBlock: weights [in, out] (the transposed nn.Linear weights)
        const float *ln1_w, *ln1_b, *qkv_w, *qkv_b, *proj_w, *proj_b, *ln2_w, *ln2_b, *ff1_w, *ff1_b, *ff2_w, *ff2_b;
        float eps1, eps2;
        size_t heads, ff;
    };
    py::list keep_;  // keeps every array alive
    std::vector<Block> blocks_;  // the transformer's; empty for a pooling tower
    const float *position_ = nullptr, *norm_w_ = nullptr, *norm_b_ = nullptr;
    float norm_eps_ = 0;
    const float *table_ = nullptr, *uid_ = nullptr, *wk_ = nullptr, *rk_ = nullptr, *q_ = nullptr;
    const float *g_known_ = nullptr, *g_new_ = nullptr;
    size_t tower_dim_ = 0, rank_ = 0;
    const int64_t *codes_ = nullptr;
    bool has_uid_ = false, last_item_ = true;
    size_t history_len_ = 0, n_items_ = 0, n_users_ = 0, n_cols_ = 0, e_ = 0, in_ = 0, dim_ = 0;
    std::vector<Feature> feats_;
    std::vector<Layer> layers_;
};

class KnownUserRecommender {
 public:
    KnownUserRecommender(py::object index, const py::list &user_ids, py::array user_emb, py::array user_ok,
                         py::array seen_offsets, py::array seen_labels, const py::list &item_ids,
                         const std::string &model_version, int source, size_t ef, size_t ef_filtered,
                         double exact_fraction, py::object tower, py::object history_offsets,
                         py::object history_items, int events_source, int history_source, double unit_sq_tol)
        : index_obj_(index), index_(index.cast<Index *>()), ef_(ef), ef_filtered_(ef_filtered),
          unit_sq_tol_(unit_sq_tol) {
        const Alg &alg = index_->alg();
        n_items_ = alg.cur_element_count;
        size_t n_users = py::len(user_ids);
        size_t rows = 0;
        emb_ = check_matrix(user_emb, "user_emb", index_->dim(), &rows);
        if (rows != n_users)
            value_error("`user_emb` must have one row per user (" + std::to_string(n_users) + "), got " +
                        std::to_string(rows));
        if (user_ok.ndim() != 1 || size_t(user_ok.shape(0)) != n_users || user_ok.itemsize() != 1 ||
            !(user_ok.flags() & py::array::c_style))
            value_error("`user_ok` must be a C-contiguous 1-byte array with one entry per user");
        ok_ = static_cast<const uint8_t *>(user_ok.data());
        size_t n_off = 0, n_val = 0;
        off_ = check_int64(seen_offsets, "seen_offsets", &n_off);
        val_ = check_int64(seen_labels, "seen_labels", &n_val);
        if (n_off != n_users + 1 || off_[0] != 0 || size_t(off_[n_users]) != n_val)
            value_error("`seen_offsets` must hold n_users + 1 offsets from 0 to len(seen_labels)");
        arrays_ = py::make_tuple(user_emb, user_ok, seen_offsets, seen_labels);
        max_exclude_ = exact_fraction * double(n_items_);
        exclude_fraction_ = exact_fraction;

        // user ID -> row, keyed by views into one owned buffer
        std::vector<std::string> users;
        users.reserve(n_users);
        size_t total = 0;
        for (auto u : user_ids) {
            users.push_back(u.cast<std::string>());
            total += users.back().size();
        }
        blob_.reserve(total);
        for (auto &u : users) blob_ += u;
        row_of_.reserve(n_users * 2);
        size_t pos = 0;
        for (size_t i = 0; i < n_users; i++) {
            row_of_.emplace(std::string_view(blob_.data() + pos, users[i].size()), int64_t(i));
            pos += users[i].size();
        }
        // per item: the ScoredItem.item_id field (tag 1, length-delimited)
        size_t n_names = py::len(item_ids);
        if (n_names != n_items_)
            value_error("`item_ids` must name every indexed item (" + std::to_string(n_items_) + "), got " +
                        std::to_string(n_names));
        item_field_.reserve(n_names);
        std::vector<std::string> names;
        if (!tower.is_none()) names.reserve(n_names);
        for (auto it : item_ids) {
            std::string id = it.cast<std::string>(), f;
            if (!tower.is_none()) names.push_back(id);
            if (!id.empty()) {  // proto3: an empty string is not written
                f.push_back('\x0a');
                write_varint(f, id.size());
                f += id;
            }
            item_field_.push_back(std::move(f));
        }
        for (size_t i = 0; i < n_items_; i++)
            if (alg.getExternalLabel(tableint(i)) >= n_items_)
                value_error("index labels must be the item rows 0..n_items-1");
        // RecommendResponse fields after the items: model_version (2), fallback (3) false = absent, source (4)
        if (!model_version.empty()) {
            tail_.push_back('\x12');
            write_varint(tail_, model_version.size());
            tail_ += model_version;
        }
        tail_events_ = tail_history_ = tail_;
        if (source != 0) {
            tail_.push_back('\x20');
            write_varint(tail_, uint64_t(int64_t(source)));
        }
        // requests with history_item_ids: the user tower on the stored history + the request's items
        if (!tower.is_none()) {
            tower_obj_ = tower;
            tower_ = tower.cast<UserTower *>();
            if (tower_->dim() != size_t(index_->dim()) || tower_->n_users() != n_users || tower_->n_items() != n_items_)
                value_error("`tower` must embed the index's users and items in its dim");
            size_t n_hoff = 0, n_hval = 0;
            py::array ho = history_offsets.cast<py::array>(), hv = history_items.cast<py::array>();
            hoff_ = check_int64(ho, "history_offsets", &n_hoff);
            hval_ = check_int64(hv, "history_items", &n_hval);
            if (n_hoff != n_users + 1 || hoff_[0] != 0 || size_t(hoff_[n_users]) != n_hval)
                value_error("`history_offsets` must hold n_users + 1 offsets from 0 to len(history_items)");
            for (size_t j = 0; j < n_hval; j++)
                if (hval_[j] < 0 || size_t(hval_[j]) >= n_items_) value_error("`history_items` must be item rows");
            history_arrays_ = py::make_tuple(ho, hv);
            size_t total_names = 0;
            for (auto &nm : names) total_names += nm.size();
            item_blob_.reserve(total_names);
            for (auto &nm : names) item_blob_ += nm;
            item_row_.reserve(n_names * 2);
            size_t at = 0;
            for (size_t i = 0; i < n_names; i++) {
                item_row_.emplace(std::string_view(item_blob_.data() + at, names[i].size()), int64_t(i));
                at += names[i].size();
            }
            for (auto [tail, src] : {std::pair<std::string *, int>{&tail_events_, events_source},
                                     std::pair<std::string *, int>{&tail_history_, history_source}}) {
                if (src != 0) {
                    tail->push_back('\x20');
                    write_varint(*tail, uint64_t(int64_t(src)));
                }
            }
        }
    }

    // `allow` (a request with a `filter`, compiled by the caller into the allowed items' bitset, as the Python path
    // compiles it): the filter field is skipped and the search walks the allowed items at `allow_width` with
    // `allow_budget`, narrowing to `allow_near_width` given the set's size `allow_count` (HnswIndex.allow_walk's
    // fields); without it a request with a filter returns None.
    // `parts` (with `allow`): None, or the partition graphs that hold the whole allowed set
    // (recsys.retrieval.partitions), searched instead of the index and merged as Partitions.search merges: a list
    // of (Index, ef, ef_filtered, width, budget, count, near_width, disjoint) -- width 0 = the whole partition is
    // allowed (its plain search with the exclusion), else its allowed walk at that width.
    py::object recommend(const py::bytes &request, int64_t max_k, size_t max_id_bytes, size_t max_history,
                         py::object allow, size_t allow_width, uint64_t allow_budget, uint64_t allow_count,
                         size_t allow_near_width, py::object parts, py::object scan) {
        char *buf = nullptr;
        Py_ssize_t len = 0;
        if (PyBytes_AsStringAndSize(request.ptr(), &buf, &len) != 0) throw py::error_already_set();
        Allowed a;
        py::array allow_arr;
        if (!allow.is_none()) {
            allow_arr = py::reinterpret_borrow<py::array>(allow);
            size_t n_words = 0;
            a.words = check_words(allow_arr, "allow", &n_words);
            a.bits = uint64_t(n_words) * 64;
            a.width = allow_width;
            a.budget = allow_budget;
            a.count = allow_count;
            a.near_width = allow_near_width;
        }
        std::vector<Part> ps;
        py::list keep;  // the partition Index objects, alive for the call
        if (!parts.is_none()) {
            if (!a.words) value_error("`parts` needs `allow`");
            for (const py::handle &h : py::reinterpret_borrow<py::list>(parts)) {
                py::tuple t = py::reinterpret_borrow<py::tuple>(h);
                if (t.size() != 8) value_error("`parts` entries must be 8-tuples");
                Part pt;
                pt.index = t[0].cast<Index *>();
                if (pt.index->dim() != index_->dim()) value_error("a partition's dim differs from the index's");
                pt.ef = t[1].cast<size_t>();
                pt.ef_filtered = t[2].cast<size_t>();
                pt.width = t[3].cast<size_t>();
                pt.budget = t[4].cast<uint64_t>();
                pt.count = t[5].cast<uint64_t>();
                pt.near_width = t[6].cast<size_t>();
                pt.disjoint = t[7].cast<bool>();
                keep.append(t[0]);
                ps.push_back(pt);
            }
        }
        // `scan`: None, or (vectors [n_items, dim] float32, words): the allowed labels outside the partitions'
        // graphs, scored exactly beside them (Partitions.search's scan of the rest)
        Scan sc;
        py::object scan_keep;
        if (!scan.is_none()) {
            if (!a.words) value_error("`scan` needs `allow`");
            py::tuple t = py::reinterpret_borrow<py::tuple>(scan);
            if (t.size() != 2) value_error("`scan` must be (vectors, words)");
            size_t rows = 0, n_words = 0;
            sc.x = check_matrix(py::reinterpret_borrow<py::array>(t[0]), "scan vectors", index_->dim(), &rows);
            sc.words = check_words(py::reinterpret_borrow<py::array>(t[1]), "scan words", &n_words);
            sc.bits = std::min<uint64_t>(uint64_t(n_words) * 64, uint64_t(rows));
            scan_keep = scan;
        }
        if (!parts.is_none() && ps.empty() && !sc.x) value_error("`parts` must not be empty without `scan`");
        std::string out;
        bool done;
        {
            py::gil_scoped_release release;
            done = answer(reinterpret_cast<const uint8_t *>(buf), size_t(len), max_k, max_id_bytes, max_history,
                          a.words ? &a : nullptr, out, (ps.empty() && !sc.x) ? nullptr : &ps, sc.x ? &sc : nullptr);
        }
        if (!done) return py::none();
        return py::bytes(out);
    }

    size_t n_users() const { return row_of_.size(); }

 private:
    struct Allowed {
        const uint64_t *words = nullptr;
        uint64_t bits = 0;
        size_t width = 0;
        uint64_t budget = 0;
        uint64_t count = 0;
        size_t near_width = 0;
    };
    struct Part {
        Index *index = nullptr;
        size_t ef = 0, ef_filtered = 0, width = 0, near_width = 0;
        uint64_t budget = 0, count = 0;
        bool disjoint = true;
    };
    struct Scan {
        const float *x = nullptr;
        const uint64_t *words = nullptr;
        uint64_t bits = 0;
    };

    // The partitions' answers (each complete, else false: the Python path scans), merged by score, best first
    // (ties: the earlier partition first, as a stable sort), each label once, into labels / scores [k] (the
    // scores as the Python path computes them, 1 - distance: not turned back into distances, which can round).
    bool search_parts(const std::vector<Part> &ps, const Scan *scan, const Allowed &allow, const float *query,
                      size_t k, const int64_t *eb, const int64_t *ee, int64_t *labels, float *scores) const {
        thread_local std::vector<int64_t> all_l;
        thread_local std::vector<float> all_s;
        const size_t n_ans = ps.size() + (scan ? 1 : 0);
        all_l.assign(n_ans * k, -1);
        all_s.assign(n_ans * k, 0.0f);
        for (size_t i = 0; i < ps.size(); i++) {
            const Part &pt = ps[i];
            std::shared_lock<std::shared_mutex> lock(pt.index->mu_);
            const Alg &alg = pt.index->alg();
            const size_t size = alg.cur_element_count;
            if (size < k || double(ee - eb) > exclude_fraction_ * double(size)) return false;  // the Python path
            int64_t *l = all_l.data() + i * k;
            float *d = all_s.data() + i * k;
            if (pt.width == 0)
                pt.index->search_row(alg, query, k, pt.ef, pt.ef_filtered, eb, ee, -1, l, d);
            else
                pt.index->search_row(alg, query, k, pt.ef, pt.width, eb, ee, -1, l, d, allow.words, allow.bits,
                                     pt.budget, pt.count, pt.near_width);
            if (l[k - 1] < 0) return false;
            for (size_t j = 0; j < k; j++) d[j] = 1.0f - d[j];  // scores, as the Python path computes them
        }
        if (scan) {
            thread_local std::vector<int64_t> excluded;
            excluded.assign(eb, ee);
            std::sort(excluded.begin(), excluded.end());
            int64_t *l = all_l.data() + ps.size() * k;
            float *d = all_s.data() + ps.size() * k;
            scan_row(scan->x, index_->dim(), scan->words, scan->bits, query, k, excluded, l, d);
            if (l[k - 1] < 0) return false;
            for (size_t j = 0; j < k; j++) d[j] = 1.0f - d[j];
        }
        if (n_ans == 1) {  // one answer: as it is (the Python path returns it unmerged)
            for (size_t j = 0; j < k; j++) {
                labels[j] = all_l[j];
                scores[j] = all_s[j];
            }
            return true;
        }
        thread_local std::vector<size_t> order;
        order.resize(all_l.size());
        for (size_t j = 0; j < order.size(); j++) order[j] = j;
        std::stable_sort(order.begin(), order.end(), [&](size_t x, size_t y) { return -all_s[x] < -all_s[y]; });
        bool disjoint = true;
        for (const Part &pt : ps) disjoint = disjoint && pt.disjoint;
        size_t got = 0;
        for (size_t j = 0; j < order.size() && got < k; j++) {
            const int64_t lab = all_l[order[j]];
            if (!disjoint && std::find(labels, labels + got, lab) != labels + got) continue;
            labels[got] = lab;
            scores[got] = all_s[order[j]];
            got++;
        }
        return got == k;
    }

    bool answer(const uint8_t *p, size_t len, int64_t max_k, size_t max_id_bytes, size_t max_history,
                const Allowed *allow, std::string &out, const std::vector<Part> *parts = nullptr,
                const Scan *scan = nullptr) const {
        const uint8_t *end = p + len;
        std::string_view user;
        int64_t k = 0;
        bool include_seen = false;
        thread_local std::vector<int64_t> events;  // history_item_ids as item rows, in request order
        events.clear();
        while (p < end) {
            uint64_t key = 0, v = 0;
            if (!read_varint(p, end, key)) return false;
            uint64_t field = key >> 3, wire = key & 7;
            if (field == 1 && wire == 2) {  // user_id (the last one wins, as in any protobuf parser)
                if (!read_varint(p, end, v) || v > uint64_t(end - p)) return false;
                user = std::string_view(reinterpret_cast<const char *>(p), size_t(v));
                p += v;
            } else if (field == 2 && wire == 2) {  // history_item_ids: every one known, or the Python path
                if (!tower_ || !read_varint(p, end, v) || v > uint64_t(end - p)) return false;
                std::string_view id(reinterpret_cast<const char *>(p), size_t(v));
                p += v;
                if (id.empty() || id.size() > max_id_bytes || events.size() >= max_history) return false;
                auto found = item_row_.find(id);
                if (found == item_row_.end()) return false;  // unknown items are reported by the Python path
                events.push_back(found->second);
            } else if ((field == 3 || field == 4 || field == 7) && wire == 0) {
                if (!read_varint(p, end, v)) return false;
                if (field == 3) k = int64_t(int32_t(uint32_t(v)));  // int32: the low 32 bits
                else if (field == 4) include_seen = v != 0;
                // field 7, allow_fallback: a known user never falls back
            } else if (field == 8 && wire == 2 && allow) {  // filter: the caller compiled it into `allow`
                if (!read_varint(p, end, v) || v > uint64_t(end - p)) return false;
                p += v;
            } else {
                return false;  // lists, unknown fields: the Python path
            }
        }
        if (user.size() > max_id_bytes || k < 1 || k > max_k) return false;
        if (user.empty() && events.empty()) return false;
        int64_t row = -1;
        if (!user.empty()) {
            auto it = row_of_.find(user);
            if (it != row_of_.end()) row = it->second;
            else if (events.empty()) return false;  // an unknown user alone: NOT_FOUND or the fallback
        }
        const int64_t *eb = nullptr, *ee = nullptr;
        const float *query = nullptr;
        const std::string *tail = &tail_;
        thread_local std::vector<float> q;
        thread_local std::vector<int64_t> excluded;
        if (events.empty()) {  // a known user alone: the stored embedding
            if (!ok_[row]) return false;
            query = emb_ + size_t(row) * size_t(index_->dim());
            if (!include_seen) {
                eb = val_ + off_[row];
                ee = val_ + off_[row + 1];
            }
        } else {  // the tower on the stored history (known user) + the request's items; those excluded like seen
            q.resize(size_t(index_->dim()));
            if (row >= 0)
                tower_->embed_one(row, hval_ + hoff_[row], size_t(hoff_[row + 1] - hoff_[row]), events.data(),
                                  events.size(), q.data());
            else
                tower_->embed_one(-1, nullptr, 0, events.data(), events.size(), q.data());
            double sq = 0;
            for (float v : q) sq += double(v) * double(v);
            if (!(std::abs(sq - 1.0) <= 0.9 * unit_sq_tol_)) return false;  // the Python path would renormalise
            query = q.data();
            tail = row >= 0 ? &tail_events_ : &tail_history_;
            if (!include_seen) {
                excluded.clear();
                if (row >= 0) excluded.insert(excluded.end(), val_ + off_[row], val_ + off_[row + 1]);
                excluded.insert(excluded.end(), events.begin(), events.end());
                eb = excluded.data();
                ee = excluded.data() + excluded.size();
            }
        }
        if (double(ee - eb) > max_exclude_) return false;  // the exact scan's territory
        const size_t kk = size_t(k);
        thread_local std::vector<int64_t> labels;
        thread_local std::vector<float> dists;
        labels.resize(kk);
        dists.resize(kk);
        const bool scored = parts != nullptr;  // search_parts leaves scores in `dists`, the others distances
        if (parts) {
            if (!search_parts(*parts, scan, *allow, query, kk, eb, ee, labels.data(), dists.data())) return false;
        } else {
            std::shared_lock<std::shared_mutex> lock(index_->mu_);
            const Alg &alg = index_->alg();
            if (alg.cur_element_count != n_items_) return false;
            if (allow)
                index_->search_row(alg, query, kk, ef_, allow->width, eb, ee, -1, labels.data(), dists.data(),
                                   allow->words, allow->bits, allow->budget, allow->count, allow->near_width);
            else
                index_->search_row(alg, query, kk, ef_, ef_filtered_, eb, ee, -1, labels.data(), dists.data());
        }
        // short (fewer allowed items than k, or the graph missed some): the Python path checks the answer is
        // complete and scans exactly when it is not
        if (labels[kk - 1] < 0) return false;
        out.clear();
        out.reserve(kk * 24 + tail_.size());
        for (size_t j = 0; j < kk && labels[j] >= 0; j++) {
            const std::string &f = item_field_[size_t(labels[j])];
            const float score = scored ? dists[j] : 1.0f - dists[j];
            uint32_t bits;
            std::memcpy(&bits, &score, 4);
            out.push_back('\x0a');  // RecommendResponse.items (1)
            write_varint(out, f.size() + (bits ? 5 : 0));
            out += f;
            if (bits) {  // ScoredItem.score (2, fixed32); proto3 leaves out +0.0
                out.push_back('\x15');
                for (int b = 0; b < 4; b++) out.push_back(char((bits >> (8 * b)) & 0xff));
            }
        }
        out += *tail;
        return true;
    }

    py::object index_obj_;  // keeps the Index alive
    Index *index_;
    size_t ef_, ef_filtered_;
    size_t n_items_ = 0;
    double max_exclude_ = 0;
    double exclude_fraction_ = 0;  // HnswIndex.exact_fallback_fraction: of a partition's size, in search_parts
    py::tuple arrays_;  // keeps the arrays below alive
    const float *emb_ = nullptr;
    const uint8_t *ok_ = nullptr;
    const int64_t *off_ = nullptr, *val_ = nullptr;
    std::string blob_;
    std::unordered_map<std::string_view, int64_t> row_of_;
    std::vector<std::string> item_field_;
    std::string tail_, tail_events_, tail_history_;  // the response's fields after the items, per source
    double unit_sq_tol_ = 0;
    py::object tower_obj_;  // keeps the tower alive
    const UserTower *tower_ = nullptr;
    py::tuple history_arrays_;
    const int64_t *hoff_ = nullptr, *hval_ = nullptr;
    std::string item_blob_;
    std::unordered_map<std::string_view, int64_t> item_row_;
};
}  // namespace

PYBIND11_MODULE(_hnsw, m) {
    m.doc() = "hnswlib 0.8.0 HierarchicalNSW<float> (space 'ip', distance 1 - dot) with in-search exclusion filters";
    m.attr("HNSWLIB_VERSION") = "0.8.0";
    m.attr("MAX_BITSET_LABEL") = py::int_(kMaxBitsetLabel);
    m.attr("BF16_ISA") = dot_bf16_isa();
    // test hook: v rounded to bf16, dotted with q by the kernel in use and by the scalar one
    m.def("popcount", [](const py::array &words) {
        size_t n = 0;
        const uint64_t *w = check_words(words, "words", &n);
        uint64_t c = 0;
        for (size_t i = 0; i < n; i++) c += uint64_t(__builtin_popcountll(w[i]));
        return c;
    }, py::arg("words"), "How many bits of a uint64 bitset (recsys.retrieval.bitset) are set.");
    m.def("cover_counts", [](const py::array &allow, const py::list &parts) {
        size_t n = 0;
        const uint64_t *a = check_words(allow, "allow", &n);
        std::vector<const uint64_t *> pw;
        std::vector<size_t> pn;
        for (const py::handle &h : parts) {
            size_t m = 0;
            pw.push_back(check_words(py::reinterpret_borrow<py::array>(h), "parts[i]", &m));
            pn.push_back(m);
        }
        py::array_t<int64_t> counts(pw.size());
        int64_t *c = counts.mutable_data();
        uint64_t uncovered = 0;
        {
            py::gil_scoped_release release;
            std::fill(c, c + pw.size(), 0);
            for (size_t i = 0; i < n; i++) {
                uint64_t w = a[i], rest = w;
                if (!w) continue;  // sparse sets: only their non-zero words cost anything
                for (size_t j = 0; j < pw.size(); j++) {
                    const uint64_t p = i < pn[j] ? pw[j][i] : 0;
                    c[j] += int64_t(__builtin_popcountll(w & p));
                    rest &= ~p;
                }
                uncovered += uint64_t(__builtin_popcountll(rest));
            }
        }
        return py::make_tuple(counts, uncovered);
    }, py::arg("allow"), py::arg("parts"),
          "(allowed labels in each of `parts` [len(parts)] int64, allowed labels in none of them): one pass over "
          "the allowed set's non-zero words; every argument a uint64 bitset (recsys.retrieval.bitset).");
    m.def("last_walk_scored", []() { return walk_scored; },
          "Nodes the calling thread's last filtered graph walk (knn with `allow`) scored.");
    m.def("scan_allowed", &scan_allowed, py::arg("vectors"), py::arg("queries"), py::arg("k"), py::arg("allow"),
          py::arg("allow_bits") = -1, py::arg("exclude_labels") = py::none(), py::arg("exclude_offsets") = py::none(),
          py::arg("num_threads") = 1);
    m.def("_bf16_dots", [](py::array_t<float, py::array::c_style | py::array::forcecast> q,
                           py::array_t<float, py::array::c_style | py::array::forcecast> v) {
        if (q.ndim() != 1 || v.ndim() != 1 || q.shape(0) != v.shape(0))
            value_error("`q` and `v` must be 1-D of the same length");
        size_t dim = size_t(q.shape(0));
        std::vector<uint16_t> h(dim + 32, 0);
        std::vector<float> rounded(dim);
        for (size_t d = 0; d < dim; d++) {
            h[d] = to_bf16(v.data()[d]);
            rounded[d] = from_bf16(h[d]);
        }
        py::array_t<float> r(dim);
        std::memcpy(r.mutable_data(), rounded.data(), dim * sizeof(float));
        return py::make_tuple(dot_bf16(q.data(), h.data(), dim), dot_bf16_scalar(q.data(), h.data(), dim), r);
    }, py::arg("q"), py::arg("v"));
    py::class_<Index>(m, "Index")
        .def(py::init<int>(), py::arg("dim"))
        .def("init_index", &Index::init_index, py::arg("max_elements"), py::arg("M") = 16,
             py::arg("ef_construction") = 200, py::arg("random_seed") = 100)
        .def("load_index", &Index::load_index, py::arg("path"), py::arg("max_elements") = 0)
        .def("save_index", &Index::save_index, py::arg("path"))
        .def("resize_index", &Index::resize_index, py::arg("new_size"))
        .def("set_ef", &Index::set_ef, py::arg("ef"))
        .def("add_items", &Index::add_items, py::arg("data"), py::arg("labels"), py::arg("num_threads") = -1)
        .def("get_items", &Index::get_items, py::arg("labels"))
        .def("get_ids_list", &Index::get_ids_list)
        .def("get_max_elements", &Index::max_elements)
        .def("get_current_count", &Index::current_count)
        .def("index_file_size", &Index::index_file_size)
        .def("knn", &Index::knn, py::arg("queries"), py::arg("k"), py::arg("ef") = 0,
             py::arg("exclude_labels") = py::none(), py::arg("exclude_offsets") = py::none(),
             py::arg("num_threads") = 1, py::arg("bitset") = -1, py::arg("ef_filtered") = 0,
             py::arg("allow") = py::none(), py::arg("allow_bits") = -1, py::arg("allow_budget") = 0,
             py::arg("allow_count") = 0, py::arg("allow_near_width") = 0)
        .def("set_bf16", &Index::set_bf16, py::arg("on"))
        .def_property_readonly("bf16", &Index::bf16)
        .def_property_readonly("ef", &Index::ef)
        .def_property_readonly("dim", &Index::dim)
        .def_property_readonly("M", &Index::M)
        .def_property_readonly("ef_construction", &Index::ef_construction);
    py::class_<KnownUserRecommender>(m, "KnownUserRecommender")
        .def(py::init<py::object, const py::list &, py::array, py::array, py::array, py::array, const py::list &,
                      const std::string &, int, size_t, size_t, double, py::object, py::object, py::object, int, int,
                      double>(),
             py::arg("index"), py::arg("user_ids"), py::arg("user_emb"), py::arg("user_ok"), py::arg("seen_offsets"),
             py::arg("seen_labels"), py::arg("item_ids"), py::arg("model_version"), py::arg("source"), py::arg("ef"),
             py::arg("ef_filtered"), py::arg("exact_fraction"), py::arg("tower") = py::none(),
             py::arg("history_offsets") = py::none(), py::arg("history_items") = py::none(),
             py::arg("events_source") = 0, py::arg("history_source") = 0, py::arg("unit_sq_tol") = 1e-4)
        .def("recommend", &KnownUserRecommender::recommend, py::arg("request"), py::arg("max_k"),
             py::arg("max_id_bytes"), py::arg("max_history") = 0, py::arg("allow") = py::none(),
             py::arg("allow_width") = 0, py::arg("allow_budget") = 0, py::arg("allow_count") = 0,
             py::arg("allow_near_width") = 0, py::arg("parts") = py::none(), py::arg("scan") = py::none())
        .def_property_readonly("n_users", &KnownUserRecommender::n_users);
    py::class_<UserTower>(m, "UserTower")
        .def(py::init<py::array, py::array, py::list, py::array, py::object, bool, py::list, int, py::object,
                      py::object>(),
             py::arg("table"), py::arg("user_id"), py::arg("features"), py::arg("user_feats"), py::arg("pool"),
             py::arg("last_item"), py::arg("layers"), py::arg("history_len"), py::arg("prior") = py::none(),
             py::arg("encoder") = py::none())
        .def("embed", &UserTower::embed, py::arg("rows"), py::arg("offsets"), py::arg("items"))
        .def_property_readonly("dim", &UserTower::dim);
}
