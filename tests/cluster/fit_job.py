"""spark-submit job for the cluster tests: fit ALS on generated data, write factors and RMSE.

Usage: fit_job.py OUTPUT_DIR SOLVER [NUM_RATINGS]
"""

import json
import sys

import numpy as np
from pyspark.ml.evaluation import RegressionEvaluator
from pyspark.sql import SparkSession

from spark_gpu_mf import ALS, datasets
from spark_gpu_mf.spark.factors import collect_factors


def main() -> None:
    output, solver = sys.argv[1], sys.argv[2]
    num_ratings = int(sys.argv[3]) if len(sys.argv) > 3 else 20_000
    spark = SparkSession.builder.appName("spark_gpu_mf cluster test").getOrCreate()
    data = datasets.generate_ratings(num_ratings, seed=13)
    train, test = datasets.train_test_split(data, 0.2, seed=14)
    train_df = datasets.to_dataframe(spark, train, num_partitions=4)
    test_df = datasets.to_dataframe(spark, test, num_partitions=2)
    model = ALS(rank=8, maxIter=5, seed=3, solver=solver, numUserBlocks=4, numItemBlocks=3,
                coldStartStrategy="drop").fit(train_df)
    rmse = RegressionEvaluator(labelCol="rating").evaluate(model.transform(test_df))
    user_ids, user_factors = collect_factors(model.userFactors)
    item_ids, item_factors = collect_factors(model.itemFactors)
    np.savez(f"{output}/factors.npz", user_ids=user_ids, user_factors=user_factors,
             item_ids=item_ids, item_factors=item_factors)
    with open(f"{output}/result.json", "w") as f:
        json.dump({"rmse": rmse, "master": spark.sparkContext.master,
                   "executors": spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size()}, f)
    spark.stop()


if __name__ == "__main__":
    main()
