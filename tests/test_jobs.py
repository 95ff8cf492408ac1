"""The jobs' building blocks, in process: progress, errors, inputs, params, metrics, plots.

The end-to-end runs through spark-submit are in test_cli.py; here the same code runs against
the session fixture, so that each case costs a Spark job, not a JVM.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import json
import logging
import math
import os

import numpy as np
import pytest

import spark_gpu_mf
from spark_gpu_mf import datasets
from spark_gpu_mf.jobs import checks, common, estimators, evaluate, inputs, metrics, plots, train
from spark_gpu_mf.jobs.common import JobError, describe_exception
from spark_gpu_mf.jobs.progress import (
    ConsoleHandler,
    Progress,
    format_bar,
    job_logging,
    progress_of,
)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _record(message: str, created: float, **extra) -> logging.LogRecord:
    record = logging.LogRecord("spark_gpu_mf", logging.INFO, __file__, 1, message, None, None)
    record.created = created
    record.__dict__.update(extra)
    return record


def _job(module, argv, monkeypatch, capsys):
    """Run a job in process as the CLI would name it; returns (exit status, stdout, stderr)."""
    monkeypatch.setenv(common.PROG_ENV, f"spark-gpu-mf {module.JOB}")
    status = common.run_job(module.build_parser(), module.run, [str(a) for a in argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _last_line(text: str) -> str:
    return [line for line in text.splitlines() if line.strip()][-1]


def _assert_one_line_error(status, err, *fragments):
    assert status == 1, err
    line = _last_line(err)
    assert line.startswith("spark-gpu-mf "), err
    assert ": error: " in line
    for fragment in fragments:
        assert fragment in line, line
    assert "\tat " not in err and "Traceback" not in err, err


# --------------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------------


def test_progress_is_read_from_the_estimators_log_lines():
    assert progress_of(_record("ALS iteration 3/10: 0.812s", 0)) == Progress("ALS", 3, 10)
    assert progress_of(_record("MascotMF epoch 2/20: rmse 0.9", 0)) == Progress(
        "MascotMF", 2, 20, "epoch"
    )
    assert progress_of(_record("ALS: 708 users, 566 items; setup 2.1s", 0)) is None
    explicit = _record("step done", 0, progress=(4, 5), progress_label="PrunedMF")
    assert progress_of(explicit) == Progress("PrunedMF", 4, 5)


def test_bar_shows_steps_speed_and_time_left_within_the_width():
    bar = format_bar(Progress("ALS", 4, 10), 0.5, columns=100)
    assert bar.startswith("ALS [")
    assert "4/10 iterations" in bar and "0.50 s/iteration" in bar and "about 3 s left" in bar
    inside = bar[bar.index("[") + 1 : bar.index("]")]
    assert inside.count("#") * 10 == len(inside) * 4 and set(inside) == {"#", "."}
    assert len(format_bar(Progress("ALS", 4, 10), 0.5, columns=40)) < 40
    assert "left" not in format_bar(Progress("ALS", 10, 10), 0.5)


def test_terminal_output_keeps_log_lines_and_a_bar_that_ends_with_the_loop():
    stream = _Terminal()
    handler = ConsoleHandler(stream, show_bar=True)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.handle(_record("ALS: setup done", 100.0))
    for i in (1, 2, 3):
        handler.handle(_record(f"ALS iteration {i}/3: 1.000s", 100.0 + 2 * i))
    handler.handle(_record("saved", 110.0))
    text = stream.getvalue()
    for i in (1, 2, 3):
        assert f"ALS iteration {i}/3" in text
    assert "\rALS [" in text and "3/3 iterations, 2.00 s/iteration" in text
    # The finished bar stays on its own line; the next log line does not overwrite it.
    assert text.endswith("3/3 iterations, 2.00 s/iteration\nsaved\n")


def test_plain_output_has_log_lines_only():
    stream = io.StringIO()
    handler = ConsoleHandler(stream, show_bar=False)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.handle(_record("ALS iteration 1/2: 1.0s", 1.0))
    assert stream.getvalue() == "ALS iteration 1/2: 1.0s\n"


def test_job_logging_shows_package_records_and_restores_the_logger():
    package_logger = logging.getLogger("spark_gpu_mf")
    before = (package_logger.level, package_logger.propagate, list(package_logger.handlers))
    stream = io.StringIO()
    with job_logging(stream=stream):
        logging.getLogger("spark_gpu_mf.spark.als_train").info("ALS iteration 1/1: 0.1s")
        logging.getLogger("py4j").info("not shown")
    assert "INFO ALS iteration 1/1" in stream.getvalue()
    assert "not shown" not in stream.getvalue()
    after = (package_logger.level, package_logger.propagate, list(package_logger.handlers))
    assert after == before


# --------------------------------------------------------------------------------------------
# One-line errors
# --------------------------------------------------------------------------------------------


def test_errors_are_reduced_to_their_meaningful_line():
    worker = RuntimeError(
        "An exception was thrown from the Python worker.\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nValueError: bad block\n'
    )
    assert describe_exception(worker) == "ValueError: bad block"
    task = RuntimeError(
        "Job aborted due to stage failure: Task 0 in stage 3.0 failed 1 times, most recent "
        "failure: Lost task 0.0 in stage 3.0 (TID 7) (127.0.0.1 executor driver): "
        "org.apache.spark.SparkRuntimeException: [USER_RAISED_EXCEPTION] user Ids MUST NOT be "
        "Null SQLSTATE: P0001\n\tat org.apache.spark.Foo(Foo.scala:1)"
    )
    assert (
        describe_exception(task)
        == "[USER_RAISED_EXCEPTION] user Ids MUST NOT be Null SQLSTATE: P0001"
    )
    assert describe_exception(JobError("input not found: x")) == "input not found: x"
    assert describe_exception(KeyError("no such id")) == "no such id"
    assert describe_exception(OSError("disk full")) == "OSError: disk full"


def test_spark_exceptions_become_one_line(spark):
    from pyspark.sql import functions as F

    def fail(batches):
        for batch in batches:
            raise ValueError("boom from a worker")
            yield batch

    cases = [
        (lambda: spark.read.parquet("/nonexistent/ratings"), "[PATH_NOT_FOUND]"),
        (lambda: spark.range(2).mapInPandas(fail, "id long").collect(), "ValueError: boom"),
        (lambda: spark.range(2).select(F.raise_error(F.lit("stop"))).collect(), "stop"),
        (
            lambda: spark._jvm.java.io.FileInputStream("/nonexistent/file"),
            "FileNotFoundException: /nonexistent/file",
        ),
    ]
    for action, expected in cases:
        with pytest.raises(Exception) as caught:
            action()
        line = describe_exception(caught.value)
        assert expected in line and "\n" not in line, line


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def _input_args(*argv, job="train"):
    parser = common.new_parser(job, "test")
    inputs.add_input_arguments(parser, job=job, default_test_fraction=0.0)
    return parser.parse_args(list(argv))


def test_columns_resolve_by_option_default_alias_or_position():
    resolve = inputs.resolve_columns
    assert resolve(["user", "item", "rating"], _input_args()) == {
        "user": "user",
        "item": "item",
        "rating": "rating",
    }
    movielens = ["userId", "movieId", "rating", "timestamp"]
    assert resolve(movielens, _input_args())["item"] == "movieId"
    named = _input_args("--user-col", "u", "--item-col", "i", "--rating-col", "r")
    assert resolve(["r", "i", "u"], named) == {"user": "u", "item": "i", "rating": "r"}
    by_model = resolve(["uid", "iid", "rating"], _input_args(), {"user": "uid", "item": "iid"})
    assert by_model == {"user": "uid", "item": "iid", "rating": "rating"}
    headerless = ["_c0", "_c1", "_c2", "_c3"]
    assert resolve(headerless, _input_args("--no-header"), positional=True)["rating"] == "_c2"
    swapped = _input_args("--no-header", "--rating-col", "3")
    assert resolve(headerless, swapped, positional=True)["rating"] == "_c3"


@pytest.mark.parametrize(
    ("available", "argv", "fragments"),
    [
        (["u", "i", "r"], ["--user-col", "nope"], ["no user column 'nope'", "u, i, r"]),
        (["u;i;r"], [], ["single column", "--delimiter"]),
        (["1", "2", "3.5"], [], ["--no-header"]),
    ],
)
def test_unknown_columns_are_explained_in_one_line(available, argv, fragments):
    with pytest.raises(JobError) as caught:
        inputs.resolve_columns(available, _input_args(*argv))
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_format_is_detected_from_name_content_or_directory(tmp_path):
    dat = tmp_path / "ratings.txt"
    dat.write_text("1::2::3.0::4\n")
    csv = tmp_path / "ratings.csv"
    csv.write_text("user,item,rating\n1,2,3\n")
    parquet_dir = tmp_path / "parts"
    parquet_dir.mkdir()
    (parquet_dir / "part-0.snappy.parquet").write_bytes(b"PAR1")
    assert inputs.detect_format(str(dat)) == "movielens"
    assert inputs.detect_format(str(csv)) == "csv"
    assert inputs.detect_format(str(parquet_dir)) == "parquet"
    assert inputs.detect_format("s3a://bucket/x.parquet") == "parquet"
    assert inputs.detect_format(datasets.spark_sample_ratings_path()) == "movielens"


def test_csv_options_give_typed_columns(spark, tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("who;what;stars;ts\n1;10;4.5;0\n2;11;3.0;0\n")
    args = _input_args(
        "--input",
        str(path),
        "--delimiter",
        ";",
        "--user-col",
        "who",
        "--item-col",
        "what",
        "--rating-col",
        "stars",
    )
    data = inputs.load_ratings(spark, args)
    assert data.test is None
    assert data.columns == {"user": "who", "item": "what", "rating": "stars"}
    assert [(f.name, f.dataType.simpleString()) for f in data.train.schema.fields] == [
        ("who", "bigint"),
        ("what", "bigint"),
        ("stars", "float"),
    ]
    assert sorted(tuple(r) for r in data.train.collect()) == [(1, 10, 4.5), (2, 11, 3.0)]
    headerless = tmp_path / "h.tsv"
    headerless.write_text("1\t10\t4.5\n")
    args = _input_args("--input", str(headerless), "--delimiter", "tab", "--no-header")
    assert inputs.load_ratings(spark, args).train.columns == ["user", "item", "rating"]


def test_hash_split_is_deterministic_disjoint_and_recomputable(spark):
    from pyspark.sql import functions as F

    data = datasets.generate_ratings(4000, seed=3)
    df = datasets.to_dataframe(spark, data)
    columns = {"user": "user", "item": "item", "rating": "rating"}
    train_part, test_part = inputs._split(df, columns, 0.25, seed=7, keep="both")
    train_rows = {(r.user, r.item) for r in train_part.collect()}
    test_rows = {(r.user, r.item) for r in test_part.collect()}
    assert not train_rows & test_rows
    assert len(train_rows) + len(test_rows) == len(data)
    assert abs(len(test_rows) / len(data) - 0.25) < 0.03
    # Another partitioning and another id type (long, as from CSV) give the same held-out set.
    other = df.repartition(5).withColumn("user", F.col("user").cast("long"))
    _, again = inputs._split(other, columns, 0.25, seed=7, keep="test")
    assert {(r.user, r.item) for r in again.collect()} == test_rows


def test_generated_input_is_split_like_the_dataset_helper(spark):
    args = _input_args("--generate", "3000", "--test-fraction", "0.2", "--data-seed", "5")
    data = inputs.load_ratings(spark, args)
    expected_train, expected_test = datasets.train_test_split(
        datasets.generate_ratings(3000, seed=5), 0.2, seed=5
    )
    assert data.train.count() == len(expected_train)
    assert sorted((r.user, r.item) for r in data.test.collect()) == sorted(
        zip(expected_test.user.tolist(), expected_test.item.tolist())
    )
    only_test = inputs.load_ratings(spark, args, keep="test")
    assert only_test.train is None and only_test.test.count() == len(expected_test)


# --------------------------------------------------------------------------------------------
# Estimators and params
# --------------------------------------------------------------------------------------------


def _train_args(*argv):
    return train.build_parser().parse_args(list(argv))


def test_options_and_generic_params_reach_the_estimator():
    args = _train_args(
        "--rank",
        "6",
        "--max-iter",
        "3",
        "--num-blocks",
        "4",
        "--implicit-prefs",
        "--param",
        "solver=cholesky",
        "--param",
        "cgIterations=4",
        "--param",
        "alpha=2",
        "--param",
        "coldStartStrategy=drop",
    )
    als = estimators.build_estimator(args, {"user": "u", "item": "i", "rating": "r"})
    assert isinstance(als, spark_gpu_mf.ALS)
    assert (als.getRank(), als.getMaxIter(), als.getNumUserBlocks(), als.getNumItemBlocks()) == (
        6,
        3,
        4,
        4,
    )
    assert als.getImplicitPrefs() is True and als.getSolver() == "cholesky"
    assert als.getCgIterations() == 4 and als.getAlpha() == 2.0
    assert als.getColdStartStrategy() == "drop"
    assert (als.getUserCol(), als.getItemCol(), als.getRatingCol()) == ("u", "i", "r")


def test_the_demo_run_compares_with_sparks_als_and_other_runs_when_asked():
    def resolved(*argv):
        args = _train_args(*argv)
        train.check_arguments(args, common.Paths())
        return args.compare_spark

    assert resolved() is True  # `spark-gpu-mf train` with no input: the demo
    assert resolved("--generate", "5000") is False
    assert resolved("--sample", "--compare-spark") is True
    assert resolved("--estimator", "mascot") is False
    with pytest.raises(JobError, match="--compare-spark compares ALS"):
        resolved("--estimator", "mascot", "--compare-spark")


def test_sparks_als_gets_every_param_it_shares_with_ours(spark):
    ours = estimators.build_estimator(
        _train_args("--rank", "6", "--max-iter", "3", "--implicit-prefs", "--param",
                    "solver=cholesky", "--param", "seed=5"),
        {"user": "u", "item": "i", "rating": "r"},
    )  # fmt: skip
    theirs = estimators.spark_als_like(ours)
    assert type(theirs).__module__ == "pyspark.ml.recommendation"
    assert (theirs.getRank(), theirs.getMaxIter(), theirs.getSeed()) == (6, 3, 5)
    assert theirs.getImplicitPrefs() is True and theirs.getUserCol() == "u"
    assert not theirs.hasParam("solver")


def test_train_job_reports_sparks_fit_beside_ours(spark, monkeypatch, capsys, tmp_path):
    argv = ["--generate", "3000", "--max-iter", "2", "--compare-spark",
            "--metrics-out", tmp_path / "m.json"]  # fmt: skip
    status, out, err = _job(train, argv, monkeypatch, capsys)
    assert status == 0, err
    document = json.loads((tmp_path / "m.json").read_text())
    theirs = document["sparkAls"]
    assert theirs["fitSeconds"] > 0
    # Same params and data: Spark's held-out RMSE is close to ours (default CG vs exact).
    assert theirs["heldOut"]["rmse"] == pytest.approx(document["heldOut"]["rmse"], rel=0.05)
    assert "Spark ALS fit time" in out and "same params and data, same session, after ours" in out
    assert "Spark ALS held-out RMSE" in out
    assert out.index("  fit time") < out.index("Spark ALS fit time")


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--param", "rnk=3"], "ALS has no param 'rnk'; its params are: alpha"),
        (["--param", "rank=three"], "invalid value 'three' for param rank"),
        (["--param", "implicitPrefs=1"], "invalid value '1' for param implicitPrefs"),
        (["--param", "rank"], "expected NAME=VALUE"),
    ],
)
def test_bad_params_are_one_line_errors_before_any_data_is_read(argv, fragment):
    with pytest.raises(JobError) as caught:
        estimators.build_estimator(_train_args(*argv))
    assert fragment in str(caught.value)


def test_an_estimator_missing_from_the_installation_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(estimators.ESTIMATORS, "mascot", ("NoSuchMF", ("spark_gpu_mf",)))
    with pytest.raises(JobError, match="spark_gpu_mf.NoSuchMF is not available"):
        estimators.build_estimator(_train_args("--estimator", "mascot"))


SGD_ESTIMATORS = [("mascot", "MascotMF"), ("pruned", "PrunedMF")]


def _published(choice: str, class_name: str):
    """The SGD class where its authors put it (spark_gpu_mf or spark_gpu_mf.<choice>), if there."""
    found = getattr(spark_gpu_mf, class_name, None)
    if found is None and importlib.util.find_spec(f"spark_gpu_mf.{choice}") is not None:
        found = getattr(importlib.import_module(f"spark_gpu_mf.{choice}"), class_name, None)
    return found


@pytest.mark.parametrize(("choice", "class_name"), SGD_ESTIMATORS)
def test_sgd_estimators_are_wired_when_the_package_has_them(choice, class_name):
    # MascotMF and PrunedMF are being built; until the package has them, --estimator
    # mascot/pruned must fail with one line. Once they exist, the job must build them.
    published = _published(choice, class_name)
    if published is None:
        with pytest.raises(JobError, match=f"spark_gpu_mf.{class_name} is not available"):
            estimators.build_estimator(_train_args("--estimator", choice))
    else:
        estimator = estimators.build_estimator(_train_args("--estimator", choice))
        assert isinstance(estimator, published)


def _sgd_class_or_skip(choice, class_name):
    published = _published(choice, class_name)
    if published is None:
        pytest.skip(f"spark_gpu_mf has no {class_name} yet")
    return published


def test_first_class_options_map_to_the_sgd_estimators_params():
    _sgd_class_or_skip("pruned", "PrunedMF")
    pruned = estimators.build_estimator(
        _train_args("--estimator", "pruned", "--num-blocks", "3", "--rank", "4")
    )
    assert pruned.getOrDefault("numBlocks") == 3 and pruned.getOrDefault("rank") == 4
    with pytest.raises(JobError, match="--implicit-prefs does not apply to --estimator pruned"):
        estimators.build_estimator(_train_args("--estimator", "pruned", "--implicit-prefs"))


@pytest.mark.parametrize(("choice", "class_name"), SGD_ESTIMATORS)
def test_train_job_fits_the_sgd_estimators(
    choice, class_name, spark, monkeypatch, capsys, tmp_path
):
    _sgd_class_or_skip(choice, class_name)
    metrics_path = tmp_path / "m.json"
    argv = ["--sample", "--estimator", choice, "--max-iter", "2", "--num-blocks", "2",
            "--metrics-out", metrics_path, "--plot-out", tmp_path / "p.png"]  # fmt: skip
    status, out, err = _job(train, argv, monkeypatch, capsys)
    assert status == 0, err
    assert f"{class_name} epoch 2/2" in err and "2 epochs" in out
    document = json.loads(metrics_path.read_text())
    assert document["estimator"] == choice and document["heldOut"]["rmse"] > 0
    assert len(document["trainingSummary"]["iterations"]) == 2


def test_list_params_needs_no_spark(monkeypatch, capsys):
    status, out, _ = _job(train, ["--list-params"], monkeypatch, capsys)
    assert status == 0
    assert out.startswith("ALS params:") and "cgIterations:" in out and "rank:" in out
    assert not train.needs_spark(_train_args("--list-params"))


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample_model(spark):
    ratings = datasets.read_spark_sample(spark)
    model = spark_gpu_mf.ALS(rank=5, maxIter=5, seed=0, regParam=0.1).fit(ratings)
    return model, ratings


def test_rating_metrics_equal_regression_evaluator_and_count_cold_start(spark, sample_model):
    from pyspark.ml.evaluation import RegressionEvaluator

    model, ratings = sample_model
    unknown = spark.createDataFrame([(12345, 1, 3.0)], ratings.schema)
    test = ratings.limit(200).union(unknown).cache()
    result = metrics.rating_metrics(model, test, "rating", baseline=2.0)
    scored = model.copy({model.coldStartStrategy: "drop"}).transform(test)
    for name in ("rmse", "mae"):
        expected = RegressionEvaluator(metricName=name, labelCol="rating").evaluate(scored)
        assert result[name] == pytest.approx(expected, rel=1e-9)
    assert (result["ratings"], result["scored"]) == (201, 200)
    labels = np.array([r.rating for r in test.where("user != 12345").collect()])
    assert result["baselineRmse"] == pytest.approx(math.sqrt(np.mean((labels - 2.0) ** 2)))


def test_ranking_metrics_match_a_direct_count(spark, sample_model):
    model, ratings = sample_model
    test = ratings.where("user < 10")
    result = metrics.ranking_metrics(
        model, test, {"user": "user", "item": "item", "rating": "rating"}, k=5, threshold=3.0
    )
    relevant = {}
    for row in test.where("rating >= 3").collect():
        relevant.setdefault(row.user, set()).add(row.item)
    top = {
        row.user: [r.item for r in row.recommendations]
        for row in model.recommendForAllUsers(5).collect()
    }
    precision = np.mean([len(set(top[u]) & items) / 5 for u, items in relevant.items()])
    assert result["users"] == len(relevant)
    assert result["precisionAtK"] == pytest.approx(precision)
    for name in ("precisionAtK", "recallAtK", "ndcgAtK", "map", "mapAtK"):
        assert 0.0 <= result[name] <= 1.0


# --------------------------------------------------------------------------------------------
# Plots and JSON
# --------------------------------------------------------------------------------------------


def test_training_plot_is_a_png_with_the_metrics_found(tmp_path):
    summary = {
        "algorithm": "als",
        "iterations": [
            {"iteration": 1, "seconds": 0.5, "trainRmse": 1.2},
            {"iteration": 2, "seconds": 0.4, "trainRmse": 0.9},
        ],
        "setup_seconds": 1.0,
    }
    assert plots.metric_names(summary) == ["trainRmse"]
    sgd = {
        "algorithm": "pruned",
        "iterations": [
            {"iteration": 1, "seconds": 0.5, "trainRmse": 1.2, "macFraction": 1.0,
             "pruned": False, "computeSeconds": 0.1},
        ],
    }  # fmt: skip
    assert plots.metric_names(sgd) == ["trainRmse", "macFraction"]
    assert plots.step_unit(sgd) == "epoch" and plots.step_unit(summary) == "iteration"
    plots.plot_training_summary(sgd, str(tmp_path / "sgd.png"), "PrunedMF")
    mascot = {
        "algorithm": "mascot",
        "iterations": [
            {"iteration": e, "seconds": 0.1, "trainRmse": 1.0 / e, "learningRate": 0.01,
             "fp32UserShare": 0.0 if e < 3 else 0.4, "fp32ItemShare": 0.1 * e}
            for e in range(1, 5)
        ],
    }  # fmt: skip
    names = plots.metric_names(mascot)
    # the FP32 shares get a panel of their own: one quantity per axis
    assert [n for n in names if plots.is_share_metric(n)] == ["fp32UserShare", "fp32ItemShare"]
    assert not any(plots.is_error_metric(n) for n in names if plots.is_share_metric(n))
    plots.plot_training_summary(mascot, str(tmp_path / "mascot.png"), "MascotMF")
    path = tmp_path / "curve.png"
    plots.plot_training_summary(summary, str(path), "ALS")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(JobError, match="no iterations"):
        plots.plot_training_summary({"iterations": []}, str(path), "x")


def test_training_plot_puts_one_quantity_on_each_axis(tmp_path, monkeypatch):
    """MascotMF's learning rate (~0.01) and FP32 group counts (up to 100) get axes of their own;
    the user and item group counts share one; errors share one."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    mascot = {
        "algorithm": "mascot",
        "iterations": [
            {"iteration": e, "seconds": 0.1, "trainRmse": 1.0 / e, "validationRmse": 1.1 / e,
             "learningRate": 0.01 / e, "fp32UserGroups": 3 * e, "fp32ItemGroups": e}
            for e in (1, 2, 3)
        ],
    }  # fmt: skip
    plots.plot_training_summary(mascot, str(tmp_path / "mascot.png"), "MascotMF")
    axes = [a for a in figures[0].axes if a.get_visible()]
    labels = [sorted(line.get_label() for line in a.get_lines()) for a in axes]
    assert labels[:3] == [
        ["trainRmse", "validationRmse"],
        ["learningRate"],
        ["fp32ItemGroups", "fp32UserGroups"],
    ]
    assert len(axes) == 4 and axes[-1].get_ylabel() == "seconds"


