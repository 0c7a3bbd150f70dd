"""Row-wise Adagrad's Triton update equals the torch one: hand-worked rows, long repeated segments, tensor rates.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported);
with one, the compiled kernels run on CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch

from recsys.train import optim
from recsys.train.optim import RowWiseAdagrad

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # see tests/test_fused_loss.py
pytest.importorskip("triton")

from recsys.train.kernels import triton_optim  # noqa: E402 - after TRITON_INTERPRET is set
from recsys.train.kernels._triton import INTERPRET  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not INTERPRET else "cpu")


def test_hand_worked_rows():
    """Rows [0, 2, 0] with grads [[1, 1], [2, 0], [1, 3]]: row 0 sums to [2, 4] (G = (4 + 16) / 2 = 10), row 2 is
    [2, 0] (G = 2); row 1 is untouched. w_r -= lr * g_r / sqrt(G_r)."""
    w = torch.zeros(3, 2, device=DEVICE)
    acc = torch.zeros(3, device=DEVICE)
    idx = torch.tensor([0, 2, 0], device=DEVICE)
    vals = torch.tensor([[1.0, 1.0], [2.0, 0.0], [1.0, 3.0]], device=DEVICE)
    triton_optim.rowwise_adagrad_update_(w, acc, idx, vals, lr=0.5, eps=0.0)
    assert acc.tolist() == pytest.approx([10.0, 0.0, 2.0])
    s10, s2 = 10**0.5, 2**0.5
    assert w.tolist() == [pytest.approx([-0.5 * 2 / s10, -0.5 * 4 / s10]), [0.0, 0.0],
                          pytest.approx([-0.5 * 2 / s2, 0.0])]  # fmt: skip


@pytest.mark.parametrize("n,n_rows,e", [(7, 5, 3), (100, 10, 16), (300, 1000, 20), (1000, 3, 8), (33, 1, 1)])
def test_equals_the_torch_update(n, n_rows, e):
    """Random rows with repeats; (1000, 3) and (33, 1) make segments far longer than a 32-entry block, so partial
    sums from several blocks meet in one row; widths that are not powers of two leave masked columns."""
    g = torch.Generator().manual_seed(n)
    idx = torch.randint(0, n_rows, (n,), generator=g).to(DEVICE)
    vals = torch.randn(n, e, generator=g).to(DEVICE)
    w0 = torch.randn(n_rows, e, generator=g).to(DEVICE)
    p = torch.nn.Parameter(w0.clone())
    opt = RowWiseAdagrad([p], lr=0.1, initial_accumulator_value=0.05, fused=False)
    p.grad = torch.sparse_coo_tensor(idx[None], vals, (n_rows, e))
    opt.step()
    w, acc = w0.clone(), torch.full((n_rows,), 0.05, device=DEVICE)
    triton_optim.rowwise_adagrad_update_(w, acc, idx, vals, lr=torch.tensor(0.1, device=DEVICE), eps=1e-8)
    torch.testing.assert_close(w, p.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(acc, opt.state[p]["sum_sq"], rtol=1e-5, atol=1e-6)
    untouched = torch.ones(n_rows, dtype=torch.bool, device=DEVICE)
    untouched[idx] = False
    assert torch.equal(w[untouched], w0[untouched])  # rows absent from the batch are not written


def test_fused_optimizer_steps_equal_the_torch_steps():
    """Three steps through RowWiseAdagrad(fused=True) vs fused=False: the accumulators carry over alike."""
    g = torch.Generator().manual_seed(1)
    w0 = torch.randn(50, 12, generator=g)
    out = []
    for fused in (False, True):
        p = torch.nn.Parameter(w0.clone().to(DEVICE))
        opt = RowWiseAdagrad([p], lr=torch.tensor(0.2, device=DEVICE), fused=fused)
        gen = torch.Generator().manual_seed(2)
        for _ in range(3):
            idx = torch.randint(0, 50, (64,), generator=gen).to(DEVICE)
            p.grad = torch.sparse_coo_tensor(idx[None], torch.randn(64, 12, generator=gen).to(DEVICE), (50, 12))
            opt.step()
        out.append((p.detach().clone(), opt.state[p]["sum_sq"].clone()))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[1][1], out[0][1], rtol=1e-5, atol=1e-6)


def test_self_check_and_choice():
    assert optim.self_check(DEVICE) < 1e-5
    assert optim.choose(torch.device("cpu")) is False  # the torch update on CPU (the kernels need CUDA)
    opt = RowWiseAdagrad([torch.nn.Parameter(torch.zeros(4, 2))])
    assert opt.fused is None  # decided at the first sparse step, from the parameter's device


def test_kernels_compile_for_hopper_without_spills():
    """Ahead-of-time sm_90 build (no GPU needed; see tests/test_fused_loss.py): both kernels compile, use 16-byte
    loads and keep everything in registers."""
    import json
    import subprocess
    import sys

    script = "import json\nfrom recsys.train.kernels.triton_optim import compile_report\nprint(json.dumps(compile_report()))\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["name"] for r in rep] == ["segment_sum", "apply"]
    for r in rep:
        assert r["stack"] == 0 and r["STL"] == r["LDL"] == 0 and r["LDG.E.128"] > 0 and r["LDG.E.U16"] == 0, r
