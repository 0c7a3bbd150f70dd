"""PNG plots of an evaluation report (matplotlib, Agg backend; imported only when plots are asked for).

Each function returns the PNG bytes so the caller writes them atomically.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from recsys.core import schema
from recsys.core.data import feature_codes


def _pyplot() -> Any:
    import matplotlib  # matplotlib: heavy, only the plots need it

    matplotlib.use("Agg", force=True)  # no display; safe in servers and CI
    import matplotlib.pyplot as plt

    return plt


def _null_formatter() -> Any:
    from matplotlib.ticker import NullFormatter  # matplotlib: heavy

    return NullFormatter()


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def recall_curves_png(report: Mapping[str, Any]) -> bytes:
    """Recall@K against K, one line per model (two-tower exact solid, HNSW dashed) and baseline (dotted)."""
    plt = _pyplot()
    ks = report["ks"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, m in report["models"].items():
        ys = [m["metrics"].get(f"recall@{k}") for k in ks]
        style = "-" if m["kind"] == "two_tower" and m["retrieval"] == "exact" else "--" if m["kind"] == "two_tower" else ":"
        ax.plot(ks, [np.nan if y is None else y for y in ys], style, marker="o", label=name)
    ax.set_xscale("log")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.xaxis.set_minor_formatter(_null_formatter())
    ax.set_xlabel("K")
    ax.set_ylabel("Recall@K")
    ax.set_title(f"Recall@K on `{report['split']}` ({report['users']['users_evaluated']} users)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def ann_tradeoff_png(sweep: Mapping[str, Any]) -> bytes:
    """HNSW recall@k vs exact against single-query p50 latency over ef; the tuned ef and exact scan marked."""
    plt = _pyplot()
    rows = sweep["rows"]
    x = [r["p50_ms"] for r in rows]
    y = [r["recall"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(x, y, "-o", label="HNSW (ef sweep)")
    for r in rows:
        ax.annotate(str(r["ef"]), (r["p50_ms"], r["recall"]), textcoords="offset points", xytext=(4, -10), fontsize=7)
    tuned = [r for r in rows if r["ef"] == sweep["tuned_ef"]]
    if tuned:
        ax.plot([tuned[0]["p50_ms"]], [tuned[0]["recall"]], "r*", markersize=14, label=f"tuned ef={sweep['tuned_ef']}")
    ax.axvline(sweep["exact"]["p50_ms"], color="grey", ls=":", label=f"exact scan p50 {sweep['exact']['p50_ms']:.3f} ms")
    ax.set_xscale("log")
    from matplotlib.ticker import FormatStrFormatter  # matplotlib: heavy

    ax.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
    ax.xaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("single-query latency p50 (ms, seen items excluded)")
    ax.set_ylabel(f"recall@{sweep['k']} vs exact")
    ax.set_title(f"HNSW recall vs latency ({sweep['n_queries']} queries)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def embedding_2d(vectors: np.ndarray, *, method: str = "auto", seed: int = 0) -> tuple[np.ndarray, str]:
    """``[n, dim]`` -> ``([n, 2], method used)``: t-SNE (scikit-learn, if installed) or PCA (numpy SVD).

    ``auto`` picks t-SNE when scikit-learn is importable: it keeps clusters apart where PCA's two directions of
    largest variance overlap them; PCA is the dependency-free fallback.
    """
    if method not in ("auto", "tsne", "pca"):
        raise ValueError(f"`method` must be 'auto', 'tsne' or 'pca', got {method!r}")
    x = np.asarray(vectors, dtype=np.float64)
    if method in ("auto", "tsne") and len(x) > 3:
        try:
            from sklearn.manifold import TSNE  # sklearn: optional, heavy
        except ImportError:
            if method == "tsne":
                raise ImportError("method='tsne' needs scikit-learn (pip install scikit-learn)") from None
        else:
            perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
            return TSNE(n_components=2, init="pca", perplexity=perplexity, random_state=seed).fit_transform(x), "tsne"
    x = x - x.mean(0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    return x @ vt[:2].T, "pca"


def _item_labels(bundle: Any) -> tuple[np.ndarray, dict[int, str], str]:
    """Category codes [n_items] + code -> value, for the feature named like 'category' (else the first one)."""
    items = bundle.item_table
    feats = [c for c in items.column_names if c.startswith(schema.FEAT_PREFIX)]
    if not feats:
        return np.zeros(bundle.n_items, dtype=np.int64), {0: "all items"}, "(no item features)"
    col = next((c for c in feats if "categ" in c), feats[0])
    name = col[len(schema.FEAT_PREFIX) :]
    codes = feature_codes(items.column(col))
    if codes.ndim == 2:  # a multi-valued feature: each item's most frequent value
        codes = codes[:, 0]
    vocab = pq.read_table(bundle.path / schema.FEATURE_VOCAB).to_pydict()
    names = {0: "(missing)"}
    for ent, feat, value, code in zip(vocab["entity"], vocab["feature"], vocab["value"], vocab["code"], strict=True):
        if ent == "item" and feat == name:
            names[int(code)] = str(value)
    return codes, names, name


def embedding_map_png(
    bundle: Any, *, method: str = "auto", max_points: int | None = None, top_categories: int = 10, seed: int = 0
) -> tuple[bytes, dict[str, Any]]:
    """2-D map of a sample of the bundle's item embeddings coloured by item category; returns (png, meta)."""
    plt = _pyplot()
    if max_points is None:
        try:
            import sklearn  # noqa: F401 - sklearn: optional, heavy

            max_points = 2000  # t-SNE is O(n log n) but slow in practice: 2k points take ~15-30 s on 2 cores
        except ImportError:
            max_points = 20000
    rng = np.random.default_rng(seed)
    n = bundle.n_items
    pick = np.sort(rng.choice(n, size=min(n, max_points), replace=False))
    xy, used = embedding_2d(bundle.item_embeddings[pick], method=method, seed=seed)
    codes, names, feature = _item_labels(bundle)
    c = codes[pick]
    vals, counts = np.unique(c, return_counts=True)
    top = vals[np.argsort(-counts, kind="stable")][:top_categories]
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    other = ~np.isin(c, top)
    if other.any():
        ax.scatter(xy[other, 0], xy[other, 1], s=4, c="lightgrey", label="other", alpha=0.5, linewidths=0)
    tab10 = plt.get_cmap("tab10")
    colours = [tab10(i) for i in (0, 1, 2, 3, 4, 5, 6, 8, 9)] + ["black"]  # no grey: that is "other"
    for j, code in enumerate(top):
        m = c == code
        ax.scatter(xy[m, 0], xy[m, 1], s=5, color=colours[j % len(colours)], label=names.get(int(code), str(code)), alpha=0.8,
                   linewidths=0)
    ax.set_title(f"Item embeddings ({used.upper()}, {len(pick)} of {n} items) by {feature}")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=3, loc="best")
    return _png(fig), {"method": used, "n_points": int(len(pick)), "feature": feature}
