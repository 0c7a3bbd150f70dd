"""The fused Triton in-batch softmax equals the torch one: hand-worked values, every option, gradients, shards.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set here before triton is imported),
which executes the same kernel code with NumPy: what is checked is the kernels' arithmetic, masking and tiling
(ragged last tiles, column/row splits). With a GPU and no TRITON_INTERPRET the same tests run the compiled kernels
(float32 operands with exact products, so the same tolerances hold).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from test_losses import _random_case  # noqa: E402 - float64 cases with many duplicate ids

from recsys.train.kernels import fused_loss  # noqa: E402 - after TRITON_INTERPRET is set
from recsys.train.kernels.fused_loss import KernelConfig, in_batch_softmax_fused  # noqa: E402
from recsys.train.losses import in_batch_softmax, in_batch_softmax_shard  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() and not fused_loss.INTERPRET else "cpu")
# 16-row tiles and 3-way splits: several tiles in each direction, ragged last tiles, partial-sum combines
TINY = KernelConfig(fwd_block_m=16, fwd_block_n=16, dq_block_m=16, dq_block_n=16, dc_block_m=16, dc_block_n=16,
                    splits=3)  # fmt: skip
CONFIGS = [KernelConfig(), TINY]
CONFIG_IDS = ["default-tiles", "tiny-tiles-3-splits"]


def _f32(case: dict) -> dict:
    """The float32 leaves the fused loss gets, on DEVICE, for a float64 reference case."""
    out = {}
    for k, v in case.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().to(DEVICE, torch.float32 if v.dtype.is_floating_point else v.dtype)
            out[k] = v.requires_grad_() if case[k].requires_grad else v
        else:
            out[k] = v
    return out


def _assert_same(got_loss, got_grads, ref_loss, ref_grads, names, rtol=2e-5):
    """float32 against a float64 reference: each element within rtol of itself or of the tensor's largest one
    or within a floor (rtol nats for the loss, 1e-6 for gradients): a near-certain row makes ``lse - logit`` and
    ``softmax - 1`` cancel to tiny float32 differences."""
    pairs = [("loss", ref_loss.detach(), got_loss)] + list(zip(names, ref_grads, got_grads, strict=True))
    for name, a, b in pairs:
        a = a.double()
        atol = rtol * float(a.abs().max()) if a.numel() else 0.0
        atol = max(atol, rtol if name == "loss" else 1e-6)
        torch.testing.assert_close(b.double().cpu(), a, rtol=rtol, atol=atol, msg=f"{name}")


def test_two_by_two_hand_worked():
    # all_pair_scores = [[1, 2], [2, 3]] @ [[0, 3], [1, 1]].T = [[6, 3], [9, 5]]
    q = torch.tensor([[1.0, 2.0], [2.0, 3.0]], device=DEVICE)
    c = torch.tensor([[0.0, 3.0], [1.0, 1.0]], device=DEVICE)
    per_row = in_batch_softmax_fused(q, c, temperature=1.0, reduction="none")
    # row 0: log(e^6 + e^3) - 6 = log(1 + e^-3); row 1: log(e^9 + e^5) - 5 = log(1 + e^4)
    assert per_row.tolist() == pytest.approx([math.log1p(math.exp(-3)), math.log1p(math.exp(4))], rel=1e-6)
    # temperature 0.5 doubles every logit; item 7 twice: row 1's negative (column 0) is masked, row 0's too
    assert in_batch_softmax_fused(q, c, temperature=0.5).item() == pytest.approx(
        (math.log1p(math.exp(-6)) + math.log1p(math.exp(8))) / 2, rel=1e-6)  # fmt: skip
    masked = in_batch_softmax_fused(q, c, temperature=1.0, item_ids=torch.tensor([7, 7], device=DEVICE))
    assert masked.item() == 0.0


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("correct_positive", [True, False])
def test_equals_torch_values_and_gradients_with_every_option(config, correct_positive):
    case = _random_case(3, b=200, m=30, d=64)  # 4 row tiles of 64 (the last ragged), 230 columns
    grads = ["q", "c", "temperature", "log_q", "extra_c", "extra_log_q"]
    ref = in_batch_softmax(**case, correct_positive=correct_positive)  # float64
    ref_grads = torch.autograd.grad(ref, [case[k] for k in grads])
    f = _f32(case)
    got = in_batch_softmax_fused(**f, correct_positive=correct_positive, config=config)
    got_grads = torch.autograd.grad(got, [f[k] for k in grads])
    _assert_same(got, got_grads, ref, ref_grads, grads)


@pytest.mark.parametrize(
    "drop",
    [("extra_item_ids",), ("item_ids", "extra_item_ids"), ("log_q", "extra_log_q"), ("user_ids",),
     ("extra_c", "extra_item_ids", "extra_log_q"), ("item_ids", "user_ids", "log_q", "extra_c", "extra_item_ids",
                                                    "extra_log_q", "weights")],
)  # fmt: skip
def test_equals_torch_with_option_subsets(drop):
    case = _random_case(6, b=29, m=5, d=9)
    for k in drop:
        case[k] = None
    grads = [k for k in ("q", "c", "temperature", "log_q", "extra_c") if case[k] is not None]
    ref = in_batch_softmax(**case, reduction="none")
    up = torch.rand(ref.shape, dtype=torch.float64)  # an arbitrary upstream gradient per row
    ref_grads = torch.autograd.grad((ref * up).sum(), [case[k] for k in grads])
    f = _f32(case)
    got = in_batch_softmax_fused(**f, reduction="none", config=TINY)
    got_grads = torch.autograd.grad((got * up.float().to(DEVICE)).sum(), [f[k] for k in grads])
    _assert_same(got, got_grads, ref, ref_grads, grads)


def test_shards_equal_the_whole_batch():
    """Data-parallel: each rank's rows against the global candidates; the shards' sums add up to the batch's."""
    case = _random_case(9, b=40, m=0)
    for k in ("extra_c", "extra_item_ids", "extra_log_q", "weights"):
        case[k] = None
    q = case.pop("q")
    for lo, hi in ((0, 16), (16, 17), (17, 40)):
        ref = in_batch_softmax_shard(q[lo:hi], **case, row_offset=lo, reduction="sum")
        f = _f32({"q": q[lo:hi].detach().requires_grad_(), **case})
        got = in_batch_softmax_fused(**f, row_offset=lo, reduction="sum", config=TINY)
        ref_grads = torch.autograd.grad(ref, [case["c"], case["log_q"]])
        got_grads = torch.autograd.grad(got, [f["c"], f["log_q"]])
        _assert_same(got, got_grads, ref, ref_grads, ["c", "log_q"])


