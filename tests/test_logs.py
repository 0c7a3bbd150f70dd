"""What `recsys` commands write to stderr: bars on a terminal only, bounded lines in a log file, JSON on request.

Commands run as subprocesses with stderr on a pipe (a Kubernetes Job, ``> train.log``) or on a pseudo-terminal,
on a tiny synthetic dataset made once per module.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import pytest

from recsys.core.logs import JsonFormatter, Throttle, configure_logging

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 2
TINY = ["--device", "cpu", "--set", f"train.epochs={EPOCHS}", "--set", "train.patience=0", "--set", "model.dim=8",
        "--set", "model.embedding_dim=8", "--set", "train.batch_size=64"]


def recsys(*argv: str, tty: bool = False, timeout: float = 300) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``python -m recsys ARGV``; stderr on a pipe, or on a pseudo-terminal."""
    cmd = [sys.executable, "-m", "recsys", *argv]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if not tty:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)
        return p.returncode, p.stdout, p.stderr
    master, slave = pty.openpty()
    # a new pty is 0 columns wide, and tqdm trims its bar to the width: make it a usual 120 x 40 terminal
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:  # a pty's buffer is small: read while the command runs
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=slave, text=True, timeout=timeout, cwd=ROOT, env=env)
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    return p.returncode, p.stdout, b"".join(chunks).decode(errors="replace")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    from recsys.cli import main

    root = tmp_path_factory.mktemp("logs")
    assert main(["synth", "--out", str(root / "synth"), "--events", "6000", "--users", "150", "--items", "60"]) == 0
    assert main(["prepare", "--logs", str(root / "synth" / "logs"), "--out", str(root / "data")]) == 0
    return root / "data"


def json_lines(stderr: str) -> list[dict]:
    lines = stderr.splitlines()
    assert lines, "no log lines"
    out = []
    for line in lines:
        rec = json.loads(line)  # every stderr line is one JSON object
        assert {"ts", "level", "logger", "msg"} <= rec.keys(), rec
        out.append(rec)
    return out


def test_train_without_a_terminal_logs_lines_not_bar_redraws(prepared, tmp_path):
    rc, _, err = recsys("train", "--data", str(prepared), "--out", str(tmp_path / "run"), *TINY)
    assert rc == 0, err
    assert "\r" not in err and "\x1b[" not in err
    train_lines = [line for line in err.splitlines() if " recsys.train.loop: " in line]
    epochs = [line for line in train_lines if "epoch=" in line]
    # one line per epoch of each phase (fit + final refit); nothing per step (default --progress-every: 30 s)
    assert 1 <= len(epochs) <= 2 * EPOCHS and len(train_lines) <= 2 * EPOCHS + 3, err
    assert len(err.splitlines()) <= 2 * EPOCHS + 6, err


def test_train_on_a_terminal_keeps_the_progress_bar(prepared, tmp_path):
    rc, _, err = recsys("train", "--data", str(prepared), "--out", str(tmp_path / "run"), *TINY, tty=True)
    assert rc == 0, err
    assert "fit epoch 1/" in err and "batch/s" in err  # the tqdm bar (log lines say "phase=fit epoch=1")


def test_json_logs_and_a_throttled_progress_line_per_long_epoch(prepared, tmp_path):
    # --progress-every 0.001: every checked step is "due", so the progress line shows up even on tiny data
    rc, out, err = recsys("--log-format", "json", "train", "--data", str(prepared), "--out", str(tmp_path / "run"),
                          *TINY, "--progress-every", "0.001")
    assert rc == 0, err
    recs = json_lines(err)
    assert {r["level"] for r in recs} <= {"DEBUG", "INFO", "WARNING"}
    progress = [r for r in recs if r["logger"] == "recsys.train.loop" and ": batch " in r["msg"]]
    assert progress and all("loss=" in r["msg"] and "examples_per_s=" in r["msg"] for r in progress)
    assert all(r["phase"] in ("fit", "refit") and 1 <= r["batch"] <= r["batches"] for r in progress)
    epochs = [r for r in recs if r["logger"] == "recsys.train.loop" and "epoch=" in r["msg"]]
    assert epochs and all({"phase", "epoch", "loss", "seconds"} <= r.keys() for r in epochs)  # fields, not only text
    assert json.loads(out)["status"] == "done"  # stdout stays the command's result


@pytest.mark.parametrize("where", ["before", "after"])
def test_json_error_is_one_json_line(tmp_path, where):
    args = ["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]
    argv = ["--log-format", "json", *args] if where == "before" else [*args, "--log-format", "json"]
    rc, _, err = recsys(*argv)
    assert rc == 2
    (rec,) = json_lines(err)
    assert rec["level"] == "ERROR" and str(tmp_path / "missing") in rec["msg"] and rec["error"]


def test_every_command_accepts_the_log_options():
    from recsys.cli import build_parser

    parser = build_parser()
    for argv in (["synth", "--out", "x"], ["prepare", "--logs", "x", "--out", "y"], ["train", "--data", "x", "--out",
                 "y"], ["export", "--run", "x", "--models", "y"], ["evaluate", "--bundle", "x", "--data", "y",
                 "--report", "z"], ["retrain", "--logs", "x", "--models", "y"], ["demo"], ["models", "list", "--models",
                 "x"], ["serve", "--models", "x"], ["query", "info"]):
        progress = [] if argv[0] in ("serve", "query", "models") else ["--progress-every", "5"]
        args = parser.parse_args([*argv, "--log-format", "json", *progress])
        assert (args.log_format, getattr(args, "progress_every", 5.0)) == ("json", 5.0), argv
        args = parser.parse_args(["--log-format", "json", *argv])
        assert args.log_format == "json", argv
        assert getattr(parser.parse_args(argv), "log_format", None) is None  # main() applies the command's default
    from recsys.cli import _log_format_default

    assert _log_format_default("serve") == "json" and _log_format_default("train") == "text"


def test_json_formatter_fields_and_extras():
    rec = logging.LogRecord("recsys.x", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    rec.request_id = "r-1"
    out = json.loads(JsonFormatter().format(rec))
    assert out["level"] == "WARNING" and out["logger"] == "recsys.x" and out["msg"] == "hello world"
    assert out["request_id"] == "r-1" and out["ts"].endswith("Z")


def test_configure_logging_keeps_an_embedding_programs_handlers():
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    foreign = logging.NullHandler()
    try:
        root.addHandler(foreign)
        configure_logging("json", replace=False)
        configure_logging("text", replace=False)  # swaps its own handler, never stacks a second one
        ours = [h for h in root.handlers if h is not foreign and h not in saved]
        assert foreign in root.handlers and len(ours) == 1
        assert ours[0].stream is sys.stderr  # the stderr of the moment, not of the call (pytest swaps it)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
        logging.captureWarnings(False)


def test_server_logs_reexports_the_one_formatter():
    import server.logs

    assert server.logs.JsonFormatter is JsonFormatter


def test_throttle(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("recsys.core.logs.time.monotonic", lambda: now[0])
    t = Throttle(10)
    assert not t.due()
    now[0] = 109.9
    assert not t.due()
    now[0] = 110.0
    assert t.due() and not t.due()
    now[0] = 125.0
    assert t.due()
    now[0] = 1e9
    assert not Throttle(0).due() and not Throttle(10, enabled=False).due()
