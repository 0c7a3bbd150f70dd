// recsys._hnsw: hnswlib 0.8.0's HierarchicalNSW<float> (inner-product space) with the exclusion filter done
// INSIDE the graph search.
//
// Why not the hnswlib Python package: its only filter is a Python callback (one GIL round trip per visited
// node), so recsys.index had to over-fetch k + |exclude| and post-filter; a trained model ranks a user's seen
// items near the top, so the fetch -- and the search width -- grew ~10x. Here each query's excluded labels
// become an hnswlib::BaseFilterFunctor (a bitset over labels, or a sorted array + binary search when the labels
// are too large for a bitset): the search walks *through* excluded nodes but keeps only allowed ones, so the
// result holds the top-k allowed items at the cost of roughly one plain query.
//
// Files are hnswlib's own format (HierarchicalNSW::saveIndex / loadIndex from the same headers): an index saved
// here loads in `hnswlib.Index(space="ip")` and vice versa.
//
// Threads: knn() and add_items() release the GIL. knn() is re-entrant (hnswlib's searches share no mutable
// state but the visited-list pool, which is locked). add_items() may run concurrently with knn() as far as
// hnswlib is concerned, but resize_index() may not: the Python wrapper (recsys.index.HnswIndex) serialises writes
// against searches with a readers-writer lock. Distances are hnswlib's `ip` distance, 1 - dot.

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