def test_json_outputs_are_written_whole(tmp_path):
    path = tmp_path / "m.json"
    common.write_json(str(path), {"rmse": np.float32(0.5), "n": np.int64(3)})
    assert json.loads(path.read_text()) == {"rmse": 0.5, "n": 3}
    assert os.listdir(tmp_path) == ["m.json"]


# --------------------------------------------------------------------------------------------
# Bad arguments through the jobs (in process): one line, non-zero status
# --------------------------------------------------------------------------------------------


def test_paths_are_checked_where_spark_will_look(spark, tmp_path):
    existing, missing = str(tmp_path), str(tmp_path / "missing")
    assert common.Paths().exists(existing) is True and common.Paths().exists(missing) is False
    # Before spark-submit, for a cluster master, a scheme-less path may be on HDFS: unknown.
    cluster = common.Paths(scheme_less_is_local=False)
    assert cluster.exists(missing) is None and cluster.exists(f"file://{missing}") is False
    assert common.Paths().exists("hdfs://namenode/ratings") is None
    # With a session, through Hadoop's FileSystem (the default file system here is local).
    with_spark = common.Paths(spark)
    assert with_spark.exists(existing) is True and with_spark.exists(missing) is False
    with pytest.raises(JobError, match="model not found"):
        with_spark.require_existing(missing, "model")
    with pytest.raises(JobError, match="already exists; pass --overwrite"):
        with_spark.require_new(existing, "output", overwrite=False)
    with_spark.require_new(existing, "output", overwrite=True)


