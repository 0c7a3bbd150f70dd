"""Offline evaluation of a model bundle on one split of a prepared dataset (package ``recsys.evaluate``: the eval
set, the run, the quick evaluation export uses, the report, baselines and plots).

Protocol, stated once:

* Every user with at least one held-out item in the split is a query (optionally a seeded sample of them). Their
  *relevant* items are the distinct split items they had not interacted with before; items seen before (train for
  ``valid``, train + valid for ``test``) are excluded from every model's list, so they are left out of
  ``relevant`` too (a re-consumed item can never be retrieved and would only add noise).
* Retrieval is over the full catalogue, through the same exclusion rule as serving (``recsys.retrieval.retrieve``),
  both exact and HNSW (with the bundle's tuned ``ef``); ANN recall is measured against the exact answer.
* Users are embedded as serving would: a known user of the bundle from their history with their ID; a user the
  bundle does not know from history alone. The dataset and the bundle may have different vocabularies: everything
  is matched by external ID and scored in the dataset's row space (items the bundle does not know can never be
  retrieved and count as misses).
* Baselines (Popularity, ItemKNN, EASE) are fitted on the interactions before the split and scored the same way.
* Metrics come from ``recsys.core.metrics.ranking_metrics`` (recall@K = hits / |relevant|), plus catalogue coverage@K
  and popularity bias (mean train-popularity percentile of the recommended items, 1 = most popular).
* A bundle is never silently scored on interactions it was trained on: the manifest's ``trained_on`` (what the
  final fit saw: splits and the sha256 of each split file) is checked against the split, and a match is refused
  (:class:`InSampleError`) unless ``in_sample=True``, which reports the numbers marked as in-sample.
* Segments: users ``cold`` (at most ``cold_threshold`` prior items) / ``warm``; items ``head`` / ``torso`` /
  ``tail`` (train popularity ranks covering the first 50% / next 30% / last 20% of train interactions) and
  ``new`` (``first_ts`` after the last train interaction). An item segment restricts ``relevant`` to its items
  and drops users left without any.
"""

from recsys.evaluate.evalset import (
    EvalSet,
    InSampleError,
    in_sample_reason,
    load_eval_set,
    popularity_percentile,
    popularity_segments,
)
from recsys.evaluate.quick import quick_evaluation
from recsys.evaluate.report import render_markdown, write_report
from recsys.evaluate.run import (
    BASELINES,
    DEFAULT_KS,
    ab_test,
    ann_recall,
    ann_sweep,
    evaluate,
    make_baseline,
    per_user_recall,
    score_topk,
    search_all,
)

__all__ = [
    "BASELINES",
    "DEFAULT_KS",
    "EvalSet",
    "InSampleError",
    "ab_test",
    "ann_recall",
    "ann_sweep",
    "evaluate",
    "in_sample_reason",
    "load_eval_set",
    "make_baseline",
    "per_user_recall",
    "popularity_percentile",
    "popularity_segments",
    "quick_evaluation",
    "render_markdown",
    "score_topk",
    "search_all",
    "write_report",
]
