"""Tests of the synthetic generator, the deterministic split and the rating-file readers."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest

from spark_gpu_mf import datasets
from spark_gpu_mf.datasets import (
    Ratings,
    default_sizes,
    generate_dataframe,
    generate_interactions,
    generate_ratings,
    read_movielens,
    read_spark_sample,
    spark_sample_ratings_path,
    to_dataframe,
    train_test_split,
)


def pair_keys(data: Ratings) -> np.ndarray:
    return (data.user.astype(np.int64) << 32) | (data.item.astype(np.int64) & 0xFFFFFFFF)


def digest(data: Ratings) -> str:
    return hashlib.sha256(
        data.user.tobytes() + data.item.tobytes() + data.rating.tobytes()
    ).hexdigest()


def degrees(ids: np.ndarray) -> np.ndarray:
    """Ratings per distinct id, heaviest first."""
    return np.sort(np.unique(ids, return_counts=True)[1])[::-1]


def loglog_slope(counts: np.ndarray) -> float:
    """Slope of log(count) against log(popularity rank) between the top 1% and the median."""
    ranks = np.arange(1, len(counts) + 1)
    middle = (ranks >= len(counts) / 100) & (ranks <= len(counts) / 2)
    return float(np.polyfit(np.log(ranks[middle]), np.log(counts[middle]), 1)[0])


def dense_als(train: Ratings, num_users: int, num_items: int, rank: int, reg: float, iters: int):
    """Float64 ALS-WR on a dense masked matrix: the reference fit for small generated sets."""
    ratings = np.zeros((num_users, num_items))
    observed = np.zeros((num_users, num_items))
    ratings[train.user, train.item] = train.rating
    observed[train.user, train.item] = 1.0
    rng = np.random.default_rng(0)
    users = rng.normal(0.0, 0.1, (num_users, rank))
    items = rng.normal(0.0, 0.1, (num_items, rank))

    def solve(mask, values, fixed):
        outer = (fixed[:, :, None] * fixed[:, None, :]).reshape(len(fixed), -1)
        gram = (mask @ outer).reshape(-1, rank, rank)
        gram += reg * np.maximum(mask.sum(1), 1.0)[:, None, None] * np.eye(rank)
        return np.linalg.solve(gram, ((mask * values) @ fixed)[..., None])[..., 0]

    for _ in range(iters):
        items = solve(observed.T, ratings.T, users)
        users = solve(observed, ratings, items)
    return users, items


def rmse(prediction: np.ndarray, truth: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(prediction, np.float64) - truth) ** 2)))


# ---------------------------------------------------------------------------------------------
# Generator: counts, uniqueness, coverage, determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("generate", [generate_ratings, generate_interactions])
@pytest.mark.parametrize(
    ("num_ratings", "num_users", "num_items"),
    [
        (20_000, None, None),  # default MovieLens-like sizes, sparse sampling
        (1_500, 30, 100),  # the shape of Spark's sample file: half the matrix, dense sampling
        (600, 20, 30),  # every pair of the matrix
        (250, 200, 50),  # nearly all ratings are needed to cover users and items
    ],
)
def test_exact_number_of_distinct_pairs_covering_every_user_and_item(
    generate, num_ratings, num_users, num_items
):
    data = generate(num_ratings, num_users=num_users, num_items=num_items, seed=7)
    expected_users, expected_items = (
        default_sizes(num_ratings) if num_users is None else (num_users, num_items)
    )

    assert len(data) == num_ratings
    assert (data.user.dtype, data.item.dtype, data.rating.dtype) == (
        np.int32,
        np.int32,
        np.float32,
    )
    assert len(np.unique(pair_keys(data))) == num_ratings
    np.testing.assert_array_equal(np.unique(data.user), np.arange(expected_users))
    np.testing.assert_array_equal(np.unique(data.item), np.arange(expected_items))
    assert np.isfinite(data.rating).all()


def test_explicit_ratings_are_on_the_one_to_five_scale():
    data = generate_ratings(20_000, seed=1)
    assert data.rating.min() >= 1.0 and data.rating.max() <= 5.0
    assert not data.implicit
    assert 3.2 < data.rating.mean() < 3.8


def test_rows_come_in_random_order_not_grouped_by_user():
    data = generate_ratings(20_000, seed=1)
    assert np.mean(np.diff(data.user) == 0) < 0.05


@pytest.mark.parametrize("generate", [generate_ratings, generate_interactions])
def test_same_seed_gives_identical_arrays_and_another_seed_does_not(generate):
    first = generate(30_000, seed=11)
    again = generate(30_000, seed=11)
    other = generate(30_000, seed=12)

    for a, b in zip(first.as_tuple(), again.as_tuple()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(first.planted.user_factors, again.planted.user_factors)
    assert digest(first) != digest(other)


def test_arrays_are_bit_identical_in_another_process():
    code = (
        "import hashlib; from spark_gpu_mf.datasets import generate_ratings as g; "
        "d = g(30_000, seed=5, ids='sparse'); "
        "print(hashlib.sha256(d.user.tobytes() + d.item.tobytes() + d.rating.tobytes())"
        ".hexdigest())"
    )
    other_process = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert other_process.stdout.strip() == digest(generate_ratings(30_000, seed=5, ids="sparse"))


def test_noise_and_rounding_do_not_change_the_pairs():
    clean = generate_ratings(10_000, noise=0.0, seed=3)
    noisy = generate_ratings(10_000, noise=0.5, seed=3)
    stars = generate_ratings(10_000, noise=0.5, round_to=0.5, seed=3)

    np.testing.assert_array_equal(clean.user, noisy.user)
    np.testing.assert_array_equal(clean.item, stars.item)
    # Without noise the rating is the clipped planted score.
    np.testing.assert_allclose(
        clean.rating, np.clip(clean.planted.scores(clean.user, clean.item), 1, 5), atol=1e-6
    )
    np.testing.assert_array_equal(np.unique(stars.rating), np.arange(1.0, 5.01, 0.5))
    np.testing.assert_allclose(stars.rating, np.clip(np.round(noisy.rating * 2) / 2, 1, 5))


def test_sparse_ids_are_distinct_random_int32_with_negatives():
    data = generate_ratings(20_000, ids="sparse", seed=2)
    num_users, num_items = default_sizes(20_000)

    assert len(np.unique(data.user)) == num_users
    assert len(np.unique(data.item)) == num_items
    assert data.user.min() < 0 < data.user.max()
    assert data.item.min() < 0 < data.item.max()
    assert data.user.dtype == np.int32
    # The same pairs and values as with dense ids, only renamed.
    dense = generate_ratings(20_000, seed=2)
    np.testing.assert_array_equal(data.rating, dense.rating)
    np.testing.assert_array_equal(data.planted.user_ids[dense.user], data.user)
    with pytest.raises(KeyError, match="user ids"):
        data.planted.scores(np.array([12345], np.int32), data.item[:1])


def test_default_sizes_follow_movielens_ratios():
    assert default_sizes(1_000_000) == (7_143, 4_000)
    assert default_sizes(10_000_000) == (71_429, 12_650)
    for num_ratings in (100, 10_000, 100_000, 1_000_000, 50_000_000):
        num_users, num_items = default_sizes(num_ratings)
        assert num_ratings / num_users <= 140.01
        assert num_ratings / (num_users * num_items) <= 0.05 + 1e-9
        assert num_users + num_items <= num_ratings
    with pytest.raises(ValueError, match="num_users and num_items"):
        default_sizes(99)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"num_ratings": 100, "num_users": 90, "num_items": 20}, ValueError, "cannot give"),
        ({"num_ratings": 101, "num_users": 10, "num_items": 10}, ValueError, "do not fit"),
        ({"num_ratings": 1000, "rank": 0}, ValueError, "rank"),
        ({"num_ratings": 1000, "ids": "hashed"}, ValueError, "ids"),
        ({"num_ratings": 1000, "noise": -1.0}, ValueError, "noise"),
        ({"num_ratings": 1000, "round_to": 0.0}, ValueError, "round_to"),
        ({"num_ratings": 1000, "item_exponent": -1.0}, ValueError, "exponent"),
        ({"num_ratings": 1000.0}, TypeError, "int"),
    ],
)
def test_invalid_generator_arguments_are_refused(kwargs, error, message):
    with pytest.raises(error, match=message):
        generate_ratings(**kwargs)


# ---------------------------------------------------------------------------------------------
# Generator: distribution and planted model
# ---------------------------------------------------------------------------------------------


def test_popularity_is_power_law_on_both_sides():
    data = generate_ratings(300_000, seed=4)
    items, users = degrees(data.item), degrees(data.user)

    top_items = items[: len(items) // 100].sum() / items.sum()
    assert top_items > 0.05, "the top 1% of the items should hold a large share"
    assert np.median(items) < 0.6 * items.mean(), "the median item should have few ratings"
    assert items[0] > 5 * items.mean()
    assert -1.1 < loglog_slope(items) < -0.7
    assert np.median(users) < 0.8 * users.mean()
    assert users[0] > 5 * users.mean()
    assert -0.8 < loglog_slope(users) < -0.4
    # Capped head: no item is expected to be rated by more than half of the users.
    assert items[0] <= 0.6 * len(users)


def test_popularity_is_independent_of_the_id():
    """Heavy users spread over ``id mod blocks`` as in real data, not all in block 0."""
    data = generate_ratings(100_000, seed=4)
    per_block = np.bincount(data.user % 10, minlength=10)
    assert per_block.max() < 1.4 * per_block.min()


def test_planted_model_is_recoverable_by_als_at_the_planted_rank():
    num_users, num_items, noise = 400, 300, 0.5
    data = generate_ratings(40_000, num_users=num_users, num_items=num_items, noise=noise, seed=0)
    train, test = train_test_split(data, 0.2, seed=1)

    def als_test_rmse(rank):
        users, items = dense_als(train, num_users, num_items, rank, reg=0.02, iters=10)
        return rmse(np.einsum("ij,ij->i", users[test.user], items[test.item]), test.rating)

    planted_rank_rmse = als_test_rmse(data.planted.rank)
    mean_rmse = rmse(np.full(len(test), train.rating.mean()), test.rating)
    oracle_rmse = rmse(data.planted.scores(test.user, test.item), test.rating)

    assert data.planted.rank == 8
    assert abs(oracle_rmse - noise) < 0.05 * noise
    assert planted_rank_rmse < 1.15 * noise
    assert planted_rank_rmse < 0.6 * mean_rmse
    assert als_test_rmse(2) > planted_rank_rmse + 0.1, "the interaction needs the planted rank"


def test_implicit_counts_are_positive_whole_numbers_driven_by_affinity():
    data = generate_interactions(50_000, seed=6)
    assert data.implicit
    assert data.rating.dtype == np.float32
    assert data.rating.min() >= 1.0
    np.testing.assert_array_equal(data.rating, np.round(data.rating))
    assert data.rating.max() > 10 * np.median(data.rating), "counts should be heavy-tailed"

    planted = data.planted
    observed = planted.scores(data.user, data.item)
    rng = np.random.default_rng(0)
    random_pairs = planted.scores(
        rng.integers(0, len(planted.user_ids), 50_000),
        rng.integers(0, len(planted.item_ids), 50_000),
    )
    assert observed.mean() > random_pairs.mean() + 0.3, "observed pairs have higher affinity"
    high = observed > np.quantile(observed, 0.9)
    low = observed < np.quantile(observed, 0.1)
    assert data.rating[high].mean() > 3 * data.rating[low].mean()

    popularity_only = generate_interactions(50_000, selectivity=0.0, seed=6)
    chosen = popularity_only.planted.scores(popularity_only.user, popularity_only.item)
    assert abs(chosen.mean() - random_pairs.mean()) < 0.1


# ---------------------------------------------------------------------------------------------
# Split
# ---------------------------------------------------------------------------------------------


def test_split_is_a_deterministic_disjoint_partition():
    data = generate_ratings(20_000, seed=8)
    train, test = train_test_split(data, 0.25, seed=3)
    train_again, test_again = train_test_split(data, 0.25, seed=3)
    _, test_other = train_test_split(data, 0.25, seed=4)

    assert (len(train), len(test)) == (15_000, 5_000)
    train_keys, test_keys = pair_keys(train), pair_keys(test)
    assert len(np.intersect1d(train_keys, test_keys)) == 0
    np.testing.assert_array_equal(
        np.sort(np.concatenate([train_keys, test_keys])), np.sort(pair_keys(data))
    )
    np.testing.assert_array_equal(test.rating, test_again.rating)
    np.testing.assert_array_equal(train.user, train_again.user)
    assert not np.array_equal(test.user, test_other.user)
    assert train.planted is data.planted
    # Rows keep their original relative order.
    position = {key: i for i, key in enumerate(pair_keys(data)[:2000])}
    kept = [position[key] for key in train_keys[:1500] if key in position]
    assert kept == sorted(kept)


def test_split_accepts_plain_arrays_and_checks_its_arguments():
    user, item, rating = np.arange(10), np.arange(10) * 2, np.linspace(1, 5, 10)
    (train_user, train_item, _), (test_user, test_item, _) = train_test_split(
        (user, item, rating), 0.3, seed=0
    )
    assert len(test_user) == 3 and len(train_user) == 7
    np.testing.assert_array_equal(test_item, test_user * 2)
    np.testing.assert_array_equal(train_item, train_user * 2)
    with pytest.raises(ValueError, match="test_fraction"):
        train_test_split((user, item, rating), 1.5)
    with pytest.raises(ValueError, match="same length"):
        train_test_split((user, item[:3], rating))


# ---------------------------------------------------------------------------------------------
# Spark DataFrames
# ---------------------------------------------------------------------------------------------


def sorted_rows(df, columns=("user", "item", "rating")):
    return sorted(tuple(row) for row in df.select(*columns).collect())


def expected_rows(data: Ratings):
    return sorted(zip(data.user.tolist(), data.item.tolist(), data.rating.tolist()))


@pytest.mark.parametrize("via", ["arrow", "parquet"])
def test_to_dataframe_has_the_als_schema_and_the_same_rows(spark, tmp_path, via):
    data = generate_ratings(3_000, ids="sparse", seed=9)
    arrow_keys = [
        "spark.sql.execution.arrow.maxRecordsPerBatch",
        "spark.sql.execution.arrow.localRelationThreshold",
    ]
    arrow_conf = [spark.conf.get(key) for key in arrow_keys]
    df = to_dataframe(spark, data, via=via, tmp_dir=str(tmp_path), num_partitions=3)

    assert df.schema.simpleString() == "struct<user:int,item:int,rating:float>"
    assert df.rdd.getNumPartitions() == 3
    assert sorted_rows(df) == expected_rows(data)
    if via == "parquet":
        assert any(name.endswith(".parquet") for name in os.listdir(tmp_path))
    # The Arrow settings changed for the call must not leak into the session.
    assert [spark.conf.get(key) for key in arrow_keys] == arrow_conf


def test_large_data_goes_through_parquet_in_the_given_directory(spark, tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "ARROW_MAX_ROWS", 100)
    data = generate_ratings(500, num_users=20, num_items=40, seed=2)
    df = to_dataframe(spark, data, tmp_dir=str(tmp_path / "scratch"))
    assert os.listdir(tmp_path / "scratch")
    assert sorted_rows(df) == expected_rows(data)


def test_to_dataframe_accepts_arrays_and_column_names(spark):
    df = to_dataframe(
        spark,
        (np.array([3, -1]), np.array([7, 8]), np.array([4.5, 1.0])),
        user_col="userId",
        item_col="movieId",
        rating_col="score",
    )
    assert df.schema.simpleString() == "struct<userId:int,movieId:int,score:float>"
    assert sorted_rows(df, ("userId", "movieId", "score")) == [(-1, 8, 1.0), (3, 7, 4.5)]
    with pytest.raises(ValueError, match="int32"):
        to_dataframe(spark, (np.array([2**31]), np.array([1]), np.array([1.0])))
    with pytest.raises(ValueError, match="via"):
        to_dataframe(spark, (np.array([1]), np.array([1]), np.array([1.0])), via="csv")


def test_generate_dataframe_passes_generator_options(spark):
    df = generate_dataframe(spark, 2_000, implicit=True, num_users=50, num_items=80, seed=1)
    data = generate_interactions(2_000, num_users=50, num_items=80, seed=1)
    assert sorted_rows(df) == expected_rows(data)


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------


def test_spark_sample_file_is_read_completely_with_the_als_schema(spark):
    path = spark_sample_ratings_path()
    with open(path) as f:
        lines = [line.strip().split("::") for line in f if line.strip()]

    df = read_spark_sample(spark)

    assert df.schema.simpleString() == "struct<user:int,item:int,rating:float>"
    assert df.count() == len(lines) == 1501
    assert sorted_rows(df) == sorted((int(u), int(i), float(r)) for u, i, r, _ in lines)


def test_spark_sample_path_falls_back_to_spark_home_and_explains_a_miss(monkeypatch, tmp_path):
    import pyspark

    monkeypatch.setattr(pyspark, "__file__", str(tmp_path / "nowhere" / "__init__.py"))
    monkeypatch.delenv("SPARK_HOME", raising=False)
    with pytest.raises(FileNotFoundError, match="sample ratings file was not found"):
        spark_sample_ratings_path()

    sample = tmp_path / "spark" / "data" / "mllib" / "als" / "sample_movielens_ratings.txt"
    sample.parent.mkdir(parents=True)
    sample.write_text("0::2::3::1424380312\n")
    monkeypatch.setenv("SPARK_HOME", str(tmp_path / "spark"))
    assert spark_sample_ratings_path() == str(sample)


RATINGS = [(1, 31, 2.5, 1260759144), (1, 1029, 3.0, 1260759179), (7, 31, 4.0, 851866703)]
EXPECTED = sorted((user, item, rating) for user, item, rating, _ in RATINGS)


def write_ratings(path, separator, header=None):
    lines = ([header] if header else []) + [separator.join(map(str, row)) for row in RATINGS]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


@pytest.mark.parametrize(
    ("file_name", "separator", "header", "format"),
    [
        ("u.data", "\t", None, "auto"),
        ("ratings.dat", "::", None, "auto"),
        ("ratings.csv", ",", "userId,movieId,rating,timestamp", "auto"),
        ("ratings", "::", None, "auto"),  # no suffix: detected from the first line
        ("ratings.txt", "\t", None, "auto"),
        ("r.txt", ",", "userId,movieId,rating,timestamp", "auto"),
        ("ratings.txt", "::", None, "ml-10m"),
        ("ratings.txt", "\t", None, "tab"),
    ],
)
def test_movielens_formats_are_read_and_detected(
    spark, tmp_path, file_name, separator, header, format
):
    path = write_ratings(tmp_path / file_name, separator, header)
    df = read_movielens(spark, path, format)
    assert df.schema.simpleString() == "struct<user:int,item:int,rating:float>"
    assert sorted_rows(df) == EXPECTED


def test_movielens_reader_keeps_timestamps_and_reads_directories(spark, tmp_path):
    directory = tmp_path / "ml"
    directory.mkdir()
    write_ratings(directory / "part-0.dat", "::")
    df = read_movielens(spark, str(directory), keep_timestamp=True, user_col="u", item_col="i")
    assert df.schema.simpleString() == "struct<u:int,i:int,rating:float,timestamp:bigint>"
    assert sorted(tuple(row) for row in df.collect()) == sorted(RATINGS)


@pytest.mark.parametrize(
    ("file_name", "content", "format", "message"),
    [
        ("ratings.dat", "1::31::2.5::1260759144\n", "parquet", "unknown MovieLens format"),
        ("ratings", "1;31;2.5;1260759144\n", "auto", "cannot tell the MovieLens format"),
        ("movies.dat", "1::Toy Story (1995)::Animation\n", "auto", "does not look like"),
        ("ratings.csv", "1,31,2.5,1260759144\n", "auto", "after a header"),
        ("u.data", "1::31::2.5::1260759144\n", "auto", "'tab' format"),
        ("ratings.dat", "", "auto", "empty"),
    ],
)
def test_bad_movielens_files_get_a_clear_error(
    spark, tmp_path, file_name, content, format, message
):
    path = tmp_path / file_name
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_movielens(spark, str(path), format)


def test_malformed_lines_fail_the_read_instead_of_becoming_nulls(spark, tmp_path):
    path = tmp_path / "ratings.dat"
    path.write_text("1::31::2.5::1260759144\n1::x::3.0::1260759179\n")
    with pytest.raises(Exception, match="(?i)malformed"):
        read_movielens(spark, str(path)).collect()


def test_missing_file_is_reported(spark, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_movielens(spark, str(tmp_path / "absent.dat"), "dat")


def test_module_never_reaches_the_network():
    with open(datasets.__file__) as f:
        source = f.read()
    for token in ("urllib", "requests", "http://", "https://", "socket"):
        assert token not in source
