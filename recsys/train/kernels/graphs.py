"""The whole training step (forward, backward, every optimizer) captured as one CUDA graph (``train.cuda_graphs``).

At batch 8192 a step is a few hundred small kernels, and launching them from Python takes longer than running
them. A CUDA graph replays the recorded kernels with one launch. What has to hold for that, and how it is met:

* fixed shapes and no host sync in the step: the batch is always ``batch_size`` rows (the trainer drops the ragged
  tail), ``Trainer.step(check=False)`` never reads the loss, row-wise Adagrad uses fixed-shape sort / cumsum /
  index_add, the loss kernels take host-side sizes only. Not capturable, so refused up front: several ranks
  (collectives), the MoCo queue (its length grows), the SSL loss (``unique``), SparseAdam (``coalesce``), and
  sparse tables with a padding row (their sparse backward drops the padding entries with a boolean index);
* inputs at fixed addresses: rows are copied into a static buffer before each replay, the learning rates become
  device tensors that :meth:`recsys.train.loop.Trainer.set_lr_factor` fills in place;
* warm-up: the first steps run eagerly on a side stream (lazy state, cuBLAS workspaces, Triton compiles), then the
  next step is captured.

Because what a capture records cannot be inspected, the first replay is checked: from the same weights, optimizer
state and random state, one replayed step and one eager step on the same rows must move the weights alike. On any
failure (capture error, mismatch) the trainer logs a warning and keeps stepping eagerly: graphs cost speed when they
fail, never a result.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from recsys.train.loop import Trainer

log = logging.getLogger(__name__)

WARMUP_STEPS = 3


def unsupported(trainer: Trainer) -> str | None:
    """Why the trainer's step cannot be captured (a sentence), or None."""
    tc, lc = trainer.tcfg, trainer.lcfg
    if trainer.device.type != "cuda":
        return f"CUDA graphs need a CUDA device, not {trainer.device.type}"
    if trainer.dist.enabled:
        return "CUDA graphs are single-process only (the data-parallel collectives are not captured)"
    if trainer.windows is not None:
        return "the transformer user tower's batches have a data-dependent number of positions"
    if lc.queue_size:
        return "the MoCo queue (loss.queue_size) changes length from step to step"
    if lc.ssl_weight > 0:
        return "the feature-dropout SSL loss (loss.ssl_weight) takes a data-dependent unique()"
    if tc.sparse_embeddings and tc.sparse_optimizer == "sparse_adam":
        return "SparseAdam coalesces its gradient (a host sync); use train.sparse_optimizer = 'rowwise_adagrad'"
    if tc.sparse_embeddings:
        for name, m in trainer.model.named_modules():
            if isinstance(m, torch.nn.Embedding) and m.sparse and m.padding_idx is not None:
                return (f"the sparse table {name!r} has a padding row, whose sparse backward is a host sync; "
                        "turn off train.sparse_embeddings or the categorical features")
    return None


