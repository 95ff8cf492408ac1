"""Seeded synthetic rating data and readers for the rating files Spark users already have.

Every test, job and benchmark of the project takes its data from here, so that results are
reproducible and comparable:

* :func:`generate_ratings` (explicit 1..5 ratings) and :func:`generate_interactions` (implicit
  positive counts) sample unique ``(user, item)`` pairs with power-law popularity on both sides
  and values from a planted low-rank model, so that the accuracy an ALS fit can reach is known
  (the noise level) and the load is as skewed as MovieLens or Netflix.
* :func:`train_test_split` splits in NumPy, deterministically (``DataFrame.randomSplit`` is not
  deterministic on unsorted, recomputed input).
* :func:`to_dataframe` / :func:`generate_dataframe` turn the arrays into a Spark DataFrame
  through Arrow, or through a temporary Parquet file for data too large for the driver.
* :func:`read_spark_sample` reads ``data/mllib/als/sample_movielens_ratings.txt`` shipped with
  pyspark and :func:`read_movielens` reads the MovieLens formats (ML-100K ``u.data``,
  ML-1M/10M ``ratings.dat``, ML-20M/25M/latest ``ratings.csv``) with Spark's own readers.

Nothing is downloaded: the readers only read files that are already on disk.

All DataFrames have the schema ``user int, item int, rating float`` (column names configurable).
``float`` because Spark's ALS casts the rating column to ``FloatType`` anyway, so a double
column would only double the bytes moved.
"""

from __future__ import annotations

import atexit
import math
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

__all__ = [
    "MOVIELENS_FORMATS",
    "PlantedModel",
    "Ratings",
    "default_sizes",
    "generate_dataframe",
    "generate_interactions",
    "generate_ratings",
    "read_movielens",
    "read_spark_sample",
    "spark_sample_ratings_path",
    "to_dataframe",
    "train_test_split",
]

RATING_MIN = 1.0
RATING_MAX = 5.0

# MovieLens 1M..25M average 140-165 ratings per user; ML-100K has 106.
RATINGS_PER_USER = 140
# Catalogues grow more slowly than audiences: 4 * sqrt(n) items gives 4,000 items at 1M ratings
# (ML-1M: 3,706), 12,650 at 10M (ML-10M: 10,677) and 40,000 at 100M (Netflix: 17,770).
ITEMS_PER_SQRT_RATING = 4.0
# At most 5% of the user x item matrix is rated by default (ML-100K: 6.3%, ML-1M: 4.5%), which
# for small data sets means more users than n / RATINGS_PER_USER.
USERS_PER_SQRT_RATING = 5.0

# Zipf exponents of the popularity ranks. With these the degree distributions resemble ML-1M's:
# at 1M ratings the median user has 0.66x the mean number of ratings and the heaviest 9x (ML-1M:
# 0.58x and 14x), the median item 0.45x (ML-1M: 0.46x); the top 1% of the items hold 11% of the
# ratings at 1M and 24% at 10M.
USER_EXPONENT = 0.7
ITEM_EXPONENT = 1.0
# A power law alone would give the most popular item more expected ratings than there are users;
# popularity is capped so that the heaviest item is expected to be rated by at most this fraction
# of the users, and the heaviest user to rate at most this fraction of the items (ML-1M: 57%
# and 62%).
MAX_HEAD_SHARE = 0.5

# Planted model, on the 1..5 scale. The noiseless score of (u, i) is p_u . q_i, where column 0
# of P and Q carries the global mean and the user and item biases and columns 1..rank-1 carry a
# zero-mean interaction. With these values the scores have std 0.94 and about 9% of the
# scores + noise fall outside 1..5 and are clipped; the best possible RMSE stays at about the
# noise level (clipping only moves ratings toward the scores), while predicting the global mean
# gives about 0.98 at noise 0.5.
DEFAULT_RANK = 8
DEFAULT_NOISE = 0.5
DEFAULT_MEAN = 3.5
DEFAULT_SIGNAL = 0.8
USER_BIAS_STD = 0.3
ITEM_BIAS_STD = 0.4

# Above this density every pair is scored at once (weighted sampling without replacement over
# the whole matrix); below it, pairs are drawn with replacement and duplicates removed.
_DENSE_SAMPLING_DENSITY = 0.5
_MAX_SAMPLING_ROUNDS = 64
_SCORE_CHUNK = 1 << 20

# Above this many rows ``to_dataframe(via="auto")`` goes through Parquet instead of keeping the
# Arrow batches in the driver JVM (12 bytes per row: 20M rows are 240 MB of a 1 GB default heap).
ARROW_MAX_ROWS = 20_000_000


@dataclass(frozen=True)
class PlantedModel:
    """The low-rank model the ratings were generated from.

    Attributes
    ----------
    user_ids, item_ids : numpy.ndarray
        int32, the id of each factor row (``arange`` unless ``ids="sparse"``).
    user_factors, item_factors : numpy.ndarray
        float32 ``(num_users, rank)`` and ``(num_items, rank)``. The noiseless score of a pair
        is ``user_factors[u] @ item_factors[i]``; column 0 holds the global mean and the biases.
    noise : float
        Standard deviation of the Gaussian noise added to explicit ratings before clipping.
    """

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    noise: float

    @property
    def rank(self) -> int:
        return self.user_factors.shape[1]

    def scores(self, user: np.ndarray, item: np.ndarray) -> np.ndarray:
        """Noiseless float32 scores ``p_u . q_i`` of the given user and item ids.

        This is the oracle prediction: its RMSE on held-out explicit ratings is the best any
        model can reach (about ``noise``). Unknown ids raise ``KeyError``.
        """
        user_rows = _rows_of(self.user_ids, np.asarray(user), "user")
        item_rows = _rows_of(self.item_ids, np.asarray(item), "item")
        return _planted_scores(self.user_factors, self.item_factors, user_rows, item_rows)


