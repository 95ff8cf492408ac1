"""``spark-gpu-mf`` and the jobs end to end: each job runs through spark-submit, as users run it.

The first tests check the command the CLI builds without starting Spark. The end-to-end tests
then run the real command line, each in its own spark-submit (a JVM, ~10-20 s), on Spark's
bundled sample data and on generated data, and check the files, schemas and metrics the jobs
write against independent references: pyspark's own ALSModel (the JVM implementation) loads
the saved models and recomputes their recommendations, and the evaluate job must reproduce the
held-out RMSE the train job reported.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from spark_gpu_mf import cli, datasets
from spark_gpu_mf.jobs import JOB_NAMES

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 600


def _cli_command() -> list[str]:
    script = Path(sys.executable).parent / "spark-gpu-mf"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "spark_gpu_mf.cli"]


def run_cli(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    """Run ``spark-gpu-mf <args>`` as a user would; with ``check``, fail with its stderr."""
    env = dict(os.environ)
    env.pop("SPARK_GPU_MF_PROG", None)
    process = subprocess.run(
        [*_cli_command(), *[str(a) for a in args]],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=TIMEOUT,
        check=False,
    )
    if check and process.returncode != 0:
        pytest.fail(f"spark-gpu-mf {' '.join(map(str, args))} failed:\n{_tail(process)}")
    return process


def _tail(process: subprocess.CompletedProcess) -> str:
    return f"stdout:\n{process.stdout[-2000:]}\nstderr:\n{process.stderr[-2000:]}"


def assert_no_stack_traces(process: subprocess.CompletedProcess) -> None:
    output = process.stdout + process.stderr
    assert "\tat " not in output and "Traceback (most recent call last)" not in output, output


# --------------------------------------------------------------------------------------------
# The command the CLI builds (no Spark)
# --------------------------------------------------------------------------------------------


def _build(job="train", *argv):
    options, job_argv = cli.parse_submit_options(job, list(argv))
    return cli.build_command(job, job_argv, options)


def _confs(command):
    return dict(command[i + 1].split("=", 1) for i, part in enumerate(command) if part == "--conf")


def test_the_project_configs_ship_with_the_package():
    names = {p.name for p in cli.conf_dir().iterdir()}
    assert {"spark-defaults.conf", "log4j2.properties", "spark-gpu.conf"} <= names
    for line in (cli.conf_dir() / "spark-defaults.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split(None, 1)
            assert key.startswith("spark.") and value.strip()


def test_local_runs_use_the_local_defaults_this_python_and_quiet_logs():
    command, env = _build("train", "--rank", "5", "--conf", "spark.executor.memory=3g")
    assert Path(command[0]).name == "spark-submit" and Path(command[0]).is_file()
    properties = command[command.index("--properties-file") + 1]
    assert Path(properties) == cli.conf_dir() / "spark-defaults.conf"
    assert "--load-spark-defaults" in command
    confs = _confs(command)
    assert confs["spark.pyspark.python"] == sys.executable
    assert confs["spark.pyspark.driver.python"] == sys.executable
    assert confs["spark.executor.memory"] == "3g"
    job_file = Path(command[-3])
    assert job_file.name == "train.py" and job_file.parent.name == "jobs" and job_file.is_file()
    assert command[-2:] == ["--rank", "5"]
    assert env["PYSPARK_PYTHON"] == sys.executable
    assert env["SPARK_LOCAL_IP"] == "127.0.0.1"
    assert "log4j2.configurationFile=file:" in env["SPARK_SUBMIT_OPTS"]
    assert env["SPARK_GPU_MF_PROG"] == "spark-gpu-mf train"


def test_cluster_and_gpu_runs_use_the_cluster_settings_and_the_gpu_template():
    command, env = _build("recommend", "--master", "spark://10.0.0.1:7077")
    assert command[1:3] == ["--master", "spark://10.0.0.1:7077"]
    assert "--properties-file" not in command
    assert env.get("SPARK_LOCAL_IP") == os.environ.get("SPARK_LOCAL_IP")
    command, _ = _build("train", "--gpu", "--master", "yarn")
    assert Path(command[command.index("--properties-file") + 1]).name == "spark-gpu.conf"
    script = Path(_confs(command)["spark.executor.resource.gpu.discoveryScript"])
    assert script.name == "getGpusResources.sh" and os.access(script, os.X_OK)
    mine = "--conf", "spark.pyspark.python=/opt/env/bin/python"
    command, env = _build("train", *mine)
    assert _confs(command)["spark.pyspark.python"] == "/opt/env/bin/python"
    assert command.count("spark.pyspark.python=/opt/env/bin/python") == 1
    assert env["PYSPARK_PYTHON"] == "/opt/env/bin/python"


def test_user_arguments_reach_spark_submit_verbatim_as_a_list():
    hostile = "ratings; rm -rf ~ $(whoami) 'x'.csv"
    command, _ = _build("train", "--input", hostile, "--master", "local[2]")
    assert command[-2:] == ["--input", hostile]
    assert command[1:3] == ["--master", "local[2]"]


def test_paths_are_left_to_spark_when_the_master_is_a_cluster(capsys):
    # On YARN a scheme-less path is on HDFS: the CLI cannot check it, the job will.
    argv = ["train", "--input", "/data/ratings.parquet", "--master", "yarn", "--dry-run"]
    assert cli.main(argv) == 0
    assert "--input /data/ratings.parquet" in capsys.readouterr().out
    assert cli.main(argv[:-3]) == 1
    assert "input not found: /data/ratings.parquet" in capsys.readouterr().err


def test_verbose_keeps_sparks_own_logging():
    options, job_argv = cli.parse_submit_options("train", ["-v"])
    _, env = cli.build_command("train", job_argv, options, verbose=True)
    assert "log4j2.configurationFile" not in env.get("SPARK_SUBMIT_OPTS", "")


def test_dry_run_prints_the_command(capsys):
    assert cli.main(["evaluate", "--model", str(REPO), "--sample", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "spark-submit" in out and "evaluate.py --model" in out and "--dry-run" not in out


@pytest.mark.parametrize("job", JOB_NAMES)
def test_help_documents_the_job_and_the_spark_options(job, capsys):
    assert cli.main([job, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: spark-gpu-mf {job}")
    assert "spark options (added by spark-gpu-mf)" in out and "examples:" in out


def test_overview_and_unknown_jobs(capsys):
    assert cli.main([]) == 0
    assert "train" in capsys.readouterr().out
    assert cli.main(["fit"]) == 2
    assert capsys.readouterr().err.strip() == (
        "spark-gpu-mf: error: unknown job 'fit'; choose from train, evaluate, recommend "
        "(see spark-gpu-mf --help)"
    )


@pytest.mark.parametrize(
    ("argv", "status", "fragment"),
    [
        (["train", "--rank", "ten"], 2, "argument --rank: invalid int value: 'ten'"),
        (["train", "--conf", "spark.x"], 2, "--conf: expected KEY=VALUE"),
        (["train", "--input", "/nonexistent/ratings.csv"], 1, "input not found"),
        (["train", "--param", "ranks=3"], 1, "ALS has no param 'ranks'"),
        (["recommend", "--model", "/nonexistent", "--output", "x"], 1, "model not found"),
        (["evaluate", "--model", "/nonexistent", "--sample"], 1, "model not found"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_spark_starts(argv, status, fragment, capsys):
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"spark-gpu-mf {argv[0]}: error: ") and fragment in err


# --------------------------------------------------------------------------------------------
# End to end through spark-submit
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("jobs")


@pytest.fixture(scope="module")
def generated_run(workdir):
    """``spark-gpu-mf train`` on generated data with every output."""
    out = workdir / "generated"
    process = run_cli(
        "train", "--generate", 20_000, "--max-iter", 5, "--seed", 1, "--training-rmse",
        "--model-out", out / "model", "--metrics-out", out / "train.json",
        "--test-out", out / "heldout", "--plot-out", out / "train.png",
        cwd=workdir,
    )  # fmt: skip
    return out, process


@pytest.fixture(scope="module")
def sample_run(workdir):
    """``spark-gpu-mf train`` on Spark's sample ratings, rewritten as a ';' CSV with a header."""
    out = workdir / "sample"
    out.mkdir()
    path = out / "ratings.csv"
    with open(datasets.spark_sample_ratings_path()) as source, open(path, "w", newline="") as f:
        writer = csv.writer(f, delimiter=";")
        writer.writerow(["uid", "movie", "stars", "ts"])
        writer.writerows(line.strip().split("::") for line in source if line.strip())
    process = run_cli(
        "train", "--input", path, "--delimiter", ";", "--user-col", "uid", "--item-col",
        "movie", "--rating-col", "stars", "--rank", 6, "--max-iter", 6, "--test-fraction",
        0.2, "--model-out", out / "model", "--metrics-out", out / "train.json",
        cwd=workdir,
    )  # fmt: skip
    return out, process