def test_missing_input_fails_before_spark_work(spark, monkeypatch, capsys, tmp_path):
    status, _, err = _job(train, ["--input", tmp_path / "nope.csv"], monkeypatch, capsys)
    _assert_one_line_error(status, err, "input not found", "nope.csv")


def test_unknown_column_and_wrong_format_are_one_line_errors(spark, monkeypatch, capsys, tmp_path):
    path = tmp_path / "r.csv"
    path.write_text("u,i,r\n1,2,3.0\n2,3,4.0\n")
    status, _, err = _job(train, ["--input", path, "--user-col", "nope"], monkeypatch, capsys)
    _assert_one_line_error(status, err, "no user column 'nope'", "u, i, r")
    status, _, err = _job(train, ["--input", path, "--format", "parquet"], monkeypatch, capsys)
    _assert_one_line_error(status, err, "cannot read", "as parquet")


def _train_on(spark, monkeypatch, capsys, path, *argv):
    """Run the train job on ``path``; returns (status, stderr, whether a Spark job failed).

    A data error must stop the job before any Spark task fails: a failed task is what makes
    Spark log its WARN/ERROR lines before the job's own one."""
    tracker = spark.sparkContext.statusTracker()
    before = set(tracker.getJobIdsForGroup())
    status, _, err = _job(
        train, ["--input", path, "--test-fraction", "0", "--max-iter", "1", *argv],
        monkeypatch, capsys,
    )  # fmt: skip
    jobs = [tracker.getJobInfo(j) for j in set(tracker.getJobIdsForGroup()) - before]
    return status, err, any(job is not None and job.status == "FAILED" for job in jobs)


