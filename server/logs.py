"""Structured JSON logs: one object per line, with the request id and any ``extra=`` fields.

The formatter is owned by :mod:`recsys.core.logs` (every `recsys` command can log the same JSON lines with
``--log-format json``); this module re-exports it for the server.
"""

from __future__ import annotations

from recsys.core.logs import JsonFormatter, configure_json_logging

__all__ = ["JsonFormatter", "configure_json_logging"]
