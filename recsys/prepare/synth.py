"""Deterministic synthetic interaction logs: the embedded demo dataset (``recsys synth``).

The world: ``clusters`` latent taste clusters. Each item belongs to one cluster, has a power-law popularity weight
(its peak height) and an arrival time (part of the catalogue appears only later). Each user has a main and a secondary
cluster and a drift target that slowly takes over part of the main cluster's share, a log-normal activity level and a
join time. Every event picks its item through one of five channels:

* ``repeat``      the user's previous item again (a click or purchase after a view: a funnel step),
* ``sequential``  a neighbour of the previous item (a nearby position in its cluster's item order; the neighbour
                  more popular *now* of two candidates) - the session/sequence signal a history-pooled model can use,
* ``new``         a recently arrived item of the user's current cluster (freshness; the catalogue drifts),
* ``explore``     any arrived item by its popularity now (noise, and what a popularity baseline captures),
* ``taste``       an arrived item of the user's current cluster, by its popularity now (the collaborative signal
                  mixed with what is in fashion).

Time dynamics (``dynamics = true``, the default): an item's popularity is its peak weight times a curve over time.
Items on the shelf at the start were released up to ``backlog_days`` before it, the late ones launch during the
period; no item has an event before its release. Kinds of curve, each item drawing its own time scales:

* life cycle  rises over ~``rise_days`` after launch, then decays with a half-life around ``half_life_days``
              down to ``popularity_floor`` of its peak (most items),
* evergreen   rises, then stays flat (``evergreen_share``),
* seasonal    a bump once a week or once a year at an item-specific phase, on the floor (``seasonal_share``),
* trending    a life cycle plus one spike at a random time of the period that makes it, for a week or two, about
              as popular as a top-10 item (``trending_share``, ``trend_half_life_days``).

Popularity is piecewise constant per day (finer for periods under 64 days), so both ``taste`` and ``explore`` follow
what is popular at the event's time: counts over the last weeks predict the next events far better than all-time
counts, while the user's clusters still decide most of what they pick. With ``dynamics = false`` popularity is static
and the files are byte-identical to those of the generator before time dynamics.

Item features: ``category`` (the cluster's home category, with some noise) and a short ``title`` of words tied to the
cluster (adjectives) and category (nouns). User features: ``region`` and ``age_band``, weakly tied to the main
cluster, occasionally missing.

Events are generated shard by shard in time order (shard ``s`` covers its own slice of the time span); only the
per-user state (previous item) crosses shards, so 100M+ events stream to parquet in bounded memory. The output is
byte-identical for the same config (seed and sizes, including ``shard_events``).

Output (atomic directory)::

    DIR/logs/part-00000.parquet ...  user_id str, item_id str, timestamp i64 (epoch seconds, UTC), event str
    DIR/items.parquet                item_id str, category str, title str
    DIR/users.parquet                user_id str, region str (nullable), age_band str (nullable)
    DIR/synth.json                   config, counts (items by kind of popularity curve too), time range, files with
                                     rows and sha256
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys.core.config import to_dict
from recsys.core.io import atomic_dir, atomic_write_json, sha256_file

__all__ = ["SynthConfig", "generate"]

log = logging.getLogger(__name__)

LOGS_DIR = "logs"
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
SYNTH_JSON = "synth.json"
EVENTS = ("view", "click", "purchase")
CHANNELS = ("repeat", "sequential", "new", "explore", "taste")
_REPEAT, _SEQ, _NEW, _EXPLORE, _TASTE = range(5)
ITEM_KINDS = ("evergreen", "seasonal", "trending", "life_cycle")  # shapes of an item's popularity over time

CATEGORY_NOUNS: dict[str, tuple[str, ...]] = {
    "books": ("novel", "memoir", "atlas", "anthology", "cookbook", "guide", "poems", "biography"),
    "music": ("album", "vinyl", "single", "playlist", "concerto", "mixtape", "ballads", "soundtrack"),
    "electronics": ("headphones", "speaker", "charger", "camera", "tablet", "keyboard", "monitor", "router"),
    "home": ("lamp", "rug", "cushion", "vase", "blanket", "mirror", "clock", "shelf"),
    "garden": ("planter", "hose", "trowel", "seeds", "lantern", "bench", "birdhouse", "shears"),
    "toys": ("puzzle", "robot", "doll", "blocks", "kite", "boardgame", "plush", "racecar"),
    "sports": ("sneakers", "racket", "yoga mat", "dumbbells", "helmet", "jersey", "backpack", "bottle"),
    "fashion": ("jacket", "scarf", "dress", "boots", "hat", "sweater", "belt", "handbag"),
    "beauty": ("serum", "lipstick", "perfume", "lotion", "palette", "shampoo", "mask", "cleanser"),
    "grocery": ("coffee", "tea", "chocolate", "olive oil", "granola", "honey", "pasta", "spices"),
    "pets": ("leash", "collar", "treats", "litter", "aquarium", "pet bed", "scratcher", "chew toy"),
    "auto": ("wipers", "car mat", "dashcam", "tyre gauge", "seat cover", "polish", "jump starter", "roof box"),
    "office": ("notebook", "pen set", "stapler", "desk lamp", "planner", "binder", "whiteboard", "organizer"),
    "kitchen": ("skillet", "kettle", "knife", "blender", "teapot", "cutting board", "mixing bowl", "grater"),
    "games": ("console", "controller", "rpg", "shooter", "strategy game", "racing game", "headset", "arcade"),
    "health": ("vitamins", "thermometer", "bandages", "massager", "scale", "pillbox", "heat pad", "brace"),
}
ADJECTIVES = (
    "vintage", "modern", "cozy", "minimal", "rustic", "classic", "bold", "retro", "organic", "smart",
    "compact", "deluxe", "handmade", "bright", "dark", "silent", "wild", "urban", "coastal", "nordic",
    "golden", "crimson", "emerald", "azure", "velvet", "silk", "bamboo", "ceramic", "leather", "wooden",
    "electric", "acoustic", "sparkling", "spicy", "sweet", "zesty", "gentle", "rugged", "sleek", "playful",
    "epic", "cosmic", "lunar", "solar", "tropical", "alpine", "desert", "misty", "frosty", "sunny",
    "neon", "pastel", "midnight", "royal", "humble", "lucky", "swift", "brave", "quiet", "loud",
    "tiny", "giant", "pocket", "family", "travel", "pro", "ultra", "eco", "premium", "essential",
)  # fmt: skip
REGIONS = ("north", "south", "east", "west", "central", "coast", "islands", "highlands")
AGE_BANDS = ("18-24", "25-34", "35-44", "45-54", "55-64", "65+")


@dataclass(frozen=True)
class SynthConfig:
    """Synthetic log generator settings (section ``[synth]``)."""

    events: int = 1_000_000
    """Total number of events (rows) across all shards."""
    users: int = 20_000
    """Number of users (all listed in users.parquet; a few light late joiners may have no events)."""
    items: int = 5_000
    """Catalogue size (all listed in items.parquet; some late or unpopular items may have no events)."""
    seed: int = 0
    """Random seed; the same config gives byte-identical files."""
    shard_events: int = 1_000_000
    """Events per parquet shard (and per generation step, so it bounds memory). Part of the data's identity."""
    clusters: int = 32
    """Latent taste clusters (items belong to one; users mix a few)."""
    categories: int = 16
    """Item categories (at most 16); each cluster has a home category."""
    category_noise: float = 0.1
    """Probability an item's category is random instead of its cluster's home category."""
    start_ts: int = 1_704_067_200
    """Epoch seconds (UTC) of the first possible event (default 2024-01-01)."""
    days: float = 180.0
    """Length of the logged period in days."""
    popularity_exponent: float = 1.2
    """Zipf exponent of item popularity: weight of the item with popularity rank r is (r + 10) ** -exponent."""
    activity_sigma: float = 1.0
    """Sigma of the log-normal user activity level (larger = more skewed)."""
    late_item_fraction: float = 0.4
    """Fraction of items that arrive uniformly over the period instead of at the start (with ``dynamics``, the others
    were released during the ``backlog_days`` before the start)."""
    late_user_fraction: float = 0.3
    """Fraction of users that join uniformly over the first 90% of the period instead of at the start."""
    p_repeat: float = 0.05
    """Probability an event repeats the user's previous item."""
    p_sequential: float = 0.45
    """Probability an event picks a neighbour of the user's previous item."""
    p_new: float = 0.1
    """Probability an event picks a recently arrived item of the user's current cluster."""
    p_explore: float = 0.1
    """Probability an event picks any item by global popularity. The rest follows the user's taste clusters."""
    neighbourhood: int = 8
    """A sequential step moves at most this many positions in the cluster's item order."""
    new_window_days: float = 14.0
    """An item counts as new for this many days after its arrival."""
    main_share: tuple[float, float] = (0.55, 0.9)
    """Range of the main cluster's share of a user's taste events (the rest goes to the secondary cluster)."""
    taste_drift: float = 0.6
    """Up to this share of the main cluster moves linearly over the period to the user's drift target cluster."""
    feature_signal: float = 0.3
    """Probability a user's region / age band is its main cluster's home value instead of random."""
    feature_missing: float = 0.02
    """Probability a user's region / age band is missing (null)."""
    event_probs: tuple[float, float, float] = (0.8, 0.15, 0.05)
    """Probabilities of view / click / purchase for non-repeat events (repeats are clicks or purchases)."""
    dynamics: bool = True
    """Item popularity changes over time (release times, life curves, evergreen / seasonal / trending items: see the
    module docstring). False: a static popularity per item, byte-identical to the generator before time dynamics."""
    half_life_days: float = 21.0
    """Median half-life in days of a life-cycle item's decay after its launch peak (each item's is log-normal around
    it, sigma 0.6)."""
    rise_days: float = 3.0
    """Median time scale in days of an item's rise after launch (each item's is log-normal around it, sigma 0.5)."""
    popularity_floor: float = 0.05
    """Share of its peak popularity an item keeps once its curve has decayed (the long tail of old items)."""
    evergreen_share: float = 0.1
    """Share of items whose popularity stays flat after the rise (no decay)."""
    seasonal_share: float = 0.1
    """Share of items with periodic popularity: a bump once a week or once a year (half each) at a random phase."""
    trending_share: float = 0.1
    """Share of items that trend once, at a random time of the period after their release: on top of their life
    cycle, a spike that rises in about a day to the peak popularity of a top-10 item, then decays."""
    trend_half_life_days: float = 7.0
    """Half-life in days of a trending item's spike."""
    backlog_days: float = 365.0
    """Items available at the start were released uniformly up to this many days before it, so the period opens
    with items at every stage of their life curves."""

    def validate(self) -> None:
        for name in ("events", "users", "items", "shard_events", "clusters", "categories", "neighbourhood"):
            v = getattr(self, name)
            if v < 1:
                raise ValueError(f"`synth.{name}` must be >= 1, got {v}")
        if self.clusters > self.items:
            raise ValueError(f"`synth.clusters` must be <= `synth.items` ({self.items}), got {self.clusters}")
        if self.categories > len(CATEGORY_NOUNS):
            raise ValueError(f"`synth.categories` must be <= {len(CATEGORY_NOUNS)}, got {self.categories}")
        if not self.days > 0:
            raise ValueError(f"`synth.days` must be > 0, got {self.days}")
        for name in (
            "category_noise", "late_user_fraction", "p_repeat", "p_sequential", "p_new", "p_explore",
            "taste_drift", "feature_signal", "feature_missing",
        ):  # fmt: skip
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"`synth.{name}` must be in [0, 1], got {v}")
        if not 0.0 <= self.late_item_fraction < 1.0:
            raise ValueError(f"`synth.late_item_fraction` must be in [0, 1), got {self.late_item_fraction}")
        p = self.p_repeat + self.p_sequential + self.p_new + self.p_explore
        if p > 1.0 + 1e-9:
            raise ValueError(f"`synth.p_repeat + p_sequential + p_new + p_explore` must be <= 1, got {p:.4g}")
        lo, hi = self.main_share
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"`synth.main_share` must be [lo, hi] with 0 <= lo <= hi <= 1, got {self.main_share}")
        if len(self.event_probs) != 3 or min(self.event_probs) < 0 or abs(sum(self.event_probs) - 1) > 1e-6:
            raise ValueError(f"`synth.event_probs` must be 3 probabilities summing to 1, got {self.event_probs}")
        for name in ("popularity_floor", "evergreen_share", "seasonal_share", "trending_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"`synth.{name}` must be in [0, 1], got {v}")
        kinds = self.evergreen_share + self.seasonal_share + self.trending_share
        if kinds > 1.0 + 1e-9:
            raise ValueError(
                f"`synth.evergreen_share + seasonal_share + trending_share` must be <= 1, got {kinds:.4g}"
            )
        for name in ("half_life_days", "rise_days", "trend_half_life_days"):
            v = getattr(self, name)
            if not v > 0:
                raise ValueError(f"`synth.{name}` must be > 0, got {v}")
        if self.backlog_days < 0:
            raise ValueError(f"`synth.backlog_days` must be >= 0, got {self.backlog_days}")
        if self.popularity_exponent < 0 or self.activity_sigma < 0 or self.new_window_days < 0:
            raise ValueError(
                "`synth.popularity_exponent`, `activity_sigma` and `new_window_days` must be >= 0, got "
                f"{self.popularity_exponent}, {self.activity_sigma}, {self.new_window_days}"
            )


_DAY = 86_400.0
_EVERGREEN, _SEASONAL, _TRENDING, _LIFE = range(4)
_SEASON_DAYS = (7.0, 365.25)  # weekly and yearly bumps
_SEASON_KAPPA = (2.0, 8.0)  # von Mises sharpness: a ~2-day bump each week, a ~7-week bump each year
_SPIKE_RISE_DAYS, _SPIKE_TOP_RANK = 1.0, 10
_TABLE_CELLS = 2_000_000  # cumulative-weight entries built at once (with temporaries, about 60 MB)


def _life_peak(rise: np.ndarray, rate: np.ndarray) -> np.ndarray:
    """Maximum over ages ``a`` of ``(1 - exp(-a / rise)) * exp(-rate * a)``, reached at
    ``a = rise * ln(1 + 1 / (rise * rate))``."""
    x = rise * rate
    return (1.0 / (1.0 + x)) * (1.0 + 1.0 / x) ** -x


class _Curves:
    """Each item's popularity over time: ``weight(i, t) = peak_i * (floor + (1 - floor) * shape_i(t)) + spike_i(t)``.

    ``shape`` is in [0, 1]: a life cycle (rise, then exponential decay), flat after the rise (evergreen) or a periodic
    bump (seasonal); trending items add a short spike of absolute height. Times are seconds relative to the start of
    the period; all parameters are drawn from their own random stream, so turning dynamics on changes no other draw.
    """

    def __init__(self, cfg: SynthConfig, peak: np.ndarray, arrival: np.ndarray, span: int) -> None:
        rng = np.random.default_rng([cfg.seed, 0, 1])
        n = peak.size
        self.peak = peak
        self.floor = cfg.popularity_floor
        # items on the shelf at the start were released before it: they open the period mid-life
        self.release = np.where(arrival > 0, arrival, -rng.random(n) * cfg.backlog_days * _DAY)
        bounds = np.cumsum([cfg.evergreen_share, cfg.seasonal_share, cfg.trending_share])
        self.kind = np.searchsorted(bounds, rng.random(n), side="right")  # [n] index into ITEM_KINDS
        self.rise = cfg.rise_days * _DAY * rng.lognormal(0.0, 0.5, n)
        self.rate = math.log(2) / (cfg.half_life_days * _DAY * rng.lognormal(0.0, 0.6, n))  # decay per second
        self.rate[self.kind == _EVERGREEN] = 0.0
        self.life_norm = 1.0 / np.where(self.rate > 0, _life_peak(self.rise, np.maximum(self.rate, 1e-300)), 1.0)
        yearly = rng.random(n) < 0.5
        self.period = np.where(yearly, _SEASON_DAYS[1], _SEASON_DAYS[0]) * _DAY
        self.kappa = np.where(yearly, _SEASON_KAPPA[1], _SEASON_KAPPA[0])
        self.phase = rng.random(n) * self.period
        # trending: one spike at a random time after release, as high as an item of rank < 10 at its peak
        start = np.maximum(self.release, 0.0)
        self.spike_at = start + rng.random(n) * np.maximum(span - start, 0.0)
        rank = rng.integers(0, _SPIKE_TOP_RANK, n)
        self.spike_height = np.where(self.kind == _TRENDING, (rank + 10.0) ** -cfg.popularity_exponent, 0.0)
        self.spike_rise = _SPIKE_RISE_DAYS * _DAY
        self.spike_rate = math.log(2) / (cfg.trend_half_life_days * _DAY)
        self.spike_norm = 1.0 / float(_life_peak(np.array(self.spike_rise), np.array(self.spike_rate)))
        self.of_kind = [np.flatnonzero(self.kind == k) for k in range(len(ITEM_KINDS))]
        # the factors of ``weight`` folded in advance (it runs on [steps, n_items] grids)
        self.neg_inv_rise = -1.0 / self.rise
        self.neg_rate = -self.rate
        self.level = self.floor * peak  # the floor, in weight
        self.neg_amp = -(1.0 - self.floor) * peak * self.life_norm
        self.spike_amp = self.spike_height * self.spike_norm

    def weight(self, items: np.ndarray | None, t: np.ndarray) -> np.ndarray:
        """Popularity of ``items`` [n] at relative times ``t`` [n]; with ``items`` None, of every item at each of the
        times ``t`` [m, 1]: [m, n_items]."""
        sel = slice(None) if items is None else items
        age = t - self.release[sel]
        np.maximum(age, 0.0, out=age)
        neg_rise = np.expm1(age * self.neg_inv_rise[sel])  # -(1 - exp(-age / rise))
        w = np.multiply(age, self.neg_rate[sel], out=age)
        np.exp(w, out=w)  # the decay (1 for evergreen items)
        w *= neg_rise
        w *= self.neg_amp[sel]
        w += self.level[sel]  # life cycle / evergreen: floor + (1 - floor) * rise * decay, in weight
        # the periodic bump and the spike only where they apply (most items have neither)
        for k in (_SEASONAL, _TRENDING):
            at = self.of_kind[k] if items is None else np.flatnonzero(self.kind[items] == k)
            if not at.size:
                continue
            i = at if items is None else items[at]
            ti = t if items is None else t[at]
            if k == _SEASONAL:
                bump = np.exp(self.kappa[i] * (np.cos((2 * np.pi) * (ti - self.phase[i]) / self.period[i]) - 1.0))
                w[..., at] = self.level[i] - (1.0 - self.floor) * self.peak[i] * neg_rise[..., at] * bump
            else:
                since = np.maximum(ti - self.spike_at[i], 0.0)
                rise_k = np.expm1(-since / self.spike_rise)  # -(1 - exp(-since / spike_rise))
                w[..., at] -= self.spike_amp[i] * rise_k * np.exp(-self.spike_rate * since)
        return w


def _ids(prefix: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` external ids like ``u00042``; numbering is shuffled so an id says nothing about the latent cluster."""
    width = len(str(n - 1))
    perm = rng.permutation(n)
    return np.array([f"{prefix}{i:0{width}d}" for i in perm.tolist()])


class _World:
    """Static users, items and the lookup tables the per-event draws need (all numpy, O(users + items))."""

    # ~85 lines: draws the synthetic world's parameters (clusters, popularity, drift), one statement each.
    def __init__(self, cfg: SynthConfig) -> None:
        rng = np.random.default_rng([cfg.seed, 0])
        n_items, n_users, n_clusters = cfg.items, cfg.users, cfg.clusters
        self.span = int(round(cfg.days * 86_400))

        # items: cluster sizes vary (Dirichlet), every cluster has at least one item
        sizes = rng.dirichlet(np.full(n_clusters, 4.0))
        cluster = np.concatenate([np.arange(n_clusters), rng.choice(n_clusters, n_items - n_clusters, p=sizes)])
        self.item_cluster = rng.permutation(cluster)
        rank = rng.permutation(n_items)
        self.item_weight = (rank + 10.0) ** -cfg.popularity_exponent  # [n_items] power-law popularity
        late = rng.random(n_items) < cfg.late_item_fraction
        late[np.argmax(self.item_weight)] = False  # something is always available at the start
        self.item_arrival = np.where(late, rng.integers(1, self.span, n_items), 0).astype(np.int64)  # rel. secs

        # segments 0..C-1 = clusters, segment C = whole catalogue; items of a segment sorted by arrival, so the
        # items available at time t are a prefix and popularity sampling is a search in a cumulative sum.
        seg_of = np.concatenate([self.item_cluster, np.full(n_items, n_clusters)])
        item_of = np.concatenate([np.arange(n_items), np.arange(n_items)])
        order = np.lexsort((item_of, self.item_arrival[item_of], seg_of))
        self.seg_items = item_of[order]
        seg_sorted = seg_of[order]
        self.seg_start = np.searchsorted(seg_sorted, np.arange(n_clusters + 1))
        self.seg_end = np.searchsorted(seg_sorted, np.arange(n_clusters + 1), side="right")
        self._big = np.int64(self.span + 1)
        self.seg_key = seg_sorted * self._big + self.item_arrival[self.seg_items]  # sorted
        self.seg_cum = np.cumsum(self.item_weight[self.seg_items])
        # first index of each cluster segment whose item arrived after the start (the "new" candidates)
        self.seg_late = np.searchsorted(self.seg_key, np.arange(n_clusters + 1) * self._big, side="right")

        # a random order of each cluster's items: sequential steps move a few positions along it
        pos_order = np.lexsort((rng.random(n_items), self.item_cluster))
        self.clus_items = pos_order
        self.clus_start = np.searchsorted(self.item_cluster[pos_order], np.arange(n_clusters))
        self.clus_size = np.bincount(self.item_cluster, minlength=n_clusters)
        self.item_pos = np.empty(n_items, dtype=np.int64)
        self.item_pos[pos_order] = np.arange(n_items) - self.clus_start[self.item_cluster[pos_order]]

        # users: main (a), secondary (b) and drift target (c) clusters, all distinct when possible
        a = rng.integers(n_clusters, size=n_users)
        b = (a + rng.integers(1, max(n_clusters, 2), size=n_users)) % n_clusters
        c = (a + rng.integers(1, max(n_clusters, 2), size=n_users)) % n_clusters
        self.user_clusters = np.stack([a, b, c], axis=1)  # [n_users, 3]
        lo, hi = cfg.main_share
        self.user_main = rng.uniform(lo, hi, n_users)
        self.user_drift = cfg.taste_drift * rng.random(n_users)
        activity = rng.lognormal(0.0, cfg.activity_sigma, n_users)
        late_user = rng.random(n_users) < cfg.late_user_fraction
        late_user[np.argmax(activity)] = False
        join = np.where(late_user, rng.integers(1, max(2, int(self.span * 0.9)), n_users), 0).astype(np.int64)
        self.user_by_join = np.lexsort((np.arange(n_users), join))
        self.join_sorted = join[self.user_by_join]
        self.activity_cum = np.cumsum(activity[self.user_by_join])

        # features
        self.cluster_category = np.arange(n_clusters) % cfg.categories
        noisy = rng.random(n_items) < cfg.category_noise
        self.item_category = np.where(
            noisy, rng.integers(cfg.categories, size=n_items), self.cluster_category[self.item_cluster]
        )
        n_adj = len(ADJECTIVES)
        cluster_adj = np.stack([rng.choice(n_adj, 5, replace=False) for _ in range(n_clusters)])  # [C, 5]
        own = rng.random((n_items, 2)) < 0.8
        adj = np.where(
            own, cluster_adj[self.item_cluster[:, None], rng.integers(5, size=(n_items, 2))],
            rng.integers(n_adj, size=(n_items, 2)),
        )  # fmt: skip
        noun = rng.integers(8, size=n_items)
        cats = list(CATEGORY_NOUNS)[: cfg.categories]
        self.category_names = np.array(cats)
        self.titles = np.array([
            f"{ADJECTIVES[x]} {ADJECTIVES[y]} {CATEGORY_NOUNS[cats[g]][w]}" if x != y
            else f"{ADJECTIVES[x]} {CATEGORY_NOUNS[cats[g]][w]}"
            for x, y, g, w in zip(adj[:, 0].tolist(), adj[:, 1].tolist(), self.item_category.tolist(), noun.tolist(), strict=True)
        ])  # fmt: skip
        home_region = rng.integers(len(REGIONS), size=n_clusters)
        home_age = rng.integers(len(AGE_BANDS), size=n_clusters)
        self.user_region = self._user_feature(rng, cfg, home_region[a], len(REGIONS))
        self.user_age = self._user_feature(rng, cfg, home_age[a], len(AGE_BANDS))

        self.item_ids = _ids("i", n_items, rng)
        self.user_ids = _ids("u", n_users, rng)

        # time dynamics: popularity is evaluated once per step (a day, finer for short periods) at the step's end
        self.curves = _Curves(cfg, self.item_weight, self.item_arrival, self.span) if cfg.dynamics else None
        self.step = max(1, min(86_400, self.span // 64))

    @staticmethod
    def _user_feature(rng: np.random.Generator, cfg: SynthConfig, home: np.ndarray, n_values: int) -> np.ndarray:
        n = home.size
        value = np.where(rng.random(n) < cfg.feature_signal, home, rng.integers(n_values, size=n))
        return np.where(rng.random(n) < cfg.feature_missing, -1, value)  # -1 = missing

    # ---- per-event draws (vectorised over events) ----

    def draw_users(self, t: np.ndarray, u: np.ndarray) -> np.ndarray:
        """Users active at relative times ``t`` [n], picked by activity among those who joined by then."""
        n_avail = np.searchsorted(self.join_sorted, t, side="right")  # >= 1: the most active user joins at 0
        idx = np.searchsorted(self.activity_cum, u * self.activity_cum[n_avail - 1], side="right")
        return self.user_by_join[np.minimum(idx, n_avail - 1)]

    def weight_now(self, items: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Popularity of ``items`` [n] at relative times ``t`` [n] (the step's value under dynamics)."""
        if self.curves is None:
            return self.item_weight[items]
        return self.curves.weight(items, (t // self.step + 1) * self.step)

    def draw_popular(self, seg: np.ndarray, t: np.ndarray, u: np.ndarray) -> np.ndarray:
        """An item of segment ``seg`` [n] that has arrived by ``t`` [n], by its popularity at ``t`` (``u``: uniform).

        Fastest with ``t`` in time order (or a few time-ordered runs): under dynamics the searches then stay in one
        step's table at a time."""
        end = np.searchsorted(self.seg_key, seg * self._big + t, side="right")
        empty = end == self.seg_start[seg]
        if empty.any():  # nothing of this cluster has arrived yet: fall back to the whole catalogue
            seg = np.where(empty, len(self.seg_start) - 1, seg)
            end = np.searchsorted(self.seg_key, seg * self._big + t, side="right")
        if self.curves is None:
            return self._draw(self.seg_cum, 0, seg, end, u)
        # one table of weights per step (arrived items are still a prefix of each segment, only the weights move),
        # the steps' tables laid end to end under one cumulative sum, so one search serves every step
        out = np.empty(seg.size, dtype=np.int64)
        if not seg.size:
            return out
        step = t // self.step
        width = self.seg_items.size
        lo, hi = int(step.min()), int(step.max()) + 1
        per_block = max(1, _TABLE_CELLS // width)  # bounds memory for large catalogues
        for b0 in range(lo, hi, per_block):
            b1 = min(b0 + per_block, hi)
            w = self.curves.weight(None, ((np.arange(b0, b1, dtype=np.float64) + 1) * self.step)[:, None])
            cum = np.cumsum(w[:, self.seg_items])  # [steps * 2 * n_items]
            at = np.flatnonzero((step >= b0) & (step < b1)) if lo < b0 or b1 < hi else slice(None)
            out[at] = self._draw(cum, step[at] - b0, seg[at], end[at], u[at])
        return out

    def _draw(self, cum: np.ndarray, row: np.ndarray | int, seg: np.ndarray, end: np.ndarray, u: np.ndarray
              ) -> np.ndarray:
        """Inverse-CDF draw within ``[seg_start[seg], end)`` of table ``row`` of the cumulative weights ``cum``
        (tables of ``len(seg_items)`` weights in segment order, laid end to end)."""
        first = row * self.seg_items.size + self.seg_start[seg]  # a segment's first entry in ``cum``
        last = row * self.seg_items.size + end - 1
        base = np.where(first > 0, cum[np.maximum(first - 1, 0)], 0.0)
        idx = np.searchsorted(cum, base + u * (cum[last] - base), side="right")
        return self.seg_items[np.clip(idx, first, last) - row * self.seg_items.size]

    def draw_new(self, seg: np.ndarray, t: np.ndarray, u: np.ndarray, window: int) -> np.ndarray:
        """A late item of cluster ``seg`` that arrived in ``(t - window, t]``, uniformly; -1 where there is none."""
        lo = np.searchsorted(self.seg_key, seg * self._big + np.maximum(t - window, 0), side="right")
        lo = np.maximum(lo, self.seg_late[seg])
        hi = np.searchsorted(self.seg_key, seg * self._big + t, side="right")
        idx = lo + np.floor(u * (hi - lo)).astype(np.int64)
        return np.where(hi > lo, self.seg_items[np.minimum(idx, len(self.seg_items) - 1)], -1)

    def neighbour(self, prev: np.ndarray, offset: np.ndarray) -> np.ndarray:
        """The item ``offset`` positions from ``prev`` in its cluster's item order (wrapping around)."""
        c = self.item_cluster[prev]
        return self.clus_items[self.clus_start[c] + (self.item_pos[prev] + offset) % self.clus_size[c]]


def _shard_bounds(cfg: SynthConfig, span: int) -> list[tuple[int, int, int]]:
    """(n_events, t0, t1) per shard: events spread evenly over time, shard s owns [t0, t1) of the span."""
    n_shards = math.ceil(cfg.events / cfg.shard_events)
    out = []
    for s in range(n_shards):
        a, b = s * cfg.shard_events, min(cfg.events, (s + 1) * cfg.shard_events)
        out.append((b - a, span * a // cfg.events, max(span * b // cfg.events, span * a // cfg.events + 1)))
    return out


# ~85 lines: one shard's event loop, vectorised over users; its steps share the shard's random state.
def _generate_shard(
    world: _World, cfg: SynthConfig, shard: int, n: int, t0: int, t1: int, last_item: np.ndarray
) -> dict[str, np.ndarray]:
    """Generate one shard's events in time order; updates ``last_item`` [n_users] in place."""
    rng = np.random.default_rng([cfg.seed, 1 + shard])
    t = np.sort(rng.integers(t0, t1, n))  # relative seconds, time order
    user = world.draw_users(t, rng.random(n))
    # work in (user, time) order so each user's events are contiguous and chronological
    order = np.argsort(user, kind="stable")
    us, ts = user[order], t[order]
    back = np.empty(n, dtype=np.int64)
    back[order] = np.arange(n)  # (user, time) order -> time order
    frac = ts / world.span

    p = np.array([cfg.p_repeat, cfg.p_sequential, cfg.p_new, cfg.p_explore])
    channel = np.searchsorted(np.cumsum(p), rng.random(n), side="right").clip(max=_TASTE)  # [n] in 0..4

    # the user's cluster right now: main share shrinks towards the drift target over the period
    main = world.user_main[us]
    drift = main * world.user_drift[us] * frac
    r = rng.random(n)
    which = np.where(r < main - drift, 0, np.where(r < 1.0 - drift, 1, 2))
    clus = world.user_clusters[us, which]
    u_taste = rng.random(n)
    explore = np.flatnonzero(channel == _EXPLORE)
    u_explore = rng.random(explore.size)
    # taste and explore draws in one call (under dynamics each step's table is built once), both in time order (so
    # consecutive searches stay in one step's table); ``ex``: the explore events' (user, time) positions, time order
    ex = back[np.flatnonzero(channel[back] == _EXPLORE)]
    drawn = world.draw_popular(
        np.r_[clus[back], np.full(ex.size, cfg.clusters)], np.r_[t, ts[ex]],
        np.r_[u_taste[back], u_explore[np.searchsorted(explore, ex)]],
    )  # fmt: skip
    taste = drawn[:n][order]
    items = taste.copy()
    items[ex] = drawn[n:]
    new = np.flatnonzero(channel == _NEW)
    fresh = world.draw_new(clus[new], ts[new], rng.random(new.size), int(cfg.new_window_days * 86_400))
    items[new] = np.where(fresh >= 0, fresh, taste[new])

    # two candidate steps per event; the neighbour more popular now wins (popular items stay popular downstream too)
    steps = rng.integers(1, cfg.neighbourhood + 1, (n, 2)) * np.where(rng.random((n, 2)) < 0.5, -1, 1)

    def follow(idx: np.ndarray, prev: np.ndarray) -> np.ndarray:
        """Items of repeat/sequential events ``idx`` given their previous items ``prev``."""
        a, b = world.neighbour(prev, steps[idx, 0]), world.neighbour(prev, steps[idx, 1])
        wa, wb = world.weight_now(np.r_[a, b], np.r_[ts[idx], ts[idx]]).reshape(2, -1)
        nxt = np.where(wa >= wb, a, b)
        nxt = np.where(world.item_arrival[nxt] <= ts[idx], nxt, taste[idx])  # a not-yet-arrived neighbour
        return np.where(channel[idx] == _REPEAT, prev, nxt)

    needs_prev = channel <= _SEQ
    first = np.ones(n, dtype=bool)
    first[1:] = us[1:] != us[:-1]
    head = np.flatnonzero(needs_prev & first)  # predecessor lives in an earlier shard (or nowhere)
    carried = last_item[us[head]]
    ok = carried >= 0
    items[head[ok]] = follow(head[ok], carried[ok])
    items[head[~ok]] = taste[head[~ok]]
    # resolve chains of repeat/sequential events: each pass settles those whose predecessor is settled
    pending = np.flatnonzero(needs_prev & ~first)
    settled = np.ones(n, dtype=bool)
    settled[pending] = False
    while pending.size:
        ready = settled[pending - 1]
        idx = pending[ready]
        items[idx] = follow(idx, items[idx - 1])
        settled[idx] = True
        pending = pending[~ready]

    event = np.searchsorted(np.cumsum(cfg.event_probs), rng.random(n), side="right").clip(max=2)
    repeat = channel == _REPEAT
    event[repeat] = np.where(rng.random(int(repeat.sum())) < 0.7, 1, 2)  # funnel: click or purchase

    last = np.flatnonzero(np.r_[us[1:] != us[:-1], True])
    last_item[us[last]] = items[last]

    return {
        "user": user,
        "item": items[back],
        "t": t,
        "event": event[back],
        "channel": channel[back],
    }


# ~80 lines: shards, the items/users files and the ground-truth file, written atomically together.
def generate(out: str | Path, *, config: SynthConfig, overwrite: bool = False) -> dict[str, Any]:
    """Write a synthetic dataset to ``out`` (atomically) and return the ``synth.json`` summary (plus ``seconds``)."""
    cfg = config
    cfg.validate()
    started = time.perf_counter()
    world = _World(cfg)
    bounds = _shard_bounds(cfg, world.span)
    user_ids = pa.array(world.user_ids, pa.string())
    item_ids = pa.array(world.item_ids, pa.string())
    event_names = pa.array(EVENTS, pa.string())
    last_item = np.full(cfg.users, -1, dtype=np.int64)
    active_users = np.zeros(cfg.users, dtype=bool)
    active_items = np.zeros(cfg.items, dtype=bool)
    event_counts = np.zeros(len(EVENTS), dtype=np.int64)
    channel_counts = np.zeros(len(CHANNELS), dtype=np.int64)
    files = []
    out = Path(out)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / LOGS_DIR).mkdir()
        for s, (n, t0, t1) in enumerate(bounds):
            ev = _generate_shard(world, cfg, s, n, t0, t1, last_item)
            table = pa.table(
                {
                    "user_id": user_ids.take(pa.array(ev["user"])),
                    "item_id": item_ids.take(pa.array(ev["item"])),
                    "timestamp": pa.array(ev["t"] + cfg.start_ts, pa.int64()),
                    "event": event_names.take(pa.array(ev["event"])),
                }
            )
            name = f"{LOGS_DIR}/part-{s:05d}.parquet"
            pq.write_table(table, tmp / name, compression="zstd")
            active_users[ev["user"]] = True
            active_items[ev["item"]] = True
            event_counts += np.bincount(ev["event"], minlength=len(EVENTS))
            channel_counts += np.bincount(ev["channel"], minlength=len(CHANNELS))
            files.append({"path": name, "rows": n, "sha256": sha256_file(tmp / name)})
            log.info("synth: shard %d/%d, %d events, %.1fs", s + 1, len(bounds), n, time.perf_counter() - started)

        def nullable(values: np.ndarray, codes: np.ndarray) -> pa.Array:
            return pa.array(values, pa.string()).take(pa.array(codes, mask=codes < 0))

        items = pa.table(
            {
                "item_id": item_ids,
                "category": pa.array(world.category_names[world.item_category], pa.string()),
                "title": pa.array(world.titles, pa.string()),
            }
        ).sort_by("item_id")
        users = pa.table(
            {
                "user_id": user_ids,
                "region": nullable(np.array(REGIONS), world.user_region),
                "age_band": nullable(np.array(AGE_BANDS), world.user_age),
            }
        ).sort_by("user_id")
        for name, table in ((ITEMS_FILE, items), (USERS_FILE, users)):
            pq.write_table(table, tmp / name, compression="zstd")
            files.append({"path": name, "rows": table.num_rows, "sha256": sha256_file(tmp / name)})
        summary = {
            "generator": "recsys.prepare.synth",
            "config": to_dict(cfg),
            "counts": {
                "events": cfg.events,
                "users": cfg.users,
                "items": cfg.items,
                "active_users": int(active_users.sum()),
                "active_items": int(active_items.sum()),
                "shards": len(bounds),
                "events_by_type": dict(zip(EVENTS, event_counts.tolist(), strict=True)),
                "events_by_channel": dict(zip(CHANNELS, channel_counts.tolist(), strict=True)),
                **({} if world.curves is None else {"items_by_kind": dict(zip(
                    ITEM_KINDS, np.bincount(world.curves.kind, minlength=len(ITEM_KINDS)).tolist(), strict=True
                ))}),
            },
            "time": {"start_ts": cfg.start_ts, "end_ts": cfg.start_ts + world.span},
            "files": files,
        }
        atomic_write_json(tmp / SYNTH_JSON, summary)
    seconds = time.perf_counter() - started
    log.info("synth: wrote %d events to %s in %.1fs", cfg.events, out, seconds)
    return {**summary, "seconds": seconds}
