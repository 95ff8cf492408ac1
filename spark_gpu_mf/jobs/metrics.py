"""Held-out metrics: rating error (RMSE, MAE) and ranking quality (through RankingEvaluator)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

#: RankingEvaluator metric -> name in reports and the metrics JSON.
RANKING_METRICS = {
    "precisionAtK": "precisionAtK",
    "recallAtK": "recallAtK",
    "ndcgAtK": "ndcgAtK",
    "meanAveragePrecision": "map",
    "meanAveragePrecisionAtK": "mapAtK",
}


def rating_metrics(
    model, test: DataFrame, rating_col: str, baseline: float | None = None
) -> dict[str, float | None]:
    """RMSE and MAE of the model's predictions on ``test``, in one pass over it.

    Ratings whose user or item the model has never seen (cold start) get no prediction; they
    are counted (``ratings`` vs ``scored``) but left out of the errors, as
    ``coldStartStrategy="drop"`` does before a ``RegressionEvaluator``. The values equal
    ``RegressionEvaluator(metricName="rmse"/"mae")`` on the scored rows.

    Parameters
    ----------
    baseline : float, optional
        A constant prediction (the training mean) whose RMSE is reported as ``baselineRmse``,
        so that the model's RMSE can be read against "no model at all".
    """
    from pyspark.sql import functions as F

    scoring = model.copy({model.coldStartStrategy: "nan"})
    predictions = scoring.transform(test)
    prediction = F.col(scoring.getPredictionCol()).cast("double")
    rating = F.col(rating_col).cast("double")
    scored = ~F.isnan(prediction)
    error = rating - prediction
    aggregates = [
        F.count(F.lit(1)).alias("ratings"),
        F.count(F.when(scored, 1)).alias("scored"),
        F.sqrt(F.avg(F.when(scored, error * error))).alias("rmse"),
        F.avg(F.when(scored, F.abs(error))).alias("mae"),
    ]
    if baseline is not None:
        deviation = rating - F.lit(float(baseline))
        aggregates.append(F.sqrt(F.avg(F.when(scored, deviation * deviation))).alias("baseline"))
    row = predictions.agg(*aggregates).first()
    result = {
        "rmse": row["rmse"],
        "mae": row["mae"],
        "ratings": int(row["ratings"]),
        "scored": int(row["scored"]),
    }
    if baseline is not None:
        result["baselineRmse"] = row["baseline"]
    return result


def ranking_metrics(
    model, test: DataFrame, columns: dict[str, str], k: int, threshold: float | None = None
) -> dict[str, float]:
    """Precision, recall and NDCG at ``k`` and MAP of the model's top-``k`` for ``test``'s users.

    For each user of ``test``, the relevant items are those it rated in ``test`` (at least
    ``threshold`` if given) and the predicted list is ``recommendForUserSubset(k)``; pyspark's
    ``RankingEvaluator`` averages the metrics over those users. A user the model does not know
    gets an empty list (zero on every metric). Items the user rated in training are not
    excluded from its recommendations (as in Spark's own examples), which lowers every metric.
    """
    from pyspark.ml.evaluation import RankingEvaluator
    from pyspark.sql import functions as F

    user, item, rating = columns["user"], columns["item"], columns["rating"]
    relevant = test if threshold is None else test.where(F.col(rating) >= F.lit(threshold))
    truth = relevant.groupBy(user).agg(F.collect_list(F.col(item).cast("double")).alias("label"))
    recommender = model.copy().setUserCol(user).setItemCol(item)
    recommended = recommender.recommendForUserSubset(truth.select(user), k).select(
        F.col(user), F.col(f"recommendations.{item}").cast("array<double>").alias("prediction")
    )
    empty = F.array().cast("array<double>")
    lists = (
        truth.join(recommended, on=user, how="left")
        .select("label", F.coalesce(F.col("prediction"), empty).alias("prediction"))
        .cache()
    )
    try:
        users = lists.count()
        evaluator = RankingEvaluator(labelCol="label", predictionCol="prediction", k=k)
        result: dict[str, float] = {"k": k, "users": users}
        for metric, name in RANKING_METRICS.items():
            result[name] = evaluator.setMetricName(metric).evaluate(lists) if users else None
        return result
    finally:
        lists.unpersist()
