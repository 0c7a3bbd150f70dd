"""The trainer: one loop for CPU and CUDA (bf16 autocast on CUDA only).

Training examples: each train interaction (u, i, t) is one row; the user side is the user's previous
``history_len`` items before it (rows are sorted by user then time, so the history is the slice of rows just
before, cut at the user's first row: the target never leaks into its own history) + the user ID (randomly dropped)
+ the user's features. The interaction table lives on the device as tensors; batches are sliced there.

Run directory (recsys/core/schema.py): config.json, model.json, model.safetensors (best weights), checkpoint/ (last
epoch: state.safetensors + state.json, for ``resume``), metrics.jsonl, summary.json.

Determinism: every random choice comes from torch's global generators, seeded once and saved in each checkpoint
together with the optimizer state, the MoCo queue and the early-stopping state; on CPU, training 2 epochs equals
training 1 epoch and resuming for 1 more, bit for bit.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from recsys.core import schema
from recsys.core.config import ConfigError, load_section, parse_overrides, to_dict
from recsys.core.data import (
    Interactions,
    PreparedData,
    embed_titles,
    feature_widths,
    fingerprint,
    last_items,
    load_prepared,
    user_item_lists,
)
from recsys.core.io import atomic_dir, atomic_write_json, sha256_file
from recsys.core.logs import Throttle
from recsys.core.metrics import ranking_metrics
from recsys.retrieval.exact import torch_search
from recsys.train import losses, objective, recency
from recsys.train.config import FeatureSpec, LossConfig, ModelConfig, TrainConfig
from recsys.train.distributed import DistContext, RankZeroEvaluator, epoch_seed, init_from_env, sync_gradients
from recsys.train.embed import item_vectors
from recsys.train.kernels import graphs
from recsys.train.losses import ItemEmbeddingQueue
from recsys.train.model import PRIOR_SCALES, TwoTower
from recsys.train.optim import RowWiseAdagrad
from recsys.train.warmstart import warm_start

log = logging.getLogger(__name__)

STATE_WEIGHTS = "state.safetensors"
SPARSE_HINT_ROWS = 100_000  # ID-table rows from which dense updates dominate a CPU step (train_bench, 2 cores)
STATE_JSON = "state.json"
# Fields that may change between a run and its --resume without changing the result of the finished epochs.
RESUMABLE_CHANGES = {"train.epochs", "train.patience", "train.progress", "train.log_every", "train.num_threads",
                     "train.tensorboard", "train.eval_batch_users", "train.compile", "train.cuda_graphs",
                     "train.loss_kernel", "train.history_kernel"}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint and best weights were kept."""


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"`device` must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"`device` {device!r} was requested but torch sees no CUDA GPU")
    return torch.device(device)


def lr_factor(step: int, total: int, *, schedule: str = "constant", warmup: int = 0) -> float:
    """Multiplier of the base learning rate for optimizer step ``step`` (0-based) of a phase of ``total`` steps.

    ``warmup`` steps rise linearly (step 0 gets ``1 / warmup``), then ``schedule`` decays the rest to 0 at
    ``total``: "constant" 1, "linear" ``1 - p``, "cosine" ``(1 + cos(pi p)) / 2`` with ``p`` the fraction of the
    post-warm-up steps already taken (so the first decayed step gets the full rate and the last one a small one).
    """
    if total < 1:
        raise ValueError(f"`total` must be >= 1, got {total}")
    if not 0 <= step < total:
        raise ValueError(f"`step` must be in [0, {total - 1}], got {step}")
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(total - warmup, 1)
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        return 1.0 - p
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    raise ValueError(f"`schedule` must be 'constant', 'cosine' or 'linear', got {schedule!r}")


# ---------------------------------------------------------------------------------------------------------- state
@dataclass
class _Progress:
    """Everything besides tensors that a checkpoint must restore."""

    phase: str = "fit"  # "fit" (on train, validated) | "refit" (the final fit, fixed epochs) | "done"
    epoch: int = 0  # epochs completed in the current phase
    step: int = 0  # optimizer steps in the current phase
    best_epoch: int = 0
    best_value: float = -math.inf
    best_metrics: dict[str, float] = field(default_factory=dict)
    bad_evals: int = 0
    stopped_early: bool = False
    refit_epochs: int = 0
    final_splits: list[str] = field(default_factory=lambda: ["train"])  # what the saved weights were fit on
    train_seconds: float = 0.0
    examples: int = 0