def test_string_ids_fail_in_one_line_with_the_column_its_type_and_a_hint(
    spark, monkeypatch, capsys, tmp_path
):
    path = tmp_path / "r.csv"
    path.write_text("userId,movieId,rating\n196,242,3\nu196,242,3\n186,302,3\n")
    status, err, failed = _train_on(spark, monkeypatch, capsys, path)
    _assert_one_line_error(
        status, err,
        "column 'userId' (string): 1 of 3 values are not integers, e.g. the row userId=u196, "
        "movieId=242, rating=3; " + checks.ID_HINT,
    )  # fmt: skip
    assert "StringIndexer" in checks.ID_HINT
    assert not failed


def test_headerless_ids_outside_the_int_range_name_the_position(
    spark, monkeypatch, capsys, tmp_path
):
    path = tmp_path / "r.tsv"
    path.write_text("1\t2\t3.0\n1\t3000000000\t4.0\n")
    status, err, failed = _train_on(
        spark, monkeypatch, capsys, path, "--no-header", "--delimiter", "tab"
    )
    _assert_one_line_error(
        status, err, "column #1 (string): 1 of 2 values are outside the int range",
        "#1=3000000000",
    )  # fmt: skip
    assert not failed


def test_missing_ratings_fail_in_one_line_with_their_count_and_a_row(
    spark, monkeypatch, capsys, tmp_path
):
    path = tmp_path / "r.csv"
    path.write_text("user,item,rating\n1,2,3.0\n2,3,\n3,4,4.0\n4,5,NaN\n")
    status, err, failed = _train_on(spark, monkeypatch, capsys, path)
    _assert_one_line_error(
        status, err, "column 'rating' (string): 2 of 4 values are null or NaN, e.g. the row user="
    )
    line = _last_line(err)
    assert "user=2, item=3, rating=null" in line or "user=4, item=5, rating=NaN" in line, line
    assert not failed
    path.write_text("user,item,rating\n1,2,3.0\n2,3,three\n")
    status, err, failed = _train_on(spark, monkeypatch, capsys, path)
    _assert_one_line_error(
        status, err, "column 'rating' (string): 1 of 2 values are not numbers, e.g. the row "
        "user=2, item=3, rating=three",
    )  # fmt: skip
    assert not failed


