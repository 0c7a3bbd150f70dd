"""The model bundle: one immutable, verified directory per published model version.

``recsys.publish.export`` turns a training run (+ its prepared dataset) into ``MODELS_DIR/<version>/`` holding everything serving
needs (schema.py lists the files): the towers (so unseen users are embedded from their history and new items from
their features), item and known-user embeddings computed with those towers, the vocabularies, the serving history
and seen sets, item popularity and an hnswlib index whose ``ef`` was auto-tuned against exact search (plus, with
``index.partition_by``, one graph per value of those item attributes: ``index.part0000.hnsw``, ..., listed in the
manifest's ``index.partitions``; :mod:`recsys.retrieval.partitions`). Publishing is
atomic (temp dir + fsync + rename) and the ``LATEST`` pointer moves afterwards (temp file + rename), so a reader
sees either the old or the new version, never half of one. Versions and ``LATEST`` get the modes a plain
``mkdir`` / ``open`` would under the umask (``recsys.core.io``): group-readable with umask 022 / 002 / 027, so a server in
another UID of the same group (Kubernetes ``fsGroup``) can load what a retrain Job published; private with 077.

``Bundle.load`` refuses anything that does not match its manifest (``BundleError`` names the file and the
mismatch, ``BundleError.reason`` the kind of check, one of ``REFUSAL_REASONS``) and checks every sha256 *before*
reading a file's contents: hnswlib index files are parsed by C++ without bounds checks and must not be loaded
untrusted. A version directory holds exactly the manifest and the files it lists, all regular files (no symlinks,
nothing unlisted), and ``LATEST`` must name a real directory of the models directory.
"""

from recsys.bundle.files import (
    BUNDLE_FILES,
    DATA_FILES,
    MANIFEST,
    OPTIONAL_FILES,
    RECENT_POPULARITY,
    REFUSAL_REASONS,
    BundleError,
    read_ragged,
)
from recsys.bundle.load import Bundle
from recsys.bundle.versions import (
    VERSION_RE,
    list_versions,
    new_version_name,
    prune,
    read_latest,
    resolve,
    version_dir,
)
from recsys.train.embed import embed_items, embed_users, served_dim

__all__ = [
    "BUNDLE_FILES",
    "DATA_FILES",
    "MANIFEST",
    "OPTIONAL_FILES",
    "RECENT_POPULARITY",
    "REFUSAL_REASONS",
    "VERSION_RE",
    "Bundle",
    "BundleError",
    "embed_items",
    "embed_users",
    "list_versions",
    "new_version_name",
    "prune",
    "read_latest",
    "read_ragged",
    "resolve",
    "served_dim",
    "version_dir",
]