class _Writer:
    """metrics.jsonl (append) + TensorBoard scalars when the package is installed."""

    def __init__(self, run_dir: Path, *, tensorboard: bool, enabled: bool = True) -> None:
        self.path = run_dir / schema.METRICS_JSONL
        self.tb = None
        self.enabled = enabled  # data-parallel ranks other than 0 write nothing
        if tensorboard and enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter  # tensorboard: optional

                self.tb = SummaryWriter(str(run_dir / "tb"))
            except ImportError:  # tensorboard is optional
                self.tb = None

    def write(self, event: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        rec = {"event": event, "step": step, "time": time.time(), **values}
        with self.path.open("a") as f:
            f.write(json.dumps(rec, sort_keys=True) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"{event}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------------------------------- evaluation
class Evaluator:
    """Full-catalogue Recall@K / NDCG@K with the user's seen items excluded: exact retrieval on the training device
    (``recsys.retrieval.exact.torch_search``, the exact index's rule on torch tensors)."""

    def __init__(
        self,
        *,
        users: np.ndarray,
        history: np.ndarray,
        seen: list[np.ndarray],
        relevant: list[np.ndarray],
        n_items: int,
        k: int,
        device: torch.device,
        batch_users: int = 1024,
    ) -> None:
        """``users`` [U] rows, ``history`` [U, N] item rows (-1 pad), ``seen`` / ``relevant``: U item arrays."""
        if not (len(users) == len(history) == len(seen) == len(relevant)):
            raise ValueError(
                f"evaluation inputs must have one entry per user (got {len(users)}, {len(history)}, "
                f"{len(seen)}, {len(relevant)})"
            )
        self.users = torch.as_tensor(users, dtype=torch.long, device=device)
        self.history = torch.as_tensor(history, dtype=torch.long, device=device)
        self.relevant = relevant
        self.k = min(k, n_items)
        self.ks = (k,) if k <= n_items else (self.k,)
        self.batch = batch_users
        self.device = device
        # CSR of the seen items, so each chunk masks its users' seen cells with one index_put
        lens = np.array([len(s) for s in seen], dtype=np.int64)
        self.seen_ptr = np.concatenate([[0], np.cumsum(lens)])
        self.seen_cols = torch.as_tensor(
            np.concatenate(seen).astype(np.int64) if len(seen) else np.zeros(0, np.int64), device=device
        )
        self.seen_rows = torch.as_tensor(np.repeat(np.arange(len(seen)), lens), device=device)

    def __len__(self) -> int:
        return int(self.users.shape[0])

    @torch.no_grad()
    def topk(self, model: TwoTower, *, item_emb: torch.Tensor | None = None) -> np.ndarray:
        """[U, K] item rows best first (-1 where fewer than K unseen items remain)."""
        scales = None if model.prior_scale is None else (float(model.prior_scale),)
        return self._topk(model, item_emb=item_emb, scales=scales)[0]

    @torch.no_grad()
    def _topk(self, model: TwoTower, *, item_emb: torch.Tensor | None, scales: tuple[float, ...] | None
              ) -> list[np.ndarray]:  # fmt: skip
        """:meth:`topk` once per prior weight of ``scales`` (one list entry without a prior), the towers run once."""
        was_training = model.training
        model.eval()
        try:
            if item_emb is None:
                item_emb = item_vectors(model, device=self.device)
            out: list[list[np.ndarray]] = [[] for _ in scales or (None,)]
            for a in range(0, len(self), self.batch):
                b = min(a + self.batch, len(self))
                users, history = self.users[a:b], self.history[a:b]
                u = model._users(users, history)
                g = None if scales is None else model.user_prior(model.user_state(users, history))
                lo, hi = int(self.seen_ptr[a]), int(self.seen_ptr[b])
                for j, scale in enumerate(scales or (None,)):
                    q = u if g is None else model.served_users(u, g * scale)
                    top = torch_search(q, item_emb, self.k, exclude_rows=self.seen_rows[lo:hi] - a,
                                       exclude_cols=self.seen_cols[lo:hi])  # [b - a, k]
                    out[j].append(top.cpu().numpy())
            return [np.concatenate(o) if o else np.zeros((0, self.k), dtype=np.int64) for o in out]
        finally:
            model.train(was_training)

    def __call__(self, model: TwoTower, *, select: str = "ndcg@20") -> dict[str, float]:
        """The metrics of the model's top-k. With ``model.time_prior``: those of the best prior weight of
        ``PRIOR_SCALES`` by ``select`` (the first of equal ones), which ``prior_scale`` reports (the model's own is
        left as it was: the trainer sets it with the weights it keeps)."""
        if model.prior_scale is None:
            return ranking_metrics(self.topk(model), self.relevant, ks=self.ks)
        best: dict[str, float] = {}
        for scale, top in zip(PRIOR_SCALES, self._topk(model, item_emb=None, scales=PRIOR_SCALES), strict=True):
            m = ranking_metrics(top, self.relevant, ks=self.ks)
            if not best or m.get(select, -math.inf) > best.get(select, -math.inf):
                best = {**m, "prior_scale": scale}
        return best


def _validation(data: PreparedData, model_cfg: ModelConfig, train_cfg: TrainConfig, device) -> Evaluator | None:
    """Validation users: those with a valid interaction; history / seen items from train only."""
    if len(data.valid) == 0:
        return None
    users = np.unique(data.valid.user_idx)
    if train_cfg.max_eval_users and len(users) > train_cfg.max_eval_users:
        rng = np.random.default_rng(train_cfg.seed)
        users = np.sort(rng.choice(users, size=train_cfg.max_eval_users, replace=False))
    hist = last_items(data.train, data.n_users, model_cfg.history_len)[users]
    seen_all = user_item_lists(data.train, data.n_users)
    rel_all = user_item_lists(data.valid, data.n_users)
    return Evaluator(
        users=users, history=hist, seen=[seen_all[u] for u in users], relevant=[rel_all[u] for u in users],
        n_items=data.n_items, k=train_cfg.eval_k, device=device, batch_users=train_cfg.eval_batch_users,
    )  # fmt: skip


def _choose_kernel(setting: str, want: str, device: torch.device, *, module: str, what: str, reference: str,
                   supported, self_check, faster=None) -> str:  # fmt: skip
    """What ``train.loss_kernel`` and ``train.history_kernel`` share: ``"triton"`` or ``"torch"`` for ``want``.

    "auto" takes the Triton kernels of ``recsys.<module>`` only on CUDA, with triton importable, when
    ``supported(module)`` is None, ``self_check(module)`` (a relative error against the torch path on this device)
    is within tolerance and, where given, ``faster(module)`` is true: a kernel that does not compile for this GPU or
    triton version, computes something else or is slower costs nothing, never a run. "triton" raises instead of
    falling back (and skips the timing).
    """
    if want == "torch" or (want == "auto" and device.type != "cuda"):
        return "torch"
    try:
        mod = importlib.import_module(f"recsys.train.kernels.{module}")
    except ImportError as e:
        if want == "triton":
            raise ValueError(f"`train.{setting}` = 'triton' needs the triton package (pip install triton)") from e
        return "torch"
    why = supported(mod)
    if why:
        if want == "triton":
            raise ValueError(f"`train.{setting}` = 'triton' cannot run here: {why}")
        return "torch"
    # bf16 operands under CUDA autocast differ from the torch path's bf16 products by rounding order only
    tol = 2e-2 if device.type == "cuda" else 1e-4
    try:
        err = self_check(mod)
    except Exception as e:  # any failure to compile or launch means: not on this machine
        if want == "triton":
            raise
        log.warning("%s failed their self-check (%s: %s); using the %s", what, type(e).__name__, e, reference)
        return "torch"
    if not err <= tol:
        msg = f"{what} disagree with the {reference} (relative error {err:.3g} > {tol:g})"
        if want == "triton":
            raise RuntimeError(msg)
        log.warning("%s; using the %s", msg, reference)
        return "torch"
    if want == "auto" and faster is not None and not faster(mod):
        return "torch"
    log.info("%s: in use (self-check relative error %.2g)", what, err)
    return "triton"


def choose_history_kernel(train_cfg: TrainConfig, model_cfg: ModelConfig, *, n_items: int,
                          device: torch.device) -> str:  # fmt: skip
    """``"triton"`` or ``"torch"``: the user tower's history pooling in this run (``train.history_kernel``).

    Only attention pooling has fused kernels (recsys.train.kernels.fused_pool); the transformer tower always takes torch. "auto" also times one forward + backward of both
    paths at this run's shape (batch, history length, width, table size) and keeps torch unless the kernels are
    faster (:func:`recsys.train.kernels.fused_pool.timings`).
    """
    want = train_cfg.history_kernel
    if model_cfg.user_tower == "transformer":  # no pooling to fuse: the encoder runs in torch (SDPA)
        if want == "triton":
            raise ValueError("`train.history_kernel` = 'triton' fuses attention pooling; `model.user_tower` is "
                             "'transformer' (use 'auto' or 'torch')")
        return "torch"
    if model_cfg.history_pooling != "attention":
        if want == "triton":
            raise ValueError("`train.history_kernel` = 'triton' fuses attention pooling; `model.history_pooling` is "
                             f"{model_cfg.history_pooling!r}")
        return "torch"
    dim, n, batch = model_cfg.embedding_dim, model_cfg.history_len, train_cfg.batch_size

    def faster(fp) -> bool:  # noqa: ANN001 - the module
        fused_ms, torch_ms = fp.timings(device, batch=batch, history_len=n, dim=dim, n_rows=n_items,
                                        sparse=train_cfg.sparse_embeddings)  # fmt: skip
        log.info("history pooling at batch %d: fused kernels %.3f ms, torch %.3f ms (forward + backward)", batch,
                 fused_ms, torch_ms)
        return fused_ms < torch_ms

    return _choose_kernel(
        "history_kernel", want, device, module="fused_pool", what="fused history pooling kernels",
        reference="torch path", supported=lambda fp: fp.supported(dim, n, device, batch=batch),
        self_check=lambda fp: fp.self_check(device, dim=dim, history_len=n), faster=faster,
    )  # fmt: skip


def choose_loss_kernel(train_cfg: TrainConfig, loss_cfg: LossConfig, *, dim: int, device: torch.device) -> str:
    """``"triton"`` or ``"torch"``: the in-batch softmax this run uses (``train.loss_kernel``, see its docstring).

    The self-check (:func:`recsys.train.kernels.fused_loss.self_check`) runs with this run's loss options.
    """
    lc = loss_cfg
    return _choose_kernel(
        "loss_kernel", train_cfg.loss_kernel, device, module="fused_loss", what="fused loss kernels",
        reference="torch loss", supported=lambda fl: fl.supported(dim, device),
        self_check=lambda fl: fl.self_check(
            device, dim=dim, extra=64 if lc.n_uniform_negatives or lc.queue_size else 0,
            mask_items=lc.mask_accidental_hits, mask_users=lc.mask_same_user, logq=lc.logq_correction,
            correct_positive=lc.logq_correct_positive,
        ),
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------------- the trainer
class Trainer:
    """Owns the model, optimizers, loss options and device tensors of one run; ``train()`` drives it."""

    def __init__(
        self,
        data: PreparedData,
        *,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        loss_cfg: LossConfig,
        device: torch.device,
        title_emb: np.ndarray | None = None,
        init_from: str | Path | None = None,
        dist: DistContext | None = None,
    ) -> None:
        self.data = data
        self.dist = dist or DistContext()
        self.init_from = init_from
        self.mcfg, self.tcfg, self.lcfg = model_cfg, train_cfg, loss_cfg
        self.device = device
        self.spec = FeatureSpec(
            n_users=data.n_users,
            n_items=data.n_items,
            item_features=dict(data.item_cardinality),
            user_features=dict(data.user_cardinality),
            text_dim=0 if title_emb is None else int(title_emb.shape[1]),
            item_feature_widths=feature_widths(data.item_features),
            user_feature_widths=feature_widths(data.user_features),
        )
        self.title_emb = title_emb
        self.log_p = torch.as_tensor(np.log(data.item_prob), dtype=torch.float32, device=device)  # [n_items]
        # model.time_prior adds a [B, B + M] score bias that only the plain torch softmax takes
        self.loss_kernel = "torch" if model_cfg.time_prior and train_cfg.loss_kernel == "auto" else \
            choose_loss_kernel(train_cfg, loss_cfg, dim=model_cfg.dim, device=device)
        self.history_kernel = choose_history_kernel(train_cfg, model_cfg, n_items=data.n_items, device=device)
        self.build(seed=train_cfg.seed)

    # ~80 lines: the model, its optimizers (dense / sparse / row-wise), the queue and the kernels' choice, which
    # depend on each other's settings.
    def build(self, *, seed: int) -> None:
        """(Re)create model, optimizers and queue from the seed: the start of a phase."""
        torch.manual_seed(seed)
        d = self.data
        if self.mcfg.time_features and self.lcfg.n_uniform_negatives and self.tcfg.cuda_graphs:
            raise ValueError(
                "`loss.n_uniform_negatives` with `model.time_features` computes each uniform negative's time inputs on "
                "the host every step, which a CUDA graph cannot capture: set `train.cuda_graphs = false`, "
                "`loss.n_uniform_negatives = 0` or `model.time_features = false`"
            )
        if self.mcfg.user_tower == "transformer" and self.dist.enabled:
            raise ValueError("`model.user_tower = \"transformer\"` trains on one process for now (each rank's batch "
                             "has its own number of positions, which the candidates' all-gather cannot take): run "
                             "without torchrun, or with `model.user_tower = \"pool\"`")
        if self.mcfg.time_prior and self.tcfg.cuda_graphs:
            raise ValueError("`model.time_prior` computes each step's (row, candidate) time inputs on the host, which a "
                             "CUDA graph cannot capture: set `train.cuda_graphs = false` or `model.time_prior = false`")
        self.model = TwoTower(
            self.spec,
            self.mcfg,
            item_feats=torch.as_tensor(d.item_feature_matrix()),
            user_feats=torch.as_tensor(d.user_feature_matrix()),
            item_text=None if self.title_emb is None else torch.as_tensor(self.title_emb),
        )
        if self.init_from is not None:
            # warm start (retraining): rows of overlapping IDs/feature values and same-shaped weights carry over

            self.warm_start_stats = warm_start(self.model, self.init_from, self.data.path)
        self.model = self.model.to(self.device)
        self.model.train()
        if self.model.pool is not None:
            self.model.pool.kernel = self.history_kernel
        lc = self.lcfg
        # learned temperature: log(1/t), clamped so t stays in [min_temperature, 1]
        self.log_inv_t = torch.nn.Parameter(
            torch.tensor(math.log(1.0 / lc.temperature), device=self.device), requires_grad=lc.learn_temperature
        )
        emb = self.model.embedding_parameters()
        emb_ids = {id(p) for p in emb}
        dense = [p for p in self.model.parameters() if id(p) not in emb_ids]
        if lc.learn_temperature:
            dense.append(self.log_inv_t)
        tc = self.tcfg
        self.optimizers: list[torch.optim.Optimizer] = []
        self.sparse_ids: frozenset[int] = frozenset()
        if tc.sparse_embeddings:
            for m in self.model.modules():
                if isinstance(m, torch.nn.Embedding) and id(m.weight) in emb_ids:
                    m.sparse = True
            self.sparse_ids = frozenset(emb_ids)
            emb_lr = tc.embedding_lr or tc.lr
            if tc.sparse_optimizer == "rowwise_adagrad":
                self.optimizers.append(RowWiseAdagrad(emb, lr=emb_lr))
            else:
                self.optimizers.append(torch.optim.SparseAdam(emb, lr=emb_lr))
            self.optimizers.append(torch.optim.AdamW(dense, lr=tc.lr, weight_decay=tc.weight_decay, fused=True))
        else:
            self.optimizers.append(
                torch.optim.AdamW(
                    [
                        {"params": dense, "weight_decay": tc.weight_decay},
                        {"params": emb, "weight_decay": tc.embedding_weight_decay},
                    ],
                    lr=tc.lr,
                    fused=True,  # one multi-tensor kernel for every parameter (CPU and CUDA): 3.8x faster on CPU
                )
            )
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["initial_lr"] = g["lr"]  # the base rate that ``set_lr_factor`` scales (saved with the state)
        # every trained tensor, in one order on every rank (data-parallel gradient averaging)
        self.trained = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        reused = self.mcfg.share_history_embeddings or lc.n_uniform_negatives or lc.ssl_weight
        if tc.sparse_embeddings and self.dist.enabled and reused:
            # A sparse table looked up more than once per step gets its lookups summed by autograd, which merges
            # repeated rows depending on the batch's content, so the ranks' gradient sizes would differ; the
            # data-parallel all-gather needs one size on every rank: coalesce, then pad with zero rows.
            self.model.item_id.weight.register_hook(self._fixed_size_sparse_grad)
        self.users_fn, self.items_fn = self.model._users, self.model._items
        if tc.compile:  # the default mode: train.cuda_graphs captures the whole step instead (recsys.train.kernels.graphs)
            self.users_fn = torch.compile(self.model._users)
            self.items_fn = torch.compile(self.model._items)
        self.graphed = None  # recsys.train.kernels.graphs.GraphedStep, made at the first step
        self.graphs_off: str | None = None  # why train.cuda_graphs is not in use

        self.queue = ItemEmbeddingQueue(lc.queue_size, self.mcfg.dim, device=self.device, dtype=torch.float32) \
            if lc.queue_size else None

    def set_prior_scale(self, scale: float | None) -> None:
        """``model.time_prior``: the prior's weight at serving (the one validation chose; None: leave it)."""
        if scale is not None and self.model.prior_scale is not None:
            self.model.prior_scale.fill_(float(scale))

    def set_lr_factor(self, factor: float) -> None:
        """Every optimizer's learning rate = its base rate (``initial_lr``) * ``factor`` (the lr schedule)."""
        for opt in self.optimizers:
            for g in opt.param_groups:
                if isinstance(g["lr"], torch.Tensor):  # a CUDA graph reads this tensor: update it in place
                    g["lr"].fill_(g["initial_lr"] * factor)
                else:
                    g["lr"] = g["initial_lr"] * factor

    def _fixed_size_sparse_grad(self, g: torch.Tensor) -> torch.Tensor:
        """Sparse [n_items, E] gradient -> the same gradient with exactly ``min(n_items, bound)`` index entries,
        ``bound`` an upper limit of the distinct rows one rank's step can touch (the same on every rank)."""
        if not g.is_sparse:
            return g
        lc, n = self.lcfg, self.model.n_items
        b = self.tcfg.batch_size  # >= this rank's rows
        bound = min(n, b * (2 + self.mcfg.history_len) + lc.n_uniform_negatives + 2 * b)
        g = g.coalesce()
        pad = bound - g._nnz()
        idx = torch.cat([g._indices(), torch.zeros(1, pad, dtype=torch.long, device=g.device)], dim=1)
        vals = torch.cat([g._values(), g._values().new_zeros(pad, *g.shape[1:])])
        return torch.sparse_coo_tensor(idx, vals, g.shape)

    def temperature(self) -> torch.Tensor | float:
        if not self.lcfg.learn_temperature:
            return self.lcfg.temperature
        hi = math.log(1.0 / self.lcfg.min_temperature)
        return 1.0 / self.log_inv_t.clamp(0.0, hi).exp()

    def temperature_value(self) -> float:
        """The current temperature as a plain number (for logs and the summary)."""
        t = self.temperature()
        return float(t.detach()) if isinstance(t, torch.Tensor) else float(t)

    def count_in_sampling(self, extra: Interactions) -> None:
        """Add ``extra``'s rows (the refit's validation rows) to the logQ sampling probabilities.

        ``items.parquet``'s ``prob`` counts train rows only, but the refit samples its batches from train + valid.
        With a drifting catalogue an item that took off late has few train rows and many validation rows: left at
        its train frequency, logQ would treat it as a rare item, inflate its logit as a negative and push the
        freshest items down in exactly the model that serves the next period.
        """
        n_train = len(self.data.train)
        counts = self.data.item_prob * n_train + np.bincount(extra.item_idx, minlength=self.data.n_items)
        self.log_p = torch.as_tensor(np.log(counts / counts.sum()), dtype=torch.float32, device=self.device)

    def set_interactions(self, inter: Interactions) -> None:
        """The rows to train on; with ``model.time_features`` also each row's item time inputs (as of the row's
        time) and the model's end-of-logs time state; ``train.half_life_days`` decays the row weights."""
        dev = self.device
        self.t_user = torch.as_tensor(inter.user_idx, device=dev)
        self.t_item = torch.as_tensor(inter.item_idx, device=dev)
        weight = inter.weight
        if self.tcfg.half_life_days > 0 and len(inter):
            weight = weight * recency.decay_weights(inter.ts, now=int(inter.ts.max()),
                                                    half_life_days=self.tcfg.half_life_days)
        self.t_weight = torch.as_tensor(weight, device=dev)
        # the examples an epoch shuffles: every row (the pooling tower), or with the transformer the ends of the
        # windows that tile each user's rows (sequence_windows); per example, how many targets it trains
        self.windows, self.targets_per_example = None, 1.0
        examples_ts = inter.ts
        if self.model.encoder is not None:
            ends = sequence_windows(inter.user_start(), self.mcfg.history_len)
            self.windows = torch.as_tensor(ends, device=dev)
            examples_ts = inter.ts[ends]
            self.targets_per_example = float(np.minimum(ends - inter.user_start()[ends], self.mcfg.history_len).mean()) \
                if len(ends) else 1.0
        self.n_examples = len(examples_ts)
        self.time_order = None  # examples by time, for train.time_batches
        if self.tcfg.time_batches:
            self.time_order = torch.as_tensor(np.argsort(examples_ts, kind="stable"), device=dev)
        self.t_time = self.events = None
        if self.model.item_now is not None:
            # kept: uniform negatives and the score prior's pairs take their time inputs from it at each step
            self.events, self.row_ts = recency.EventIndex(inter.item_idx, inter.ts, self.data.n_items), inter.ts
            per_event, now, cold = recency.time_state(self.events, inter.item_idx, inter.ts,
                                                      self.mcfg.time_windows_days)
            if self.model.item_time is not None:
                self.t_time = torch.as_tensor(per_event, device=dev)
            users_now = None
            if self.model.prior_user is not None:  # each row's user as of the row, and every user at the end
                per_row, users_now = recency.user_time_state(inter.user_idx, inter.ts, inter.user_start(),
                                                             self.data.n_users)
                self.t_user_state = torch.as_tensor(per_row, device=dev)
                users_now = torch.as_tensor(users_now, device=dev)
            self.model.set_time_state(torch.as_tensor(now, device=dev), torch.as_tensor(cold, device=dev), users_now)
        self.t_start = torch.as_tensor(inter.user_start(), device=dev)
        self.offsets = torch.arange(self.mcfg.history_len, 0, -1, device=dev)  # [N]: N..1 rows back
        self.t_last = None  # each row's user's last row: how far ahead the transformer's positions may look
        if self.windows is not None and self.tcfg.target_window > 1:
            self.t_last = torch.as_tensor(inter.user_last(), device=dev)

    def batch_history(self, rows: torch.Tensor, gap: torch.Tensor | None = None) -> torch.Tensor:
        """[B, N] the N items before each row, oldest first, -1 before the user's first interaction.

        ``gap`` [B] (>= 0): skip that many of the row's most recent earlier items (the history ends ``gap + 1``
        rows before the target).
        """
        idx = rows[:, None] - self.offsets[None, :]  # [B, N]
        if gap is not None:
            idx = idx - gap[:, None]
        ok = idx >= self.t_start[rows][:, None]
        return torch.where(ok, self.t_item[idx.clamp(min=0)], torch.full_like(idx, -1))

    def sequence_queries(self, ends: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The transformer's examples: window ends [W] -> (queries [P, dim], target rows [P]).

        Window ``r`` reads the N rows before ``r`` (:meth:`batch_history`); position ``i`` (row ``r - N + i``)
        predicts the next row's item, so the targets are rows ``r - N + 1 .. r``. Pad positions (before the user's
        first row) are dropped: P = the window's real items, summed over the batch. With ``train.target_window``
        W > 1 each position predicts one of its next W items instead (drawn uniformly, PinnerFormer's "next few
        actions"), never past the user's last row: near it the draw is cut to the rows there are.
        """
        history = self.batch_history(ends)  # [W, N]
        q = self.model._user_sequence(self.t_user[ends], history, id_dropout=self.mcfg.user_id_dropout)  # [W, N, d]
        valid = history >= 0
        targets = ends[:, None] - self.offsets[None, :] + 1  # [W, N]
        if self.t_last is not None:
            ahead = self.t_last[ends][:, None] - targets  # [W, N] rows left after each target (same user)
            gap = torch.randint(0, self.tcfg.target_window, targets.shape, device=targets.device)
            targets = targets + torch.minimum(gap, ahead.clamp(min=0))
        return q[valid], targets[valid]

    def loss(self, rows: torch.Tensor) -> torch.Tensor:
        """The loss of one batch of examples: rows (the pooling tower) or window ends (the transformer, every
        position a query: :meth:`sequence_queries`); below, ``rows`` are the targets' rows either way."""
        m, lc, mc = self.model, self.lcfg, self.mcfg
        cuda = self.device.type == "cuda"
        # autocast's cache of cast weights must be off inside a CUDA graph capture (torch's CUDA graphs notes)
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=cuda,
                            cache_enabled=not self.tcfg.cuda_graphs):  # fmt: skip
            if self.windows is not None:
                q, rows = self.sequence_queries(self.windows[rows])
                q = q.float()
                users, items = self.t_user[rows], self.t_item[rows]
            else:
                users, items = self.t_user[rows], self.t_item[rows]
                gap = None
                if self.tcfg.target_window > 1:
                    # the target is 1..W steps after the history's last item: evaluation asks for the next few items
                    gap = torch.randint(0, self.tcfg.target_window, rows.shape, device=self.device)
                q = self.users_fn(users, self.batch_history(rows, gap), id_dropout=mc.user_id_dropout).float()  # [B, dim]
            time = self.t_time[rows] if self.t_time is not None else None  # each item as of its example's time
            c = self.items_fn(items, id_dropout=mc.item_id_dropout, time=time).float()  # [B, dim]
            extra_c = extra_ids = None
            if lc.n_uniform_negatives:
                extra_ids = torch.randint(0, m.n_items, (lc.n_uniform_negatives,), device=self.device)
                extra_time = None
                if self.model.item_time is not None:  # each negative as of a random example of the batch (no leakage)
                    at = rows[torch.randint(0, rows.shape[0], (lc.n_uniform_negatives,), device=rows.device)]
                    extra_time = torch.as_tensor(recency.item_time_features(
                        self.events, extra_ids.cpu().numpy(), self.row_ts[at.cpu().numpy()], mc.time_windows_days,
                    ), device=self.device)
                extra_c = m._items(extra_ids, id_dropout=mc.item_id_dropout, time=extra_time).float()
            b = items.shape[0] * self.dist.world_size  # the global batch: the candidate pool of every row
            log_q = extra_log_q = None
            if lc.logq_correction:
                log_p = self.log_p[items]
                if lc.logq_frequencies == "batch":  # the batch's own item frequencies (this rank's shard)
                    _, inverse, counts = torch.unique(items, return_inverse=True, return_counts=True)
                    log_p = torch.log(counts[inverse].float() / items.shape[0])
                log_q = losses.mixed_log_q(log_p, batch_size=b, n_uniform=lc.n_uniform_negatives, n_items=m.n_items)
                if extra_ids is not None:
                    extra_log_q = losses.mixed_log_q(
                        self.log_p[extra_ids], batch_size=b, n_uniform=lc.n_uniform_negatives, n_items=m.n_items
                    )
            if self.queue is not None and len(self.queue):
                qe, qi = self.queue.tensors()
                extra_c = qe if extra_c is None else torch.cat([extra_c, qe])
                extra_ids = qi if extra_ids is None else torch.cat([extra_ids, qi])
                if log_q is not None:
                    # queued items were batch positives: same sampling distribution as the in-batch candidates
                    ql = losses.mixed_log_q(
                        self.log_p[qi], batch_size=b, n_uniform=lc.n_uniform_negatives, n_items=m.n_items
                    )
                    extra_log_q = ql if extra_log_q is None else torch.cat([extra_log_q, ql])
            bias = None
            if m.prior_item is not None:
                # each candidate (in-batch and extra) as of each row's time (what the item looked like when the
                # row's user chose) against the row's user as of then: g_r . h(item j at t_r)
                cols = items if extra_ids is None else torch.cat([items, extra_ids])
                pair = recency.pair_time_features(self.events, cols.cpu().numpy(), self.row_ts[rows.cpu().numpy()],
                                                  mc.time_windows_days)
                h = m.item_prior(torch.as_tensor(pair, device=self.device))  # [B, B + M, K]
                bias = torch.einsum("bk,bck->bc", m.user_prior(self.t_user_state[rows]), h)  # [B, B + M]
            # plain / chunked / fused softmax, or with several ranks this rank's rows against every rank's candidates
            loss, c, items = objective.contrastive_loss(
                q, c, ctx=self.dist, temperature=self.temperature(), items=items, users=users,
                mask_items=lc.mask_accidental_hits, mask_users=lc.mask_same_user,
                log_q=log_q, correct_positive=lc.logq_correct_positive,
                extra_c=extra_c, extra_ids=extra_ids, extra_log_q=extra_log_q,
                weights=self.t_weight[rows] if lc.use_weights else None, chunk_size=self.tcfg.loss_chunk_size,
                fused=self.loss_kernel == "triton", score_bias=bias,
            )  # fmt: skip
            if lc.ssl_weight > 0:
                uniq = torch.unique(items)
                z1, z2 = m.item_views(uniq, lc.ssl_dropout)
                loss = loss + lc.ssl_weight * losses.feature_dropout_ssl_loss(
                    z1.float(), z2.float(), temperature=lc.ssl_temperature
                )
        if self.queue is not None:
            self.queue.enqueue(c.detach(), items)
        return loss

    def step(self, rows: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """One optimizer step on ``rows`` (this rank's shard of the global batch); returns the detached loss.

        ``check``: read the loss on the host first (a device sync; a collective with several ranks) and return
        without touching any weight when it is not finite. Without it nothing here waits for the device: the
        caller checks the returned losses every few steps. With ``train.cuda_graphs`` an unchecked step is a CUDA
        graph replay (recsys.train.kernels.graphs) once the graph is captured and has passed its check.
        """
        if self.tcfg.cuda_graphs and not check and self.graphs_off is None:
            if self.graphed is None:
                self.graphs_off = graphs.unsupported(self)
                if self.graphs_off:
                    log.warning("train.cuda_graphs is off: %s", self.graphs_off)
                    return self.eager_step(rows, check=check)
                self.graphed = graphs.GraphedStep(self, batch=int(rows.shape[0]))
            out = self.graphed(rows)
            self.graphs_off = self.graphed.failed
            return out
        return self.eager_step(rows, check=check)

    def eager_step(self, rows: torch.Tensor, *, check: bool = True) -> torch.Tensor:
        """:meth:`step`, always run op by op (what a CUDA graph captures)."""
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        loss = self.loss(rows)
        value = loss.detach()
        if check:
            value = self.dist.all_reduce_mean(value)
            if not math.isfinite(float(value)):
                return value  # the caller stops before any weight is touched
        loss.backward()
        if self.dist.enabled:
            # every rank looks up the same number of rows (SSL views use the global batch's items); a reused sparse
            # item table has its gradient padded to a fixed size by _fixed_size_sparse_grad
            sync_gradients(self.trained, self.dist, sparse_ids=self.sparse_ids)
        if self.tcfg.grad_clip > 0:
            params = [p for p in self.model.parameters() if p.grad is not None and not p.grad.is_sparse]
            torch.nn.utils.clip_grad_norm_(params, self.tcfg.grad_clip)
        for opt in self.optimizers:
            opt.step()
        return value

    # ----------------------------------------------------------------------------------------- checkpoint state
    def state_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"model.{k}": v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        out["loss.log_inv_t"] = self.log_inv_t.detach().cpu().reshape(1)
        for o, opt in enumerate(self.optimizers):
            for pid, st in opt.state_dict()["state"].items():
                for name, v in st.items():
                    if isinstance(v, torch.Tensor):
                        out[f"optim.{o}.{pid}.{name}"] = v.detach().cpu().contiguous()
        out["rng.cpu"] = torch.get_rng_state()
        if self.device.type == "cuda":
            out["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        if self.queue is not None and self.queue._emb is not None:
            out["queue.emb"] = self.queue._emb.detach().cpu().contiguous()
            out["queue.ids"] = self.queue._ids.detach().cpu().contiguous()
        return out

    def state_meta(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"optimizers": []}
        for opt in self.optimizers:
            sd = opt.state_dict()
            scalars = {
                str(pid): {k: v for k, v in st.items() if not isinstance(v, torch.Tensor)}
                for pid, st in sd["state"].items()
            }
            # CUDA graphs keep the learning rates as device tensors and make AdamW capturable: a checkpoint
            # stores plain rates and the default, so it resumes anywhere (a new graph sets them again)
            groups = [{k: float(v) if isinstance(v, torch.Tensor) else False if k == "capturable" else v
                       for k, v in g.items()} for g in sd["param_groups"]]  # fmt: skip
            meta["optimizers"].append({"param_groups": groups, "scalars": scalars,
                                       "params_with_state": sorted(int(p) for p in sd["state"])})
        if self.queue is not None:
            meta["queue"] = {"ptr": self.queue._ptr, "count": self.queue._count}
        return meta

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        model_state = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
        self.model.load_state_dict(model_state, strict=True)
        with torch.no_grad():
            self.log_inv_t.copy_(tensors["loss.log_inv_t"].reshape(()).to(self.device))
        for o, opt in enumerate(self.optimizers):
            om = meta["optimizers"][o]
            state: dict[int, dict[str, Any]] = {}
            for pid in om["params_with_state"]:
                st = dict(om["scalars"].get(str(pid), {}))
                prefix = f"optim.{o}.{pid}."
                for k, v in tensors.items():
                    if k.startswith(prefix):
                        st[k[len(prefix) :]] = v
                state[pid] = st
            opt.load_state_dict({"state": state, "param_groups": om["param_groups"]})
        torch.set_rng_state(tensors["rng.cpu"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if self.queue is not None and "queue.emb" in tensors:
            self.queue._emb = tensors["queue.emb"].to(self.device)
            self.queue._ids = tensors["queue.ids"].to(self.device)
            self.queue._ptr = int(meta["queue"]["ptr"])
            self.queue._count = int(meta["queue"]["count"])


def _save_weights(model: TwoTower, path: Path, *, write: bool = True) -> None:
    """model.safetensors via a temp file + rename (readers never see a half-written file); ``write=False``: no-op
    (data-parallel ranks other than 0)."""
    if not write:
        return

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp),
              metadata={"format": "pt"})
    os.replace(tmp, path)


def _save_checkpoint(run_dir: Path, trainer: Trainer, progress: _Progress) -> None:
    """Rank 0 writes; progress is global (steps of global batches), so any world size can resume it."""
    if not trainer.dist.is_main:
        return

    with atomic_dir(run_dir / schema.CHECKPOINT_DIR, overwrite=True) as tmp:
        save_file(trainer.state_tensors(), str(tmp / STATE_WEIGHTS))
        atomic_write_json(tmp / STATE_JSON, {"progress": progress.__dict__, **trainer.state_meta(),
                                             "world_size": trainer.dist.world_size})


def _config_dict(model_cfg, train_cfg, loss_cfg) -> dict[str, Any]:
    return {"model": to_dict(model_cfg), "train": to_dict(train_cfg), "loss": to_dict(loss_cfg)}


def _diff_configs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    out = []
    for sec in ("model", "train", "loss"):
        for k in sorted(set(old.get(sec, {})) | set(new.get(sec, {}))):
            a, b = old.get(sec, {}).get(k), new.get(sec, {}).get(k)
            if a != b and f"{sec}.{k}" not in RESUMABLE_CHANGES:
                out.append(f"{sec}.{k}: {a!r} -> {b!r}")
    return out


def _load_title_embeddings(data: PreparedData, model_cfg: ModelConfig, run_dir: Path) -> np.ndarray | None:
    if not model_cfg.use_text:
        return None
    if data.titles is None:
        raise ValueError(
            f"`model.use_text` is true but {str(data.path / schema.ITEMS)!r} has no `{schema.TITLE}` column"
        )
    cache = run_dir / "title_embeddings.npy"
    if cache.exists():  # a resumed run reuses them: re-encoding could differ in the last bits across machines
        emb = np.load(cache, allow_pickle=False)
        if emb.shape[0] == data.n_items:
            return emb

    emb = embed_titles(data.titles, model_dir=model_cfg.text_model or None)
    tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, emb, allow_pickle=False)
    os.replace(tmp, cache)
    return emb


def train(
    data_dir: str | Path,
    out_dir: str | Path,
    *,
    model_cfg: ModelConfig | None = None,
    train_cfg: TrainConfig | None = None,
    loss_cfg: LossConfig | None = None,
    device: str | torch.device = "auto",
    resume: bool = False,
    init_from: str | Path | None = None,
    final_fit_epochs: int | None = None,
) -> dict[str, Any]:
    """Train a two-tower model on a prepared dataset; write the run directory; return the summary dict.

    Two fits: the fit on train, validated every epoch, picks the epoch count (early stopping); the final fit
    (``train.refit``) trains from scratch for that many epochs on the splits ``train.final_fit`` names and is the
    model the run publishes. The summary keeps the fit's validation metrics as ``holdout`` and records what the
    final fit saw as ``final_fit`` (splits, rows, time range, the split files' sha256), which export copies into
    the bundle and ``recsys evaluate`` checks.

    ``init_from``: a bundle version directory (or a run with its vocabularies) to warm-start from, as retraining
    does: see :func:`recsys.train.warmstart.warm_start`. Ignored when resuming (the checkpoint has the weights).
    ``final_fit_epochs``: skip the fit on train and run only the final fit, for this many epochs (an epoch count
    another run chose on validation, as retraining does after its gate).

    Raises:
        FileExistsError: ``out_dir`` already holds a run and ``resume`` is false.
        ValueError: ``resume`` with a config that differs from the run's in a field that changes the result.
        TrainingDiverged: the loss became NaN/inf (the last good checkpoint and best weights are kept).
    """
    model_cfg, train_cfg, loss_cfg = model_cfg or ModelConfig(), train_cfg or TrainConfig(), loss_cfg or LossConfig()
    run_dir = Path(out_dir)
    # under torchrun (WORLD_SIZE > 1): join the process group; the device becomes cuda:LOCAL_RANK on GPUs
    ctx, device = init_from_env(device)
    try:
        summary = _train(data_dir, run_dir, model_cfg=model_cfg, train_cfg=train_cfg, loss_cfg=loss_cfg,
                         device=device, resume=resume, init_from=init_from, ctx=ctx,
                         final_fit_epochs=final_fit_epochs)
        ctx.barrier()  # no rank tears the group down while a peer still talks to it (gloo aborts on that)
        return summary
    finally:
        if ctx.owns_group:
            torch.distributed.destroy_process_group()


def _train(
    data_dir: str | Path, run_dir: Path, *, model_cfg: ModelConfig, train_cfg: TrainConfig, loss_cfg: LossConfig,
    device: str | torch.device, resume: bool, init_from: str | Path | None, ctx: DistContext,
    final_fit_epochs: int | None = None,
) -> dict[str, Any]:
    if final_fit_epochs is not None and final_fit_epochs < 1:
        raise ValueError(f"`final_fit_epochs` must be >= 1, got {final_fit_epochs}")
    dev = resolve_device(device)
    if train_cfg.num_threads and dev.type == "cpu":
        torch.set_num_threads(train_cfg.num_threads)
    cfg_dict = _config_dict(model_cfg, train_cfg, loss_cfg)
    _check_run_dir(run_dir, cfg_dict, train_cfg, resume=resume)
    ctx.barrier()  # every rank has checked the run dir before rank 0 writes to it
    if ctx.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()

    data = load_prepared(data_dir)
    rows = data.n_items + (data.n_users if model_cfg.use_user_id else 0)
    if not train_cfg.sparse_embeddings and rows >= SPARSE_HINT_ROWS and ctx.is_main:
        # dense AdamW reads and writes every row of the ID tables (and two moments) at every step
        log.warning("the ID tables hold %d rows and train.sparse_embeddings is off: every step updates all of them; "
                    "--set train.sparse_embeddings=true updates only the batch's rows (faster steps on large tables)", rows)
    title_emb = _load_title_embeddings(data, model_cfg, run_dir)
    trainer = Trainer(data, model_cfg=model_cfg, train_cfg=train_cfg, loss_cfg=loss_cfg, device=dev,
                      title_emb=title_emb, init_from=None if resume else init_from, dist=ctx)
    ctx.barrier()  # every rank has read the old config.json / checkpoint inputs before rank 0 rewrites them
    if ctx.is_main:
        atomic_write_json(run_dir / schema.RUN_CONFIG, {
            **cfg_dict, "data_dir": str(Path(data_dir).resolve()),
            "data_dir_relative": os.path.relpath(Path(data_dir).resolve(), Path(run_dir).resolve()),
            "data_fingerprint": data.fingerprint,
            "device": str(dev), "torch": torch.__version__, "world_size": ctx.world_size,
        })  # fmt: skip
        atomic_write_json(run_dir / schema.MODEL_JSON, trainer.model.model_json())

    progress = _restore(trainer, run_dir, train_cfg) if resume else _Progress()
    if not resume and ctx.is_main:
        (run_dir / schema.METRICS_JSONL).unlink(missing_ok=True)
    final = final_fit_splits(data, train_cfg)
    if final_fit_epochs is not None and not resume:
        progress.phase, progress.refit_epochs = "refit", final_fit_epochs
        trainer.build(seed=train_cfg.seed + 1)

    writer = _Writer(run_dir, tensorboard=train_cfg.tensorboard, enabled=ctx.is_main)
    try:
        if progress.phase == "fit":
            _fit(trainer, progress, writer, run_dir, data, final, model_cfg=model_cfg, dev=dev)
            if progress.phase == "fit":  # stopped before its last epoch (a budget): nothing more to do now
                return _summary(run_dir, progress, trainer, status="incomplete")
        if progress.phase == "refit":
            _refit(trainer, progress, writer, run_dir, data, final)
        _save_checkpoint(run_dir, trainer, progress)
        return _summary(run_dir, progress, trainer, status="done")
    finally:
        writer.close()


def _check_run_dir(run_dir: Path, cfg_dict: dict[str, Any], train_cfg: TrainConfig, *, resume: bool) -> None:
    """A new run needs an empty ``run_dir``; a resumed one a checkpoint and the same config (but for
    ``RESUMABLE_CHANGES``)."""
    ckpt = run_dir / schema.CHECKPOINT_DIR
    if resume:
        if not (ckpt / STATE_JSON).exists():
            raise FileNotFoundError(f"cannot resume: {str(ckpt / STATE_JSON)!r} does not exist")
        old = json.loads((run_dir / schema.RUN_CONFIG).read_text())
        diffs = _diff_configs(old, cfg_dict)
        if diffs:
            raise ValueError(
                f"cannot resume {str(run_dir)!r} with a different config: {'; '.join(diffs)} "
                f"(only {sorted(RESUMABLE_CHANGES)} may change)"
            )
        if old["train"].get("epochs") != train_cfg.epochs and (
                train_cfg.lr_schedule != "constant" or train_cfg.warmup_epochs):
            # the finished epochs stand; the rest of the schedule is recomputed over the new length, so the rate
            # jumps to its value at this step of the longer (or shorter) phase
            log.warning("resuming %s with train.epochs %s -> %s under train.lr_schedule=%r: the remaining steps "
                        "follow the schedule of the new length (not what an uninterrupted run would do)",
                        run_dir, old["train"].get("epochs"), train_cfg.epochs, train_cfg.lr_schedule)
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(f"run dir {str(run_dir)!r} is not empty (pass resume=True / --resume to continue it)")


def _restore(trainer: Trainer, run_dir: Path, train_cfg: TrainConfig) -> _Progress:
    """The progress and trainer state of ``run_dir``'s checkpoint (loaded into ``trainer``)."""
    ckpt = run_dir / schema.CHECKPOINT_DIR
    meta = json.loads((ckpt / STATE_JSON).read_text())
    progress = _Progress(**meta["progress"])
    if (progress.phase == "done" and not progress.refit_epochs and not progress.stopped_early
            and progress.epoch < train_cfg.epochs):
        progress.phase = "fit"  # a finished run resumed with more epochs continues where it stopped
    if progress.phase == "refit":
        trainer.build(seed=train_cfg.seed + 1)
    trainer.load_state(load_file(str(ckpt / STATE_WEIGHTS)), meta)
    log.info("resuming %s: phase %s after epoch %d", run_dir, progress.phase, progress.epoch)
    return progress


def _fit(trainer: Trainer, progress: _Progress, writer: _Writer, run_dir: Path, data: PreparedData,
         final: tuple[str, ...] | list[str], *, model_cfg: ModelConfig, dev: torch.device) -> None:
    """The fit phase: train on train with validation (early stopping picks the epoch), then set up the refit on
    every final-fit split (``progress.phase`` becomes ``"refit"`` or ``"done"``; it stays ``"fit"`` when the run
    stopped before its last epoch)."""
    train_cfg, ctx = trainer.tcfg, trainer.dist
    evaluator = _validation(data, model_cfg, train_cfg, dev) if ctx.is_main else None
    if ctx.enabled and len(data.valid):
        evaluator = RankZeroEvaluator(evaluator, ctx)
    trainer.set_interactions(data.train)
    _run_phase(trainer, progress, writer, run_dir, evaluator=evaluator, epochs=train_cfg.epochs)
    if progress.epoch < train_cfg.epochs and not progress.stopped_early:
        return
    if evaluator is None:  # nothing to choose from: the last epoch is the model
        progress.best_epoch = progress.epoch
        _save_weights(trainer.model, run_dir / schema.MODEL_WEIGHTS, write=trainer.dist.is_main)
    if len(final) > 1 and progress.best_epoch > 0:
        progress.phase, progress.epoch, progress.step = "refit", 0, 0
        progress.refit_epochs = progress.best_epoch
        trainer.build(seed=train_cfg.seed + 1)
        _save_checkpoint(run_dir, trainer, progress)
    else:
        progress.phase = "done"


def _refit(trainer: Trainer, progress: _Progress, writer: _Writer, run_dir: Path, data: PreparedData,
           final: tuple[str, ...] | list[str]) -> None:
    """The refit phase: the chosen number of epochs on every final-fit split, no validation; keeps the weights."""
    parts = [getattr(data, s) for s in final[1:]]
    extra = Interactions.concat(*parts) if parts else Interactions.empty()
    trainer.set_interactions(Interactions.concat(data.train, extra))
    trainer.count_in_sampling(extra)
    trainer.set_prior_scale(progress.best_metrics.get("prior_scale"))  # the fit's choice (no validation here)
    _run_phase(trainer, progress, writer, run_dir, evaluator=None, epochs=progress.refit_epochs)
    _save_weights(trainer.model, run_dir / schema.MODEL_WEIGHTS, write=trainer.dist.is_main)
    progress.phase, progress.final_splits = "done", list(final)


def final_fit_splits(data: PreparedData, train_cfg: TrainConfig) -> tuple[str, ...]:
    """The splits the published weights are fit on: train, plus (with ``train.refit``) the non-empty splits that
    ``train.final_fit`` adds. Just ("train",) means there is no refit: the fit's best epoch is the model."""
    if not train_cfg.refit:
        return ("train",)
    wanted = ("valid", "test", "extra") if train_cfg.final_fit == "all" else ("valid",)
    return ("train", *(s for s in wanted if len(getattr(data, s))))


def final_fit_record(data_dir: str | Path, splits: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """What a final fit saw, for the bundle manifest and ``recsys evaluate``'s in-sample check: the splits, their
    row count and time range, the prepared dataset's fingerprint and each split file's sha256."""
    d = Path(data_dir)
    rows, lo, hi = 0, None, None
    for s in splits:
        t = pq.read_table(d / schema.SPLITS[s], columns=[schema.TS])
        rows += t.num_rows
        if t.num_rows:
            mm = pc.min_max(t.column(schema.TS))
            lo = mm["min"].as_py() if lo is None else min(lo, mm["min"].as_py())
            hi = mm["max"].as_py() if hi is None else max(hi, mm["max"].as_py())
    return {"splits": list(splits), "rows": rows, "ts_min_ms": lo, "ts_max_ms": hi,
            "data_fingerprint": fingerprint(d),
            "split_sha256": {s: sha256_file(d / schema.SPLITS[s]) for s in splits}}


def time_blocks(time_order: torch.Tensor, bs: int, n_batches: int, *, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """One epoch's row order for ``train.time_batches``: ``n_batches`` batches of ``bs`` rows consecutive in time
    (``time_order``: the rows sorted by time), the batches in random order, the cut points shifted by a random
    offset so they move from epoch to epoch."""
    n = int(time_order.shape[0])
    shift = int(torch.randint(0, max(bs, 1), (1,), generator=generator))
    blocks = torch.randperm(n_batches, generator=generator).to(time_order.device)
    start = (blocks * bs + shift).clamp(max=max(n - bs, 0))
    return time_order[(start[:, None] + torch.arange(bs, device=time_order.device)).reshape(-1)]


def sequence_windows(user_start: np.ndarray, n: int) -> np.ndarray:
    """The transformer's training examples: the rows where the windows of ``n`` targets that tile each user's rows
    end, counted back from the user's last row (rows ``end - 1``, ``end - 1 - n``, ...), so each row but a user's
    first is the target of exactly one window per epoch. ``user_start`` [rows]: each row's user's first row
    (``Interactions.user_start``); rows are grouped by user, by time within a user. A user's first row has nothing
    before it to read and is never a target."""
    rows = np.arange(len(user_start), dtype=np.int64)
    last = np.empty_like(rows)  # each row's user's last row
    if len(rows):
        new = np.flatnonzero(np.diff(user_start, prepend=-1) != 0)  # the first row of each user
        ends = np.append(new[1:], len(rows)) - 1
        last = np.repeat(ends, np.diff(np.append(new, len(rows))))
    keep = ((last - rows) % n == 0) & (rows > user_start)
    return rows[keep]


def _run_phase(
    trainer: Trainer, progress: _Progress, writer: _Writer, run_dir: Path, *, evaluator: Evaluator | None,
    epochs: int,
) -> None:
    """Train epochs ``progress.epoch + 1 .. epochs`` of the current phase, validating and checkpointing each."""
    tc = trainer.tcfg
    ctx = trainer.dist
    n = trainer.n_examples
    # the global batch; each of the W ranks takes bs / W examples of it. The transformer's examples are windows of
    # up to N targets: as many windows as make about `train.batch_size` targets (>= 2, so there are negatives)
    bs = tc.batch_size if trainer.windows is None else max(2, round(tc.batch_size / trainer.targets_per_example))
    bs = min(bs, n)
    bs -= bs % ctx.world_size
    ctx.local_batch(bs)
    n_batches = max(1, n // bs)  # the ragged tail is dropped: a tiny last batch has too few negatives
    # Reading the loss on the host waits for the device: on CPU that is free, on CUDA only every log_every steps
    # (and at the epoch's end) is the loss read, checked for NaN and logged.
    check_every = 1 if trainer.device.type == "cpu" else max(tc.log_every, 1) if tc.log_every else n_batches
    phase = progress.phase
    # the lr schedule spans the phase's full length (``epochs`` x batches), whether or not early stopping cuts it
    # short; it is a function of the step alone, so a resumed run gets the same rates
    total_steps = epochs * n_batches
    warmup_steps = round(tc.warmup_epochs * n_batches)
    scheduled = tc.lr_schedule != "constant" or warmup_steps > 0
    # a bar only on a terminal: in a log file its redraws are noise (each epoch's line is logged either way); there
    # a long epoch logs one progress line every `recsys --progress-every` seconds instead (recsys.core.logs)
    show_bar = tc.progress and sys.stderr.isatty()
    # early stopping ends the fit phase only; the refit phase always runs its fixed number of epochs
    while progress.epoch < epochs and not (phase == "fit" and progress.stopped_early):
        epoch = progress.epoch + 1
        t0 = time.perf_counter()
        perm = _epoch_order(trainer, phase, epoch, n=n, bs=bs, n_batches=n_batches)
        total_t = _run_epoch(trainer, progress, writer, run_dir, perm, epoch=epoch, epochs=epochs, bs=bs,
                             n_batches=n_batches, check_every=check_every, total_steps=total_steps,
                             warmup_steps=warmup_steps, scheduled=scheduled, show_bar=show_bar, t0=t0)
        total = float(ctx.all_reduce_mean(total_t))
        seconds = time.perf_counter() - t0
        progress.epoch = epoch
        progress.train_seconds += seconds
        examples = round(n_batches * bs * trainer.targets_per_example)  # targets trained (window ends x positions)
        progress.examples += examples
        rec: dict[str, Any] = {"phase": phase, "epoch": epoch, "loss": total / n_batches,
                               "seconds": round(seconds, 3), "examples_per_s": round(examples / seconds, 1)}
        if trainer.lcfg.learn_temperature:
            rec["temperature"] = trainer.temperature_value()
        if evaluator is not None and (epoch % tc.eval_every == 0 or epoch == epochs):
            rec.update(_validate(trainer, progress, evaluator, run_dir, epoch=epoch))
        writer.write("epoch", progress.step, **rec)
        log.info("%s", " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in rec.items()),
                 extra=rec)  # the fields again, for `--log-format json`
        _save_checkpoint(run_dir, trainer, progress)


def _epoch_order(trainer: Trainer, phase: str, epoch: int, *, n: int, bs: int, n_batches: int) -> torch.Tensor:
    """The epoch's row order ``[n]`` on the trainer's device (seeded per phase and epoch under DDP)."""
    tc, ctx = trainer.tcfg, trainer.dist
    if ctx.enabled:
        # one permutation for every rank (a generator of its own), and per-rank dropout / negative draws
        gen = torch.Generator().manual_seed(epoch_seed(tc.seed, phase, epoch))
        perm = torch.randperm(n, generator=gen).to(trainer.device)
        torch.manual_seed(epoch_seed(tc.seed, phase, epoch, ctx.rank))
    else:
        gen = None
        perm = torch.randperm(n).to(trainer.device)  # CPU generator: the same order on CPU and CUDA
    if tc.time_batches:
        perm = time_blocks(trainer.time_order, bs, n_batches, generator=gen)
    return perm


def _run_epoch(
    trainer: Trainer, progress: _Progress, writer: _Writer, run_dir: Path, perm: torch.Tensor, *, epoch: int,
    epochs: int, bs: int, n_batches: int, check_every: int, total_steps: int, warmup_steps: int, scheduled: bool,
    show_bar: bool, t0: float,
) -> torch.Tensor:
    """One epoch's steps over ``perm``; the summed loss (a device scalar). Logs progress, stops on divergence."""
    tc, ctx, phase = trainer.tcfg, trainer.dist, progress.phase
    total_t = torch.zeros((), dtype=torch.float64, device=trainer.device)
    bar = tqdm(range(n_batches), desc=f"{phase} epoch {epoch}/{epochs}", disable=not show_bar, leave=False,
               unit="batch")
    throttle = Throttle(enabled=tc.progress and not show_bar and ctx.is_main)
    for b in bar:
        rows = ctx.shard(perm[b * bs : (b + 1) * bs])
        check = (b + 1) % check_every == 0 or b + 1 == n_batches
        if scheduled:
            trainer.set_lr_factor(lr_factor(min(progress.step, total_steps - 1), total_steps,
                                            schedule=tc.lr_schedule, warmup=warmup_steps))
        value_t = trainer.step(rows, check=check_every == 1)  # checked: already the mean over ranks
        total_t += value_t
        value = 0.0
        if check:
            value = float(value_t if check_every == 1 else ctx.all_reduce_mean(value_t))
            if check_every > 1 and not math.isfinite(float(ctx.all_reduce_mean(total_t))):
                value = float("nan")  # a step since the last check went non-finite (and was applied)
        if not math.isfinite(value):
            _diverged(trainer, progress, writer, run_dir, value, epoch=epoch, batch=b + 1, n_batches=n_batches)
        progress.step += 1
        if check and tc.log_every and progress.step % tc.log_every == 0:
            writer.write("train", progress.step, phase=phase, epoch=epoch, loss=value)
        if show_bar and check:
            el = time.perf_counter() - t0
            bar.set_postfix(loss=f"{value:.4f}", ex_s=f"{(b + 1) * bs * trainer.targets_per_example / max(el, 1e-9):.0f}")
        elif check and throttle.due():
            el = time.perf_counter() - t0
            ex_s = round((b + 1) * bs * trainer.targets_per_example / max(el, 1e-9), 1)
            log.info("%s epoch %d/%d: batch %d/%d loss=%.4g examples_per_s=%.0f", phase, epoch, epochs, b + 1,
                     n_batches, value, ex_s, extra={"phase": phase, "epoch": epoch, "batch": b + 1,
                                                    "batches": n_batches, "loss": value, "examples_per_s": ex_s})
    bar.close()
    return total_t


def _diverged(trainer: Trainer, progress: _Progress, writer: _Writer, run_dir: Path, value: float, *, epoch: int,
              batch: int, n_batches: int) -> NoReturn:
    """Record a non-finite loss and stop with an error that says what was kept and what to try."""
    phase = progress.phase
    writer.write("diverged", progress.step, phase=phase, epoch=epoch, loss=str(value))
    _summary(run_dir, progress, trainer, status="diverged")
    raise TrainingDiverged(
        f"loss became {value} at {phase} epoch {epoch}, batch {batch}/{n_batches} (step "
        f"{progress.step + 1}); training stopped. The last good checkpoint "
        f"({str(run_dir / schema.CHECKPOINT_DIR)!r}, {phase} epoch {progress.epoch}) and the best "
        f"weights were kept. Try a lower train.lr, a higher loss.temperature or train.grad_clip."
        if progress.epoch or phase == "refit" else
        f"loss became {value} at {phase} epoch 1, batch {batch}/{n_batches}; training stopped before "
        f"any checkpoint was written. Try a lower train.lr, a higher loss.temperature or train.grad_clip."
    )


def _validate(trainer: Trainer, progress: _Progress, evaluator: Any, run_dir: Path, *, epoch: int) -> dict[str, Any]:
    """Validate the model after ``epoch``; keep its weights if best so far, count towards early stopping. Returns
    the epoch record's fields (``valid_*``, ``best_epoch``)."""
    tc = trainer.tcfg
    rec: dict[str, Any] = {}
    metrics = evaluator(trainer.model, select=tc.early_stop_metric)
    if tc.early_stop_metric not in metrics:
        raise ValueError(
            f"`train.early_stop_metric` {tc.early_stop_metric!r} is not a validation metric; "
            f"choose one of {sorted(metrics)}"
        )
    rec.update({f"valid_{k}": v for k, v in metrics.items()})
    value = metrics[tc.early_stop_metric]
    if value > progress.best_value:
        progress.best_value, progress.best_epoch, progress.bad_evals = value, epoch, 0
        progress.best_metrics = dict(metrics)
        trainer.set_prior_scale(metrics.get("prior_scale"))  # saved with these weights
        _save_weights(trainer.model, run_dir / schema.MODEL_WEIGHTS, write=trainer.dist.is_main)
    else:
        progress.bad_evals += 1
        if tc.patience and progress.bad_evals >= tc.patience:
            progress.stopped_early = True
    rec["best_epoch"] = progress.best_epoch
    return rec


def _summary(run_dir: Path, progress: _Progress, trainer: Trainer, *, status: str) -> dict[str, Any]:
    summary = {
        "status": status,
        "world_size": trainer.dist.world_size,
        "best_epoch": progress.best_epoch,
        "best_metrics": progress.best_metrics,
        "epochs_run": progress.epoch if progress.phase != "done" else None,
        "stopped_early": progress.stopped_early,
        "refit_epochs": progress.refit_epochs,
        "holdout": {
            "estimate": "validation metrics of the fit on train at its best epoch (the split the final fit "
                        "then trains on is no longer held out)",
            "fit_on": ["train"], "split": "valid", "best_epoch": progress.best_epoch,
            "metrics": progress.best_metrics,
        },
        "final_fit": (final_fit_record(trainer.data.path, progress.final_splits)
                      if status == "done" else None),
        "phase": progress.phase,
        "steps": progress.step,
        "train_seconds": round(progress.train_seconds, 3),
        "examples_per_s": round(progress.examples / progress.train_seconds, 1) if progress.train_seconds else None,
        "device": str(trainer.device),
        "loss_kernel": trainer.loss_kernel,
        "history_kernel": trainer.history_kernel,
        "cuda_graphs": trainer.graphed is not None and trainer.graphed.graph is not None,
        "n_parameters": sum(p.numel() for p in trainer.model.parameters()),
        "metric": trainer.model.metric,
        "temperature": trainer.temperature_value(),
    }
    if trainer.dist.is_main:
        atomic_write_json(run_dir / schema.SUMMARY, summary)
    return summary


def load_configs(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[ModelConfig, TrainConfig, LossConfig]:
    """The three training sections of one TOML file + ``section.field=value`` overrides."""
    unknown = sorted(set(parse_overrides(overrides)) - {"model", "train", "loss"})
    if unknown:
        raise ConfigError(f"override section(s) {unknown} are not training sections (model, train, loss)")
    return (
        load_section(ModelConfig, "model", path=path, overrides=overrides),
        load_section(TrainConfig, "train", path=path, overrides=overrides),
        load_section(LossConfig, "loss", path=path, overrides=overrides),
    )


__all__ = ["Evaluator", "Trainer", "TrainingDiverged", "load_configs", "lr_factor",
           "resolve_device", "train"]