def test_train_on_generated_data_writes_model_metrics_split_and_plot(spark, generated_run):
    out, process = generated_run
    assert_no_stack_traces(process)
    # One log line per iteration. spark-submit passes the Python driver's stderr on through
    # its stdout, so the logs and the report arrive there, in order.
    for i in range(1, 6):
        assert f"INFO ALS iteration {i}/5:" in process.stdout
    assert process.stdout.index("ALS iteration 5/5") < process.stdout.index("held-out RMSE")
    assert "held-out RMSE" in process.stdout and "fit time" in process.stdout
    document = json.loads((out / "train.json").read_text())
    held_out = document["heldOut"]
    # 20% of 20,000 ratings; the planted noise (0.5) bounds the RMSE from below, and the
    # model must beat predicting the training mean by a wide margin.
    assert held_out["ratings"] == 4000 and held_out["scored"] >= 3900
    assert 0.5 < held_out["rmse"] < 0.9 * held_out["baselineRmse"]
    assert 0 < held_out["mae"] < held_out["rmse"]
    assert document["trainRatings"] == 16_000 and document["params"]["maxIter"] == 5
    iterations = document["trainingSummary"]["iterations"]
    assert [entry["iteration"] for entry in iterations] == [1, 2, 3, 4, 5]
    assert all(entry["trainRmse"] > 0 for entry in iterations)
    assert (out / "train.png").read_bytes()[:4] == b"\x89PNG"
    heldout = spark.read.parquet(str(out / "heldout"))
    assert heldout.count() == 4000 and heldout.columns == ["user", "item", "rating"]
    # Spark's own ALSModel (the JVM implementation) reads the saved model.
    from pyspark.ml.recommendation import ALSModel as SparkALSModel

    spark_model = SparkALSModel.load(str(out / "model"))
    assert spark_model.rank == 10 and spark_model.userFactors.count() > 0