@dataclass(frozen=True)
class Ratings:
    """A generated data set: three aligned arrays, plus the model behind them.

    Attributes
    ----------
    user, item : numpy.ndarray
        int32 ids; every ``(user, item)`` pair occurs once.
    rating : numpy.ndarray
        float32; explicit ratings in 1..5, or positive counts when ``implicit``.
    planted : PlantedModel or None
        The generating model (None after :meth:`from_arrays`).
    implicit : bool
        True for :func:`generate_interactions` output.
    """

    user: np.ndarray
    item: np.ndarray
    rating: np.ndarray
    planted: PlantedModel | None = None
    implicit: bool = False

    def __post_init__(self) -> None:
        if not (len(self.user) == len(self.item) == len(self.rating)):
            raise ValueError(
                f"user, item and rating must have the same length, got "
                f"{len(self.user)}, {len(self.item)} and {len(self.rating)}"
            )

    @classmethod
    def from_arrays(cls, user, item, rating, *, implicit: bool = False) -> Ratings:
        """Wrap existing arrays, converting them to int32 / int32 / float32."""
        return cls(
            _as_int32(user, "user"),
            _as_int32(item, "item"),
            np.asarray(rating, dtype=np.float32),
            implicit=implicit,
        )

    def __len__(self) -> int:
        return len(self.user)

    def take(self, indices: np.ndarray) -> Ratings:
        """The rows at ``indices`` (integer positions or a boolean mask), keeping ``planted``."""
        return replace(
            self, user=self.user[indices], item=self.item[indices], rating=self.rating[indices]
        )

    def as_tuple(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.user, self.item, self.rating


# --------------------------------------------------------------------------------------------
# Generator
# --------------------------------------------------------------------------------------------


def default_sizes(num_ratings: int) -> tuple[int, int]:
    """MovieLens-like ``(num_users, num_items)`` for ``num_ratings`` ratings.

    ``num_users = max(n / 140, 5 sqrt(n))`` and ``num_items = 4 sqrt(n)``: 140 ratings per user
    as in MovieLens 1M-25M, a catalogue that grows like the square root of the data (about
    ML-1M's and ML-10M's item counts at 1M and 10M ratings), and at most 5% of the matrix rated
    (the ``5 sqrt(n)`` floor, which only matters below 490K ratings; it gives ML-100K's shape
    at 100K). Examples: 100K -> (1,582, 1,265); 1M -> (7,143, 4,000);
    10M -> (71,429, 12,650); 100M -> (714,286, 40,000).
    """
    if num_ratings < 100:
        raise ValueError(
            f"default sizes need num_ratings >= 100, got {num_ratings}; "
            "pass num_users and num_items for smaller data sets"
        )
    root = math.sqrt(num_ratings)
    num_users = max(
        math.ceil(num_ratings / RATINGS_PER_USER), math.ceil(USERS_PER_SQRT_RATING * root)
    )
    num_items = math.ceil(ITEMS_PER_SQRT_RATING * root)
    return num_users, num_items


def generate_ratings(
    num_ratings: int,
    *,
    num_users: int | None = None,
    num_items: int | None = None,
    rank: int = DEFAULT_RANK,
    noise: float = DEFAULT_NOISE,
    mean: float = DEFAULT_MEAN,
    signal: float = DEFAULT_SIGNAL,
    round_to: float | None = None,
    user_exponent: float = USER_EXPONENT,
    item_exponent: float = ITEM_EXPONENT,
    ids: str = "dense",
    seed: int = 0,
) -> Ratings:
    """Explicit ratings from a planted low-rank model with power-law user and item popularity.

    ``rating = clip(p_u . q_i + noise * N(0, 1), 1, 5)`` for exactly ``num_ratings`` distinct
    ``(user, item)`` pairs. The noiseless matrix ``P Q^T`` has rank exactly ``rank``: column 0
    of P and Q carries the global ``mean`` (as ``sqrt(mean)`` in both) plus user and item
    biases (std 0.3 and 0.4), columns 1..rank-1 a zero-mean interaction of total std
    ``signal``. So an ALS fit of rank >= ``rank`` (Spark's ALS has no intercept; the mean lives
    in a factor) can reach a held-out RMSE close to ``noise``, while predicting the global mean
    gives about ``sqrt(0.25 + signal**2 + noise**2)`` shrunk by the clipping: 0.98 against 0.5
    with the defaults. (A float64 ALS at rank 8 on 40K ratings of 400 x 300 reaches 0.53.)

    Parameters
    ----------
    num_ratings : int
        Exact number of ratings (and of distinct pairs) returned.
    num_users, num_items : int, optional
        Distinct users and items; every one of them gets at least one rating, so
        ``num_users + num_items <= num_ratings <= num_users * num_items`` is required. Defaults
        from :func:`default_sizes` (MovieLens-like).
    rank : int
        Planted rank (>= 1; with rank 1 there is no interaction, only mean and biases).
    noise : float
        Standard deviation of the Gaussian noise, the floor of any model's RMSE.
    mean, signal : float
        Global mean and interaction standard deviation of the noiseless scores.
    round_to : float, optional
        Round ratings to multiples of this step (0.5 for half stars, 1 for whole stars, as in
        MovieLens); None keeps continuous values. Rounding adds ``round_to / sqrt(12)`` of
        noise.
    user_exponent, item_exponent : float
        Zipf exponents of the popularity: the k-th most active user is drawn with weight
        ``k ** -user_exponent`` (capped so that no user is expected to rate more than half the
        items, and no item to be rated by more than half the users).
    ids : {"dense", "sparse"}
        ``"dense"``: ids ``0..num_users-1`` and ``0..num_items-1``. ``"sparse"``: distinct ids
        drawn from the whole int32 range, negative ones included, to exercise id handling.
        Popularity is independent of the id either way (random ranks), so ``id mod blocks``
        partitions are balanced as in real data.
    seed : int
        Same seed and arguments give bit-identical arrays (for a given NumPy version), in any
        process. Pairs, factors and noise use separate random streams, so e.g. changing
        ``noise`` keeps the same pairs and factors.

    Returns
    -------
    Ratings
        ``user`` int32, ``item`` int32, ``rating`` float32, in random order, and ``planted``.

    Notes
    -----
    Pairs are drawn independently from the user and item popularity, duplicates removed, and
    drawing repeats until ``num_ratings`` distinct pairs exist; random surplus pairs are then
    dropped. The heaviest user x item pairs are thus "saturated" (rated at most once), as in
    real data. Measured on 2 cores: 1M ratings in 0.15-0.3 s, 10M in 2.6-2.8 s, peak memory
    under 60 bytes per rating.
    """
    _check_values(noise=noise, signal=signal, mean=mean, round_to=round_to)
    streams = _streams(seed)
    num_users, num_items = _sizes(num_ratings, num_users, num_items)
    planted = _planted_model(num_users, num_items, rank, mean, signal, noise, ids, streams)
    user_rows, item_rows = _popular_pairs(
        num_ratings, num_users, num_items, user_exponent, item_exponent, streams
    )
    scores = _planted_scores(planted.user_factors, planted.item_factors, user_rows, item_rows)
    scores += np.float32(noise) * streams["values"].standard_normal(num_ratings, dtype=np.float32)
    if round_to is not None:
        step = np.float32(round_to)
        np.round(scores / step, out=scores)
        scores *= step
    np.clip(scores, RATING_MIN, RATING_MAX, out=scores)
    return Ratings(
        _to_ids(planted.user_ids, user_rows), _to_ids(planted.item_ids, item_rows), scores, planted
    )


def generate_interactions(
    num_interactions: int,
    *,
    num_users: int | None = None,
    num_items: int | None = None,
    rank: int = DEFAULT_RANK,
    selectivity: float = 2.0,
    count_scale: float = 2.0,
    user_exponent: float = USER_EXPONENT,
    item_exponent: float = ITEM_EXPONENT,
    ids: str = "dense",
    seed: int = 0,
) -> Ratings:
    """Implicit feedback (e.g. play or click counts) driven by a planted low-rank affinity.

    For implicit ALS (``implicitPrefs=True``) what matters is *which* pairs are observed and
    how strongly. Both follow the standardized planted score ``z`` of the pair (the same model
    as :func:`generate_ratings`, mean 0, std 1 over random pairs):

    * a pair drawn by popularity is kept with probability ``sigmoid(selectivity * z)``, so
      observed pairs have a higher affinity than unobserved ones (a ranking model can learn
      them); ``selectivity=0`` makes observation depend on popularity only;
    * its value is ``1 + Poisson(count_scale * exp(z))``: a positive whole-number count, mean
      about 6 with the defaults (observed pairs have z > 0 on average), heavy-tailed (maximum
      about 1,000 at 1M interactions).

    Parameters are those of :func:`generate_ratings` (same defaults, sizes, popularity, ids and
    determinism); the ``num_users + num_items`` pairs that give every user and item an
    interaction are drawn by popularity only.

    Returns
    -------
    Ratings
        ``rating`` holds the counts as float32 (all >= 1); ``implicit`` is True.
    """
    if selectivity < 0 or count_scale < 0:
        raise ValueError(
            f"selectivity and count_scale must be >= 0, got {selectivity} and {count_scale}"
        )
    streams = _streams(seed)
    num_users, num_items = _sizes(num_interactions, num_users, num_items)
    planted = _planted_model(
        num_users, num_items, rank, DEFAULT_MEAN, DEFAULT_SIGNAL, 0.0, ids, streams
    )
    score_std = math.sqrt(
        USER_BIAS_STD**2 + ITEM_BIAS_STD**2 + (DEFAULT_SIGNAL**2 if rank > 1 else 0)
    )

    def affinity(user_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        z = _planted_scores(planted.user_factors, planted.item_factors, user_rows, item_rows)
        z -= np.float32(DEFAULT_MEAN)
        z /= np.float32(score_std)
        return z

    def keep_probability(user_rows: np.ndarray, item_rows: np.ndarray) -> np.ndarray:
        z = affinity(user_rows, item_rows)
        return 1.0 / (1.0 + np.exp(-selectivity * z))

    user_rows, item_rows = _popular_pairs(
        num_interactions,
        num_users,
        num_items,
        user_exponent,
        item_exponent,
        streams,
        keep_probability=keep_probability,
    )
    rate = np.exp(affinity(user_rows, item_rows), dtype=np.float64) * count_scale
    counts = (1 + streams["values"].poisson(rate)).astype(np.float32)
    return Ratings(
        _to_ids(planted.user_ids, user_rows),
        _to_ids(planted.item_ids, item_rows),
        counts,
        planted,
        implicit=True,
    )


def train_test_split(data, test_fraction: float = 0.2, seed: int = 0):
    """Split rows at random into train and test, deterministically, keeping their order.

    Exactly ``round(len * test_fraction)`` rows go to test. Users or items whose every rating
    lands in test are absent from train on purpose: they are the cold-start cases that
    ``coldStartStrategy`` exists for (with the default sizes they are rare).

    Parameters
    ----------
    data : Ratings or sequence of equal-length arrays
    test_fraction : float
        In [0, 1].
    seed : int

    Returns
    -------
    (train, test)
        Two :class:`Ratings` (``planted`` kept) or two tuples of arrays, like the input.
    """
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must be in [0, 1], got {test_fraction}")
    if isinstance(data, Ratings):
        columns = None
        size = len(data)
    else:
        columns = [np.asarray(a) for a in data]
        lengths = {len(a) for a in columns}
        if len(lengths) != 1:
            raise ValueError(f"arrays to split must have the same length, got {sorted(lengths)}")
        size = lengths.pop()
    num_test = round(size * test_fraction)
    is_test = np.zeros(size, dtype=bool)
    is_test[np.random.default_rng(seed).permutation(size)[:num_test]] = True
    if columns is None:
        return data.take(~is_test), data.take(is_test)
    return tuple(a[~is_test] for a in columns), tuple(a[is_test] for a in columns)


# --------------------------------------------------------------------------------------------
# Generator internals (module-level, pure NumPy)
# --------------------------------------------------------------------------------------------


def _streams(seed: int) -> dict[str, np.random.Generator]:
    names = ("ids", "factors", "popularity", "pairs", "values")
    children = np.random.SeedSequence(seed).spawn(len(names))
    return {name: np.random.default_rng(child) for name, child in zip(names, children)}


def _sizes(num_ratings: int, num_users: int | None, num_items: int | None) -> tuple[int, int]:
    if isinstance(num_ratings, bool) or not isinstance(num_ratings, (int, np.integer)):
        raise TypeError(f"num_ratings must be an int, got {type(num_ratings).__name__}")
    if num_users is None or num_items is None:
        default_users, default_items = default_sizes(int(num_ratings))
        num_users = default_users if num_users is None else num_users
        num_items = default_items if num_items is None else num_items
    num_ratings, num_users, num_items = int(num_ratings), int(num_users), int(num_items)
    limit = np.iinfo(np.int32).max
    if not (1 <= num_users <= limit and 1 <= num_items <= limit):
        raise ValueError(
            f"num_users and num_items must be in [1, {limit}], got {num_users} and {num_items}"
        )
    if num_users + num_items > num_ratings:
        raise ValueError(
            f"{num_ratings} ratings cannot give each of {num_users} users and {num_items} items "
            "a rating; use fewer users or items or more ratings"
        )
    if num_ratings > num_users * num_items:
        raise ValueError(
            f"{num_ratings} distinct ratings do not fit in a {num_users} x {num_items} matrix"
        )
    return num_users, num_items


def _check_values(*, noise: float, signal: float, mean: float, round_to: float | None) -> None:
    if noise < 0 or signal < 0:
        raise ValueError(f"noise and signal must be >= 0, got {noise} and {signal}")
    if not mean > 0:
        raise ValueError(f"mean must be > 0 (it is planted as sqrt(mean)), got {mean}")
    if round_to is not None and not round_to > 0:
        raise ValueError(f"round_to must be > 0 or None, got {round_to}")


def _planted_model(
    num_users: int,
    num_items: int,
    rank: int,
    mean: float,
    signal: float,
    noise: float,
    ids: str,
    streams: dict[str, np.random.Generator],
) -> PlantedModel:
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"rank must be an int >= 1, got {rank!r}")
    if ids not in ("dense", "sparse"):
        raise ValueError(f"ids must be 'dense' or 'sparse', got {ids!r}")
    rng = streams["factors"]
    # p_u0 * q_i0 = mean + b_u + b_i + b_u b_i / mean with b = sqrt(mean) * (p0 - sqrt(mean)).
    level = math.sqrt(mean)
    # Each interaction term is a product of two N(0, s^2): (rank - 1) * s^4 = signal^2.
    scale = (signal**2 / (rank - 1)) ** 0.25 if rank > 1 else 0.0

    def factors(count: int, bias_std: float) -> np.ndarray:
        f = rng.standard_normal((count, rank), dtype=np.float32)
        f[:, 0] *= np.float32(bias_std / level)
        f[:, 0] += np.float32(level)
        f[:, 1:] *= np.float32(scale)
        return f

    user_factors = factors(num_users, USER_BIAS_STD)
    item_factors = factors(num_items, ITEM_BIAS_STD)
    return PlantedModel(
        _make_ids(num_users, ids, streams["ids"]),
        _make_ids(num_items, ids, streams["ids"]),
        user_factors,
        item_factors,
        float(noise),
    )


def _make_ids(count: int, ids: str, rng: np.random.Generator) -> np.ndarray:
    if ids == "dense":
        return np.arange(count, dtype=np.int32)
    drawn = rng.choice(1 << 32, size=count, replace=False) - (1 << 31)
    return drawn.astype(np.int32)


def _to_ids(ids: np.ndarray, rows: np.ndarray) -> np.ndarray:
    if len(ids) and ids[0] == 0 and ids[-1] == len(ids) - 1 and np.all(np.diff(ids) == 1):
        return rows.astype(np.int32, copy=False)
    return ids[rows]


def _rows_of(ids: np.ndarray, query: np.ndarray, what: str) -> np.ndarray:
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    positions = np.searchsorted(sorted_ids, query)
    found = positions < len(ids)
    found[found] = sorted_ids[positions[found]] == query[found]
    if not found.all():
        raise KeyError(f"{what} ids not in the planted model: {query[~found][:5].tolist()}")
    return order[positions]


def _popular_pairs(
    num_pairs: int,
    num_users: int,
    num_items: int,
    user_exponent: float,
    item_exponent: float,
    streams: dict[str, np.random.Generator],
    keep_probability: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user row, item row) pairs drawn by capped power-law popularity."""
    user_cap = MAX_HEAD_SHARE * num_items / num_pairs
    item_cap = MAX_HEAD_SHARE * num_users / num_pairs
    return _sample_pairs(
        num_pairs,
        _popularity(num_users, user_exponent, user_cap, streams["popularity"]),
        _popularity(num_items, item_exponent, item_cap, streams["popularity"]),
        streams["pairs"],
        keep_probability,
    )


def _popularity(count: int, exponent: float, cap: float, rng: np.random.Generator) -> np.ndarray:
    """Zipf weights ``k ** -exponent``, none above ``cap``, assigned to rows in random order.

    Capped weights are set to ``cap`` and the rest rescaled so that the total stays 1 (water
    filling); a cap below the uniform weight gives uniform weights.
    """
    if exponent < 0:
        raise ValueError(f"popularity exponents must be >= 0, got {exponent}")
    if cap * count <= 1.0:
        weights = np.full(count, 1.0 / count)
    else:
        weights = np.arange(1, count + 1, dtype=np.float64) ** -exponent
        weights /= weights.sum()
        # Smallest k such that capping the k heaviest leaves the (k+1)-th under the cap.
        suffix = np.cumsum(weights[::-1])[::-1]
        heads = np.arange(count)
        capped = int(np.argmax(weights * (1.0 - heads * cap) <= cap * suffix))
        weights[capped:] *= (1.0 - capped * cap) / suffix[capped]
        weights[:capped] = cap
    return weights[rng.permutation(count)]


def _draw(weights: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` i.i.d. draws of row indices with these weights, sorted (O(size + rows))."""
    counts = rng.multinomial(size, weights / weights.sum())
    return np.repeat(np.arange(len(weights), dtype=np.int32), counts)


def _sample_pairs(
    num_pairs: int,
    user_weights: np.ndarray,
    item_weights: np.ndarray,
    rng: np.random.Generator,
    keep_probability: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Exactly ``num_pairs`` distinct (user row, item row) pairs, in random order.

    Each pair is drawn with probability proportional to ``user_weights[u] * item_weights[i]``
    (times ``keep_probability(u, i)`` when given). First every user gets an item and every
    item a user (drawn by popularity), so that all of them appear. Pairs are encoded as int64
    keys ``u * num_items + i`` and kept sorted, so deduplication is a sort.
    """
    num_users, num_items = len(user_weights), len(item_weights)
    coverage = np.concatenate(
        [
            np.arange(num_users, dtype=np.int64) * num_items
            + rng.permutation(_draw(item_weights, num_users, rng)),
            rng.permutation(_draw(user_weights, num_items, rng)).astype(np.int64) * num_items
            + np.arange(num_items, dtype=np.int64),
        ]
    )
    coverage = _sorted_unique(coverage)
    if num_pairs >= _DENSE_SAMPLING_DENSITY * num_users * num_items:
        keys = _sample_dense(num_pairs, coverage, user_weights, item_weights, rng, keep_probability)
    else:
        keys = _sample_sparse(
            num_pairs, coverage, user_weights, item_weights, rng, keep_probability
        )
    keys = keys[rng.permutation(len(keys))]
    return (keys // num_items).astype(np.int32), (keys % num_items).astype(np.int32)


def _sample_sparse(num_pairs, coverage, user_weights, item_weights, rng, keep_probability):
    num_items = len(item_weights)
    kept = coverage
    expected_yield = 1.0
    for _ in range(_MAX_SAMPLING_ROUNDS):
        missing = num_pairs - len(kept)
        if missing <= 0:
            break
        draws = min(math.ceil(1.05 * missing / expected_yield) + 64, 8 * num_pairs + 1_000_000)
        users = _draw(user_weights, draws, rng)
        items = rng.permutation(_draw(item_weights, draws, rng))
        if keep_probability is not None:
            keep = rng.random(draws) < keep_probability(users, items)
            users, items = users[keep], items[keep]
        candidates = _sorted_unique(users.astype(np.int64) * num_items + items)
        new = candidates[~_contains_sorted(kept, candidates)]
        kept = np.sort(np.concatenate([kept, new]))
        expected_yield = max(len(new) / draws, 1e-3)
    if len(kept) < num_pairs:
        raise RuntimeError(
            f"could not draw {num_pairs} distinct pairs in {_MAX_SAMPLING_ROUNDS} rounds; "
            "the popularity is too concentrated for this density"
        )
    surplus = len(kept) - num_pairs
    if surplus > 0:
        droppable = np.flatnonzero(~_contains_sorted(coverage, kept))
        kept = np.delete(kept, rng.choice(droppable, size=surplus, replace=False))
    return kept


def _sample_dense(num_pairs, coverage, user_weights, item_weights, rng, keep_probability):
    """Weighted sampling without replacement over every pair (Efraimidis-Spirakis keys).

    Only used when at least half the matrix is wanted, i.e. at most 2 * num_pairs pairs exist;
    drawing with replacement would then mostly hit pairs already drawn.
    """
    num_users, num_items = len(user_weights), len(item_weights)
    candidates = np.arange(num_users * num_items, dtype=np.int64)
    candidates = candidates[~_contains_sorted(coverage, candidates)]
    users = (candidates // num_items).astype(np.int32)
    items = (candidates % num_items).astype(np.int32)
    weights = user_weights[users] * item_weights[items]
    if keep_probability is not None:
        weights *= keep_probability(users, items)
    # The pairs with the largest u ** (1 / w) are a weighted sample without replacement.
    with np.errstate(divide="ignore"):
        priority = np.log(rng.random(len(candidates))) / weights
    wanted = num_pairs - len(coverage)
    chosen = np.argpartition(-priority, wanted - 1)[:wanted] if wanted > 0 else []
    return np.sort(np.concatenate([coverage, candidates[chosen]]))


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    # np.unique is several times slower than sort + mask on NumPy 2.x for int64 keys.
    keys = np.sort(keys)
    if len(keys) == 0:
        return keys
    first = np.empty(len(keys), dtype=bool)
    first[0] = True
    np.not_equal(keys[1:], keys[:-1], out=first[1:])
    return keys[first]


def _contains_sorted(sorted_keys: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """Whether each query is in ``sorted_keys`` (sorted, unique)."""
    positions = np.searchsorted(sorted_keys, queries)
    found = positions < len(sorted_keys)
    found[found] = sorted_keys[positions[found]] == queries[found]
    return found


def _planted_scores(
    user_factors: np.ndarray, item_factors: np.ndarray, user_rows: np.ndarray, item_rows: np.ndarray
) -> np.ndarray:
    """Row-wise dot products, in chunks so that the gathered factors stay small."""
    scores = np.empty(len(user_rows), dtype=np.float32)
    for start in range(0, len(user_rows), _SCORE_CHUNK):
        stop = start + _SCORE_CHUNK
        np.einsum(
            "ij,ij->i",
            user_factors[user_rows[start:stop]],
            item_factors[item_rows[start:stop]],
            out=scores[start:stop],
        )
    return scores


def _as_int32(values, what: str) -> np.ndarray:
    array = np.asarray(values)
    if array.dtype == np.int32:
        return array
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{what} ids must be integers, got dtype {array.dtype}")
    info = np.iinfo(np.int32)
    if len(array) and (array.min() < info.min or array.max() > info.max):
        raise ValueError(f"{what} ids must fit in int32 (Spark's ALS ids are ints)")
    return array.astype(np.int32)


# --------------------------------------------------------------------------------------------
# Spark DataFrames
# --------------------------------------------------------------------------------------------


def _schema(user_col: str, item_col: str, rating_col: str):
    from pyspark.sql.types import FloatType, IntegerType, StructField, StructType

    return StructType(
        [
            StructField(user_col, IntegerType()),
            StructField(item_col, IntegerType()),
            StructField(rating_col, FloatType()),
        ]
    )


def to_dataframe(
    spark: SparkSession,
    data: Ratings | Sequence[np.ndarray],
    *,
    user_col: str = "user",
    item_col: str = "item",
    rating_col: str = "rating",
    num_partitions: int | None = None,
    via: str = "auto",
    tmp_dir: str | None = None,
) -> DataFrame:
    """A Spark DataFrame ``(user int, item int, rating float)`` of generated arrays.

    Parameters
    ----------
    spark : SparkSession
    data : Ratings or (user, item, rating) arrays
    user_col, item_col, rating_col : str
        Column names (those of ALS's ``userCol``, ``itemCol``, ``ratingCol``).
    num_partitions : int, optional
        Partitions of the result. Default: Spark's default parallelism for ``"arrow"``,
        whatever the Parquet reader chooses for ``"parquet"``. When Spark does not produce
        exactly this many by itself (Parquet; Arrow when there are fewer rows than partitions),
        the result is repartitioned (a shuffle).
    via : {"auto", "arrow", "parquet"}
        ``"arrow"``: ``createDataFrame`` from a pyarrow Table, one Arrow batch per partition
        (10M rows in under a second; the batches live in the driver JVM while the DataFrame is
        used). ``"parquet"``: write a Parquet file with pyarrow and ``spark.read.parquet`` it,
        for data too large for the driver heap. ``"auto"``: Arrow up to 20M rows.
    tmp_dir : str, optional
        Where ``"parquet"`` writes (a fresh ``ratings-*.parquet`` file in it). The file must
        outlive the DataFrame, which reads it lazily, and executors must be able to read it
        (on a cluster: a shared file system). Default: a directory from
        ``tempfile.mkdtemp`` that is deleted when the Python process exits.
    """
    import pyarrow as pa

    if not isinstance(data, Ratings):
        data = Ratings.from_arrays(*data)
    if via not in ("auto", "arrow", "parquet"):
        raise ValueError(f"via must be 'auto', 'arrow' or 'parquet', got {via!r}")
    if num_partitions is not None and num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if via == "auto":
        via = "arrow" if len(data) <= ARROW_MAX_ROWS else "parquet"
    table = pa.table(
        {
            user_col: pa.array(data.user, type=pa.int32()),
            item_col: pa.array(data.item, type=pa.int32()),
            rating_col: pa.array(data.rating, type=pa.float32()),
        }
    )
    schema = _schema(user_col, item_col, rating_col)
    if via == "parquet":
        df = spark.read.schema(schema).parquet(_write_parquet(table, tmp_dir))
    else:
        df = _create_from_arrow(spark, table, schema, num_partitions)
    if num_partitions is not None and df.rdd.getNumPartitions() != num_partitions:
        df = df.repartition(num_partitions)
    return df


def _create_from_arrow(spark: SparkSession, table, schema, num_partitions: int | None):
    """``createDataFrame(table)`` as ``num_partitions`` (or default parallelism) Arrow batches.

    Spark makes one partition per Arrow batch of ``maxRecordsPerBatch`` rows (10,000 by default:
    1,000 partitions for 10M rows), and below ``localRelationThreshold`` (48 MB, 4M rows) it
    instead converts the data to rows in the driver, a local relation that is 5-10x slower to
    create and scan (1M rows: 3 s against 0.4 s). Both are set for this call only.
    """
    from spark_gpu_mf import conf
    from spark_gpu_mf.spark.session import runtime_confs

    batches = num_partitions or _default_parallelism(spark)
    temporary = {
        conf.ARROW_MAX_RECORDS_PER_BATCH: str(max(1, -(-len(table) // batches))),
        conf.ARROW_LOCAL_RELATION_THRESHOLD: "0",
    }

    with runtime_confs(spark, temporary):
        return spark.createDataFrame(table, schema=schema)


def generate_dataframe(
    spark: SparkSession,
    num_ratings: int,
    *,
    implicit: bool = False,
    user_col: str = "user",
    item_col: str = "item",
    rating_col: str = "rating",
    num_partitions: int | None = None,
    via: str = "auto",
    tmp_dir: str | None = None,
    **generator_options,
) -> DataFrame:
    """:func:`generate_ratings` (or :func:`generate_interactions` if ``implicit``) as a DataFrame.

    ``generator_options`` go to the generator (``num_users``, ``rank``, ``seed``, ...), the
    rest to :func:`to_dataframe`. To also get a test set, call the generator,
    :func:`train_test_split` and :func:`to_dataframe` instead.
    """
    generate = generate_interactions if implicit else generate_ratings
    return to_dataframe(
        spark,
        generate(num_ratings, **generator_options),
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
        num_partitions=num_partitions,
        via=via,
        tmp_dir=tmp_dir,
    )


_TEMP_DIRS: list[str] = []


def _write_parquet(table, tmp_dir: str | None) -> str:
    import pyarrow.parquet as pq

    if tmp_dir is None:
        if not _TEMP_DIRS:
            _TEMP_DIRS.append(tempfile.mkdtemp(prefix="spark_gpu_mf_data_"))
            atexit.register(shutil.rmtree, _TEMP_DIRS[0], True)
        tmp_dir = _TEMP_DIRS[0]
    os.makedirs(tmp_dir, exist_ok=True)
    path = os.path.join(tmp_dir, f"ratings-{uuid.uuid4().hex}.parquet")
    pq.write_table(table, path, row_group_size=1 << 20)
    return path


def _default_parallelism(spark: SparkSession) -> int:
    from spark_gpu_mf.spark.session import default_parallelism

    return default_parallelism(spark)  # also on Spark Connect, which has no SparkContext


# --------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------

_SAMPLE_RELATIVE_PATH = os.path.join("data", "mllib", "als", "sample_movielens_ratings.txt")

#: format name -> (field separator, header line), with the MovieLens releases using each.
MOVIELENS_FORMATS = {
    "tab": ("\t", False),  # ML-100K u.data (and its u1.base ... splits)
    "dat": ("::", False),  # ML-1M, ML-10M ratings.dat; Spark's sample_movielens_ratings.txt
    "csv": (",", True),  # ML-20M, ML-25M, ML-32M, ml-latest(-small) ratings.csv
}
_FORMAT_ALIASES = {
    "ml-100k": "tab",
    "u.data": "tab",
    "ml-1m": "dat",
    "ml-10m": "dat",
    "ml-20m": "csv",
    "ml-25m": "csv",
    "ml-32m": "csv",
    "ml-latest": "csv",
    "ml-latest-small": "csv",
}


def spark_sample_ratings_path() -> str:
    """Path of Spark's bundled ``data/mllib/als/sample_movielens_ratings.txt``.

    Looked for in the installed pyspark package, then under ``$SPARK_HOME``. 1,501 ratings of
    30 users on 100 items (0..4 stars), in the ``dat`` format.
    """
    import pyspark

    candidates = [os.path.join(os.path.dirname(pyspark.__file__), _SAMPLE_RELATIVE_PATH)]
    if os.environ.get("SPARK_HOME"):
        candidates.append(os.path.join(os.environ["SPARK_HOME"], _SAMPLE_RELATIVE_PATH))
    for path in candidates:
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        "Spark's sample ratings file was not found; looked in "
        + " and ".join(candidates)
        + ". It ships with the pyspark pip package and Spark distributions; "
        "nothing is downloaded."
    )


def read_spark_sample(
    spark: SparkSession,
    *,
    user_col: str = "user",
    item_col: str = "item",
    rating_col: str = "rating",
) -> DataFrame:
    """Spark's bundled sample ratings as ``(user int, item int, rating float)``."""
    return read_movielens(
        spark,
        spark_sample_ratings_path(),
        format="dat",
        user_col=user_col,
        item_col=item_col,
        rating_col=rating_col,
    )


def read_movielens(
    spark: SparkSession,
    path: str,
    format: str = "auto",
    *,
    user_col: str = "user",
    item_col: str = "item",
    rating_col: str = "rating",
    keep_timestamp: bool = False,
) -> DataFrame:
    """Read a MovieLens ratings file with Spark's CSV reader (scales to ML-32M and beyond).

    Parameters
    ----------
    spark : SparkSession
    path : str
        A file (or directory of files) in one of :data:`MOVIELENS_FORMATS`, on any file system
        Spark can read.
    format : str
        ``"tab"`` (ML-100K ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``), ``"dat"``
        (ML-1M/10M ``ratings.dat`` and Spark's sample: ``user::item::rating::timestamp``),
        ``"csv"`` (ML-20M/25M/32M/latest ``ratings.csv`` with header
        ``userId,movieId,rating,timestamp``), a release name such as ``"ml-1m"``, or
        ``"auto"``: from the file name (``.data``, ``.dat``, ``.csv``), else from the first line.
    keep_timestamp : bool
        Also return the ``timestamp`` column (long, seconds since the epoch), e.g. for a
        time-based split.

    Returns
    -------
    DataFrame
        ``(user int, item int, rating float[, timestamp long])``.

    Raises
    ------
    ValueError
        Unknown format, or a first line that does not look like a ratings file of that format
        (wrong separator, a ``movies.dat`` instead of ``ratings.dat``, a missing csv header).
        Malformed lines further down fail the first Spark job that reads them (the reader runs
        in ``FAILFAST`` mode, so nothing is silently dropped or read as null).
    """
    format = _resolve_format(spark, path, format)
    separator, header = MOVIELENS_FORMATS[format]
    _check_first_line(_first_line(spark, path), format, path)
    df = spark.read.csv(
        path,
        sep=separator,
        header=header,
        schema=f"`{user_col}` INT, `{item_col}` INT, `{rating_col}` FLOAT, timestamp LONG",
        mode="FAILFAST",
    )
    return df if keep_timestamp else df.drop("timestamp")


def _resolve_format(spark: SparkSession, path: str, format: str) -> str:
    name = str(format).lower()
    name = _FORMAT_ALIASES.get(name, name)
    if name in MOVIELENS_FORMATS:
        return name
    if name != "auto":
        raise ValueError(
            f"unknown MovieLens format {format!r}; use 'auto', one of "
            f"{sorted(MOVIELENS_FORMATS)} or a release name such as 'ml-1m'"
        )
    base = os.path.basename(str(path).rstrip("/")).lower()
    by_suffix = {".data": "tab", ".dat": "dat", ".csv": "csv"}
    for suffix, detected in by_suffix.items():
        if base.endswith(suffix):
            return detected
    line = _first_line(spark, path)
    for detected in ("dat", "tab", "csv"):
        if MOVIELENS_FORMATS[detected][0] in line:
            return detected
    raise ValueError(
        f"cannot tell the MovieLens format of {path}: its first line {line[:80]!r} has no '::', "
        "tab or comma separator; pass format='tab', 'dat' or 'csv'"
    )


def _first_line(spark: SparkSession, path: str) -> str:
    if os.path.isfile(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    return line.rstrip("\r\n")
        raise ValueError(f"{path} is empty")
    if os.path.isdir(path) or "://" in str(path):
        rows = spark.read.text(path).where("trim(value) != ''").limit(1).collect()
        if not rows:
            raise ValueError(f"{path} is empty")
        return rows[0][0]
    raise FileNotFoundError(f"no such file or directory: {path}")


def _check_first_line(line: str, format: str, path: str) -> None:
    separator, header = MOVIELENS_FORMATS[format]
    fields = line.split(separator)
    expected = (
        "userId,movieId,rating,timestamp"
        if header
        else separator.join(["user", "item", "rating", "timestamp"])
    )
    looks_right = len(fields) == 4
    if looks_right and header:
        looks_right = not _is_number(fields[0])
    elif looks_right:
        looks_right = all(_is_number(field) for field in fields)
    if not looks_right:
        raise ValueError(
            f"{path} does not look like a MovieLens ratings file in the {format!r} format "
            f"({expected!r} lines{' after a header' if header else ''}); its first line is "
            f"{line[:80]!r}"
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
