"""`recsys query recommend|similar|embed|info|models|reload --target TARGET ...`: call a running server.

TARGET is one server (HOST:PORT), a headless Service (dns:///NAME:PORT) or several replicas (IP:PORT,IP:PORT);
calls are balanced round_robin over them and UNAVAILABLE is retried on another replica. Prints the answer as
JSON on stdout; a failed call prints the status code and message and exits with 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from recsys.core.logs import report_error


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("query", help="query a running recommendation server", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", default="localhost:50051",
                        help="HOST:PORT, dns:///NAME:PORT (all its addresses) or IP:PORT,IP:PORT,... "
                        "(default localhost:50051)")
    # the choices of recsys.client.LOAD_BALANCING, spelled out so that `--help` does not import grpc
    common.add_argument("--load-balancing", choices=("round_robin", "pick_first"), default="round_robin",
                        help="policy over the target's addresses (default round_robin)")
    common.add_argument("--timeout", type=float, default=5.0, help="deadline per call in seconds (default 5)")
    common.add_argument("--tls-ca", metavar="PEM", help="CA that signed the server certificate (enables TLS)")
    common.add_argument("--tls-cert", metavar="PEM", help="client certificate (mTLS)")
    common.add_argument("--tls-key", metavar="PEM", help="client private key (mTLS)")
    common.add_argument("--admin-token", help="bearer token for models/reload (or env RECSYS_ADMIN_TOKEN)")
    sub = p.add_subparsers(dest="query", metavar="QUERY", required=True)

    r = sub.add_parser("recommend", parents=[common], help="top-k items for a user or a history")
    r.add_argument("--user", default="", help="user ID")
    r.add_argument("--history", nargs="+", default=[], metavar="ITEM",
                   help="item IDs, oldest first: a new user's history, or a known --user's fresh events")
    r.add_argument("-k", type=int, default=10, help="number of items (default 10)")
    r.add_argument("--include-seen", action="store_true", help="do not exclude the user's seen items")
    r.add_argument("--exclude", nargs="+", default=[], metavar="ITEM", help="items never to return")
    r.add_argument("--allowed", nargs="+", default=[], metavar="ITEM", help="only these items may be returned")
    r.add_argument("--fallback", action="store_true", help="popular items for an unknown user")
    r.add_argument("--filter", action="append", default=[], metavar="TERM",
                   help="a condition on item attributes (repeatable, ANDed): NAME=V1,V2 / NAME!=V / NAME>=X / "
                        "NAME<=X / NAME=LOW..HIGH")

    s = sub.add_parser("similar", parents=[common], help="items closest to an item")
    s.add_argument("--item", required=True, help="item ID")
    s.add_argument("-k", type=int, default=10, help="number of items (default 10)")
    s.add_argument("--exclude", nargs="+", default=[], metavar="ITEM", help="items never to return")
    s.add_argument("--filter", action="append", default=[], metavar="TERM",
                   help="a condition on item attributes (repeatable, ANDed), as for recommend")

    e = sub.add_parser("embed", parents=[common], help="embeddings of users, items, or a history")
    g = e.add_mutually_exclusive_group()
    g.add_argument("--users", nargs="+", metavar="USER", help="stored user embeddings")
    g.add_argument("--items", nargs="+", metavar="ITEM", help="stored item embeddings")
    e.add_argument("--history", nargs="+", default=[], metavar="ITEM",
                   help="user-tower embedding of a new user's history, or of a known --user's fresh events")
    e.add_argument("--user", default="", help="one user (EmbedUser): its stored embedding, or with --history the "
                   "tower on its stored history + the events")

    sub.add_parser("info", parents=[common], help="the serving model")
    sub.add_parser("models", parents=[common], help="model versions on the server (admin)")
    rl = sub.add_parser("reload", parents=[common], help="load LATEST or --version (admin)")
    rl.add_argument("--version", help="version to load (default: LATEST)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    # grpc: imported here so `recsys --help` stays fast
    from recsys.client import RecommenderClient, RecommenderError

    token = args.admin_token or os.environ.get("RECSYS_ADMIN_TOKEN")
    client = RecommenderClient(
        args.target, timeout=args.timeout, admin_token=token, tls_ca=args.tls_ca, tls_cert=args.tls_cert,
        tls_key=args.tls_key, load_balancing=args.load_balancing,
    )
    try:
        with client:
            out = _ask(client, args)
    except RecommenderError as e:
        report_error(getattr(args, "log_format", "text"), f"query {args.query}", e.details, label=f"{e.code.name}: ",
                     code=e.code.name)
        return 1
    json.dump(out, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def _ask(client, args: argparse.Namespace) -> object:
    if args.query == "recommend":
        rec = client.recommend(
            args.user, history=args.history, k=args.k, include_seen=args.include_seen, exclude=args.exclude,
            allowed=args.allowed, allow_fallback=args.fallback, filter=args.filter or None,
        )
        return {
            "model_version": rec.model_version, "source": rec.source, "fallback": rec.fallback,
            "items": [{"item_id": i, "score": s} for i, s in zip(rec.item_ids, rec.scores, strict=True)],
            "unknown_item_ids": rec.unknown_item_ids,
        }
    if args.query == "similar":
        rec = client.similar_items(args.item, k=args.k, exclude=args.exclude, filter=args.filter or None)
        return {
            "model_version": rec.model_version,
            "items": [{"item_id": i, "score": s} for i, s in zip(rec.item_ids, rec.scores, strict=True)],
        }
    if args.query == "embed":
        if (args.users or args.items) and (args.user or args.history):
            raise ValueError("`recsys query embed`: --users / --items cannot be combined with --user / --history")
        if args.user or args.history:
            vec, unknown = client.embed_user(args.history, user_id=args.user)
            return {"embedding": vec.tolist(), "unknown_item_ids": unknown}
        if not (args.users or args.items):
            raise ValueError("`recsys query embed` needs --users, --items, --history or --user")
        found, unknown = (client.user_embeddings(args.users) if args.users else client.item_embeddings(args.items))
        return {"embeddings": {k: v.tolist() for k, v in found.items()}, "unknown_ids": unknown}
    if args.query == "info":
        return client.model_info()
    if args.query == "models":
        return client.list_models()
    if args.query == "reload":
        return client.reload_model(args.version, timeout=max(args.timeout, 60.0))
    raise ValueError(f"unknown query {args.query!r}")
