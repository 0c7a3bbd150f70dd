"""benchmarks/train_bench.py at a tiny size on CPU: table and JSON shape, finite positive numbers for our path."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import torch

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_bench.py"


def _load():
    spec = importlib.util.spec_from_file_location("train_bench", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_train_bench_tiny_cpu(tmp_path, capsys):
    out = tmp_path / "train_bench.json"
    rc = _load().main([
        "--device", "cpu", "--n-users", "300", "--n-items", "200", "--n-interactions", "4000", "--dim", "16",
        "--history-len", "5", "--batch-sizes", "64", "256", "--steps", "2", "--warmup", "1", "--threads", "1",
        "--chunk", "32", "--out", str(out),
    ])  # fmt: skip
    assert rc == 0
    res = json.loads(out.read_text())
    assert res["device"] == "cpu" and res["torch"] == torch.__version__
    assert res["imported_polars"] is False and res["imported_hnswlib"] is False
    rows = res["results"]
    # per batch size: ours x 2 tower kinds, then the reference
    assert [(r["impl"], r["towers"], r["batch"]) for r in rows] == [
        ("ours", "id_only", 64), ("ours", "history_features", 64), ("reference", "id_only", 64),
        ("ours", "id_only", 256), ("ours", "history_features", 256), ("reference", "id_only", 256),
    ]  # fmt: skip
    for r in rows:
        assert r["status"] == "ok"
        for k in ("step_ms", "interactions_per_s", "final_loss"):
            assert math.isfinite(r[k]) and r[k] > 0, (r, k)
        assert r["peak_mem_mib"] is None  # CPU: not measured
    # the history+features towers have more parameters than the ID-only ones
    assert rows[1]["n_parameters"] > rows[0]["n_parameters"]
    table = capsys.readouterr().out
    assert table.splitlines()[0].split()[:4] == ["impl", "towers", "batch", "step"]
    assert sum(line.startswith(("ours", "reference")) for line in table.splitlines()) == 6
