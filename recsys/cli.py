"""`recsys` command line: a thin dispatcher.

Each subcommand lives in ``recsys/commands/<name>.py`` with ``add_parser(subparsers)`` and ``run(args) -> int``;
command modules import heavy libraries (torch, polars, hnswlib, grpc) only inside ``run`` so ``recsys --help``
is instant and the training path never needs the serving stack.

Logging is set up here for every command (see :mod:`recsys.core.logs`): ``--log-format text|json`` and
``--progress-every S`` are accepted before or after the command name. A command module may set
``LOG_FORMAT = "json"`` to change its default (``serve`` does; the batch commands log text by default).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import sys

from recsys.core.logs import (
    DEFAULT_PROGRESS_EVERY_S,
    LOG_FORMATS,
    configure_logging,
    report_error,
    set_progress_every,
)

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
    "items": "recsys.commands.items",
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
    _add_log_options(parser, default="text; serve: json")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS.values():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # command not built yet
        mod.add_parser(sub)
    for name, p in sub.choices.items():
        _add_log_options(p, default=_log_format_default(name), progress=name not in _NO_PROGRESS)
    return parser


# commands without long loops of their own: no --progress-every
_NO_PROGRESS = {"serve", "query", "models", "items"}


def _log_format_default(command: str) -> str:
    return getattr(importlib.import_module(COMMANDS[command]), "LOG_FORMAT", "text")


def _add_log_options(p: argparse.ArgumentParser, default: str = "text", *, progress: bool = True) -> None:
    """``--log-format`` and ``--progress-every`` on the top-level parser, every command's parser and its own
    subcommands' (``models list``).

    ``SUPPRESS`` keeps a value given before the command name: a subparser's default would overwrite it."""
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _add_log_options(child, default, progress=progress)
    g = p.add_argument_group("logging")
    if not any("--log-format" in a.option_strings for a in p._actions):
        g.add_argument("--log-format", choices=LOG_FORMATS, default=argparse.SUPPRESS,
                       help=f"stderr log lines: text, or one JSON object per line (default: {default})")
    if not progress:
        return
    g.add_argument("--progress-every", type=float, default=argparse.SUPPRESS, metavar="S",
                   help=f"without a terminal, at most one progress line every S seconds within a long loop "
                        f"(epoch, evaluation pass); 0 = only the per-epoch/per-phase lines (default: "
                        f"{DEFAULT_PROGRESS_EVERY_S:g}). On a terminal tqdm bars are drawn instead.")


# OSErrors that describe the machine rather than a bug: reported in one line, exit status 1
_ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "log_format", None) is None:
        args.log_format = _log_format_default(args.command)
    # replace=False: when main() runs inside another program (or pytest), its handlers stay
    configure_logging(args.log_format, logging.DEBUG if args.verbose else logging.INFO, replace=False)
    set_progress_every(getattr(args, "progress_every", DEFAULT_PROGRESS_EVERY_S))
    try:
        return int(args.func(args) or 0)
    except (UserError, ValueError, FileNotFoundError, FileExistsError) as e:
        # ValueError covers config and validation errors, whose messages already name the field and value.
        if args.verbose:
            raise
        report_error(args.log_format, args.command, str(e), label="error: ", error=type(e).__name__)
        return 2
    except OSError as e:
        # the disk, not the program: full, over quota, a file-size limit, read-only, no permission -- one line
        # naming the path (and any note the writer added, e.g. which output was left untouched)
        if args.verbose or e.errno not in _ENVIRONMENT_ERRNOS:
            raise
        report_error(args.log_format, args.command, " ".join([str(e), *getattr(e, "__notes__", ())]),
                     label="error: ", error=type(e).__name__, errno=e.errno)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `recsys query ... | head`: the reader went away; exit quietly like other Unix tools
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as e:
        if args.log_format != "json" or args.verbose:
            raise
        # a crash's traceback as one JSON line (field "exc") for the log collector, not 30 lines of text
        logging.getLogger(f"recsys.{args.command}").critical("%s: %s", type(e).__name__, e, exc_info=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
