"""`recsys synth`: write the deterministic synthetic demo logs (see recsys.prepare.synth)."""

from __future__ import annotations

import argparse
import json

from recsys.core.config import load_section


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "synth",
        help="generate deterministic synthetic interaction logs (the demo dataset)",
        description=(
            "Write DIR/logs/part-*.parquet (user_id, item_id, timestamp, event), DIR/items.parquet, "
            "DIR/users.parquet and DIR/synth.json. The same settings give byte-identical files. Flags override "
            "the [synth] section of --config, which overrides the defaults; any other field via --set."
        ),
    )
    parser.add_argument("--out", required=True, help="output directory (written atomically)")
    parser.add_argument("--events", type=int, help="total events (default 1000000)")
    parser.add_argument("--users", type=int, help="number of users (default 20000)")
    parser.add_argument("--items", type=int, help="number of items (default 5000)")
    parser.add_argument("--seed", type=int, help="random seed (default 0)")
    parser.add_argument("--shard-events", type=int, help="events per parquet shard (default 1000000)")
    parser.add_argument("--config", help="TOML file with a [synth] section")
    parser.add_argument(
        "--set", action="append", default=[], metavar="synth.FIELD=VALUE", help="override any [synth] field"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    # polars: imported here so `recsys --help` stays fast
    from recsys.prepare.synth import SynthConfig, generate

    overrides = list(args.set)
    for flag, field in (
        ("events", "events"), ("users", "users"), ("items", "items"), ("seed", "seed"),
        ("shard_events", "shard_events"),
    ):  # fmt: skip
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"synth.{field}={value}")
    cfg = load_section(SynthConfig, "synth", path=args.config, overrides=overrides)
    summary = generate(args.out, config=cfg, overwrite=args.overwrite)
    counts = summary["counts"]
    print(
        f"wrote {counts['events']} events ({counts['active_users']} active users, {counts['active_items']} "
        f"active items) in {counts['shards']} shard(s) to {args.out} in {summary['seconds']:.1f}s"
    )
    print(json.dumps(counts["events_by_type"]))
    return 0