size_t resolve_threads(int num_threads) {
    if (num_threads <= 0) {
        unsigned hc = std::thread::hardware_concurrency();
        return hc ? hc : 1;
    }
    return size_t(num_threads);
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
    }

    void load_index(const std::string &path, size_t max_elements) {
        // hnswlib trusts the file's header: recsys.index.check_hnsw_file validates it before this is called.
        std::unique_ptr<Alg> alg(new Alg(&space_, path, false, max_elements, false));
        if (alg->label_offset_ - alg->offsetData_ != size_t(dim_) * sizeof(float))
            value_error("index file " + path + " holds vectors of dim " +
                        std::to_string((alg->label_offset_ - alg->offsetData_) / sizeof(float)) + ", expected " +
                        std::to_string(dim_));
        alg_ = std::move(alg);
        alg_->ef_ = ef_;
    }

    void save_index(const std::string &path) { inited().saveIndex(path); }

    void resize_index(size_t new_size) { inited().resizeIndex(new_size); }

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
        if (alg.cur_element_count == 0 && rows) {
            // The first point becomes the entry point: insert it alone so parallel inserts find a graph.
            alg.addPoint(x, labeltype(ids[0]));
            start = 1;
        }
        ParallelFor(start, rows, threads, [&](size_t row, size_t) {
            alg.addPoint(x + row * size_t(dim_), labeltype(ids[row]));
        });
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
    // `ef_filtered`: the search width of rows with a non-empty exclusion list (0 = `ef`).
    py::tuple knn(const py::array &queries, size_t k, size_t ef, py::object exclude_labels,
                  py::object exclude_offsets, int num_threads, int bitset, size_t ef_filtered) {
        const Alg &alg = inited();
        if (k < 1) value_error("`k` must be >= 1, got " + std::to_string(k));
        size_t rows = 0;
        const float *q = check_matrix(queries, "queries", dim_, &rows);
        const int64_t *ex = nullptr, *off = nullptr;
        if (exclude_labels.is_none() != exclude_offsets.is_none())
            value_error("`exclude_labels` and `exclude_offsets` must both be given or both be None");
        py::array ex_arr, off_arr;
        if (!exclude_labels.is_none()) {
            ex_arr = py::array(exclude_labels);
            off_arr = py::array(exclude_offsets);
            size_t n_ex = 0, n_off = 0;
            ex = check_int64(ex_arr, "exclude_labels", &n_ex);
            off = check_int64(off_arr, "exclude_offsets", &n_off);
            if (n_off != rows + 1)
                value_error("`exclude_offsets` must hold n + 1 = " + std::to_string(rows + 1) + " offsets, got " +
                            std::to_string(n_off));
            if (off[0] != 0 || size_t(off[rows]) != n_ex)
                value_error("`exclude_offsets` must start at 0 and end at len(exclude_labels) = " +
                            std::to_string(n_ex) + ", got " + std::to_string(off[0]) + ".." + std::to_string(off[rows]));
            for (size_t i = 0; i < rows; i++)
                if (off[i + 1] < off[i])
                    value_error("`exclude_offsets` must be non-decreasing, got " + std::to_string(off[i]) + " then " +
                                std::to_string(off[i + 1]) + " at " + std::to_string(i));
        }
        const size_t width = std::max(ef ? ef : ef_, k);
        const size_t width_filtered = std::max(ef_filtered ? ef_filtered : (ef ? ef : ef_), k);
        py::array_t<int64_t> labels_out({rows, k});
        py::array_t<float> dist_out({rows, k});
        int64_t *lo = labels_out.mutable_data();
        float *dout = dist_out.mutable_data();
        size_t threads = resolve_threads(num_threads);
        if (rows <= threads * 4) threads = 1;  // one query (the serving path) runs on the calling thread
        {
            py::gil_scoped_release release;
            ParallelFor(0, rows, threads, [&](size_t row, size_t) {
                const float *qi = q + row * size_t(dim_);
                int64_t *l = lo + row * k;
                float *d = dout + row * k;
                hnswlib::BaseFilterFunctor *filter = nullptr;
                ExcludeBitset fb;
                ExcludeSorted fs;
                ClearBits clear;
                if (ex && off[row + 1] > off[row]) {
                    const int64_t *eb = ex + off[row], *ee = ex + off[row + 1];
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
                size_t got = search_one(alg, qi, k, filter ? width_filtered : width, filter, l, d);
                for (size_t j = got; j < k; j++) {
                    l[j] = -1;
                    d[j] = std::numeric_limits<float>::infinity();
                }
            });
        }
        return py::make_tuple(labels_out, dist_out);
    }

 private:
    // hnswlib's HierarchicalNSW::searchKnn with the search width as an argument (hnswlib reads the shared ef_,
    // which would make a per-call ef racy) and without its metric counters (atomics shared by all threads).
    // Writes up to k results nearest first; returns how many.
    static size_t search_one(const Alg &alg, const float *q, size_t k, size_t width,
                             hnswlib::BaseFilterFunctor *filter, int64_t *labels, float *dists) {
        if (alg.cur_element_count == 0) return 0;
        tableint cur = alg.enterpoint_node_;
        float curdist = alg.fstdistfunc_(q, alg.getDataByInternalId(cur), alg.dist_func_param_);
        for (int level = alg.maxlevel_; level > 0; level--) {
            bool changed = true;
            while (changed) {
                changed = false;
                unsigned int *data = (unsigned int *)alg.get_linklist(cur, level);
                int size = alg.getListCount(data);
                tableint *datal = (tableint *)(data + 1);
                for (int i = 0; i < size; i++) {
                    tableint cand = datal[i];
                    if (cand > alg.max_elements_) throw std::runtime_error("cand error");
                    float d = alg.fstdistfunc_(q, alg.getDataByInternalId(cand), alg.dist_func_param_);
                    if (d < curdist) {
                        curdist = d;
                        cur = cand;
                        changed = true;
                    }
                }
            }
        }
        auto top = (!alg.num_deleted_ && !filter)
                       ? alg.searchBaseLayerST<true>(cur, q, width, filter)
                       : alg.searchBaseLayerST<false>(cur, q, width, filter);
        while (top.size() > k) top.pop();
        size_t n = top.size();
        for (size_t j = n; j-- > 0;) {  // the heap pops farthest first
            dists[j] = top.top().first;
            labels[j] = int64_t(alg.getExternalLabel(top.top().second));
            top.pop();
        }
        return n;
    }

    Alg &inited() const {
        if (!alg_) throw std::runtime_error("the index is not initialised (call init_index or load_index)");
        return *alg_;
    }

    int dim_;
    size_t ef_ = 10;
    hnswlib::InnerProductSpace space_;
    std::unique_ptr<Alg> alg_;
};

}  // namespace

PYBIND11_MODULE(_hnsw, m) {
    m.doc() = "hnswlib 0.8.0 HierarchicalNSW<float> (space 'ip', distance 1 - dot) with in-search exclusion filters";
    m.attr("HNSWLIB_VERSION") = "0.8.0";
    m.attr("MAX_BITSET_LABEL") = py::int_(kMaxBitsetLabel);
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
             py::arg("num_threads") = 1, py::arg("bitset") = -1, py::arg("ef_filtered") = 0)
        .def_property_readonly("ef", &Index::ef)
        .def_property_readonly("dim", &Index::dim)
        .def_property_readonly("M", &Index::M)
        .def_property_readonly("ef_construction", &Index::ef_construction);
}
