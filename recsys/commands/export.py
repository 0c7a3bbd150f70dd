"""`recsys export`: publish a training run as a new, verified model version (atomic; moves LATEST)."""

from __future__ import annotations

import argparse
import json

from recsys.core.config import load_section


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "export",
        help="publish a trained run as MODELS_DIR/<version>/ and point LATEST at it",
        description="Embed every item and known user with the run's towers, build the HNSW index (ef auto-tuned "
        "against exact search on held-out users), write the bundle with a checksummed manifest into a temporary "
        "directory, rename it to MODELS_DIR/<version>/, then move MODELS_DIR/LATEST atomically. Keeps the newest "
        "--keep versions (never the one LATEST points to).",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="output dir of `recsys train`")
    p.add_argument("--models", required=True, metavar="MODELS_DIR", help="directory of published versions")
    p.add_argument("--data", metavar="PREPARED_DIR", help="prepared dataset (default: the run's, found by its path "
                   "relative to the run, then its absolute path, and its fingerprint; needed only if it moved)")
    p.add_argument("--keep", type=int, default=5, metavar="N", help="versions to keep (default: 5)")
    p.add_argument("--version", help="version name (default: UTC timestamp + short content hash; not LATEST or catalogue, which the models directory uses)")
    p.add_argument("--config", metavar="FILE", help="TOML file with an [index] section")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="index.FIELD=VALUE",
        help="override an index config field, e.g. --set index.M=32 --set index.target_recall=0.995; "
             "--set 'index.partition_by=[\"category\"]' builds one more graph per category value, for fast filters "
             "on it",
    )
    p.add_argument("--no-eval", action="store_true",
                   help="skip the quick test-split evaluation stored in the manifest (when the final fit trained on "
                        "test, the manifest stores the run's holdout estimate instead)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    # numpy (torch on use): imported here so `recsys --help` stays fast
    from recsys.publish import export
    from recsys.retrieval import IndexConfig

    index_cfg = load_section(IndexConfig, "index", path=args.config, overrides=args.overrides)
    path = export(
        args.run, args.models, data_dir=args.data, index_cfg=index_cfg, keep=args.keep, version=args.version,
        evaluate_split=None if args.no_eval else "test",
    )
    manifest = json.loads((path / "manifest.json").read_text())
    print(json.dumps({
        "version": manifest["version"], "path": str(path), "ef": manifest["index"]["ef"],
        "counts": manifest["counts"], "evaluation": manifest["evaluation"],
        "trained_on": {k: (manifest.get("trained_on") or {}).get(k) for k in ("splits", "rows")},
    }, indent=2, sort_keys=True))  # fmt: skip
    return 0
