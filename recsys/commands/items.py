"""`recsys items`: upsert or retire items of the serving catalogue without a retrain.

Writes the change to the catalogue delta of a model version in the models directory (LATEST's by default); every
server of that directory applies it at its next poll (``serve.poll_s``), a running one or one started later. The
same as the ``RecommenderAdmin.UpsertItems`` / ``RetireItems`` RPCs, for a server that is not running or for many
replicas at once.
"""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "items",
        help="upsert / retire catalogue items without a retrain",
        description="`recsys items upsert --models DIR --items FILE` embeds the items of FILE (an items file as "
        "`recsys prepare --items` reads it: ID, attributes, title) with the serving model's item tower and adds or "
        "updates them; `recsys items retire --models DIR --ids FILE` withdraws the IDs listed in FILE (one per "
        "line). Both append one change to the version's catalogue delta (MODELS_DIR/catalogue/VERSION/), which "
        "every server of MODELS_DIR applies within its poll interval.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = sub.add_parser("upsert", help="add or update items from an items file")
    up.add_argument("--items", required=True, metavar="FILE", help="items file (CSV/TSV/parquet/NDJSON/MovieLens)")
    rt = sub.add_parser("retire", help="withdraw items")
    rt.add_argument("--ids", required=True, metavar="FILE", help="item IDs, one per line")
    for q in (up, rt):
        q.add_argument("--models", required=True, metavar="MODELS_DIR")
        q.add_argument("--version", metavar="VERSION", help="the model version (default: the one LATEST names)")
        q.add_argument("--change-id", dest="change_id", metavar="ID",
                       help="makes a retry safe: a change ID already in the delta is not applied twice")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from recsys.bundle import Bundle, read_latest
    from recsys.catalogue.changes import retire_items, upsert_items
    from recsys.catalogue.delta import load_state
    from recsys.catalogue.encode import read_items
    from recsys.catalogue.live import live_bundle
    from recsys.core.config import from_dict
    from recsys.prepare import PrepareConfig

    models = Path(args.models)
    version = args.version or read_latest(models)
    if version is None:
        raise FileNotFoundError(f"no model in {str(models)!r}: LATEST does not exist (give --version)")
    bundle = Bundle.load(models / version)
    view = live_bundle(bundle, load_state(models, version))
    if args.action == "upsert":
        cfg = from_dict(PrepareConfig, (bundle.manifest.get("data") or {}).get("prepare_config"))
        rows = read_items(args.items, config=cfg)
        r = upsert_items(models, view, rows, change_id=args.change_id)
        out = {"version": version, "added": r.added, "updated": r.updated, "applied": r.applied, "seq": r.seq,
               "change_id": r.change_id, "unknown_values": [list(u) for u in r.unknown]}
    else:
        lines = Path(args.ids).read_text(encoding="utf-8").splitlines()
        ids = [t.strip() for t in lines if t.strip()]
        if not ids:
            raise ValueError(f"{args.ids}: no item IDs (one per line)")
        r = retire_items(models, view, ids, change_id=args.change_id)
        out = {"version": version, "retired": r.retired, "unknown_item_ids": r.unknown_ids, "applied": r.applied,
               "seq": r.seq, "change_id": r.change_id}
    print(json.dumps(out, sort_keys=True))
    return 0
