"""`recsys train`: train the two-tower model on a prepared dataset and write a run directory."""

from __future__ import annotations

import argparse
import json

from recsys.core.logs import report_error


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "train",
        help="train the two-tower model (CPU or one CUDA GPU)",
        description="Train the two-tower model on the output of `recsys prepare`; writes config.json, model.json, "
        "model.safetensors, checkpoint/, metrics.jsonl and summary.json to the run dir. Two fits: one on the train "
        "split, validated each epoch, picks the epoch count (its validation metrics are the run's holdout "
        "estimate); then the final fit -- the weights `recsys export` publishes -- trains that many epochs on every "
        "split (train.final_fit=all, the default) or on train + valid only (train.final_fit=train_valid: test stays "
        "unseen, so `recsys evaluate` can score the published model on it). Every field "
        "of recsys/configs/default.toml can be set, e.g. model.user_tower=transformer (a causal transformer over "
        "the history, every position trained as a query; the default `pool` measured as good or better, README "
        "Results); on a GPU the speed-related ones are train.loss_kernel (auto: "
        "fused Triton in-batch softmax), train.history_kernel (auto: fused history lookup + attention pooling when "
        "faster), train.cuda_graphs (the whole step as one CUDA graph), "
        "train.sparse_embeddings + train.sparse_optimizer=rowwise_adagrad (big ID tables), train.batch_size.",
    )
    p.add_argument("--data", required=True, metavar="PREPARED_DIR", help="output dir of `recsys prepare`")
    p.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to create (or --resume)")
    p.add_argument("--config", metavar="FILE", help="TOML file with [model], [train], [loss] sections")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: cuda if available")
    p.add_argument("--resume", action="store_true", help="continue RUN_DIR from its last checkpoint")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="SEC.FIELD=VALUE",
        help="override a config field, e.g. --set train.lr=0.001 --set model.dim=32 (repeatable)",
    )
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    # torch: imported here so `recsys --help` stays fast
    from recsys.train.loop import TrainingDiverged, load_configs, train

    model_cfg, train_cfg, loss_cfg = load_configs(args.config, args.overrides)
    try:
        summary = train(
            args.data, args.out, model_cfg=model_cfg, train_cfg=train_cfg, loss_cfg=loss_cfg,
            device=args.device, resume=args.resume,
        )
    except TrainingDiverged as e:
        report_error(getattr(args, "log_format", "text"), "train", str(e), error="TrainingDiverged")
        return 3
    print(json.dumps(summary, indent=2, sort_keys=True))
    return 0
