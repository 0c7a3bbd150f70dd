"""train.cuda_graphs: what can be captured, device learning rates, and (on a GPU) replay == eager training.

The capture itself needs CUDA; on CPU these tests pin everything around it: the refusals, the in-place learning
rates a graph reads, their checkpoint round trip, and that asking for graphs where there are none trains eagerly.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from test_train import make_clustered

from recsys.core.data import load_prepared
from recsys.train.config import LossConfig, ModelConfig, TrainConfig
from recsys.train.distributed import DistContext
from recsys.train.kernels import graphs
from recsys.train.loop import Trainer, train
from recsys.train.optim import RowWiseAdagrad

torch.set_num_threads(1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_clustered(tmp_path_factory.mktemp("clustered") / "prepared")


def _cfgs(**train_over):
    # ID towers only: the categorical feature tables have a padding row, which a sparse capture cannot take
    model = ModelConfig(dim=16, embedding_dim=16, history_len=8, use_item_features=False, use_user_features=False)
    opts = {"batch_size": 64, "lr": 0.01, "epochs": 3, "progress": False, "tensorboard": False, "patience": 0,
            "refit": False, "cuda_graphs": True, "sparse_embeddings": True, "sparse_optimizer": "rowwise_adagrad",
            "embedding_lr": 0.1}  # fmt: skip
    return model, TrainConfig(**{**opts, **train_over}), LossConfig(temperature=0.1)


def test_unsupported_names_the_reason():
    def fake(device="cuda", dist=False, model=None, windows=None, **over):
        m, t, lc = _cfgs()
        tc = TrainConfig(**{**t.__dict__, **{k: v for k, v in over.items() if hasattr(t, k)}})
        lcfg = LossConfig(**{**lc.__dict__, **{k: v for k, v in over.items() if hasattr(lc, k)}})
        return SimpleNamespace(device=torch.device(device), dist=SimpleNamespace(enabled=dist), tcfg=tc, lcfg=lcfg,
                               model=model or torch.nn.Module(), windows=windows)  # fmt: skip

    assert graphs.unsupported(fake()) is None
    assert graphs.unsupported(fake(device="cpu")) == "CUDA graphs need a CUDA device, not cpu"
    assert "single-process only" in graphs.unsupported(fake(dist=True))
    assert "transformer user tower" in graphs.unsupported(fake(windows=torch.zeros(3, 2, dtype=torch.long)))
    assert "MoCo queue" in graphs.unsupported(fake(queue_size=256))
    assert "unique()" in graphs.unsupported(fake(ssl_weight=0.1))
    assert "SparseAdam coalesces" in graphs.unsupported(fake(sparse_optimizer="sparse_adam"))
    feats = torch.nn.Module()
    feats.region = torch.nn.Embedding(5, 4, padding_idx=0, sparse=True)
    assert "the sparse table 'region' has a padding row" in graphs.unsupported(fake(model=feats))
    assert graphs.unsupported(fake(model=feats, sparse_embeddings=False)) is None


def test_rowwise_adagrad_takes_a_tensor_learning_rate():
    """A CUDA graph reads the rate from a tensor: the update must equal the float one, sparse or dense grads."""
    for sparse in (True, False):
        out = []
        for lr in (0.1, torch.tensor(0.1)):
            w = torch.nn.Parameter(torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10)
            opt = RowWiseAdagrad([w], lr=lr)
            for rows in ([0, 2, 0], [1, 2]):
                idx = torch.tensor(rows)
                g = torch.ones(len(rows), 3) * torch.arange(1, len(rows) + 1)[:, None]
                w.grad = torch.sparse_coo_tensor(idx[None], g, (4, 3)) if sparse else \
                    torch.zeros(4, 3).index_add_(0, idx, g)  # fmt: skip
                opt.step()
            out.append(w.detach().clone())
        torch.testing.assert_close(out[1], out[0], rtol=1e-6, atol=1e-7)
        assert not torch.equal(out[0], torch.arange(12, dtype=torch.float32).reshape(4, 3) / 10)


def test_device_learning_rates_update_in_place_and_checkpoint_as_floats(data_dir):
    data = load_prepared(data_dir)
    m, t, lc = _cfgs()
    trainer = Trainer(data, model_cfg=m, train_cfg=t, loss_cfg=lc, device=torch.device("cpu"), dist=DistContext())
    tensors = []
    for opt in trainer.optimizers:  # what GraphedStep does to them
        for g in opt.param_groups:
            g["lr"] = torch.tensor(float(g["lr"]))
            tensors.append(g["lr"])
    trainer.set_lr_factor(0.25)
    groups = [g for opt in trainer.optimizers for g in opt.param_groups]
    assert all(g["lr"] is t for g, t in zip(groups, tensors, strict=True))  # the same tensors, new values
    assert [float(g["lr"]) for g in groups] == pytest.approx([0.25 * g["initial_lr"] for g in groups])
    trainer.set_interactions(data.train)
    trainer.step(torch.arange(64), check=False)  # optimizer state exists
    meta = json.loads(json.dumps(trainer.state_meta()))  # no tensor left in the JSON part
    lrs = [g["lr"] for o in meta["optimizers"] for g in o["param_groups"]]
    assert lrs == pytest.approx([0.25 * g["initial_lr"] for g in groups])
    fresh = Trainer(data, model_cfg=m, train_cfg=t, loss_cfg=lc, device=torch.device("cpu"), dist=DistContext())
    fresh.load_state(trainer.state_tensors(), meta)
    assert [g["lr"] for opt in fresh.optimizers for g in opt.param_groups] == pytest.approx(lrs)


def test_cuda_graphs_on_cpu_warn_and_train_eagerly(data_dir, tmp_path, caplog):
    m, t, lc = _cfgs(epochs=1)
    with caplog.at_level("WARNING", logger="recsys.train.loop"):
        s = train(data_dir, tmp_path / "run", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cpu")
    assert s["status"] == "done" and s["cuda_graphs"] is False
    # the CPU loop checks every step (check=True), so it never asks for a graph: nothing to warn about either
    trainer = Trainer(load_prepared(data_dir), model_cfg=m, train_cfg=t, loss_cfg=lc, device=torch.device("cpu"))
    trainer.set_interactions(load_prepared(data_dir).train)
    with caplog.at_level("WARNING", logger="recsys.train.loop"):
        trainer.step(torch.arange(64), check=False)
    assert trainer.graphs_off == "CUDA graphs need a CUDA device, not cpu"
    assert "train.cuda_graphs is off: CUDA graphs need a CUDA device" in caplog.text


@cuda
def test_cuda_graph_steps_equal_eager_steps_and_learn(data_dir, tmp_path):
    """Ten steps replayed vs ten eager steps from the same seed: the same losses (atomics aside); then a full run
    with graphs reaches the quality band."""
    data = load_prepared(data_dir)
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(3)).cuda()
    losses = {}
    for graphs_on in (False, True):
        m, t, lc = _cfgs(cuda_graphs=graphs_on, lr_schedule="cosine")
        trainer = Trainer(data, model_cfg=m, train_cfg=t, loss_cfg=lc, device=torch.device("cuda"))
        trainer.set_interactions(data.train)
        out = []
        for i in range(10):
            trainer.set_lr_factor(1.0 - i / 10)
            out.append(float(trainer.step(perm[(i % 4) * 64 : (i % 4 + 1) * 64], check=False)))
        losses[graphs_on] = out
        if graphs_on:
            assert trainer.graphs_off is None and trainer.graphed.graph is not None, trainer.graphs_off
    assert losses[True] == pytest.approx(losses[False], rel=1e-3)
    m, t, lc = _cfgs(epochs=8, log_every=2)
    s = train(data_dir, tmp_path / "run", model_cfg=m, train_cfg=t, loss_cfg=lc, device="cuda")
    assert s["status"] == "done" and s["cuda_graphs"] is True
    assert s["best_metrics"]["recall@20"] >= 0.9, s["best_metrics"]


@pytest.mark.parametrize("over", [{"sparse_embeddings": False}, {"sparse_optimizer": "rowwise_adagrad"},
                                  {"sparse_optimizer": "sparse_adam"}], ids=["adamw", "rowwise", "sparse_adam"])
def test_feature_code_zero_stays_a_zero_vector_without_padding_idx(data_dir, over):
    """Feature tables mask code 0 instead of using padding_idx (a host sync in the sparse backward): its row must
    start at zero, get no update from any optimizer and add nothing to the tower's input."""
    from recsys.train.model import TwoTower

    data = load_prepared(data_dir)
    m, t, lc = _cfgs(**over, cuda_graphs=False)
    m = ModelConfig(**{**m.__dict__, "use_item_features": True, "use_user_features": True})
    trainer = Trainer(data, model_cfg=m, train_cfg=t, loss_cfg=lc, device=torch.device("cpu"))
    tables = list(trainer.model.item_feat) + list(trainer.model.user_feat)
    assert tables and all(e.padding_idx is None and float(e.weight[0].abs().sum()) == 0 for e in tables)
    # every other code is set: give some items and users the missing code 0 so row 0 is looked up
    trainer.model.item_feats[::3] = 0
    trainer.model.user_feats[::3] = 0
    trainer.set_interactions(data.train)
    for a in range(0, 256, 64):
        trainer.step(torch.arange(a, a + 64))
    assert all(float(e.weight[0].abs().sum()) == 0 for e in tables)
    assert all(float(e.weight[1:].abs().sum()) > 0 for e in tables)
    model: TwoTower = trainer.model
    codes = torch.tensor([[0], [2]])
    out = model.item_feat[0](codes)
    assert out.shape == (2, 1, 16) and float(out[0].abs().sum()) == 0 and float(out[1].abs().sum()) > 0


