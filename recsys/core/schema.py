"""The files each stage hands to the next, named once.

Stages talk only through these files (nanoGPT style: prepare -> train -> export -> serve/evaluate).

Prepared dataset (``recsys prepare --out DIR``)
-----------------------------------------------
``manifest.json``            schema_version, config, input fingerprints, row accounting, counts, split info.
``train.parquet``            interactions used for training, sorted by (user_idx, ts, seq).
``valid.parquet``            validation interactions (later in time than the user's train ones).
``test.parquet``             test interactions (later in time than the user's train and valid ones).
``extra.parquet``            valid/test-period interactions of users or items with no train row (``drop_cold``):
                             never scored, trained on by the final fit (``train.final_fit = "all"``).
    columns: user_idx i32, item_idx i32, ts i64 (epoch milliseconds, UTC), weight f32
``users.parquet``            user vocabulary, row order == user_idx (most frequent first):
    user_id str (external id, always a string), user_idx i32, n_train i32, and one ``feat_<name>`` i32 column
    per encoded user feature (code 0 means "missing or unknown value"; a multi-valued feature is a list[i32]
    column of its values' codes, empty when missing).
``items.parquet``            item vocabulary, row order == item_idx (most frequent first):
    item_id str, item_idx i32, n_train i32, prob f64 (sampling probability for logQ; sums to 1),
    first_ts i64 (first time the item appears anywhere), ``feat_<name>`` i32 columns, and ``title`` str when the
    items file had a text column.
``feature_vocab.parquet``    entity str ("user"|"item"), feature str, value str, code i32 (code >= 1).
``history.parquet``          user_idx i32, items list[i32]: last N items of train+valid, oldest first
                             (the serving history, used to embed users at test/serving time).
``seen.parquet``             user_idx i32, items list[i32]: distinct items in train+valid (excluded from
                             recommendations at test/serving time).
``rejects.parquet``          only with ``--on-bad-rows skip``: the rejected raw rows, with file, row, column, reason.

Training run (``recsys train --out RUN_DIR``)
---------------------------------------------
``config.json``              the resolved config (model, train, loss sections) and the data dir + its fingerprint.
``model.json``               model architecture (vocab sizes, feature cardinalities, dim, metric, ...).
``model.safetensors``        best weights (includes the item/user feature-code buffers: the towers are
                             self-contained given item_idx / user_idx / history).
``checkpoint/``              last checkpoint for ``--resume``: state.safetensors + state.json.
``metrics.jsonl``            one JSON object per validation / log event.
``summary.json``             best epoch, best validation metrics (``holdout``: the estimate from the fit on train),
                             ``final_fit`` (what the saved weights were fit on: splits, rows, time range, each
                             split file's sha256), timing, device.

Model bundle (``recsys export --models MODELS_DIR``)
----------------------------------------------------
``MODELS_DIR/<version>/``    manifest.json, model.json, model.safetensors, item_embeddings.npy,
                             user_embeddings.npy, users.parquet, items.parquet, feature_vocab.parquet,
                             history.parquet, seen.parquet, index.hnsw. The serving state covers what the final
                             fit saw (``manifest["trained_on"]``): with ``train.final_fit = "all"`` (the default)
                             history / seen / ``n_train`` / ``prob`` are rebuilt from every split, else they are
                             the prepared dataset's (train + valid).
``MODELS_DIR/LATEST``        a text file holding the current version name, replaced atomically.
"""

from __future__ import annotations

SCHEMA_VERSION = 1

# The one similarity the whole system uses: towers output L2-normalised vectors, the score is their dot product.
METRIC = "cosine"

# prepared dataset
MANIFEST = "manifest.json"
TRAIN = "train.parquet"
VALID = "valid.parquet"
TEST = "test.parquet"
USERS = "users.parquet"
ITEMS = "items.parquet"
FEATURE_VOCAB = "feature_vocab.parquet"
HISTORY = "history.parquet"
SEEN = "seen.parquet"
REJECTS = "rejects.parquet"
EXTRA = "extra.parquet"
SPLITS = {"train": TRAIN, "valid": VALID, "test": TEST, "extra": EXTRA}

USER_IDX = "user_idx"
ITEM_IDX = "item_idx"
USER_ID = "user_id"
ITEM_ID = "item_id"
TS = "ts"
WEIGHT = "weight"
FEAT_PREFIX = "feat_"
TITLE = "title"

# training run
RUN_CONFIG = "config.json"
MODEL_JSON = "model.json"
MODEL_WEIGHTS = "model.safetensors"
CHECKPOINT_DIR = "checkpoint"
METRICS_JSONL = "metrics.jsonl"
SUMMARY = "summary.json"

# bundle
ITEM_EMBEDDINGS = "item_embeddings.npy"
USER_EMBEDDINGS = "user_embeddings.npy"
INDEX_FILE = "index.hnsw"
LATEST = "LATEST"
