"""The fused history lookup + attention pooling equals the torch path: output and every gradient, sparse and dense.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before triton is imported): the
same kernel code with NumPy, float32 products. With a GPU the same tests run the compiled kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from recsys.train.config import ModelConfig, TrainConfig  # noqa: E402
from recsys.train.kernels import fused_pool  # noqa: E402 - after TRITON_INTERPRET is set
from recsys.train.model import AttentionPool

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not fused_pool.INTERPRET else "cpu")


def _problem(b: int, n: int, e: int, v: int, *, sparse: bool, seed: int = 0):
    """A float64 torch pooling and table, the same weights in float32 for the kernels, ragged histories: row 0
    empty, row 1 one item, row 2 full of one repeated item, the rest random lengths (right-aligned, -1 = pad)."""
    g = torch.Generator().manual_seed(seed)
    pool = AttentionPool(e, n)
    with torch.no_grad():
        for p in pool.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.4)
    table = torch.nn.Embedding(v, e, sparse=sparse)
    with torch.no_grad():
        table.weight.copy_(torch.randn(v, e, generator=g) * 0.3)
    hist = torch.randint(0, v, (b, n), generator=g)
    lengths = torch.randint(0, n + 1, (b,), generator=g)
    lengths[:3] = torch.tensor([0, 1, n])
    hist[2] = hist[2, 0]
    hist = torch.where(torch.arange(n)[None, :] >= n - lengths[:, None], hist, -1)
    ref_pool, ref_table = AttentionPool(e, n).double(), torch.nn.Embedding(v, e, sparse=sparse).double()
    ref_pool.load_state_dict(pool.state_dict())
    ref_table.load_state_dict(table.state_dict())
    probe = torch.randn(b, e, generator=g, dtype=torch.float64)
    return pool.to(DEVICE), table.to(DEVICE), hist.to(DEVICE), ref_pool, ref_table, hist, probe


def _grads(pool, table, out, probe):
    (out.double() * probe.to(out.device)).sum().backward()
    d_table = table.weight.grad
    if d_table.is_sparse:
        d_table = d_table.to_dense()
    return {"out": out.detach(), "table": d_table, "key.weight": pool.key.weight.grad, "key.bias": pool.key.bias.grad,
            "query": pool.query.grad, "recency": pool.recency.weight.grad}  # fmt: skip


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize(("b", "n", "e", "v"), [(9, 7, 24, 30), (4, 1, 16, 5), (70, 20, 32, 40)])
def test_matches_torch_pooling(sparse, b, n, e, v):
    """Widths and lengths that are not powers of two, a 1-item history, repeated rows, several users per program."""
    pool, table, hist, ref_pool, ref_table, ref_hist, probe = _problem(b, n, e, v, sparse=sparse)
    got = _grads(pool, table, fused_pool.attention_pool(table, hist, pool), probe)
    want = _grads(ref_pool, ref_table, ref_pool(ref_table(ref_hist.clamp(min=0)), ref_hist >= 0), probe)
    assert table.weight.grad.is_sparse == sparse
    for k, w in want.items():
        torch.testing.assert_close(got[k].double().cpu(), w, rtol=2e-5, atol=2e-6, msg=k)
    assert float(got["out"][0].abs().max()) == 0.0  # the empty history pools to zeros


def test_hand_worked_uniform_attention():
    """Key weights and bias 0: every score is 0, so each user's valid rows get equal weight: the output is their mean
    and each valid row's gradient is g / count; padded positions (table row 0) get nothing."""
    e = 16
    pool = AttentionPool(e, 4).to(DEVICE)
    with torch.no_grad():
        pool.key.weight.zero_()
        pool.key.bias.zero_()
        pool.query.fill_(1.0)
    table = torch.nn.Embedding(6, e).to(DEVICE)
    with torch.no_grad():
        table.weight.copy_(torch.arange(6 * e, dtype=torch.float32).reshape(6, e))
    hist = torch.tensor([[-1, -1, 2, 4], [1, 1, 1, 3]], device=DEVICE)
    out = fused_pool.attention_pool(table, hist, pool)
    w = table.weight.detach()
    torch.testing.assert_close(out[0], (w[2] + w[4]) / 2)
    torch.testing.assert_close(out[1], (3 * w[1] + w[3]) / 4)
    g = torch.stack([torch.ones(e), 2 * torch.ones(e)]).to(DEVICE)
    (out * g).sum().backward()
    d = table.weight.grad
    torch.testing.assert_close(d[2], g[0] / 2)  # user 0: two valid rows
    torch.testing.assert_close(d[4], g[0] / 2)
    torch.testing.assert_close(d[1], 3 * g[1] / 4)  # user 1: row 1 three times out of four
    torch.testing.assert_close(d[3], g[1] / 4)
    assert float(d[0].abs().max()) == 0.0 and float(d[5].abs().max()) == 0.0