# ------------------------------------------------------------------------------------ the orchestration, on CPU
class _FakeStream:
    def __init__(self, *a, **k) -> None:
        pass

    def wait_stream(self, other) -> None:  # noqa: ANN001
        pass


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPU: "capture" runs the body and then puts every tensor back (a real
    capture runs nothing), replay runs the body again and writes its loss into the captured output tensor."""

    def __init__(self) -> None:
        self.body = None

    def replay(self) -> None:
        self.body()


def _fake_cuda(monkeypatch, step: graphs.GraphedStep, *, replay_noise: float = 0.0, capture_error: bool = False):
    """Returns the list that gets one entry per capture."""
    import contextlib

    captures = []

    @contextlib.contextmanager
    def graph(g):
        captures.append(1)
        before = step._snapshot()
        if capture_error:
            raise RuntimeError("operation not permitted when stream is capturing")
        yield
        captured = step.loss

        def body():
            out = step.trainer.eager_step(step.rows, check=False)
            if replay_noise:  # a graph that computes something else than the eager step
                with torch.no_grad():
                    next(step.trainer.model.parameters()).add_(replay_noise)
            captured.copy_(out)

        g.body = body
        step._restore(before)

    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "Stream", _FakeStream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _FakeStream())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda *a: torch.get_rng_state())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, *a: torch.set_rng_state(s))
    return captures


@pytest.mark.parametrize("mode", ["graph", "mismatch", "capture-error"])
def test_graphed_steps_are_exactly_the_eager_steps(data_dir, monkeypatch, caplog, mode):
    """Ten calls = ten optimizer steps, whatever happens to the graph: warm-up steps, the capture call (which must
    leave exactly one step behind), replays, learning rates changed in place in between; a replay that differs from
    the eager step, or a capture that fails, switches to eager steps with a warning and the same result."""
    data = load_prepared(data_dir)
    perm = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(5))
    batches = [perm[(i % 5) * 64 : (i % 5 + 1) * 64] for i in range(10)]
    runs = {}
    for graphed in (False, True):
        m, t, lc = _cfgs(lr_schedule="linear")
        m = ModelConfig(**{**m.__dict__, "dropout": 0.1, "user_id_dropout": 0.2})  # random draws inside the step
        torch.manual_seed(0)
        trainer = Trainer(data, model_cfg=m, train_cfg=t, loss_cfg=lc, device=torch.device("cpu"))
        trainer.set_interactions(data.train)
        step = trainer.eager_step
        if graphed:
            gs = graphs.GraphedStep.__new__(graphs.GraphedStep)
            captures = _fake_cuda(monkeypatch, gs, replay_noise=0.5 if mode == "mismatch" else 0.0,
                                  capture_error=mode == "capture-error")  # fmt: skip
            gs.__init__(trainer, batch=64)
            step = gs
        losses = []
        with caplog.at_level("WARNING", logger="recsys.train.kernels.graphs"):
            for i, rows in enumerate(batches):
                trainer.set_lr_factor(1.0 - i / 10)
                losses.append(float(step(rows) if graphed else step(rows, check=False)))
        runs[graphed] = (losses, {k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
        if graphed:
            assert len(captures) == 1  # after the warm-up steps, once; a failure is not retried
            assert all(isinstance(g["lr"], torch.Tensor) for o in trainer.optimizers for g in o.param_groups)
            if mode == "graph":
                assert gs.graph is not None and gs.failed is None and gs.check_error == 0.0
            else:
                assert gs.graph is None and gs.failed
                assert ("differs from the eager one" if mode == "mismatch" else "capture failed") in caplog.text
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6, abs=1e-7)
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=1e-5, atol=1e-6, msg=k)
