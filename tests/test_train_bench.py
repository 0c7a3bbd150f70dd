"""benchmarks/train_bench.py at a tiny size on CPU: table and JSON shape, and numbers that measure something: the
rows actually stepped, timings consistent with each other, weights moved by the timed steps."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "train_bench.py"


def test_train_bench_tiny_cpu(tmp_path):
    out = tmp_path / "train_bench.json"
    # a fresh interpreter: the bench records whether the training path pulled in polars/hnswlib, which only means
    # something when no other test has imported them into this process first
    proc = subprocess.run([
        sys.executable, str(BENCH),
        "--device", "cpu", "--n-users", "300", "--n-items", "200", "--n-interactions", "4000", "--dim", "16",
        "--history-len", "5", "--batch-sizes", "64", "256", "--steps", "2", "--warmup", "1", "--threads", "1",
        "--chunk", "32", "--out", str(out),
    ], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
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
        # what was measured: the whole generated table on the device, 2 timed steps of a full batch each
        assert r["n_interactions"] == 4000, r
        assert r["rows_timed"] == 2 * r["batch"], r
        # the numbers agree with each other: throughput = timed rows / wall, step time = median of the 2 steps,
        # and on CPU (no sync between steps) the wall time holds the 2 steps and little else
        steps = r["step_s"]
        assert len(steps) == 2 and min(steps) > 0, r
        assert r["interactions_per_s"] == pytest.approx(r["rows_timed"] / r["wall_s"], rel=1e-9)
        assert r["step_ms"] == pytest.approx(1e3 * sum(steps) / 2, rel=1e-9)
        assert sum(steps) <= r["wall_s"] <= sum(steps) + 0.1, r
        # and the timed steps trained: the weights moved
        assert r["weight_norm_change"] > 1e-6, r
    # the history+features towers have more parameters than the ID-only ones
    assert rows[1]["n_parameters"] > rows[0]["n_parameters"]
    table = proc.stdout
    assert table.splitlines()[0].split()[:6] == ["impl", "towers", "softmax", "pool", "batch", "step"]
    # "auto" on CPU: the torch softmax and pooling (the fused kernels are CUDA-only outside Triton's interpreter)
    assert {r["loss_kernel"] for r in rows if r["impl"] == "ours"} == {"torch"}
    assert {r["history_kernel"] for r in rows if r["impl"] == "ours"} == {"torch"}
    assert sum(line.startswith(("ours", "reference")) for line in table.splitlines()) == 6
