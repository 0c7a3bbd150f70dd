"""`recsys evaluate`: offline evaluation of a bundle (exact + HNSW) against baselines; report.json/.md + plots."""

from __future__ import annotations

import argparse
import sys


def _ks(text: str) -> list[int]:
    try:
        ks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--k must be comma-separated integers, got {text!r}") from None
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"--k must hold integers >= 1, got {text!r}")
    return ks


def _filter_term(text: str) -> str:
    """One --filter term, checked for syntax here (argparse names the flag); attributes are checked by evaluate."""
    from recsys.catalogue.filters import parse_filter

    try:
        parse_filter([text])
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"--filter: {e}") from None
    return text


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "evaluate",
        help="offline evaluation of a model bundle: Recall/NDCG/HitRate/MRR/MAP@K, ANN vs exact, baselines",
        description="Evaluate a bundle on a split of a prepared dataset over the full catalogue with seen items "
        "excluded (the serving rule), exact and HNSW side by side, with baselines, segments and an optional A/B "
        "against a second bundle. Writes report.json, report.md and PNG plots to --report.",
    )
    p.add_argument("--bundle", required=True, metavar="BUNDLE",
                   help="MODELS_DIR (follows LATEST), MODELS_DIR/LATEST, or a version directory")
    p.add_argument("--data", required=True, metavar="PREPARED_DIR", help="output dir of `recsys prepare`")
    p.add_argument("--split", default="test", choices=["valid", "test"])
    p.add_argument("--report", required=True, metavar="DIR", help="directory for report.json, report.md, *.png")
    p.add_argument("--k", dest="ks", type=_ks, default=[10, 20, 50, 100], metavar="K1,K2,...",
                   help="cut-offs (default: 10,20,50,100)")
    p.add_argument("--compare", metavar="OTHER_BUNDLE", help="second bundle for an A/B comparison")
    p.add_argument("--baselines", default="popularity,itemknn,ease",
                   help="comma-separated subset of popularity,itemknn,ease; '' for none")
    p.add_argument("--max-users", type=int, metavar="N", help="evaluate a seeded sample of N users")
    p.add_argument("--cold-threshold", type=int, default=5, metavar="N",
                   help="users with at most N prior items are 'cold' (default: 5)")
    p.add_argument("--ease-max-items", type=int, default=10_000, metavar="N",
                   help="skip EASE above N items (its dense N x N inverse; default: 10000, ~0.8 GB)")
    p.add_argument("--embedding-map", default="auto", choices=["auto", "tsne", "pca"],
                   help="2-D item map: t-SNE if scikit-learn is installed (auto), else PCA")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")
    p.add_argument("--no-sweep", action="store_true", help="skip the ef sweep (ANN recall vs latency)")
    p.add_argument("--filter", dest="filters", action="append", type=_filter_term, default=[], metavar="TERM",
                   help="evaluate a filtered use, as served with this item filter (repeatable, ANDed): "
                        "NAME=V1,V2 (any of), NAME!=V (none of), NAME>=X, NAME<=X, NAME=LOW..HIGH; e.g. "
                        "--filter genre=Comedy,Drama --filter year=1990..1999. Models retrieve only allowed items "
                        "and users are judged on their allowed held-out items (users without any are dropped)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--in-sample", action="store_true",
                   help="score a bundle whose final fit trained on this split (refused otherwise: by default a "
                        "published model is fit on every split); the report marks the numbers as in-sample")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    # numpy, scipy: imported here so `recsys --help` stays fast
    from recsys.bundle import Bundle
    from recsys.catalogue.filters import parse_filter
    from recsys.evaluate import evaluate, write_report

    bundle = Bundle.load(args.bundle)
    report = evaluate(
        bundle, args.data, split=args.split, ks=args.ks, baselines=[b for b in args.baselines.split(",") if b],
        compare=args.compare, max_users=args.max_users, cold_threshold=args.cold_threshold,
        ease_max_items=args.ease_max_items, sweep=not args.no_sweep, seed=args.seed, progress=sys.stderr.isatty(),
        in_sample=args.in_sample, item_filter=parse_filter(args.filters) if args.filters else None,
    )
    written = write_report(report, args.report, bundle=bundle, plots=not args.no_plots,
                           embedding_map=args.embedding_map)
    k = report["ks"][1] if len(report["ks"]) > 1 else report["ks"][0]
    print(f"{'model':24} {'retrieval':9} recall@{k:<5} ndcg@{k:<5}")
    for name, m in report["models"].items():
        print(f"{name:24} {m['retrieval']:9} {m['metrics'][f'recall@{k}']:.4f}       {m['metrics'][f'ndcg@{k}']:.4f}")
    if "filter" in report:
        f = report["filter"]
        print(f"filter {' AND '.join(f['terms'])}: {f['allowed_items']} items allowed, {f['users_kept']} users "
              f"evaluated, {f['users_dropped']} dropped (no allowed held-out item)")
    print(f"report: {written['report.md']}")
    return 0
