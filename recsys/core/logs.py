"""Log output of every `recsys` command: text or JSON lines, and time-throttled progress lines for log files.

The server (``server/logs.py``) re-exports :class:`JsonFormatter` and :func:`configure_json_logging`; this module
is their one owner, so a batch job and the server write the same JSON objects.

Progress: a tqdm bar is drawn only when stderr is a terminal. Without one (a Kubernetes Job, ``> train.log``) a
long loop logs at most one progress line every :data:`PROGRESS_EVERY_S` seconds (``recsys --progress-every S``)
besides its per-epoch / per-phase lines, so a log grows with wall time, not with the number of steps.
"""

from __future__ import annotations

import json
import logging
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")

DEFAULT_PROGRESS_EVERY_S = 30.0
PROGRESS_EVERY_S = DEFAULT_PROGRESS_EVERY_S
"""Seconds between progress lines of one long loop when stderr is not a terminal (0: none)."""

# attributes every LogRecord has; anything else came from `extra=` and is emitted as a field
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``ts`` (UTC, ms), ``level``, ``logger``, ``msg``, every ``extra=`` field, and
    ``exc`` (the formatted traceback) when the record carries one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr`` (like logging's last-resort handler), so a handler installed while
    stderr is redirected (pytest's capture, ``contextlib.redirect_stderr``) never writes to a closed stream later."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr


def configure_logging(fmt: str = "text", level: int = logging.INFO, *, replace: bool = True) -> None:
    """Route the root logger to stderr as text or JSON lines, at ``level``.

    ``replace``: drop every other root handler (a process of its own: the server, a CLI run); otherwise only the
    handler an earlier call installed is swapped and handlers of an embedding application (or pytest) stay. In
    JSON mode Python warnings are logged too (logger ``py.warnings``), so they arrive as JSON objects as well."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {LOG_FORMATS}, got {fmt!r}")
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    keep = [] if replace else [h for h in root.handlers if not isinstance(h, _StderrHandler)]
    root.handlers[:] = [*keep, handler]
    root.setLevel(level)
    if fmt == "json":
        logging.captureWarnings(True)


def configure_json_logging(level: int = logging.INFO) -> None:
    """Route the root logger to stderr as JSON lines (replaces existing handlers)."""
    configure_logging("json", level)


def report_error(fmt: str, command: str, message: str, *, label: str = "", **fields: object) -> None:
    """A command's failure on stderr: ``recsys COMMAND: LABELMESSAGE`` as text, or (``fmt == "json"``) one JSON log
    record at ERROR with ``fields`` as extras, so every stderr line of a JSON run parses."""
    if fmt == "json":
        logging.getLogger(f"recsys.{command.split()[0]}").error("%s%s", label, message, extra=fields)
    else:
        print(f"recsys {command}: {label}{message}", file=sys.stderr)


def set_progress_every(seconds: float = DEFAULT_PROGRESS_EVERY_S) -> None:
    """Set :data:`PROGRESS_EVERY_S` for this process (``recsys --progress-every``)."""
    global PROGRESS_EVERY_S
    if not seconds >= 0:
        raise ValueError(f"--progress-every must be >= 0 seconds, got {seconds}")
    PROGRESS_EVERY_S = float(seconds)


class Throttle:
    """``due()`` is true at most once every ``every_s`` seconds (default :data:`PROGRESS_EVERY_S`, read when the
    throttle is made), first ``every_s`` after it was made; never with ``every_s == 0`` or when ``enabled`` is
    false (e.g. a tqdm bar is drawn instead)."""

    __slots__ = ("every_s", "_next")

    def __init__(self, every_s: float | None = None, *, enabled: bool = True) -> None:
        self.every_s = PROGRESS_EVERY_S if every_s is None else float(every_s)
        self._next = time.monotonic() + self.every_s if enabled and self.every_s > 0 else float("inf")

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next:
            return False
        self._next = now + self.every_s
        return True