def test_large_logits_stay_finite_and_exact():
    """Temperature 1e-3 on unit vectors: logits up to 1000, where a naive exp overflows (online log-sum-exp)."""
    case = _random_case(4, b=33, m=0, d=8)
    case.update(extra_c=None, extra_item_ids=None, extra_log_q=None, weights=None, temperature=1e-3)
    case["q"] = torch.nn.functional.normalize(case["q"].detach(), dim=1).requires_grad_()
    case["c"] = torch.nn.functional.normalize(case["c"].detach(), dim=1).requires_grad_()
    ref = in_batch_softmax(**case)
    ref_grads = torch.autograd.grad(ref, [case["q"], case["c"]])
    f = _f32(case)
    got = in_batch_softmax_fused(**f, config=TINY)
    got_grads = torch.autograd.grad(got, [f["q"], f["c"]])
    assert math.isfinite(got.item()) and ref.item() > 10
    # float32 scores times 1000: relative agreement of ~1e-4 is what the operands allow
    _assert_same(got, got_grads, ref, ref_grads, ["q", "c"], rtol=2e-4)


def test_a_batch_of_one_item_masks_every_negative():
    b = 21
    q = torch.randn(b, 8, device=DEVICE, requires_grad=True)
    c = torch.randn(b, 8, device=DEVICE, requires_grad=True)
    loss = in_batch_softmax_fused(q, c, temperature=0.1, item_ids=torch.zeros(b, dtype=torch.long, device=DEVICE),
                                  config=TINY)  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0  # only the positive is left in each row: log(e^x) - x
    assert q.grad.abs().max().item() == 0.0 and c.grad.abs().max().item() == 0.0