def test_model_fuses_in_training_mode_only(monkeypatch):
    from recsys.train.config import FeatureSpec
    from recsys.train.model import TwoTower

    calls = []
    real = fused_pool.attention_pool
    monkeypatch.setattr(fused_pool, "attention_pool", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    model = TwoTower(FeatureSpec(n_users=5, n_items=9), ModelConfig(dim=16, embedding_dim=16, history_len=4,
                                                                     dropout=0.0, user_id_dropout=0.0)).to(DEVICE)
    with torch.no_grad():
        model.pool.query.normal_()
    users = torch.tensor([0, 1, -1], device=DEVICE)
    hist = torch.tensor([[-1, 2, 3, 4], [5, 5, 6, 7], [-1, -1, -1, 8]], device=DEVICE)
    model.train()
    want = model.encode_users(users, hist)
    model.pool.kernel = "triton"
    got = model.encode_users(users, hist)
    assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    model.eval()  # validation and serving: the torch path, whatever the trainer chose
    model.encode_users(users, hist)
    assert len(calls) == 1


def test_trainer_steps_with_fused_pooling_equal_torch(monkeypatch):
    """Two optimizer steps of the trainer (shared item table with sparse row-wise Adagrad, last-item input): the same
    losses and weights with the fused pooling as with the torch one."""
    from test_fused_loss import _trainer_cfgs
    from test_train import make_clustered

    from recsys.core.data import load_prepared
    from recsys.train.loop import Trainer

    calls = []
    real = fused_pool.attention_pool
    monkeypatch.setattr(fused_pool, "attention_pool", lambda *a, **k: calls.append(1) or real(*a, **k))
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        data = load_prepared(make_clustered(Path(tmp) / "prepared"))
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(1))
    runs = {}
    for kernel in ("torch", "triton"):
        m, t, lc = _trainer_cfgs(history_kernel=kernel, loss_kernel="torch", sparse_embeddings=True,
                                 sparse_optimizer="rowwise_adagrad")  # fmt: skip
        trainer = Trainer(data, model_cfg=m, train_cfg=t, loss_cfg=lc, device=DEVICE)
        assert trainer.history_kernel == kernel
        calls.clear()  # after the self-check
        trainer.set_interactions(data.train)
        losses_ = [float(trainer.step(perm[a : a + 64].to(DEVICE))) for a in (0, 64)]
        runs[kernel] = (losses_, {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()})
        assert len(calls) == (2 if kernel == "triton" else 0)
    rel, atol = (1e-5, 1e-5) if DEVICE.type == "cpu" else (5e-3, 2e-3)
    assert runs["triton"][0] == pytest.approx(runs["torch"][0], rel=rel)
    for k, v in runs["torch"][1].items():
        torch.testing.assert_close(runs["triton"][1][k], v, rtol=10 * rel, atol=atol, msg=k)


