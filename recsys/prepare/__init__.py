"""``recsys prepare``: raw interaction logs -> the prepared dataset described in :mod:`recsys.core.schema`.

The pipeline, in order (every input row ends in exactly one bucket of ``manifest["rows"]``)::

    read + validate      each file is scanned lazily and normalised (user, item, ts in epoch ms, weight, event);
                         a bad row is an error naming file / row / column / value, or with ``on_bad_rows="skip"``
                         it goes to rejects.parquet                                      -> rows.rejected[reason]
    implicit feedback    rating threshold, per-event-type weights, time window           -> rows.filtered[reason]
    dedupe               one row per (user, item): keep first / last, or sum the weights -> rows.deduplicated
    k-core               drop users with < kcore_users items and items with < kcore_items users, repeated
                         until nothing changes (one pass is not enough: dropping an item can push a user
                         under the threshold)                                             -> rows.filtered[kcore_*]
    temporal split       per-user last fraction / last N, or a global time cutoff; valid/test rows of users or
                         items with no train row go to the ``extra`` split (``drop_cold``): never scored, but
                         trained on by the final fit and part of the serving state        -> rows.extra[cold_*]
    vocabularies         users / items ordered by train frequency (ties by ID), features encoded with their own
                         vocabularies, logQ probabilities, histories, seen sets          -> rows.kept

Dedupe happens before the split, so a (user, item) pair appears exactly once in the whole dataset: a pair in
test is never in that user's train or valid. The split is by time order (ts, then the input position of the pair's
first row), so a user's test rows are never earlier than their train rows.

Reading, validation, filtering and ID coding run as lazy Polars queries on the streaming engine: each file is
normalised once into a scratch parquet (IDs already u32 codes of run-private Categorical categories, so no string
is hashed twice), the accounting and the dedupe group-by (on one u64 pair key, in user slices so its hash table
stays bounded) scan that. Only the deduplicated pairs ``(user, item, ts, weight)``, ~20 bytes each, are held in
memory, as numpy columns, for k-core, the split and the outputs (blocks of rows are moved, rows never sorted).
Modules: ``config`` (``[prepare]``, the row-accounting reasons, time parsing), ``inputs`` (files, formats,
MovieLens, validation), ``steps`` (k-core, split, logQ, ordering), ``features`` (items / users files), ``pipeline``
(the run, its manifest, reading the output back), ``synth`` (built-in synthetic logs).

Measured on 2 shared cores (benchmarks/prepare_bench.py): 10M events in ~10 s CPU, peak RSS ~0.65-0.9 GiB.
"""

from recsys.prepare.config import PrepareConfig, parse_time
from recsys.prepare.inputs import detect_format, expand_inputs, fingerprint_file
from recsys.prepare.pipeline import format_summary, load_vocabs, prepare, read_manifest, read_tables
from recsys.prepare.steps import kcore_filter, logq_prob, split_codes

__all__ = [
    "PrepareConfig",
    "detect_format",
    "expand_inputs",
    "fingerprint_file",
    "format_summary",
    "kcore_filter",
    "load_vocabs",
    "logq_prob",
    "parse_time",
    "prepare",
    "read_manifest",
    "read_tables",
    "split_codes",
]
