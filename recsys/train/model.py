"""The two-tower retrieval model and the configs of the training stage.

Both towers end in an L2-normalised vector of size ``dim``; the score of a (user, item) pair is the dot product of
the two vectors, i.e. their cosine (``TwoTower.metric == "cosine"``, recorded in ``model.json``). Training, export,
the index and serving all read the metric from there, so the geometry cannot drift between stages.

Item tower::

    x_item = [keep_id] * E_id[item] + sum_f E_f[feat_f(item)] (+ W_text @ title_emb(item))      # [B, E]
    item   = normalize(MLP(x_item))                                                             # [B, dim]

A multi-valued feature (genres, tags) contributes the mean of its values' embeddings.

``keep_id`` is dropped at random while training (``item_id_dropout``) so the features-only path
(:meth:`TwoTower.encode_item_features`) gives a usable vector to an item that was never trained on.

User tower::

    x_user = [keep_id] * U_id[user] + sum_g U_g[feat_g(user)]                                   # [B, E]
    h      = pool(H[history items])          # mean or attention over the last N items, pads masked  [B, E]
    user   = normalize(MLP([x_user, h, H[last item]]))                                          # [B, dim]

or with ``model.user_tower = "transformer"`` (SASRec-style)::

    s      = CausalEncoder(H[history items] + P[position])   # one output per position, reading items <= it  [B, N, E]
    user_i = normalize(MLP([x_user, s_i]))                    # the user after their i-th item               [B, N, dim]
    user   = user_{last}                                      # what export and serving use                  [B, dim]

Training asks every position ``i`` for item ``i + 1`` (``Trainer.loss``); a pad position is never a query.

The user ID is dropped at random while training (``user_id_dropout``), so a user never seen in training is embedded
from a list of item IDs alone (``user_idx == -1``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

from recsys.core import schema
from recsys.core.config import from_dict, to_dict
from recsys.train.config import FeatureSpec, ModelConfig
from recsys.train.layers import AttentionPool, CausalEncoder, CodeEmbedding, mlp
from recsys.train.recency import N_USER_TIME_FEATURES, n_time_features, new_user_time_features

# bump when the layout of model.json / the weight names change
MODEL_FORMAT = 1


# ``model.time_prior``: the bound of each item-side component and the hidden width of both MLPs
PRIOR_BOUND = 1.0


PRIOR_HIDDEN = 16


# the prior's weight at serving (score = cos + scale * g . h), chosen on validation each time the trainer
# validates; 1.0 (as trained) first, so a tie keeps it
PRIOR_SCALES = (1.0, 0.5, 1.5, 2.0, 3.0, 5.0, 8.0)


class TwoTower(nn.Module):
    """User tower + item tower with L2-normalised outputs; score = dot product (cosine)."""

    metric = schema.METRIC

    # ~80 lines: declares every module of both towers (one line or two each).
    def __init__(
        self,
        spec: FeatureSpec,
        cfg: ModelConfig | None = None,
        *,
        item_feats: Tensor | None = None,
        user_feats: Tensor | None = None,
        item_text: Tensor | None = None,
    ) -> None:
        """``item_feats`` [n_items, F] / ``user_feats`` [n_users, G] int codes, ``item_text`` [n_items, T] float.

        The feature tables are buffers: they are saved with the weights, so the towers are self-contained given
        ``item_idx`` / ``user_idx`` / a history.
        """
        super().__init__()
        cfg = cfg or ModelConfig()
        self.cfg = cfg
        self.spec = spec
        self.n_users = spec.n_users
        self.n_items = spec.n_items
        self.dim = cfg.dim
        e = cfg.embedding_dim
        self.item_feature_names = list(spec.item_features) if cfg.use_item_features else []
        self.user_feature_names = list(spec.user_features) if cfg.use_user_features else []
        self.text_dim = spec.text_dim if cfg.use_text else 0

        # item tower
        self.item_id = nn.Embedding(spec.n_items, e)
        # code 0 = missing/unknown: a fixed zero row, so an unknown value adds nothing instead of untrained noise
        self.item_feat = nn.ModuleList([CodeEmbedding(spec.item_features[n], e) for n in self.item_feature_names])
        self.item_text_proj = nn.Linear(self.text_dim, e) if self.text_dim else None
        self.item_mlp = mlp(e, cfg.hidden, cfg.dim, cfg.dropout)
        # time inputs (recsys.train.recency.item_time_features): a small MLP of the item's recent rates and age
        n_time = n_time_features(cfg.time_windows_days) if cfg.time_features or cfg.time_prior else 0
        self.item_time = mlp(n_time, (e,), e, 0.0) if cfg.time_features else None
        # model.time_prior: h = PRIOR_BOUND * tanh(MLP(item time inputs)), zero at the start (its last layer starts
        # at zero), and g = MLP(user state)
        k = cfg.time_prior_rank
        self.prior_item = mlp(n_time, (PRIOR_HIDDEN,), k, 0.0) if cfg.time_prior else None
        self.prior_user = mlp(N_USER_TIME_FEATURES, (PRIOR_HIDDEN,), k, 0.0) if cfg.time_prior else None
        # the size of what the bundle stores and the index searches: the tower output, + K + 1 with a prior
        self.out_dim = cfg.dim + (k + 1 if cfg.time_prior else 0)

        # user tower
        self.user_id = nn.Embedding(spec.n_users, e) if cfg.use_user_id else None
        self.user_feat = nn.ModuleList([CodeEmbedding(spec.user_features[n], e) for n in self.user_feature_names])
        self.history_emb = None if cfg.share_history_embeddings else nn.Embedding(spec.n_items, e)
        self.sequential = cfg.user_tower == "transformer"
        self.encoder = CausalEncoder(e, cfg.history_len, layers=cfg.transformer_layers, heads=cfg.transformer_heads,
                                     dropout=cfg.dropout) if self.sequential else None
        self.pool = AttentionPool(e, cfg.history_len) \
            if cfg.history_pooling == "attention" and not self.sequential else None
        self.last_item = cfg.last_item and not self.sequential
        self.user_mlp = mlp((3 if self.last_item else 2) * e, cfg.hidden, cfg.dim, cfg.dropout)
        self.input_dropout = nn.Dropout(cfg.dropout)

        # column slices of the feature buffers: (start, width) per feature, width > 1 for a multi-valued one
        self._item_cols = _slices(self.item_feature_names, spec.item_feature_widths)
        self._user_cols = _slices(self.user_feature_names, spec.user_feature_widths)
        n_if = sum(w for _, w in self._item_cols)
        n_uf = sum(w for _, w in self._user_cols)
        self.register_buffer("item_feats", _codes(item_feats, spec.n_items, n_if, "item_feats"))
        self.register_buffer("user_feats", _codes(user_feats, spec.n_users, n_uf, "user_feats"))
        if self.text_dim:
            if item_text is None:
                item_text = torch.zeros(spec.n_items, self.text_dim)
            if tuple(item_text.shape) != (spec.n_items, self.text_dim):
                raise ValueError(
                    f"`item_text` must have shape [{spec.n_items}, {self.text_dim}], got {list(item_text.shape)}"
                )
            self.register_buffer("item_text", item_text.float())
        else:
            self.item_text = None
        if n_time:
            # the time inputs as of the end of the logs (what encode_items uses; set by the trainer, saved with the
            # weights), and those of an item without any event (a new item embedded from its features)
            self.register_buffer("item_now", torch.zeros(spec.n_items, n_time))
            self.register_buffer("item_cold", torch.zeros(n_time))
        else:
            self.item_now = self.item_cold = None
        # the users' states as of the end of the logs (model.time_prior; set by the trainer, saved with the weights)
        # and the prior's weight at serving (PRIOR_SCALES: chosen on validation by the trainer)
        if cfg.time_prior:
            self.register_buffer("user_now", torch.zeros(spec.n_users, N_USER_TIME_FEATURES))
            self.register_buffer("prior_scale", torch.ones(()))
        else:
            self.user_now = self.prior_scale = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Embedding) and m is not getattr(self.pool, "recency", None):
                # the transformer's position table starts small, as GPT-2's does
                std = 0.02 if m is getattr(self.encoder, "position", None) else self.cfg.init_std
                nn.init.normal_(m.weight, std=std)
                if isinstance(m, CodeEmbedding):
                    with torch.no_grad():
                        m.weight[0].zero_()
        if self.prior_item is not None:
            nn.init.zeros_(self.prior_item[-1].weight)
            nn.init.zeros_(self.prior_item[-1].bias)

    # ------------------------------------------------------------------ item tower
    def set_time_state(self, now: Tensor, cold: Tensor, users: Tensor | None = None) -> None:
        """The item time inputs serving uses: ``now`` [n_items, T] as of the end of the logs, ``cold`` [T] for an
        item without events (``recsys.train.recency.item_time_features`` / ``cold_time_features``); with
        ``model.time_prior`` also ``users`` [n_users, 2], each user's state then (``recsys.train.recency.user_time_state``)."""
        if (users is None) != (self.user_now is None):
            raise ValueError("the users' time state is needed exactly when `model.time_prior` is on")
        if users is not None:
            if tuple(users.shape) != tuple(self.user_now.shape):
                raise ValueError(f"user time state must be {list(self.user_now.shape)}, got {list(users.shape)}")
            with torch.no_grad():
                self.user_now.copy_(users)
        if self.item_now is None:
            raise ValueError("this model has no time inputs (`model.time_features` and `model.time_prior` are off)")
        if tuple(now.shape) != tuple(self.item_now.shape) or tuple(cold.shape) != tuple(self.item_cold.shape):
            raise ValueError(f"time state must be {list(self.item_now.shape)} and {list(self.item_cold.shape)}, got "
                             f"{list(now.shape)} and {list(cold.shape)}")
        with torch.no_grad():
            self.item_now.copy_(now)
            self.item_cold.copy_(cold)

    def item_prior(self, time: Tensor) -> Tensor:
        """``model.time_prior``'s item side: time inputs ``[..., T]`` -> ``h`` ``[..., K]`` (each in
        ``(-PRIOR_BOUND, PRIOR_BOUND)``)."""
        if self.prior_item is None:
            raise ValueError("this model has no score prior (`model.time_prior` is off)")
        return PRIOR_BOUND * torch.tanh(self.prior_item(time.to(self.item_now.dtype)).float())

    def user_prior(self, state: Tensor, *, served: bool = False) -> Tensor:
        """``model.time_prior``'s user side: user states ``[B, 2]`` -> ``g`` ``[B, K]`` as trained, or with
        ``served`` times ``prior_scale`` (the prior's weight at serving, chosen on validation: the newest events
        can need more of "what is popular now" than the training rows, most of them older, taught)."""
        if self.prior_user is None:
            raise ValueError("this model has no score prior (`model.time_prior` is off)")
        g = self.prior_user(state.to(self.user_now.dtype)).float()
        return g * self.prior_scale if served else g

    def user_state(self, user_idx: Tensor, history: Tensor) -> Tensor:
        """``[B, 2]``: a known user's state as of the end of the logs; a new user's (row -1): no tenure, as many
        events as their history's items (of the last ``history_len``)."""
        known = (user_idx >= 0)[:, None]
        n_hist = (history[:, -self.cfg.history_len :] >= 0).sum(1)
        new = self.new_user_states()[n_hist]
        return torch.where(known, self.user_now[user_idx.clamp(min=0)], new)

    def new_user_states(self) -> Tensor:
        """``[history_len + 1, 2]``: a new user's state by their history's length
        (``recsys.train.recency.new_user_time_features``)."""
        return torch.as_tensor(new_user_time_features(self.cfg.history_len), device=self.user_now.device)

    def served_items(self, v: Tensor, h: Tensor | None = None) -> Tensor:
        """Tower outputs ``v`` [B, dim] (unit) -> the vectors the bundle stores and the index searches ``[B, out_dim]``.

        Without a prior: ``v`` itself. With one (``h`` [B, K], each ``|h_k| < P = PRIOR_BOUND``):
        ``[v, h, sqrt(K P^2 - |h|^2)] / sqrt(1 + K P^2)``, a unit vector for every item (the norm-equalising extra
        dimension of the MIPS-to-cosine reduction, Bachrach et al. 2014). Against :meth:`served_users`' query
        ``[u, g, 0] / |[u, g]|`` the dot product is ``(cos(u, v) + g . h) / c_user``: the model's score divided by
        a positive number that depends on the query only, so a cosine index (HNSW included) ranks exactly by it.
        """
        if self.prior_item is None:
            return v
        k = self.cfg.time_prior_rank
        if h is None or tuple(h.shape) != (v.shape[0], k):
            raise ValueError(f"a model with a score prior needs `h` [{v.shape[0]}, {k}] with the item vectors")
        h = h.to(v.dtype)
        rest = torch.sqrt((k * PRIOR_BOUND**2 - (h * h).sum(1, keepdim=True)).clamp(min=0.0))
        return torch.cat([v, h, rest], dim=1) / math.sqrt(1.0 + k * PRIOR_BOUND**2)

    def served_users(self, u: Tensor, g: Tensor | None = None) -> Tensor:
        """Tower outputs ``u`` [B, dim] (unit) -> the query vectors ``[B, out_dim]``: ``u`` itself, or with a prior
        (``g`` [B, K]) the unit vector ``[u, g, 0] / sqrt(1 + |g|^2)`` (see :meth:`served_items`)."""
        if self.prior_item is None:
            return u
        g = g.to(u.dtype)
        z = torch.cat([u, g, torch.zeros_like(g[:, :1])], dim=1)
        return z / torch.sqrt(1.0 + (g * g).sum(1, keepdim=True))

    def _item_input(
        self, ids: Tensor | None, feats: Tensor, text: Tensor | None, *, id_keep: Tensor | None = None,
        feat_keep: Tensor | None = None, time: Tensor | None = None,
    ) -> Tensor:
        """Sum of the item-tower input embeddings -> [B, E]. ``*_keep`` [B] / [B, F+1] float masks (1 = keep).
        ``time`` [B, T]: the items' time inputs (default: as of the end of the logs; a new item's: none)."""
        x = 0.0
        if ids is not None:
            x = self.item_id(ids)
            if id_keep is not None:
                x = x * id_keep.unsqueeze(1)
        for j, emb in enumerate(self.item_feat):
            v = _feature_input(emb, feats, *self._item_cols[j])
            if feat_keep is not None:
                v = v * feat_keep[:, j : j + 1]
            x = x + v
        if self.item_text_proj is not None and text is not None:
            v = self.item_text_proj(text)
            if feat_keep is not None:
                v = v * feat_keep[:, -1:]
            x = x + v
        if self.item_time is not None:
            if time is None:
                time = self.item_now[ids] if ids is not None else self.item_cold.expand(feats.shape[0], -1)
            x = x + self.item_time(time.to(self.item_now.dtype))
        if isinstance(x, float):  # no ID and no features: an all-zero input
            x = torch.zeros(feats.shape[0], self.cfg.embedding_dim, device=feats.device)
        return x

    def _item_head(self, x: Tensor) -> Tensor:
        return F.normalize(self.item_mlp(self.input_dropout(x)).float(), dim=-1)

    def encode_items(self, item_idx: Tensor, *, id_dropout: float = 0.0) -> Tensor:
        """Item rows [B] -> the served vectors [B, out_dim] (:meth:`served_items`): ID + the item's stored feature codes
        (+ title embedding); with ``model.time_prior`` the prior as of the end of the logs.

        ``id_dropout`` (training only) replaces the ID embedding by nothing for a random share of the rows.
        """
        self._check_rows(item_idx, self.n_items, "item_idx")
        item_idx = item_idx.long()
        v = self._items(item_idx, id_dropout=id_dropout)
        return self.served_items(v, None if self.prior_item is None else self.item_prior(self.item_now[item_idx]))

    def _items(self, item_idx: Tensor, *, id_dropout: float = 0.0, time: Tensor | None = None) -> Tensor:
        """:meth:`encode_items` without the range checks (they sync the device; the trainer's rows are valid).
        ``time`` [B, T]: each item's time inputs as of its training example (default: the end of the logs)."""
        keep = None
        if id_dropout > 0:
            keep = (torch.rand(item_idx.shape[0], device=item_idx.device) >= id_dropout).float()
        text = self.item_text[item_idx] if self.item_text is not None else None
        return self._item_head(self._item_input(item_idx, self.item_feats[item_idx], text, id_keep=keep, time=time))

    def encode_item_features(self, feats: Tensor, title_emb: Tensor | None = None) -> Tensor:
        """A new item from features alone (ID dropped): ``feats`` [B, F] codes (0 = unknown) -> [B, out_dim]
        (with a prior: that of an item without events).

        Columns follow ``item_feature_names``; ``title_emb`` [B, T] when the model uses text.
        """
        widths = [w for _, w in self._item_cols]
        if feats.dim() != 2 or feats.shape[1] != sum(widths):
            cols = f", columns {widths}" if any(w > 1 for w in widths) else ""
            raise ValueError(
                f"`feats` must have shape [B, {sum(widths)}] (features {self.item_feature_names}{cols}), got "
                f"{list(feats.shape)}"
            )
        feats = feats.long()
        for j, emb in enumerate(self.item_feat):
            a, w = self._item_cols[j]
            col = feats[:, a : a + w]
            if col.numel() and (int(col.min()) < 0 or int(col.max()) >= emb.num_embeddings):
                raise ValueError(
                    f"item feature {self.item_feature_names[j]!r} codes must be in [0, {emb.num_embeddings}), "
                    f"got values in [{int(col.min())}, {int(col.max())}]"
                )
        if title_emb is not None and self.item_text_proj is not None:
            if tuple(title_emb.shape) != (feats.shape[0], self.text_dim):
                raise ValueError(
                    f"`title_emb` must have shape [{feats.shape[0]}, {self.text_dim}], got {list(title_emb.shape)}"
                )
            title_emb = title_emb.float()
        v = self._item_head(self._item_input(None, feats, title_emb))
        if self.prior_item is None:
            return v
        return self.served_items(v, self.item_prior(self.item_cold.expand(v.shape[0], -1)))

    def item_views(self, item_idx: Tensor, drop: float) -> tuple[Tensor, Tensor]:
        """Two feature-dropout views of the items (self-supervised loss): each input (ID, each feature, title)
        masked with prob ``drop``, the masks drawn by :func:`recsys.train.losses.feature_dropout` (one rule for both)."""
        # looked up at call time: tests monkeypatch recsys.train.losses.feature_dropout
        from recsys.train.losses import feature_dropout

        text = self.item_text[item_idx] if self.item_text is not None else None
        feats = self.item_feats[item_idx]
        n_in = 1 + len(self.item_feat) + (1 if self.item_text_proj is not None else 0)
        inputs = torch.ones(item_idx.shape[0], n_in, dtype=torch.long, device=item_idx.device)  # 1 = present
        views = []
        for _ in range(2):
            keep = feature_dropout(inputs, drop).float()  # [B, n_in], 0 = dropped
            x = self._item_input(item_idx, feats, text, id_keep=keep[:, 0], feat_keep=keep[:, 1:])
            views.append(self._item_head(x))
        return views[0], views[1]

    # ------------------------------------------------------------------ user tower
    def _history_table(self) -> nn.Embedding:
        return self.item_id if self.history_emb is None else self.history_emb

    def pool_history(self, history: Tensor) -> Tensor:
        """history [B, N] item rows (-1 = pad) -> pooled [B, E]; an empty history pools to zeros."""
        if self.pool is not None and self.pool.kernel == "triton" and self.training:
            from recsys.train.kernels import fused_pool  # triton: optional

            return fused_pool.attention_pool(self._history_table(), history, self.pool)
        mask = history >= 0
        h = self._history_table()(history.clamp(min=0))  # [B, N, E]
        if self.pool is not None:
            return self.pool(h, mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1.0)

    def encode_users(self, user_idx: Tensor, history: Tensor, *, id_dropout: float = 0.0) -> Tensor:
        """user_idx [B] (-1 = unknown user), history [B, N] item rows oldest first (-1 = pad) -> the
        query vectors [B, out_dim] (:meth:`served_users`).

        Only the last ``history_len`` columns are used. Unknown users are embedded from their history (+ feature
        code 0). ``id_dropout`` (training only) drops the user ID and features of a random share of the rows.
        """
        if user_idx.dim() != 1 or history.dim() != 2 or history.shape[0] != user_idx.shape[0]:
            raise ValueError(
                f"`user_idx` must be [B] and `history` [B, N] with the same B, got {list(user_idx.shape)} "
                f"and {list(history.shape)}"
            )
        user_idx, history = user_idx.long(), history.long()
        if user_idx.numel() and (int(user_idx.max()) >= self.n_users or int(user_idx.min()) < -1):
            raise ValueError(
                f"`user_idx` must be in [-1, {self.n_users}) (-1 = unknown user), got values in "
                f"[{int(user_idx.min())}, {int(user_idx.max())}]"
            )
        if history.numel() and (int(history.max()) >= self.n_items or int(history.min()) < -1):
            raise ValueError(
                f"`history` item rows must be in [-1, {self.n_items}), got values in "
                f"[{int(history.min())}, {int(history.max())}]"
            )
        u = self._users(user_idx, history, id_dropout=id_dropout)
        if self.prior_user is None:
            return u
        return self.served_users(u, self.user_prior(self.user_state(user_idx, history), served=True))

    def _users(self, user_idx: Tensor, history: Tensor, *, id_dropout: float = 0.0) -> Tensor:
        """:meth:`encode_users` without the range checks (they sync the device; the trainer's rows are valid)."""
        history = history[:, -self.cfg.history_len :]
        x = self._user_input(user_idx, id_dropout)
        if self.encoder is not None:
            last = history[:, -1:]  # right-aligned: the last column is the most recent item (-1 = none)
            h = self.encoder(self._history_table()(history.clamp(min=0)), history >= 0)[:, -1]
            parts = [x, h * (last >= 0).float()]  # an empty history reads as zeros, as the pool's does
        else:
            parts = [x, self.pool_history(history)]
        if self.last_item:
            last = history[:, -1]
            parts.append(self._history_table()(last.clamp(min=0)) * (last >= 0).float().unsqueeze(1))
        z = torch.cat(parts, dim=1)
        return F.normalize(self.user_mlp(self.input_dropout(z)).float(), dim=-1)

    def _user_sequence(self, user_idx: Tensor, history: Tensor, *, id_dropout: float = 0.0) -> Tensor:
        """``model.user_tower = "transformer"``, training: the user tower's output after each history position,
        ``[B, N, dim]`` (position ``i`` reads history items ``<= i``; pad positions are garbage, the caller drops
        them). The last column is :meth:`_users`' output."""
        if self.encoder is None:
            raise ValueError("only `model.user_tower = \"transformer\"` has an output per position")
        x = self._user_input(user_idx, id_dropout)  # [B, E]
        s = self.encoder(self._history_table()(history.clamp(min=0)), history >= 0)  # [B, N, E]
        z = torch.cat([x[:, None, :].expand(-1, s.shape[1], -1), s], dim=2)
        return F.normalize(self.user_mlp(self.input_dropout(z)).float(), dim=-1)

    def _user_input(self, user_idx: Tensor, id_dropout: float) -> Tensor:
        """[B, E]: the user-ID embedding + the user feature embeddings (zeros for an unknown / dropped user)."""
        known = user_idx >= 0
        rows = user_idx.clamp(min=0)
        b = user_idx.shape[0]
        x = torch.zeros(b, self.cfg.embedding_dim, device=user_idx.device)
        # An unknown user has no ID and no features (code 0). Training drops both together for a random share of
        # the rows, so the history-only path that serves unknown users is trained as such.
        keep = known
        if id_dropout > 0:
            keep = keep & (torch.rand(b, device=user_idx.device) >= id_dropout)
        if self.user_id is not None:
            x = x + self.user_id(rows) * keep.float().unsqueeze(1)
        if self.user_feature_names:
            codes = self.user_feats[rows] * keep.unsqueeze(1).long()  # dropped / unknown user -> code 0 ("missing")
            for j, emb in enumerate(self.user_feat):
                x = x + _feature_input(emb, codes, *self._user_cols[j])
        return x

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _check_rows(idx: Tensor, n: int, name: str) -> None:
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(f"`{name}` must be in [0, {n}), got values in [{int(idx.min())}, {int(idx.max())}]")

    def embedding_parameters(self) -> list[nn.Parameter]:
        """The ID / feature tables (candidates for sparse updates and their own weight decay)."""
        out = []
        dense = (getattr(self.pool, "recency", None), getattr(self.encoder, "position", None))
        for m in self.modules():
            if isinstance(m, nn.Embedding) and all(m is not d for d in dense):
                out.append(m.weight)
        return out

    def model_json(self) -> dict[str, Any]:
        return {
            "format": MODEL_FORMAT,
            "schema_version": schema.SCHEMA_VERSION,
            "metric": self.metric,
            "dim": self.dim,
            "served_dim": self.out_dim,  # the bundle's vectors: dim, + time_prior_rank + 1 with a score prior
            "n_users": self.n_users,
            "n_items": self.n_items,
            # lists of [name, cardinality]: the order is the column order of the feature buffers (JSON objects
            # get their keys sorted on write, so a dict would lose it)
            # a multi-valued feature has a third entry: its columns in the feature buffer
            "item_features": _feature_meta(self.spec.item_features, self.spec.item_feature_widths),
            "user_features": _feature_meta(self.spec.user_features, self.spec.user_feature_widths),
            "item_feature_names": self.item_feature_names,
            "user_feature_names": self.user_feature_names,
            "text_dim": self.spec.text_dim,
            "config": to_dict(self.cfg),
        }

    @classmethod
    def from_model_json(cls, meta: dict[str, Any]) -> TwoTower:
        """An untrained model with the architecture in ``meta`` (the content of model.json)."""
        if meta.get("format") != MODEL_FORMAT:
            raise ValueError(f"model.json `format` must be {MODEL_FORMAT}, got {meta.get('format')!r}")
        if meta.get("metric") != schema.METRIC:
            raise ValueError(f"model.json `metric` must be {schema.METRIC!r}, got {meta.get('metric')!r}")
        spec = FeatureSpec(
            n_users=int(meta["n_users"]),
            n_items=int(meta["n_items"]),
            item_features={str(f[0]): int(f[1]) for f in meta["item_features"]},
            user_features={str(f[0]): int(f[1]) for f in meta["user_features"]},
            text_dim=int(meta.get("text_dim", 0)),
            item_feature_widths={str(f[0]): int(f[2]) for f in meta["item_features"] if len(f) > 2},
            user_feature_widths={str(f[0]): int(f[2]) for f in meta["user_features"] if len(f) > 2},
        )
        cfg = dict(meta["config"])
        cfg.setdefault("time_features", False)  # written before the time inputs existed
        return cls(spec, from_dict(ModelConfig, cfg))

    @classmethod
    def from_run(cls, run_dir: str | Path, *, device: str | torch.device = "cpu") -> TwoTower:
        """Rebuild the best model of a training run (or a bundle dir): model.json + model.safetensors, eval mode."""
        run_dir = Path(run_dir)
        meta_path, weights_path = run_dir / schema.MODEL_JSON, run_dir / schema.MODEL_WEIGHTS
        for p in (meta_path, weights_path):
            if not p.exists():
                raise FileNotFoundError(f"{str(p)!r} does not exist (is {str(run_dir)!r} a finished training run?)")
        model = cls.from_model_json(json.loads(meta_path.read_text()))
        state = load_file(str(weights_path), device="cpu")
        kind = "transformer" if any(k.startswith("encoder.") for k in state) else "pool"
        if kind != model.cfg.user_tower:
            raise ValueError(f"{str(weights_path)!r} holds a {kind!r} user tower but model.json says "
                             f"`model.user_tower = {model.cfg.user_tower!r}`: one kind never loads as the other")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(
                f"{str(weights_path)!r} does not match model.json: missing {sorted(missing)}, "
                f"unexpected {sorted(unexpected)}"
            )
        return model.to(device).eval()