def test_train_on_the_sample_csv_with_column_options(sample_run):
    out, process = sample_run
    assert_no_stack_traces(process)
    document = json.loads((out / "train.json").read_text())
    assert document["columns"] == {"user": "uid", "item": "movie", "rating": "stars"}
    assert document["params"]["userCol"] == "uid" and document["params"]["rank"] == 6
    held_out = document["heldOut"]
    assert 200 < held_out["ratings"] < 400  # 20% of 1,501
    assert 0.3 < held_out["rmse"] < 2.0 and held_out["mae"] <= held_out["rmse"]


def test_evaluate_reproduces_the_held_out_rmse_and_plots_the_training(generated_run):
    out, _ = generated_run
    process = run_cli(
        "evaluate", "--model", out / "model", "--input", out / "heldout", "--k", 10,
        "--training-metrics", out / "train.json", "--plot-out", out / "eval.png",
        "--metrics-out", out / "eval.json",
    )  # fmt: skip
    assert_no_stack_traces(process)
    trained = json.loads((out / "train.json").read_text())["heldOut"]
    document = json.loads((out / "eval.json").read_text())
    assert document["heldOut"]["rmse"] == pytest.approx(trained["rmse"], rel=1e-9)
    assert document["heldOut"]["ratings"] == trained["ratings"]
    ranking = document["ranking"]
    assert ranking["k"] == 10 and ranking["users"] > 100
    for name in ("precisionAtK", "recallAtK", "ndcgAtK", "map", "mapAtK"):
        assert 0.0 <= ranking[name] <= 1.0
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    assert "precision@10" in process.stdout and "RMSE" in process.stdout