def test_ratings_beyond_float32_fail_in_one_line(spark, monkeypatch, capsys, tmp_path):
    """The documented deviation from Spark (which trains on +Inf) in the jobs' one line, from a
    CSV's text and from a Parquet double."""
    path = tmp_path / "r.csv"
    path.write_text("user,item,rating\n1,2,3.0\n2,3,1e39\n")
    status, err, failed = _train_on(spark, monkeypatch, capsys, path)
    _assert_one_line_error(
        status, err, "column 'rating' (string): 1 of 2 values are infinite or beyond float32's "
        "range", "user=2, item=3, rating=1e39",
    )  # fmt: skip
    assert not failed
    parquet = tmp_path / "r.parquet"
    spark.createDataFrame([(1, 2, 3.0), (2, 3, 1e39)], "user int, item int, rating double") \
        .write.parquet(str(parquet))  # fmt: skip
    status, err, failed = _train_on(spark, monkeypatch, capsys, parquet)
    _assert_one_line_error(
        status, err, "column 'rating' (double): 1 of 2 values are infinite or beyond float32's",
        "rating=1.0E39",
    )  # fmt: skip
    assert not failed


def test_parquet_ids_of_other_types_fail_in_one_line(spark, monkeypatch, capsys, tmp_path):
    strings = tmp_path / "s.parquet"
    spark.createDataFrame([("7", 2, 3.0), ("u1", 2, 3.0)], "user string, item int, rating double") \
        .write.parquet(str(strings))  # fmt: skip
    status, err, failed = _train_on(spark, monkeypatch, capsys, strings)
    _assert_one_line_error(
        status, err, "column 'user' (string): 1 of 2 values are not integers, e.g. the row "
        "user=u1, item=2, rating=3.0; " + checks.ID_HINT,
    )  # fmt: skip
    assert not failed
    dates = tmp_path / "d.parquet"
    spark.createDataFrame([(1, 2, 3.0)], "user int, item int, rating double").selectExpr(
        "user", "date'2024-01-01' as item", "rating"
    ).write.parquet(str(dates))
    status, err, failed = _train_on(spark, monkeypatch, capsys, dates)
    _assert_one_line_error(status, err, "column 'item' (date) holds no item ids; " + checks.ID_HINT)
    assert not failed


def test_invalid_param_values_fail_with_sparks_message(spark, monkeypatch, capsys):
    argv = ["--sample", "--param", "rank=-1"]
    status, _, err = _job(train, argv, monkeypatch, capsys)
    _assert_one_line_error(status, err, "parameter rank given invalid value -1")


def test_evaluate_checks_its_arguments_before_spark_work(spark, monkeypatch, capsys, tmp_path):
    status, _, err = _job(
        evaluate,
        ["--model", tmp_path, "--sample", "--plot-out", tmp_path / "p.png"],
        monkeypatch,
        capsys,
    )
    _assert_one_line_error(status, err, "--training-metrics")
    status, _, err = _job(evaluate, ["--model", tmp_path / "none"], monkeypatch, capsys)
    _assert_one_line_error(status, err, "no held-out ratings")
