"""`recsys models`: list published versions, or roll LATEST back (or forth) to one of them."""

from __future__ import annotations

import argparse
import json


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models",
        help="list model versions / roll LATEST back",
        description="`recsys models list --models DIR` prints the published versions (oldest first, * = LATEST); "
        "`recsys models rollback VERSION --models DIR` verifies VERSION and points LATEST at it atomically.",
    )
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("list", help="list versions")
    ls.add_argument("--models", required=True, metavar="MODELS_DIR")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    rb = sub.add_parser("rollback", help="point LATEST at VERSION (after verifying it)")
    rb.add_argument("version", metavar="VERSION")
    rb.add_argument("--models", required=True, metavar="MODELS_DIR")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    # numpy: imported here so `recsys --help` stays fast
    from recsys.bundle import list_versions
    from recsys.publish import rollback

    if args.action == "rollback":
        path = rollback(args.models, args.version)
        print(f"LATEST -> {args.version} ({path})")
        return 0
    rows = list_versions(args.models)
    if args.json:
        print(json.dumps(rows, indent=2, sort_keys=True, default=str))
        return 0
    if not rows:
        print(f"no versions in {args.models}")
        return 0
    print(f"{'':2}{'version':26} {'created_at':22} {'users':>8} {'items':>8} {'dim':>4} {'ef':>4}  recall@20")
    for r in rows:
        ev = r.get("evaluation") or {}
        rec = ev.get("recall@20")
        print(
            f"{'*' if r['latest'] else ' ':2}{r['version']:26} {str(r.get('created_at') or '?'):22} "
            f"{r.get('n_users') or '?':>8} {r.get('n_items') or '?':>8} {r.get('dim') or '?':>4} "
            f"{r.get('ef') or '?':>4}  {'' if rec is None else f'{rec:.4f}'}{r.get('error', '')}"
        )
    return 0
