"""spark-submit job for the cluster tests: several ALS fits in one application, results written.

Usage: fit_job.py OUTPUT_DIR CASES_JSON

``CASES_JSON`` is a list of ``{"name", "solver", "maxIter", "conf"}``; each case sets its Spark
confs (a dataflow, the failure injection), fits ALS on the same generated data, and writes
``OUTPUT_DIR/<name>/factors.npz`` and ``result.json`` (held-out RMSE, master, executors, and the
task attempts that failed in the case's jobs). One application for every case: a spark-submit
and its executors cost more to start than these fits. Logs ``fit_job: case <name>`` and one line
per ALS iteration to stderr (the executor-kill test waits for them).
"""

import json
import logging
import os
import sys

import numpy as np
from pyspark.ml.evaluation import RegressionEvaluator
from pyspark.sql import SparkSession

from spark_gpu_mf import ALS, datasets
from spark_gpu_mf.spark.factors import collect_factors

FIT = dict(rank=8, seed=3, numUserBlocks=4, numItemBlocks=3, coldStartStrategy="drop")
DATA_SEED, SPLIT_SEED, NUM_RATINGS = 13, 14, 20_000

logger = logging.getLogger("fit_job")


def fit(spark, solver, max_iter, num_ratings=NUM_RATINGS):
    """The fit every cluster test compares: the same data and params wherever it runs."""
    data = datasets.generate_ratings(num_ratings, seed=DATA_SEED)
    train, test = datasets.train_test_split(data, 0.2, seed=SPLIT_SEED)
    model = ALS(solver=solver, maxIter=max_iter, **FIT).fit(
        datasets.to_dataframe(spark, train, num_partitions=4)
    )
    rmse = RegressionEvaluator(labelCol="rating").evaluate(
        model.transform(datasets.to_dataframe(spark, test, num_partitions=2))
    )
    return model, rmse


def run_case(spark, case: dict, output: str) -> None:
    sc = spark.sparkContext
    logger.warning("fit_job: case %s", case["name"])
    for key, value in case["conf"].items():
        spark.conf.set(key, value)
    sc.setJobGroup(case["name"], f"cluster test case {case['name']}")
    try:
        model, rmse = fit(spark, case["solver"], case["maxIter"])
        user_ids, user_factors = collect_factors(model.userFactors)
        item_ids, item_factors = collect_factors(model.itemFactors)
    finally:
        for key in case["conf"]:
            spark.conf.unset(key)
    tracker = sc.statusTracker()
    failed = 0
    for job_id in tracker.getJobIdsForGroup(case["name"]):
        job = tracker.getJobInfo(job_id)
        for stage_id in job.stageIds if job else ():
            stage = tracker.getStageInfo(stage_id)
            failed += stage.numFailedTasks if stage else 0
    directory = os.path.join(output, case["name"])
    os.makedirs(directory)
    np.savez(
        os.path.join(directory, "factors.npz"),
        user_ids=user_ids,
        user_factors=user_factors,
        item_ids=item_ids,
        item_factors=item_factors,
    )
    with open(os.path.join(directory, "result.json"), "w") as f:
        json.dump(
            {
                "rmse": rmse,
                "master": sc.master,
                "executors": sc._jsc.sc().getExecutorMemoryStatus().size(),
                "failedTasks": failed,
            },
            f,
        )


def main() -> None:
    output, cases = sys.argv[1], json.loads(sys.argv[2])
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("spark_gpu_mf").setLevel(logging.INFO)
    spark = SparkSession.builder.appName("spark_gpu_mf cluster test").getOrCreate()
    for case in cases:
        run_case(spark, case, output)
    spark.stop()


if __name__ == "__main__":
    main()