@settings(max_examples=15, deadline=None)
@given(
    b=st.integers(1, 40),
    m=st.integers(0, 9),
    n_ids=st.integers(1, 6),
    use=st.tuples(st.booleans(), st.booleans(), st.booleans(), st.booleans()),
    seed=st.integers(0, 2**16),
)
def test_equals_torch_property(b, m, n_ids, use, seed):
    use_items, use_users, use_logq, correct_positive = use
    g = torch.Generator().manual_seed(seed)
    kw = dict(generator=g, dtype=torch.float64)
    case = dict(q=torch.randn(b, 5, **kw).requires_grad_(), c=torch.randn(b, 5, **kw).requires_grad_(),
                temperature=0.5)  # fmt: skip
    if use_items:
        case["item_ids"] = torch.randint(0, n_ids, (b,), generator=g)
    if use_users:
        case["user_ids"] = torch.randint(0, n_ids, (b,), generator=g)
    if use_logq:
        case["log_q"] = -3 * torch.rand(b, **kw)
    if m:
        case["extra_c"] = torch.randn(m, 5, **kw).requires_grad_()
        if use_items:
            case["extra_item_ids"] = torch.randint(0, n_ids, (m,), generator=g)
        if use_logq:
            case["extra_log_q"] = -3 * torch.rand(m, **kw)
    leaves = ["q", "c"] + (["extra_c"] if m else [])
    ref = in_batch_softmax(**case, correct_positive=correct_positive, reduction="sum")
    ref_grads = torch.autograd.grad(ref, [case[k] for k in leaves])
    f = _f32(case)
    got = in_batch_softmax_fused(**f, correct_positive=correct_positive, reduction="sum", config=TINY)
    got_grads = torch.autograd.grad(got, [f[k] for k in leaves])
    _assert_same(got, got_grads, ref, ref_grads, leaves)


def test_errors_and_support():
    q = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"`row_offset` must be an int in \[0, 2\] \(B=4, b=2\), got 3"):
        in_batch_softmax_fused(q[:2], q, temperature=1.0, row_offset=3)
    with pytest.raises(ValueError, match=r"`q` must have shape \[b >= 1, 4\], got \[4, 8\]"):
        in_batch_softmax_fused(q, q[:, :4], temperature=1.0)
    with pytest.raises(ValueError, match="float32/bfloat16/float16 towers, got torch.float64"):
        in_batch_softmax_fused(q.double(), q.double(), temperature=1.0)
    assert fused_loss.supported(300, DEVICE) == "embedding width 300 is over the fused kernels' 256"
    assert fused_loss.supported(128, DEVICE) is None
    # float32 on CPU; under CUDA's bf16 autocast the two paths round the scores differently
    assert fused_loss.self_check(DEVICE, dim=16, extra=8, mask_users=True) < (1e-5 if DEVICE.type == "cpu" else 2e-2)


# ------------------------------------------------------------------------------------------------ in the trainer
def _trainer_cfgs(user_tower="pool", **train_over):
    from recsys.train.config import LossConfig, ModelConfig, TrainConfig

    # no dropout: two trainers must draw nothing at random inside the step to be compared
    model = ModelConfig(dim=16, embedding_dim=16, history_len=8, dropout=0.0, user_id_dropout=0.0, item_id_dropout=0.0,
                        user_tower=user_tower)  # fmt: skip
    opts = {"batch_size": 64, "lr": 0.01, "epochs": 3, "progress": False, "tensorboard": False, "patience": 0,
            "refit": False}
    return model, TrainConfig(**{**opts, **train_over}), LossConfig(temperature=0.1, n_uniform_negatives=16)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from test_train import make_clustered

    return make_clustered(tmp_path_factory.mktemp("clustered") / "prepared")


