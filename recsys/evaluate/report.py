"""The evaluation report: JSON + markdown (+ plots)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from recsys.core.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from recsys.evaluate import plots as P
from recsys.evaluate.run import finite

log = logging.getLogger(__name__)


def write_report(report: Mapping[str, Any], out_dir: str | Path, *, bundle: Any = None, plots: bool = True,
                 embedding_map: str = "auto") -> dict[str, Path]:
    """Write ``report.json``, ``report.md`` and (with matplotlib) the PNG plots into ``out_dir`` atomically.

    ``bundle`` (the evaluated one) feeds the 2-D map of item embeddings. Returns name -> path of what was written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = dict(report)
    written: dict[str, Path] = {}
    plot_files: dict[str, str] = {}
    if plots:
        try:
            pngs = {
                "recall_at_k": P.recall_curves_png(report),
                **({"ann_tradeoff": P.ann_tradeoff_png(report["ann_sweep"])} if "ann_sweep" in report else {}),
            }
            if bundle is not None:
                png, meta = P.embedding_map_png(bundle, method=embedding_map)
                pngs["item_embeddings"] = png
                report["embedding_map"] = meta
        except ImportError as e:
            log.warning("plots skipped: %s (pip install matplotlib)", e)
            pngs = {}
            report.setdefault("notes", []).append(f"plots skipped: {e}")
        for name, data in pngs.items():
            atomic_write_bytes(out / f"{name}.png", data)
            written[name] = out / f"{name}.png"
            plot_files[name] = f"{name}.png"
    report["plots"] = plot_files
    atomic_write_json(out / "report.json", finite(report))
    written["report.json"] = out / "report.json"
    atomic_write_text(out / "report.md", render_markdown(report))
    written["report.md"] = out / "report.md"
    json.loads((out / "report.json").read_text())  # what we wrote must read back
    return written


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def render_markdown(report: Mapping[str, Any]) -> str:
    """A human-readable report: models x metrics, ANN vs exact, segments, A/B, plots."""
    ks = report["ks"]
    lines = [
        f"# Offline evaluation — split `{report['split']}`",
        "",
        f"Data: `{report['data']['path']}` ({report['data']['n_users']} users, {report['data']['n_items']} items); "
        f"{report['users']['users_evaluated']} users evaluated "
        f"({report['users']['split_pairs_seen_before']} of {report['users']['split_pairs']} held-out pairs were "
        "already seen and are excluded).",
        "",
    ]
    filt = report.get("filter")
    if filt:
        lines += [f"**Filtered:** `{' AND '.join(filt['terms'])}` allows {filt['allowed_items']} items; every model "
                  f"returns only those, and each user is judged on the allowed held-out items only "
                  f"({filt['users_kept']} users kept, {filt['users_dropped']} with none dropped).", ""]
    for name, why in (report.get("in_sample") or {}).items():
        lines += [f"**IN-SAMPLE: `{name}` was trained on the scored interactions; its numbers are not an estimate "
                  f"of future quality.** ({why})", ""]
    for name, info in report.get("bundles", {}).items():
        lines.append(f"- `{name}`: bundle `{info['version']}` (ef={info['ef']}, "
                     f"users unknown to it: {info['users_unknown_to_bundle']}, "
                     f"relevant items unknown to it: {info['relevant_unknown_to_bundle']})")
    scope = "filtered catalogue" if filt else "full catalogue"
    lines += ["", f"## Retrieval quality ({scope}, seen items excluded)", ""]
    cols = [f"recall@{k}" for k in ks] + [f"ndcg@{k}" for k in ks] + [f"hit_rate@{ks[0]}", "mrr", f"map@{ks[-1]}",
                                                                      f"coverage@{ks[-1]}", f"pop_percentile@{ks[-1]}"]
    lines.append("| model | retrieval | " + " | ".join(cols) + " |")
    lines.append("|---|---|" + "---|" * len(cols))
    for name, m in report["models"].items():
        lines.append(f"| {name} | {m['retrieval']} | " + " | ".join(_fmt(m["metrics"].get(c)) for c in cols) + " |")
    if report.get("ann"):
        lines += ["", "## HNSW against exact search", ""]
        rk = [f"ann_recall@{k}" for k in ks]
        lines.append("| model | ef | " + " | ".join(rk) + " |")
        lines.append("|---|---|" + "---|" * len(rk))
        for name, a in report["ann"].items():
            lines.append(f"| {name} | {a['ef']} | " + " | ".join(_fmt(a.get(c)) for c in rk) + " |")
    sw = report.get("ann_sweep")
    if sw:
        lines += ["", f"ef sweep (recall@{sw['k']} vs exact, {sw['n_queries']} queries, tuned ef = "
                      f"{sw['tuned_ef']}; exact scan p50 {_fmt(sw['exact']['p50_ms'], 3)} ms):", "",
                  "| ef | recall | p50 ms | p95 ms | batch ms/query |", "|---|---|---|---|---|"]
        for r in sw["rows"]:
            lines.append(f"| {r['ef']} | {_fmt(r['recall'])} | {_fmt(r['p50_ms'], 3)} | {_fmt(r['p95_ms'], 3)} | "
                         f"{_fmt(r['batch_ms_per_query'], 4)} |")
    seg_k = ks[1] if len(ks) > 1 else ks[0]
    segs = list(report["segments_definition"])
    lines += ["", f"## Segments — recall@{seg_k} (users in segment)", ""]
    lines.append("| model | " + " | ".join(segs) + " |")
    lines.append("|---|" + "---|" * len(segs))
    for name, m in report["models"].items():
        cells = []
        for s in segs:
            seg = m["segments"][s]
            cells.append(f"{_fmt(seg['metrics'][f'recall@{seg_k}'])} ({seg['n_users']})" if "metrics" in seg
                         else f"– ({seg['n_users']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [""] + [f"- `{k}`: {v}" for k, v in report["segments_definition"].items()]
    if report.get("ab"):
        lines += ["", "## A/B: `compare` (B) against `two_tower` (A), exact retrieval", "",
                  "| metric | A | B | B − A | 95% CI | users B better / A better |", "|---|---|---|---|---|---|"]
        for mname, r in report["ab"].items():
            lines.append(f"| {mname} | {_fmt(r['a'])} | {_fmt(r['b'])} | {_fmt(r['delta'])} | "
                         f"[{_fmt(r['ci95'][0])}, {_fmt(r['ci95'][1])}] | {r['b_better_users']} / "
                         f"{r['a_better_users']} |")
    if report.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    if report.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{n}]({f})" for n, f in report["plots"].items()]
    if report.get("embedding_map"):
        em = report["embedding_map"]
        lines.append(f"\nItem map: {em.get('method')} of {em.get('n_points')} items coloured by "
                     f"`{em.get('feature')}`.")
    return "\n".join(lines) + "\n"
