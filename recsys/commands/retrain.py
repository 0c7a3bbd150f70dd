"""`recsys retrain`: new logs -> prepare -> train (warm start) -> quality gate -> publish."""

from __future__ import annotations

import argparse
import json


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "retrain",
        help="retrain from new logs and publish only if the model passes the quality gate",
        description=(
            "Prepare the new logs (global time split: the newest events are the gate slice), train warm-started "
            "from the serving model (LATEST) with the score's time prior (model.time_prior = true unless the config "
            "or --set names it: what is popular now, weighted on the newest events), compare Recall@K of candidate and serving model on the newest slice, "
            "and publish (atomically, moving LATEST) only when the candidate is not worse by more than "
            "retrain.tolerance. The gate report is written either way. Holds MODELS_DIR/.retrain.lock; a crashed "
            "job resumes where it stopped and publishes once. Running servers hot-reload the new LATEST."
        ),
    )
    p.add_argument("--logs", nargs="+", required=True, metavar="PATH_OR_GLOB", help="interaction logs")
    p.add_argument("--models", required=True, metavar="MODELS_DIR", help="models directory (versions + LATEST)")
    p.add_argument("--items", metavar="FILE", help="item features file")
    p.add_argument("--users", metavar="FILE", help="user features file")
    p.add_argument("--config", metavar="FILE",
                   help="TOML with [retrain], [prepare], [model], [train], [loss], [index] tables")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override a config field, e.g. --set retrain.tolerance=0.01 (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from recsys.retrain import retrain  # torch, polars: imported here so `recsys --help` stays fast

    report = retrain(args.logs, args.models, items=args.items, users=args.users, config_path=args.config,
                     overrides=args.overrides)
    gate = report["gate"]
    print(json.dumps({"published": report["published"], "gate": gate.get("reason"),
                      "candidate": gate.get("candidate"), "serving": gate.get("serving")}, indent=2))
    return 0 if report["published"] else 3