@pytest.mark.parametrize("user_tower", ["pool", "transformer"])
def test_trainer_steps_with_fused_kernels_equal_the_torch_loss(data_dir, monkeypatch, user_tower):
    """Two optimizer steps (mixed negatives, logQ, both masks, sparse row-wise Adagrad): same losses, same weights.
    The transformer's steps are windows whose real positions (P, not a multiple of the kernels' blocks) are the
    queries."""
    from recsys.core.data import load_prepared
    from recsys.train.loop import Trainer

    calls = []
    fused = fused_loss.in_batch_softmax_fused
    monkeypatch.setattr(fused_loss, "in_batch_softmax_fused", lambda *a, **k: calls.append(1) or fused(*a, **k))
    data = load_prepared(data_dir)
    runs = {}
    for kernel in ("torch", "triton"):
        m, t, lc = _trainer_cfgs(user_tower, loss_kernel=kernel, sparse_embeddings=True,
                                 sparse_optimizer="rowwise_adagrad")  # fmt: skip
        trainer = Trainer(data, model_cfg=m, train_cfg=t, loss_cfg=lc, device=DEVICE)
        calls.clear()  # after the self-check
        assert trainer.loss_kernel == kernel
        trainer.set_interactions(data.train)
        perm = torch.randperm(trainer.n_examples, generator=torch.Generator().manual_seed(1))
        size = 64 if user_tower == "pool" else 9  # 9 windows: 9 x ~7 real positions
        losses_ = [float(trainer.step(perm[a : a + size].to(DEVICE))) for a in (0, size)]
        runs[kernel] = (losses_, {k: v.detach().cpu().clone() for k, v in trainer.model.state_dict().items()})
        assert len(calls) == (2 if kernel == "triton" else 0)  # the trainer's steps, not only its self-check
    # float32 on CPU; on CUDA the trainer's bf16 autocast rounds the two paths' scores differently
    rel, atol = (1e-5, 1e-5) if DEVICE.type == "cpu" else (5e-3, 2e-3)
    assert runs["triton"][0] == pytest.approx(runs["torch"][0], rel=rel)
    for k, v in runs["torch"][1].items():
        got = runs["triton"][1][k]
        if k.endswith("qkv.bias"):
            # the key bias adds a constant to each query's attention logits, which the softmax ignores: its gradient
            # is rounding noise, which Adam scales to lr-sized steps; compare the query and value thirds
            got, v = got.view(3, -1)[[0, 2]], v.view(3, -1)[[0, 2]]
        torch.testing.assert_close(got, v, rtol=10 * rel, atol=atol, msg=k)


def test_choose_loss_kernel_falls_back_or_refuses(monkeypatch, caplog):
    from recsys.train.config import LossConfig, TrainConfig
    from recsys.train.loop import choose_loss_kernel

    lc = LossConfig()
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert choose_loss_kernel(TrainConfig(loss_kernel="auto"), lc, dim=64, device=cpu) == "torch"
    assert choose_loss_kernel(TrainConfig(loss_kernel="torch"), lc, dim=64, device=cuda) == "torch"
    with pytest.raises(ValueError, match="`train.loss_kernel` = 'triton' cannot run here: embedding width 512"):
        choose_loss_kernel(TrainConfig(loss_kernel="triton"), lc, dim=512, device=DEVICE)
    # on a GPU where the kernels fail to build, or compute something else, "auto" warns and keeps training
    monkeypatch.setattr(fused_loss, "supported", lambda dim, device: None)

    def broken(*a, **k):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(fused_loss, "self_check", broken)
    with caplog.at_level("WARNING", logger="recsys.train.loop"):
        assert choose_loss_kernel(TrainConfig(loss_kernel="auto"), lc, dim=64, device=cuda) == "torch"
    assert "failed their self-check (RuntimeError: PassManager::run failed)" in caplog.text
    with pytest.raises(RuntimeError, match="PassManager"):
        choose_loss_kernel(TrainConfig(loss_kernel="triton"), lc, dim=64, device=cuda)
    monkeypatch.setattr(fused_loss, "self_check", lambda *a, **k: 0.5)
    assert choose_loss_kernel(TrainConfig(loss_kernel="auto"), lc, dim=64, device=cuda) == "torch"
    assert "disagree with the torch loss (relative error 0.5 > 0.02)" in caplog.text
    monkeypatch.setattr(fused_loss, "self_check", lambda *a, **k: 0.001)
    assert choose_loss_kernel(TrainConfig(loss_kernel="auto"), lc, dim=64, device=cuda) == "triton"
    with pytest.raises(ValueError, match="`train.loss_kernel` must be 'auto', 'torch' or 'triton', got 'cuda'"):
        TrainConfig(loss_kernel="cuda").validate()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="compiled kernels need a CUDA GPU")
