"""spark-submit job for the cluster and retry tests: fit ALS on generated data, write the result.

Usage: fit_job.py OUTPUT_DIR [--solver S] [--ratings N] [--max-iter N]

Writes OUTPUT_DIR/factors.npz and OUTPUT_DIR/result.json, and logs one line per ALS iteration
to stderr (the executor-kill test waits for them).
"""

import argparse
import json
import logging

import numpy as np
from pyspark.ml.evaluation import RegressionEvaluator
from pyspark.sql import SparkSession

from spark_gpu_mf import ALS, datasets
from spark_gpu_mf.spark.factors import collect_factors

FIT = dict(rank=8, seed=3, numUserBlocks=4, numItemBlocks=3, coldStartStrategy="drop")
DATA_SEED, SPLIT_SEED = 13, 14


def fit(spark, solver, num_ratings, max_iter):
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--solver", default="cholesky")
    parser.add_argument("--ratings", type=int, default=20_000)
    parser.add_argument("--max-iter", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("spark_gpu_mf").setLevel(logging.INFO)
    spark = SparkSession.builder.appName("spark_gpu_mf cluster test").getOrCreate()
    model, rmse = fit(spark, args.solver, args.ratings, args.max_iter)
    user_ids, user_factors = collect_factors(model.userFactors)
    item_ids, item_factors = collect_factors(model.itemFactors)
    np.savez(
        f"{args.output}/factors.npz",
        user_ids=user_ids,
        user_factors=user_factors,
        item_ids=item_ids,
        item_factors=item_factors,
    )
    with open(f"{args.output}/result.json", "w") as f:
        json.dump(
            {
                "rmse": rmse,
                "master": spark.sparkContext.master,
                "executors": spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size(),
            },
            f,
        )
    spark.stop()


if __name__ == "__main__":
    main()
