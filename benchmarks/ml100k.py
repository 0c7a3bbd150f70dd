"""MovieLens-100K for the benchmarks, read from the recbole 1.2.1 wheel on PyPI (the only copy reachable here).

    raw = fetch_ml100k(Path.home() / ".cache" / "recsys")   # raw / "ml-100k.inter", ".item", ".user"

The wheel is fetched once with ``pip download recbole==1.2.1 --no-deps`` into ``cache`` (outside the repo; the data
files are never committed) and the three RecBole files are extracted next to it. The files are tab-separated with
a typed header: ``.inter`` = user_id, item_id, rating (1-5), timestamp (epoch s); ``.item`` = item_id,
movie_title, release_year, class (space-separated genres); ``.user`` = user_id, age, gender, occupation, zip_code.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

RECBOLE = "recbole==1.2.1"
EXTS = ("inter", "item", "user")


def fetch_ml100k(cache: str | Path) -> Path:
    """The directory (under ``cache``) holding ml-100k.inter / .item / .user, downloading the wheel if needed."""
    cache = Path(cache)
    raw = cache / "ml-100k"
    if all((raw / f"ml-100k.{ext}").exists() for ext in EXTS):
        return raw
    cache.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        subprocess.run([sys.executable, "-m", "pip", "download", RECBOLE, "--no-deps", "-q", "-d", str(cache)],
                       check=True)
        wheels = sorted(cache.glob("recbole-1.2.1-*.whl"))
    if not wheels:
        raise FileNotFoundError(f"pip download {RECBOLE} left no wheel in {cache}")
    raw.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheels[0]) as z:
        for ext in EXTS:
            target = raw / f"ml-100k.{ext}"
            if not target.exists():
                tmp = target.with_suffix(f".{ext}.tmp")
                tmp.write_bytes(z.read(f"recbole/dataset_example/ml-100k/ml-100k.{ext}"))
                tmp.replace(target)
    return raw