def test_cuda_fused_trainer_under_bf16_and_quality_band(data_dir, tmp_path):
    from recsys.core.data import load_prepared
    from recsys.train.loop import Trainer, train

    data = load_prepared(data_dir)
    rows = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(1))[:256].cuda()
    out = {}
    for kernel in ("torch", "triton"):
        m, t, lc = _trainer_cfgs(loss_kernel=kernel, batch_size=256)
        trainer = Trainer(data, model_cfg=m, train_cfg=t, loss_cfg=lc, device=DEVICE)
        trainer.set_interactions(data.train)
        loss = trainer.loss(rows)
        loss.backward()
        out[kernel] = (float(loss.detach()), {k: p.grad.detach().clone() for k, p in trainer.model.named_parameters()
                                              if p.grad is not None})  # fmt: skip
    assert out["triton"][0] == pytest.approx(out["torch"][0], rel=2e-3)  # bf16 scores round differently
    for k, a in out["torch"][1].items():
        b = out["triton"][1][k]
        assert float((a - b).norm()) <= 0.02 * float(a.norm()) + 1e-6, k
    m, t, lc = _trainer_cfgs(epochs=8, sparse_embeddings=True, sparse_optimizer="rowwise_adagrad", embedding_lr=0.1)
    s = train(data_dir, tmp_path / "run", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cuda")
    assert s["status"] == "done" and s["loss_kernel"] == "triton"
    assert s["best_metrics"]["recall@20"] >= 0.9, s["best_metrics"]


def test_kernels_compile_for_hopper_without_spills():
    """Ahead-of-time compile for an H100 (sm_90) with Triton's own LLVM + ptxas, no GPU needed: every kernel builds
    (bf16 as training runs them, float32 with every option as these tests run them), and the training build runs
    its products on the tensor cores, loads 16 bytes at a time and keeps everything in registers (cuobjdump). Runs in a subprocess: the kernels here are interpreter objects."""
    import json
    import subprocess
    import sys

    script = (
        "import json\n"
        "from recsys.train.kernels.fused_loss import compile_report\n"
        "print(json.dumps({'bf16': compile_report(), 'bf16_256': compile_report(dim=256), "
        "'fp32_all': compile_report(dtype='fp32', NEED_T=True, NEED_BIAS=True, MASK_EXTRA=True, CORRECT_POS=True)}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["name"] for r in rep["bf16"]] == ["forward", "dq", "dc"] == [r["name"] for r in rep["fp32_all"]]
    for r in rep["bf16"] + rep["bf16_256"]:  # the default tiles of d = 128 and of d = 256
        # tensor cores (wgmma, or mma for the 32-row tiles of d = 256), 16-byte / async loads, no local memory
        assert r["HGMMA"] + r["HMMA"] > 0 and r["LDG.E.U16"] == 0 and r["STL"] == r["LDL"] == 0, r
        assert r["stack"] == 0 and 0 < r["regs"] <= 255 and r["shared"] <= 228 * 1024, r
    assert all(r["HGMMA"] > 0 for r in rep["bf16"]), rep["bf16"]  # d = 128: Hopper's wgmma throughout
