"""The estimator shell ``MascotMF`` and ``PrunedMF`` share: common params, setters, checks and
``fit``.

pyspark's idiom keeps some things per class: the keyword-only ``__init__``/``setParams`` (their
signatures are the API and carry each estimator's defaults), ``DefaultParamsReadable[...]`` and
the estimator's own params. Everything else is here, once: the params both have (rank, maxIter,
regParam, stepSize, seed, initStd, numBlocks, backend and ALS's column params), their setters and
validity rules, the schema check, the driver-side GPU check and ``BackendChoice.for_session``
(the same backend settling as ``ALS``), and turning a trainer's result into an ``ALSModel``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from pyspark.ml import Estimator
from pyspark.ml.param.shared import HasMaxIter, HasRegParam, HasSeed, HasStepSize
from pyspark.ml.recommendation import _ALSModelParams
from pyspark.ml.util import DefaultParamsWritable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import types as T

from spark_gpu_mf.errors import illegal_argument
from spark_gpu_mf.model import COLD_START_STRATEGIES, ALSModel
from spark_gpu_mf.params import BACKENDS, HasBackend, validate_params
from spark_gpu_mf.sgd.params import HasInitStd, HasNumBlocks, HasRank, HasRatingCol
from spark_gpu_mf.validation import check_numeric_column, validated_ratings

if TYPE_CHECKING:
    from spark_gpu_mf.executor.runtime import BackendChoice
    from spark_gpu_mf.sgd.common import SGDResult

__all__ = ["SGD_PARAM_RULES", "SGDEstimator", "java_string_hash"]

SGD_PARAM_RULES = {
    "rank": lambda v: v >= 1,
    "maxIter": lambda v: v >= 0,
    "stepSize": lambda v: v > 0,
    "regParam": lambda v: v >= 0,
    "initStd": lambda v: v > 0,
    "numBlocks": lambda v: v >= 0,
    "coldStartStrategy": lambda v: str(v).lower() in COLD_START_STRATEGIES,
    "blockSize": lambda v: v > 0,
    "backend": lambda v: v in BACKENDS,
}

_E = TypeVar("_E", bound="SGDEstimator")


def java_string_hash(text: str) -> int:
    """Java's ``String.hashCode``: Spark's JVM estimators seed by their class name's hash.

    pyspark's ``HasSeed`` default is Python's ``hash()`` of the class name, which changes from
    process to process; a fit with the default seed must be repeatable, as with Spark's.
    """
    value = 0
    for char in text:
        value = (31 * value + ord(char)) & 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


class SGDEstimator(
    Estimator[ALSModel],
    _ALSModelParams,
    HasRank,
    HasMaxIter,
    HasRegParam,
    HasStepSize,
    HasSeed,
    HasRatingCol,
    HasInitStd,
    HasNumBlocks,
    HasBackend,
    DefaultParamsWritable,
):
    """Base of the SGD estimators; a subclass sets ``_name``, ``_param_rules`` (its own params'),
    ``_cuda_max_rank`` and implements ``_train``."""

    _name = "SGD"
    _param_rules: dict[str, Any] = {}
    _cuda_max_rank = 0

    # setters ---------------------------------------------------------------
    def setRank(self: _E, value: int) -> _E:
        """Sets the value of :py:attr:`rank`."""
        return self._set(rank=value)

    def setMaxIter(self: _E, value: int) -> _E:
        """Sets the value of :py:attr:`maxIter`."""
        return self._set(maxIter=value)

    def setStepSize(self: _E, value: float) -> _E:
        """Sets the value of :py:attr:`stepSize`."""
        return self._set(stepSize=value)

    def setRegParam(self: _E, value: float) -> _E:
        """Sets the value of :py:attr:`regParam`."""
        return self._set(regParam=value)

    def setInitStd(self: _E, value: float) -> _E:
        """Sets the value of :py:attr:`initStd`."""
        return self._set(initStd=value)

    def setNumBlocks(self: _E, value: int) -> _E:
        """Sets the value of :py:attr:`numBlocks`."""
        return self._set(numBlocks=value)

    def setSeed(self: _E, value: int) -> _E:
        """Sets the value of :py:attr:`seed`."""
        return self._set(seed=value)

    def setUserCol(self: _E, value: str) -> _E:
        """Sets the value of :py:attr:`userCol`."""
        return self._set(userCol=value)

    def setItemCol(self: _E, value: str) -> _E:
        """Sets the value of :py:attr:`itemCol`."""
        return self._set(itemCol=value)

    def setRatingCol(self: _E, value: str) -> _E:
        """Sets the value of :py:attr:`ratingCol`."""
        return self._set(ratingCol=value)

    def setPredictionCol(self: _E, value: str) -> _E:
        """Sets the value of :py:attr:`predictionCol`."""
        return self._set(predictionCol=value)

    def setColdStartStrategy(self: _E, value: str) -> _E:
        """Sets the value of :py:attr:`coldStartStrategy`."""
        return self._set(coldStartStrategy=value)

    def setBlockSize(self: _E, value: int) -> _E:
        """Sets the value of :py:attr:`blockSize`."""
        return self._set(blockSize=value)

    def setBackend(self: _E, value: str) -> _E:
        """Sets the value of :py:attr:`backend`."""
        return self._set(backend=value)

    # fit --------------------------------------------------------------------
    def transformSchema(self, schema: T.StructType) -> T.StructType:
        """Numeric user, item and rating columns, as ALS requires."""
        check_numeric_column(schema, self.getUserCol())
        check_numeric_column(schema, self.getItemCol())
        check_numeric_column(schema, self.getRatingCol())
        return schema

    def _ratings(self, dataset: DataFrame) -> DataFrame:
        """``user, item, rating`` with Spark ALS's checks on every row."""
        return validated_ratings(dataset, self.getUserCol(), self.getItemCol(), self.getRatingCol())

    def _check_gpu(self, spark: SparkSession) -> None:
        """``backend="cupy"``: a usable GPU setup and a rank the CUDA kernel supports, before
        any Spark job."""
        if self.getBackend() != "cupy":
            return
        from spark_gpu_mf.backends import check_gpu_backend_available

        check_gpu_backend_available(spark)
        if self.getRank() > self._cuda_max_rank:
            raise illegal_argument(
                f"{self._name}'s CUDA kernel supports rank <= {self._cuda_max_rank}, got rank "
                f"{self.getRank()}; use backend='auto' or 'numpy' for larger ranks."
            )

    @staticmethod
    def _in_driver_max_ratings(spark: SparkSession, backend: BackendChoice) -> int:
        """Largest fit whose epochs run in the driver (``spark.gpumf.sgd.inDriverMaxRatings``):
        only next to a local master on a classic session (a Connect client is not the driver),
        and only with the NumPy backend (the driver never imports CuPy)."""
        from spark_gpu_mf import conf
        from spark_gpu_mf.spark import session

        if session.is_connect(spark) or not session.is_local(spark):
            return 0
        if backend.requested != "numpy":
            return 0
        limit = conf.SGD_IN_DRIVER_MAX_RATINGS.get(spark)
        return 1_000_000 if limit is None else limit

    def _train(self, spark: SparkSession, ratings: DataFrame, backend: BackendChoice) -> SGDResult:
        """Run the trainer on ``ratings`` from :meth:`_ratings` with the settled ``backend``."""
        raise NotImplementedError

    def _fit(self, dataset: DataFrame) -> ALSModel:
        from spark_gpu_mf.executor.runtime import BackendChoice

        validate_params(self, {**SGD_PARAM_RULES, **self._param_rules})
        self.transformSchema(dataset.schema)
        spark = dataset.sparkSession
        self._check_gpu(spark)
        backend = BackendChoice.for_session(spark, self.getBackend())
        result = self._train(spark, self._ratings(dataset), backend)
        model = ALSModel._create(
            self.getRank(),
            result.user_factors,
            result.item_factors,
            uid=self.uid,
            summary=result.summary,
        )
        return self._copyValues(model)