def _feature_meta(cards: dict[str, int], widths: dict[str, int]) -> list[list]:
    """model.json's feature list: [name, cardinality], or [name, cardinality, columns] for a multi-valued one."""
    return [[k, v] + ([widths[k]] if widths.get(k, 1) != 1 else []) for k, v in cards.items()]


def _slices(names: list[str], widths: dict[str, int]) -> list[tuple[int, int]]:
    """(start column, width) of each feature in a feature buffer."""
    out, start = [], 0
    for n in names:
        w = int(widths.get(n, 1))
        out.append((start, w))
        start += w
    return out


def _feature_input(emb: nn.Embedding, codes: Tensor, start: int, width: int) -> Tensor:
    """codes [B, columns] -> [B, E]: a feature's embedding, or for a multi-valued one the mean over its codes
    present (code 0 pads and embeds to zero; no code at all gives zeros)."""
    if width == 1:
        return emb(codes[:, start])
    c = codes[:, start : start + width]  # [B, K]
    n = (c != 0).sum(1, keepdim=True).clamp(min=1)
    return emb(c).sum(1) / n


def _codes(t: Tensor | None, n: int, f: int, name: str) -> Tensor:
    if t is None or f == 0:
        return torch.zeros(n, f, dtype=torch.long)
    t = torch.as_tensor(t).long()
    if tuple(t.shape) != (n, f):
        raise ValueError(f"`{name}` must have shape [{n}, {f}], got {list(t.shape)}")
    return t.contiguous()