def test_evaluate_recomputes_the_split_from_the_input_via_plain_spark_submit(sample_run):
    # The repository's jobs/evaluate.py through spark-submit itself, as on a cluster gateway.
    out, _ = sample_run
    import pyspark

    spark_submit = Path(pyspark.__file__).parent / "bin" / "spark-submit"
    env = dict(os.environ, PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    env.pop("SPARK_GPU_MF_PROG", None)
    command = [
        str(spark_submit), "--master", "local[2]", "--conf", "spark.ui.enabled=false",
        str(REPO / "jobs" / "evaluate.py"), "--model", str(out / "model"),
        "--input", str(out / "ratings.csv"), "--delimiter", ";", "--rating-col", "stars",
        "--test-fraction", "0.2",
        "--relevance-threshold", "3", "--k", "5", "--metrics-out", str(out / "eval.json"),
    ]  # fmt: skip
    process = subprocess.run(
        command, capture_output=True, text=True, env=env, timeout=TIMEOUT, check=False
    )
    assert process.returncode == 0, _tail(process)
    trained = json.loads((out / "train.json").read_text())["heldOut"]
    document = json.loads((out / "eval.json").read_text())
    # The same input, fraction and seed: the same held-out ratings, so the same RMSE. The id
    # columns come from the model (uid, movie); a model does not know its rating column.
    assert document["columns"] == {"user": "uid", "item": "movie", "rating": "stars"}
    assert document["heldOut"]["ratings"] == trained["ratings"]
    assert document["heldOut"]["rmse"] == pytest.approx(trained["rmse"], rel=1e-9)
    assert 0.0 <= document["ranking"]["ndcgAtK"] <= 1.0


def test_recommend_for_all_users_matches_sparks_own_model(spark, generated_run):
    out, _ = generated_run
    target = out / "recommendations"
    process = run_cli("recommend", "--model", out / "model", "--num", 5, "--output", target)
    assert_no_stack_traces(process)
    written = spark.read.parquet(str(target))
    assert written.schema.simpleString() == (
        "struct<user:int,recommendations:array<struct<item:int,rating:float>>>"
    )
    from pyspark.ml.recommendation import ALSModel as SparkALSModel

    expected = {
        row.user: row.recommendations
        for row in SparkALSModel.load(str(out / "model")).recommendForAllUsers(5).collect()
    }
    rows = {row.user: row.recommendations for row in written.collect()}
    assert rows.keys() == expected.keys()
    for user in list(rows)[:50]:
        assert [r.rating for r in rows[user]] == pytest.approx(
            [r.rating for r in expected[user]], rel=1e-5
        )


def test_recommend_for_a_list_of_ids_as_csv(sample_run):
    out, _ = sample_run
    target = out / "recommendations.csv"
    process = run_cli(
        "recommend", "--model", out / "model", "--ids", "0,1,999", "--num", 3,
        "--output", target, "--output-format", "csv",
    )  # fmt: skip
    assert_no_stack_traces(process)
    assert "2 of 3 requested" in process.stdout
    rows = []
    for part in sorted(target.glob("part-*.csv")):
        with open(part) as f:
            rows += list(csv.DictReader(f))
    assert list(rows[0]) == ["uid", "rank", "movie", "rating"]
    assert sorted((r["uid"], r["rank"]) for r in rows) == [
        (u, k) for u in ("0", "1") for k in ("1", "2", "3")
    ]
    ratings = [float(r["rating"]) for r in sorted(rows, key=lambda r: (r["uid"], r["rank"]))]
    assert ratings[0] >= ratings[1] >= ratings[2] and ratings[3] >= ratings[4] >= ratings[5]


def test_an_unknown_column_found_by_spark_ends_with_one_line(workdir):
    path = workdir / "other.csv"
    path.write_text("u,i,r\n1,2,3.0\n")
    process = run_cli("train", "--input", path, "--user-col", "customer", check=False)
    assert process.returncode == 1
    assert_no_stack_traces(process)
    last = process.stdout.strip().splitlines()[-1]
    assert last == (
        "spark-gpu-mf train: error: the input has no user column 'customer' (its columns: "
        "u, i, r); pass --user-col NAME"
    )


def test_string_ids_end_with_one_line_and_no_spark_log_lines(workdir):
    """Through spark-submit: the check runs before any Spark task can fail, so Spark logs
    nothing (the task-failure WARN/ERROR lines came before the error line)."""
    path = workdir / "string-ids.csv"
    path.write_text("userId,movieId,rating\n196,242,3\nu196,242,3\n")
    process = run_cli("train", "--input", path, "--max-iter", 1, check=False)
    assert process.returncode == 1
    assert_no_stack_traces(process)
    last = process.stdout.strip().splitlines()[-1]
    assert last.startswith(
        "spark-gpu-mf train: error: column 'userId' (string): 1 of 2 values are not integers, "
        "e.g. the row userId=u196, movieId=242, rating=3; ALS needs integer ids"
    ), last
    spark_lines = [line for line in (process.stdout + process.stderr).splitlines()
                   if " WARN " in line or " ERROR " in line]  # fmt: skip
    assert spark_lines == [], spark_lines
