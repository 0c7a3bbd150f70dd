"""`recsys` command line: a thin dispatcher.

Each subcommand lives in ``recsys/commands/<name>.py`` with ``add_parser(subparsers)`` and ``run(args) -> int``;
command modules import heavy libraries (torch, polars, hnswlib, grpc) only inside ``run`` so ``recsys --help``
is instant and the training path never needs the serving stack.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> module; order is the order shown in --help
COMMANDS = {
    "synth": "recsys.commands.synth",
    "prepare": "recsys.commands.prepare",
    "train": "recsys.commands.train",
    "export": "recsys.commands.export",
    "evaluate": "recsys.commands.evaluate",
    "serve": "recsys.commands.serve",
    "query": "recsys.commands.query",
    "retrain": "recsys.commands.retrain",
    "models": "recsys.commands.models",
    "demo": "recsys.commands.demo",
}


class UserError(Exception):
    """An error caused by the user's input; printed without a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="recsys",
        description="Two-tower recommendation retrieval: prepare logs, train, export, evaluate, serve over gRPC.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # command not built yet
        mod.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as e:
        # ValueError covers config and validation errors, whose messages already name the field and value.
        if args.verbose:
            raise
        print(f"recsys {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `recsys query ... | head`: the reader went away; exit quietly like other Unix tools
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    raise SystemExit(main())