class NumpyUserTower:
    """``TwoTower.encode_users`` in eval mode as a few numpy operations on the model's own weights: the serving twin
    of the user tower for a request's one (or few) users.

    Why: one user's forward in torch is ~45 tiny ops, each a Python call with its own dispatch -- ~300 us of CPU
    eager and ~220 us as a frozen TorchScript graph (100k items, dim 64, 2-core machine), ten times the native
    known-user Recommend it sits beside. The same math here is ~15 numpy calls on arrays that SHARE the model's
    weights (nothing copied but two small precomputed terms): the recency keys ``recency @ W_key^T + b_key``, by
    linearity of the key projection, so the attention scores are ``tanh(h @ W_key^T + rec_key) . query``.
    The torch module stays the owner of the math; whoever serves with this twin checks it against
    ``encode_users`` first (``server.service.user_tower``). Histories: item rows oldest first, the last
    ``history_len`` used, right-aligned as ``recsys.train.embed.pad_histories`` does.
    """

    def __init__(self, model: TwoTower) -> None:
        def arr(t: Tensor) -> Any:
            return t.detach().cpu().float().numpy()

        cfg = model.cfg
        self.history_len = int(cfg.history_len)
        self.dim = int(model.out_dim)
        # model.time_prior: g of every known user and of a new user per history length 0..N (TwoTower.user_prior)
        self._prior = None
        if model.prior_user is not None:
            with torch.no_grad():
                known = model.user_prior(model.user_now, served=True)
                new = model.user_prior(model.new_user_states(), served=True)
            self._prior = (np.ascontiguousarray(arr(known)), np.ascontiguousarray(arr(new)))
        self._table = arr(model._history_table().weight)
        self._user_id = None if model.user_id is None else arr(model.user_id.weight)
        self._user_feats = model.user_feats.detach().cpu().numpy()
        self._feats = [(arr(emb.weight), *model._user_cols[j]) for j, emb in enumerate(model.user_feat)]
        self._pool = None
        if model.pool is not None:
            p = model.pool
            w_key, b_key = arr(p.key.weight), arr(p.key.bias)
            # row d = the key term of the item d steps from the most recent (recency row d)
            rec_key = (arr(p.recency.weight) @ w_key.T + b_key).astype(np.float32)
            scale = np.float32(1.0 / math.sqrt(self._table.shape[1]))
            self._pool = (np.ascontiguousarray(w_key.T), rec_key, arr(p.query) * scale)
        self._last_item = bool(model.last_item)
        self._layers = [(np.ascontiguousarray(arr(m.weight).T), arr(m.bias))
                        for m in model.user_mlp if isinstance(m, nn.Linear)]
        self._encoder = None
        if model.encoder is not None:  # model.user_tower = "transformer": each block's weights, transposed once
            enc = model.encoder

            def lin(m: nn.Linear) -> tuple[Any, Any]:
                return np.ascontiguousarray(arr(m.weight).T), arr(m.bias)

            def ln(m: nn.LayerNorm) -> tuple[Any, Any, float]:
                return arr(m.weight), arr(m.bias), float(m.eps)

            blocks = [(ln(b.norm1), lin(b.qkv), lin(b.proj), ln(b.norm2), lin(b.ff[0]), lin(b.ff[2]), b.heads)
                      for b in enc.blocks]
            self._encoder = (arr(enc.position.weight), blocks, ln(enc.norm))

    def arrays(self) -> dict[str, Any]:
        """This tower's arrays as ``recsys._hnsw.UserTower`` takes them (the native twin; C-contiguous, shared).
        ``encoder``: None for a pooling tower; for a transformer (position [L, E], blocks, (final_w, final_b,
        final_eps)), a block (ln1_w, ln1_b, ln1_eps, qkv_wT [E, 3E], qkv_b, proj_wT [E, E], proj_b, ln2_w, ln2_b,
        ln2_eps, ff1_wT [E, 4E], ff1_b, ff2_wT [4E, E], ff2_b, heads). An extension built before the native
        transformer takes no ``encoder``: TypeError, and server.service serves with this numpy twin."""
        e = self._table.shape[1]
        out = {
            "table": np.ascontiguousarray(self._table),
            "user_id": np.ascontiguousarray(self._user_id if self._user_id is not None else np.zeros((0, e), np.float32)),
            "features": [(np.ascontiguousarray(w), int(start), int(width)) for w, start, width in self._feats],
            "user_feats": np.ascontiguousarray(self._user_feats, dtype=np.int64),
            "pool": None if self._pool is None else tuple(np.ascontiguousarray(a) for a in self._pool),
            "last_item": self._last_item,
            "layers": [(w, np.ascontiguousarray(b)) for w, b in self._layers],
            "history_len": self.history_len,
            "prior": self._prior,
        }
        if self._encoder is not None:  # only then: a pooling tower still builds on an older extension
            out["encoder"] = _native_encoder(self._encoder)
        return out

    def __call__(self, rows: Any, histories: Any) -> Any:
        """user rows [n] int (-1 = a new user, valid rows only), histories (item rows, oldest first, valid rows)
        -> [n, out_dim] float32, L2-normalised (``TwoTower.encode_users``)."""
        rows = np.asarray(rows, dtype=np.int64)
        n, e = len(rows), self._table.shape[1]
        if not n:
            return np.zeros((0, self.dim), np.float32)
        hs = [np.asarray(h, dtype=np.int64)[-self.history_len :] for h in histories]
        width = max(max((len(h) for h in hs), default=0), 1)
        padded = np.full((n, width), -1, dtype=np.int64)
        for i, h in enumerate(hs):
            if len(h):
                padded[i, width - len(h) :] = h
        mask = padded >= 0
        h = self._table[np.maximum(padded, 0)]  # [n, N, E]
        if self._encoder is not None:
            pooled = self._encode(h, mask) * mask[:, -1:]  # the last position; an empty history reads as zeros
        elif self._pool is not None:
            w_key, rec_key, query = self._pool
            scores = np.tanh(h @ w_key + rec_key[width - 1 :: -1]) @ query  # column j is width-1-j steps back
            scores = np.where(mask, scores, -np.inf)
            top = scores.max(axis=1, keepdims=True)
            weights = np.exp(scores - np.where(np.isfinite(top), top, 0.0))  # masked -> exp(-inf) = 0
            total = weights.sum(axis=1, keepdims=True)
            weights = weights / np.where(total > 0, total, 1.0)  # an empty history pools to zeros
            pooled = (weights[:, None, :] @ h)[:, 0]
        else:
            m = mask[..., None].astype(np.float32)
            pooled = (h * m).sum(1) / np.maximum(m.sum(1), 1.0)
        known = rows >= 0
        r = np.maximum(rows, 0)
        x = np.zeros((n, e), dtype=np.float32)
        if self._user_id is not None:
            x += self._user_id[r] * known[:, None]
        if self._feats:
            codes = self._user_feats[r] * known[:, None]
            for weight, start, w in self._feats:
                c = codes[:, start : start + w]
                v = (weight[c] * (c != 0)[..., None]).sum(1)
                x += v if w == 1 else v / np.maximum((c != 0).sum(1, keepdims=True), 1)
        parts = [x, pooled]
        if self._last_item:
            last = padded[:, -1]
            parts.append(self._table[np.maximum(last, 0)] * (last >= 0)[:, None])
        z = np.concatenate(parts, axis=1).astype(np.float32, copy=False)
        for j, (w, b) in enumerate(self._layers):
            z = z @ w + b
            if j < len(self._layers) - 1:  # nn.GELU (exact): x * Phi(x)
                z = 0.5 * z * (1.0 + _erf(z / np.float32(math.sqrt(2.0))))
        norm = np.sqrt((z * z).sum(axis=1, keepdims=True))
        z = (z / np.maximum(norm, 1e-12)).astype(np.float32, copy=False)
        if self._prior is not None:  # TwoTower.served_users
            known_g, new_g = self._prior
            g = np.where(known[:, None], known_g[r], new_g[mask.sum(1)])
            z = np.concatenate([z, g, np.zeros((n, 1), np.float32)], axis=1)
            z = z / np.sqrt(1.0 + (g * g).sum(1, keepdims=True))
        return z.astype(np.float32, copy=False)


    def _encode(self, h: Any, mask: Any) -> Any:
        """``CausalEncoder`` in eval mode, at the last position only: h [n, W, E], mask [n, W] -> [n, E]. Every
        block but the last runs on all positions (later blocks read them as keys and values); the last block and
        the final norm run on the last position alone."""
        position, blocks, final = self._encoder
        n, w, e = h.shape
        pos = np.maximum(np.arange(w)[None, :] - (w - mask.sum(1, keepdims=True)), 0)  # [n, W]
        x = (h + position[pos]).astype(np.float32)
        causal = np.tril(np.ones((w, w), dtype=bool))
        allowed = (causal[None] & mask[:, None, :]) | np.eye(w, dtype=bool)[None]  # [n, W, W]
        for j, (ln1, qkv, proj, ln2, ff1, ff2, heads) in enumerate(blocks):
            last = j == len(blocks) - 1
            d = e // heads
            kv = _layer_norm(x, *ln1) @ qkv[0] + qkv[1]  # [n, W, 3E]
            q = kv[:, -1:, :e] if last else kv[..., :e]  # [n, Q, E]: Q = 1 in the last block
            q = q.reshape(n, -1, heads, d).transpose(0, 2, 1, 3)  # [n, H, Q, d]
            k = kv[..., e : 2 * e].reshape(n, w, heads, d).transpose(0, 2, 3, 1)  # [n, H, d, W]
            v = kv[..., 2 * e :].reshape(n, w, heads, d).transpose(0, 2, 1, 3)  # [n, H, W, d]
            scores = (q @ k) * np.float32(1.0 / math.sqrt(d))  # [n, H, Q, W]
            ok = allowed[:, None, -1:, :] if last else allowed[:, None]
            scores = np.where(ok, scores, -np.inf)
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            a = (p @ v).transpose(0, 2, 1, 3).reshape(n, -1, e)  # [n, Q, E]
            x = (x[:, -1:] if last else x) + a @ proj[0] + proj[1]
            y = _layer_norm(x, *ln2) @ ff1[0] + ff1[1]
            x = x + (0.5 * y * (1.0 + _erf(y / np.float32(math.sqrt(2.0))))) @ ff2[0] + ff2[1]
        return _layer_norm(x[:, -1], *final).astype(np.float32, copy=False)


def _native_encoder(encoder: Any) -> tuple:
    """``NumpyUserTower._encoder`` flattened as ``recsys._hnsw.UserTower(encoder=...)`` takes it (C-contiguous)."""
    c = np.ascontiguousarray
    position, blocks, (fw, fb, feps) = encoder
    flat = [(c(ln1[0]), c(ln1[1]), float(ln1[2]), c(qkv[0]), c(qkv[1]), c(proj[0]), c(proj[1]),
             c(ln2[0]), c(ln2[1]), float(ln2[2]), c(ff1[0]), c(ff1[1]), c(ff2[0]), c(ff2[1]), int(heads))
            for ln1, qkv, proj, ln2, ff1, ff2, heads in blocks]
    return c(position), flat, (c(fw), c(fb), float(feps))


def _layer_norm(x: Any, weight: Any, bias: Any, eps: float) -> Any:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + np.float32(eps)) * weight + bias


def _erf(x: Any) -> Any:
    from scipy.special import erf  # scipy: heavy, only the time prior needs it

    return erf(x)
