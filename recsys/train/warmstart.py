"""Warm-start a new two-tower model from an older one where the vocabularies overlap.

Rows of the ID tables are matched by external ID (item ID, user ID), rows of the categorical feature tables by
(feature, value) through both ``feature_vocab.parquet`` files; IDs and values that are new keep their fresh
initialisation. Every other parameter is copied when its name and shape match. Buffers that describe the new data
(feature codes, title embeddings) are never copied. The training path stays free of polars (pyarrow only).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from safetensors.torch import load_file

from recsys.core import schema
from recsys.core.vocab import Vocab

log = logging.getLogger(__name__)

# parameter name -> which vocabulary indexes its rows
_ITEM_ROWS = ("item_id.weight", "history_emb.weight")
_USER_ROWS = ("user_id.weight",)
# the data's own tables, rebuilt from the new data (the end-of-logs time states by the trainer); a model's
# ``prior_scale`` (the time prior's weight chosen on validation) is carried over like any same-shaped tensor
_DATA_BUFFERS = ("item_feats", "user_feats", "item_text", "item_now", "item_cold", "user_now")


# the modules that read a history, which differ by `model.user_tower`
_USER_TOWER_LAYERS = ("pool", "encoder", "user_mlp")


def _ids(path: Path, col: str) -> np.ndarray:
    return np.asarray(pq.read_table(path, columns=[col]).column(col).to_pylist(), dtype=object)


def _feature_codes(path: Path) -> dict[tuple[str, str], dict[str, int]]:
    """{(entity, feature): {value: code}} from a feature_vocab.parquet (empty when absent)."""
    if not path.exists():
        return {}
    t = pq.read_table(path).to_pydict()
    out: dict[tuple[str, str], dict[str, int]] = {}
    for ent, feat, val, code in zip(t["entity"], t["feature"], t["value"], t["code"], strict=True):
        out.setdefault((ent, feat), {})[val] = int(code)
    return out


def _row_map(new_ids: np.ndarray, old_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(new_rows, old_rows) of the IDs present in both vocabularies."""
    old = Vocab(old_ids.tolist()).numbers(new_ids.tolist())  # [n_new], -1 = not in the old vocabulary
    new_rows = np.flatnonzero(old >= 0).astype(np.int64)
    return new_rows, old[new_rows]


def warm_start(model: torch.nn.Module, old_dir: str | Path, new_data_dir: str | Path) -> dict[str, Any]:
    """Copy what carries over from the model in ``old_dir`` (a bundle version or a run with its data) into ``model``.

    ``old_dir`` must hold ``model.safetensors`` and the vocabularies it was trained with (``users.parquet``,
    ``items.parquet``, ``feature_vocab.parquet``) — a bundle version has all of them. Returns counts of what was
    copied, for the logs and the retrain report.
    """
    old_dir, new_data_dir = Path(old_dir), Path(new_data_dir)
    old_state = load_file(str(old_dir / schema.MODEL_WEIGHTS))
    old_model_cfg = json.loads((old_dir / schema.MODEL_JSON).read_text()) if (old_dir / schema.MODEL_JSON).exists() else {}
    new_items, old_items = _ids(new_data_dir / schema.ITEMS, schema.ITEM_ID), _ids(old_dir / schema.ITEMS, schema.ITEM_ID)
    new_users, old_users = _ids(new_data_dir / schema.USERS, schema.USER_ID), _ids(old_dir / schema.USERS, schema.USER_ID)
    item_map, user_map = _row_map(new_items, old_items), _row_map(new_users, old_users)
    new_fv, old_fv = _feature_codes(new_data_dir / schema.FEATURE_VOCAB), _feature_codes(old_dir / schema.FEATURE_VOCAB)

    feat_names = {
        "item_feat": list(getattr(model, "item_feature_names", [])),
        "user_feat": list(getattr(model, "user_feature_names", [])),
    }
    old_feat_names = {
        "item_feat": list(old_model_cfg.get("item_feature_names", [])),
        "user_feat": list(old_model_cfg.get("user_feature_names", [])),
    }

    stats: dict[str, Any] = {"copied": [], "skipped": [], "items_matched": int(len(item_map[0])),
                             "users_matched": int(len(user_map[0])), "n_items": len(new_items),
                             "n_users": len(new_users)}
    # a pooling user tower never warm-starts a transformer one, or back: the layers that read the history (and the
    # MLP over their output) stay fresh; the ID and feature tables, shared by both kinds, still carry over
    old_kind = old_model_cfg.get("config", {}).get("user_tower", "pool")
    new_kind = getattr(getattr(model, "cfg", None), "user_tower", "pool")
    other_kind = _USER_TOWER_LAYERS if old_kind != new_kind else ()
    new_state = model.state_dict()
    with torch.no_grad():
        for name, tensor in new_state.items():
            if name.split(".")[0] in _DATA_BUFFERS + other_kind or name not in old_state:
                stats["skipped"].append(name)
                continue
            old = old_state[name].to(tensor.dtype)
            if name in _ITEM_ROWS or name in _USER_ROWS:
                new_rows, old_rows = item_map if name in _ITEM_ROWS else user_map
                if old.shape[1:] != tensor.shape[1:]:
                    stats["skipped"].append(name)
                    continue
                tensor[torch.from_numpy(new_rows)] = old[torch.from_numpy(old_rows)]
                stats["copied"].append(name)
                continue
            parts = name.split(".")
            if parts[0] in feat_names and len(parts) == 3 and parts[2] == "weight":
                # item_feat.<i>.weight: rows are codes of one feature; match codes through the value strings
                entity = "item" if parts[0] == "item_feat" else "user"
                i = int(parts[1])
                olds = old_feat_names[parts[0]]
                feat = feat_names[parts[0]][i] if i < len(feat_names[parts[0]]) else None
                if feat is None or feat not in olds or old.shape[1:] != tensor.shape[1:]:
                    stats["skipped"].append(name)
                    continue
                old_key = f"{parts[0]}.{olds.index(feat)}.weight"
                old = old_state[old_key].to(tensor.dtype)
                new_codes, old_codes = new_fv.get((entity, feat), {}), old_fv.get((entity, feat), {})
                pairs = [(c, old_codes[v]) for v, c in new_codes.items() if v in old_codes]
                pairs.append((0, 0))  # code 0 = missing/unknown in both
                for nc, oc in pairs:
                    if nc < tensor.shape[0] and oc < old.shape[0]:
                        tensor[nc] = old[oc]
                stats["copied"].append(name)
                continue
            if old.shape == tensor.shape:
                tensor.copy_(old)
                stats["copied"].append(name)
            else:
                stats["skipped"].append(name)
    model.load_state_dict(new_state)
    log.info(
        "warm start from %s: %d/%d items and %d/%d users matched; %d tensors copied, %d kept fresh",
        old_dir, stats["items_matched"], stats["n_items"], stats["users_matched"], stats["n_users"],
        len(stats["copied"]), len(stats["skipped"]),
    )
    return stats