def test_choose_history_kernel(monkeypatch, caplog):
    from recsys.train.loop import choose_history_kernel

    cuda = torch.device("cuda")  # the choice's logic only: self_check and timings are stand-ins
    m = ModelConfig(embedding_dim=64, history_len=20)
    assert choose_history_kernel(TrainConfig(), m, n_items=100, device=torch.device("cpu")) == "torch"
    assert choose_history_kernel(TrainConfig(history_kernel="torch"), m, n_items=100, device=cuda) == "torch"
    with pytest.raises(ValueError, match="fuses attention pooling; `model.history_pooling` is 'mean'"):
        choose_history_kernel(TrainConfig(history_kernel="triton"), ModelConfig(history_pooling="mean"), n_items=100,
                              device=cuda)  # fmt: skip
    with pytest.raises(ValueError, match="width 256 is over the fused pooling's 128"):
        choose_history_kernel(TrainConfig(history_kernel="triton"), ModelConfig(embedding_dim=256), n_items=100,
                              device=cuda)  # fmt: skip
    with pytest.raises(ValueError, match="over the kernels' 32-bit offsets"):
        choose_history_kernel(TrainConfig(history_kernel="triton", batch_size=2**21), m, n_items=100, device=cuda)
    monkeypatch.setattr(fused_pool, "self_check", lambda *a, **k: 0.001)
    monkeypatch.setattr(fused_pool, "timings", lambda *a, **k: (2.0, 1.0))  # fused slower: not taken
    assert choose_history_kernel(TrainConfig(), m, n_items=100, device=cuda) == "torch"
    monkeypatch.setattr(fused_pool, "timings", lambda *a, **k: (0.5, 1.0))
    assert choose_history_kernel(TrainConfig(), m, n_items=100, device=cuda) == "triton"
    tf = ModelConfig(embedding_dim=64, history_len=20, user_tower="transformer")  # no pooling: torch, even if faster
    assert choose_history_kernel(TrainConfig(), tf, n_items=100, device=cuda) == "torch"
    with pytest.raises(ValueError, match="`model.user_tower` is 'transformer'"):
        choose_history_kernel(TrainConfig(history_kernel="triton"), tf, n_items=100, device=cuda)
    monkeypatch.setattr(fused_pool, "self_check", lambda *a, **k: 0.5)
    assert choose_history_kernel(TrainConfig(), m, n_items=100, device=cuda) == "torch"
    assert "kernels disagree with the torch path (relative error 0.5 > 0.02)" in caplog.text
    with pytest.raises(RuntimeError, match="disagree with the torch path"):
        choose_history_kernel(TrainConfig(history_kernel="triton"), m, n_items=100, device=cuda)
    with pytest.raises(ValueError, match="`train.history_kernel` must be 'auto', 'torch' or 'triton', got 'cuda'"):
        TrainConfig(history_kernel="cuda").validate()


def test_timings_measure_both_paths():
    fused_ms, torch_ms = fused_pool.timings(DEVICE, batch=8, history_len=5, dim=16, n_rows=50, sparse=True, reps=1)
    assert fused_ms > 0 and torch_ms > 0


def test_kernels_compile_for_hopper():
    """Ahead-of-time sm_90 compile (Triton's own LLVM + ptxas, no GPU): the forward keeps everything in registers and
    runs its product on wgmma; the backward at most touches a few bytes of local memory at width 128 (none at 64)."""
    import json
    import subprocess
    import sys

    script = ("import json\nfrom recsys.train.kernels.fused_pool import compile_report\n"
              "print(json.dumps({d: compile_report(dim=d) for d in (64, 128)}))\n")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    for dim, (fwd, bwd) in rep.items():
        assert fwd["name"] == "forward" and bwd["name"] == "backward"
        assert fwd["stack"] == 0 and fwd["HGMMA"] > 0 and fwd["LDG.E.U16"] == 0, (dim, fwd)
        assert bwd["HGMMA"] + bwd["HMMA"] > 0 and bwd["stack"] <= (32 if dim == "128" else 0), (dim, bwd)