class GraphedStep:
    """``trainer.step(rows, check=False)`` as a CUDA graph replay, after ``WARMUP_STEPS`` eager steps.

    Call it exactly like ``Trainer.step``; it returns the step's loss (a tensor the next replay overwrites: read or
    accumulate it before then). ``failed`` is set (and the caller should step eagerly) when capture or the check
    failed.
    """

    def __init__(self, trainer: Trainer, batch: int) -> None:
        self.trainer = trainer
        self.batch = batch
        self.graph: torch.cuda.CUDAGraph | None = None
        self.failed: str | None = None
        self.calls = 0
        self.check_error: float | None = None
        dev = trainer.device
        self.rows = torch.zeros(batch, dtype=torch.long, device=dev)
        self.side = torch.cuda.Stream(dev)
        for opt in trainer.optimizers:  # device learning rates, filled in place by set_lr_factor
            for g in opt.param_groups:
                if not isinstance(g["lr"], torch.Tensor):
                    g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float32, device=dev)
                if "capturable" in g:  # AdamW (fused): refuses to be captured without it
                    g["capturable"] = True

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        if rows.shape != (self.batch,):
            raise ValueError(f"a graphed step takes exactly {self.batch} rows, got {list(rows.shape)}")
        self.calls += 1
        if self.failed:
            return self.trainer.eager_step(rows, check=False)
        if self.graph is None and self.calls <= WARMUP_STEPS:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                self.rows.copy_(rows)
                out = self.trainer.eager_step(self.rows, check=False)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            return self._capture_and_check(rows)  # this call's step, run eagerly
        self.rows.copy_(rows)
        self.graph.replay()
        return self.loss

    # ------------------------------------------------------------------------------------------------ capture
    def _capture_and_check(self, rows: torch.Tensor) -> torch.Tensor:
        """Capture the step, replay it once on ``rows`` and compare with an eager step from the same state; return
        the loss of that eager step, whose weights are kept (graphs on or off, this call made exactly one step)."""
        tr = self.trainer
        before = self._snapshot()
        try:
            graph = torch.cuda.CUDAGraph()
            for opt in tr.optimizers:
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize(tr.device)
            with torch.cuda.graph(graph):
                self.loss = tr.eager_step(self.rows, check=False)
            # capture recorded the kernels without running them: the weights are still ``before``
            self.rows.copy_(rows)
            graph.replay()
            replayed = self._snapshot()
            loss_graph = float(self.loss)
            self._restore(before)
            loss = tr.eager_step(rows, check=False)
            loss_eager = float(loss)
            eager = self._snapshot()
        except Exception as e:  # a kernel or op that cannot be captured on this torch / GPU
            self.failed = f"capture failed ({type(e).__name__}: {str(e)[:200]})"
            log.warning("CUDA graphs off: %s; stepping eagerly", self.failed)
            self._restore(before)
            return tr.eager_step(rows, check=False)
        # the same step twice from the same state: the weight updates must agree (atomics reorder float sums)
        err = abs(loss_graph - loss_eager) / max(abs(loss_eager), 1e-12)
        for k, b in before.items():
            if not b.is_floating_point():
                continue
            de, dg = eager[k] - b, replayed[k] - b
            scale = float(de.norm())
            err = max(err, float((dg - de).norm()) / scale if scale > 0 else float(dg.norm()))
        self.check_error = err
        if not err <= 1e-2:
            self.failed = f"the replayed step differs from the eager one (relative error {err:.3g})"
            log.warning("CUDA graphs off: %s; stepping eagerly", self.failed)
            return loss
        self.graph = graph  # the eager step above was the real one; the state it left is kept
        log.info("training step captured as a CUDA graph (replay vs eager relative error %.2g)", err)
        return loss

    def _state(self) -> dict[str, torch.Tensor]:
        """Every tensor a step changes, by name: parameters and optimizer state (learning rates excluded)."""
        tr = self.trainer
        out = {f"param.{k}": v for k, v in tr.model.named_parameters()}
        out["param.log_inv_t"] = tr.log_inv_t
        for o, opt in enumerate(tr.optimizers):
            for i, p in enumerate(g for group in opt.param_groups for g in group["params"]):
                for name, v in opt.state.get(p, {}).items():
                    if isinstance(v, torch.Tensor):
                        out[f"opt.{o}.{i}.{name}"] = v
        return out

    def _snapshot(self) -> dict[str, torch.Tensor]:
        snap = {k: v.detach().clone() for k, v in self._state().items()}
        snap["rng.cuda"] = torch.cuda.get_rng_state(self.trainer.device)
        return snap

    def _restore(self, snap: dict[str, torch.Tensor]) -> None:
        """In place: the graph holds these tensors' addresses."""
        with torch.no_grad():
            for k, v in self._state().items():
                if k in snap:
                    v.copy_(snap[k])
        torch.cuda.set_rng_state(snap["rng.cuda"], self.trainer.device)
