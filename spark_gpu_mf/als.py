"""``ALS``: a drop-in for ``pyspark.ml.recommendation.ALS`` whose work runs in Python executors.

Same params, defaults, setters and getters, errors, fitted model and saved format as Spark's ALS,
plus params of ours: ``solver``, ``cgIterations``, ``precision``, ``backend``,
``initialModel`` (warm start) and ``indexIds`` (long and string ids).
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from pyspark import keyword_only
from pyspark.ml import Estimator
from pyspark.ml.recommendation import _ALSParams
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame
from pyspark.sql import types as T

from spark_gpu_mf import conf
from spark_gpu_mf.errors import illegal_argument
from spark_gpu_mf.model import COLD_START_STRATEGIES, ALSModel
from spark_gpu_mf.params import (
    BACKENDS,
    PRECISIONS,
    SOLVERS,
    HasBackend,
    HasCgIterations,
    HasIndexIds,
    HasInitialModel,
    HasPrecision,
    HasSolver,
    validate_params,
)
from spark_gpu_mf.spark import session
from spark_gpu_mf.spark.als_train import AlsJob, train, warm_up_driver
from spark_gpu_mf.spark.id_index import build_index, needs_index, to_internal
from spark_gpu_mf.spark.persistence import ParamsWriter
from spark_gpu_mf.spark.storage_levels import is_storage_level, storage_level
from spark_gpu_mf.validation import (
    check_indexable,
    check_numeric_column,
    checked_id,
    checked_rating,
    non_null_id,
    validated_ratings,
)

__all__ = ["ALS"]


ALS_PARAM_RULES = {
    "rank": lambda v: v >= 1,
    "maxIter": lambda v: v >= 0,
    "regParam": lambda v: v >= 0,
    "numUserBlocks": lambda v: v >= 1,
    "numItemBlocks": lambda v: v >= 1,
    "alpha": lambda v: v >= 0,
    "checkpointInterval": lambda v: v == -1 or v >= 1,
    "intermediateStorageLevel": lambda v: is_storage_level(v) and v != "NONE",
    "finalStorageLevel": lambda v: is_storage_level(v) or v == "NONE",
    "coldStartStrategy": lambda v: str(v).lower() in COLD_START_STRATEGIES,
    "blockSize": lambda v: v > 0,
    "solver": lambda v: v in SOLVERS,
    "cgIterations": lambda v: v >= 1,
    "precision": lambda v: v in PRECISIONS,
    "backend": lambda v: v in BACKENDS,
}


def _single_task_max_ratings(spark) -> int:
    configured = conf.SINGLE_TASK_MAX_RATINGS.get(spark)
    if configured is not None:
        return configured
    return 20_000_000 if session.is_local(spark) else 2_000_000


def _single_task_in_driver_max_ratings(spark) -> int:
    configured = conf.SINGLE_TASK_IN_DRIVER_MAX_RATINGS.get(spark)
    if configured is not None:
        return configured
    return 1_000_000 if session.is_local(spark) else 0


class ALS(
    Estimator[ALSModel],
    _ALSParams,
    HasSolver,
    HasCgIterations,
    HasPrecision,
    HasBackend,
    HasInitialModel,
    HasIndexIds,
    DefaultParamsWritable,
    DefaultParamsReadable["ALS"],
):
    """
    Alternating Least Squares (ALS) matrix factorization, with Spark ALS's API and results.

    ALS attempts to estimate the ratings matrix `R` as the product of two lower-rank matrices,
    `X` and `Y`, i.e. `X * Yt = R`. Each iteration solves one factor matrix with the other fixed,
    one regularized least-squares problem per row (ALS-WR: lambda scaled by the row's number of
    ratings). Implicit preferences follow Hu, Koren and Volinsky, "Collaborative Filtering for
    Implicit Feedback Datasets" (ICDM 2008) with Spark's confidence ``1 + alpha * |r|``.

    Ratings are split into user and item blocks (``id mod numBlocks``) held once as compact CSR
    rows; every half-iteration solves whole blocks at once on the executors through Arrow: normal
    equations built in batches (BLAS-3 on CPU, a cuMF-style kernel on GPU) and solved by batched
    Cholesky or by a few conjugate-gradient steps warm-started from the previous factors
    (``solver``), optionally with FP16-stored matrices (``precision``). The same ``seed`` gives
    the same starting factors as Spark's ALS.

    Examples
    --------
    >>> df = spark.createDataFrame(
    ...     [(0, 0, 4.0), (0, 1, 2.0), (1, 1, 3.0), (1, 2, 4.0), (2, 1, 1.0), (2, 2, 5.0)],
    ...     ["user", "item", "rating"])
    >>> als = ALS(rank=10, seed=0)
    >>> als.setMaxIter(5)
    ALS...
    >>> als.getMaxIter()
    5
    >>> model = als.fit(df)
    >>> model.rank
    10
    >>> test = spark.createDataFrame([(0, 2), (1, 0), (2, 0)], ["user", "item"])
    >>> predictions = sorted(model.transform(test).collect(), key=lambda r: r[0])
    >>> predictions[0]
    Row(user=0, item=2, prediction=0.6929...)
    >>> predictions[1]
    Row(user=1, item=0, prediction=3.47356...)
    >>> predictions[2]
    Row(user=2, item=0, prediction=-0.899198...)
    >>> user_recs = model.recommendForAllUsers(3)
    >>> user_recs.where(user_recs.user == 0)\
        .select("recommendations.item", "recommendations.rating").collect()
    [Row(item=[0, 1, 2], rating=[3.910..., 1.997..., 0.692...])]
    >>> model_path = temp_path + "/als_model"
    >>> model.save(model_path)
    >>> ALSModel.load(model_path).rank
    10
    """

    _input_kwargs: Dict[str, Any]

    @keyword_only
    def __init__(
        self,
        *,
        rank: int = 10,
        maxIter: int = 10,
        regParam: float = 0.1,
        numUserBlocks: int = 10,
        numItemBlocks: int = 10,
        implicitPrefs: bool = False,
        alpha: float = 1.0,
        userCol: str = "user",
        itemCol: str = "item",
        seed: Optional[int] = None,
        ratingCol: str = "rating",
        nonnegative: bool = False,
        checkpointInterval: int = 10,
        intermediateStorageLevel: str = "MEMORY_AND_DISK",
        finalStorageLevel: str = "MEMORY_AND_DISK",
        coldStartStrategy: str = "nan",
        blockSize: int = 4096,
        solver: str = "auto",
        cgIterations: int = 5,
        precision: str = "fp32",
        backend: str = "auto",
        initialModel: Optional[Any] = None,
        indexIds: bool = False,
    ):
        super().__init__()
        kwargs = self._input_kwargs
        self.setParams(**kwargs)

    @keyword_only
    def setParams(
        self,
        *,
        rank: int = 10,
        maxIter: int = 10,
        regParam: float = 0.1,
        numUserBlocks: int = 10,
        numItemBlocks: int = 10,
        implicitPrefs: bool = False,
        alpha: float = 1.0,
        userCol: str = "user",
        itemCol: str = "item",
        seed: Optional[int] = None,
        ratingCol: str = "rating",
        nonnegative: bool = False,
        checkpointInterval: int = 10,
        intermediateStorageLevel: str = "MEMORY_AND_DISK",
        finalStorageLevel: str = "MEMORY_AND_DISK",
        coldStartStrategy: str = "nan",
        blockSize: int = 4096,
        solver: str = "auto",
        cgIterations: int = 5,
        precision: str = "fp32",
        backend: str = "auto",
        initialModel: Optional[Any] = None,
        indexIds: bool = False,
    ) -> "ALS":
        """Sets params for ALS; keyword-only, with the same defaults as ``__init__``."""
        kwargs = self._input_kwargs
        return self._set(**kwargs)

    # Spark's setters -------------------------------------------------------
    def setRank(self, value: int) -> "ALS":
        """Sets the value of :py:attr:`rank`."""
        return self._set(rank=value)

    def setNumUserBlocks(self, value: int) -> "ALS":
        """Sets the value of :py:attr:`numUserBlocks`."""
        return self._set(numUserBlocks=value)

    def setNumItemBlocks(self, value: int) -> "ALS":
        """Sets the value of :py:attr:`numItemBlocks`."""
        return self._set(numItemBlocks=value)

    def setNumBlocks(self, value: int) -> "ALS":
        """Sets both :py:attr:`numUserBlocks` and :py:attr:`numItemBlocks` to the specific value."""
        self._set(numUserBlocks=value)
        return self._set(numItemBlocks=value)

    def setImplicitPrefs(self, value: bool) -> "ALS":
        """Sets the value of :py:attr:`implicitPrefs`."""
        return self._set(implicitPrefs=value)

    def setAlpha(self, value: float) -> "ALS":
        """Sets the value of :py:attr:`alpha`."""
        return self._set(alpha=value)

    def setUserCol(self, value: str) -> "ALS":
        """Sets the value of :py:attr:`userCol`."""
        return self._set(userCol=value)

    def setItemCol(self, value: str) -> "ALS":
        """Sets the value of :py:attr:`itemCol`."""
        return self._set(itemCol=value)

    def setRatingCol(self, value: str) -> "ALS":
        """Sets the value of :py:attr:`ratingCol`."""
        return self._set(ratingCol=value)

    def setNonnegative(self, value: bool) -> "ALS":
        """Sets the value of :py:attr:`nonnegative`."""
        return self._set(nonnegative=value)

    def setIntermediateStorageLevel(self, value: str) -> "ALS":
        """Sets the value of :py:attr:`intermediateStorageLevel`."""
        return self._set(intermediateStorageLevel=value)

    def setFinalStorageLevel(self, value: str) -> "ALS":
        """Sets the value of :py:attr:`finalStorageLevel`."""
        return self._set(finalStorageLevel=value)

    def setColdStartStrategy(self, value: str) -> "ALS":
        """Sets the value of :py:attr:`coldStartStrategy`."""
        return self._set(coldStartStrategy=value)

    def setMaxIter(self, value: int) -> "ALS":
        """Sets the value of :py:attr:`maxIter`."""
        return self._set(maxIter=value)

    def setRegParam(self, value: float) -> "ALS":
        """Sets the value of :py:attr:`regParam`."""
        return self._set(regParam=value)

    def setPredictionCol(self, value: str) -> "ALS":
        """Sets the value of :py:attr:`predictionCol`."""
        return self._set(predictionCol=value)

    def setCheckpointInterval(self, value: int) -> "ALS":
        """Sets the value of :py:attr:`checkpointInterval`."""
        return self._set(checkpointInterval=value)

    def setSeed(self, value: int) -> "ALS":
        """Sets the value of :py:attr:`seed`."""
        return self._set(seed=value)

    def setBlockSize(self, value: int) -> "ALS":
        """Sets the value of :py:attr:`blockSize`."""
        return self._set(blockSize=value)

    # Our setters -----------------------------------------------------------
    def setSolver(self, value: str) -> "ALS":
        """Sets the value of :py:attr:`solver`."""
        return self._set(solver=value)

    def setCgIterations(self, value: int) -> "ALS":
        """Sets the value of :py:attr:`cgIterations`."""
        return self._set(cgIterations=value)

    def setPrecision(self, value: str) -> "ALS":
        """Sets the value of :py:attr:`precision`."""
        return self._set(precision=value)

    def setBackend(self, value: str) -> "ALS":
        """Sets the value of :py:attr:`backend`."""
        return self._set(backend=value)

    def setInitialModel(self, value: Any) -> "ALS":
        """Sets the value of :py:attr:`initialModel` (a fitted model or a saved model's path)."""
        return self._set(initialModel=value)

    def setIndexIds(self, value: bool) -> "ALS":
        """Sets the value of :py:attr:`indexIds`."""
        return self._set(indexIds=value)

    # persistence ------------------------------------------------------------
    def write(self) -> ParamsWriter:
        """Returns an MLWriter instance for this ML instance (``DefaultParamsWriter``'s layout,
        Spark's overwrite error, and no py4j, so it also works on Spark Connect)."""
        return ParamsWriter(self)

    # fit --------------------------------------------------------------------
    def transformSchema(self, schema):
        """Spark's schema check: numeric user, item and rating columns (with ``indexIds``:
        integral or string ids)."""
        check_id = check_indexable if self.getIndexIds() else check_numeric_column
        check_id(schema, self.getUserCol())
        check_id(schema, self.getItemCol())
        check_numeric_column(schema, self.getRatingCol())
        return schema

    def _indexed_ratings(self, dataset: DataFrame):
        """``(ratings, user index, item index)``: validated ``(user int, item int, rating)``
        with the long and string id sides replaced by their index (None for int sides)."""
        schema = dataset.schema
        user_col, item_col = self.getUserCol(), self.getItemCol()
        indexed = {c: needs_index(schema[c].dataType) for c in (user_col, item_col)}
        checked = dataset.select(
            *[
                (non_null_id(dataset, c) if indexed[c] else checked_id(dataset, c)).alias(alias)
                for c, alias in ((user_col, "user"), (item_col, "item"))
            ],
            checked_rating(dataset, self.getRatingCol()).alias("rating"),
        )
        level = storage_level(self.getIntermediateStorageLevel())
        indexes = {}
        for column, side in ((user_col, "user"), (item_col, "item")):
            indexes[side] = (
                build_index(checked.select(side), level, what=f"{side} ids")
                if indexed[column]
                else None
            )
        ratings = to_internal(checked, "user", indexes["user"])
        ratings = to_internal(ratings, "item", indexes["item"]).select("user", "item", "rating")
        return ratings, indexes["user"], indexes["item"]

    def _job(self, spark, input_cached: bool = False) -> AlsJob:
        return AlsJob(
            rank=self.getRank(),
            max_iter=self.getMaxIter(),
            reg_param=self.getRegParam(),
            implicit=self.getImplicitPrefs(),
            alpha=self.getAlpha(),
            nonnegative=self.getNonnegative(),
            num_user_blocks=self.getNumUserBlocks(),
            num_item_blocks=self.getNumItemBlocks(),
            seed=self.getSeed(),
            checkpoint_interval=self.getCheckpointInterval(),
            intermediate_level=storage_level(self.getIntermediateStorageLevel()),
            final_level=storage_level(self.getFinalStorageLevel()),
            solver=self.getSolver(),
            cg_iterations=self.getCgIterations(),
            precision=self.getPrecision(),
            backend=self.getBackend(),
            memory_budget=conf.MEMORY_BUDGET.get(spark),
            broadcast_threshold=conf.BROADCAST_THRESHOLD.get(spark),
            blas_threads=conf.BLAS_THREADS.get(spark),
            training_rmse=conf.TRAINING_RMSE.get(spark),
            adaptive_execution=conf.ALS_ADAPTIVE_EXECUTION.get(spark),
            fail_first_attempt=conf.FAIL_FIRST_ATTEMPT.get(spark),
            single_task_max_ratings=_single_task_max_ratings(spark),
            in_driver_max_ratings=_single_task_in_driver_max_ratings(spark),
            input_cached=input_cached,
        )

    def _training_settings(self) -> Dict[str, Any]:
        """What the model keeps of this fit for ``foldInUsers`` / ``foldInItems``."""
        return {
            "regParam": self.getRegParam(),
            "implicitPrefs": self.getImplicitPrefs(),
            "alpha": self.getAlpha(),
            "nonnegative": self.getNonnegative(),
            "ratingCol": self.getRatingCol(),
            "backend": self.getBackend(),
        }

    def _initial_factors(self, spark, indexes) -> Optional[Dict[str, DataFrame]]:
        """The warm start's ``{side: (id int, features)}`` factor DataFrames in this fit's int
        ids, or None.

        Checked before any job: the model's rank must be this fit's (its factors would not
        fit the normal equations otherwise), and a side this fit does not index must have int
        ids in the model too.
        """
        if not self.isDefined(self.initialModel) or self.getInitialModel() is None:
            return None
        value = self.getInitialModel()
        model = ALSModel.read().session(spark).load(value) if isinstance(value, str) else value
        if model.rank != self.getRank():
            raise illegal_argument(
                f"initialModel has rank {model.rank} but this ALS has rank {self.getRank()}: a "
                "warm start needs the same rank."
            )
        initial = {}
        for side, factors in (("user", model.userFactors), ("item", model.itemFactors)):
            if indexes[side] is not None:
                factors = to_internal(factors, "id", indexes[side])
            elif not isinstance(factors.schema["id"].dataType, T.IntegerType):
                raise illegal_argument(
                    f"initialModel has {side} ids of type "
                    f"{factors.schema['id'].dataType.simpleString()} but this fit's {side} ids "
                    "are ints: set indexIds=True and give the ids in their original type."
                )
            initial[side] = factors
        return initial

    def _fit(self, dataset: DataFrame) -> ALSModel:
        validate_params(self, ALS_PARAM_RULES)
        self.transformSchema(dataset.schema)
        spark = dataset.sparkSession
        if self.getBackend() == "cupy":
            from spark_gpu_mf import backends

            check = getattr(backends, "check_gpu_backend_available", None)
            if check is not None:
                check(spark)
        level = dataset.storageLevel
        cached = level.useMemory or level.useDisk or level.useOffHeap
        job = self._job(spark, input_cached=cached)
        # First: loading the compiled code overlaps the Spark jobs from here on.
        warm_up_driver(spark, job)
        indexes = {"user": None, "item": None}
        if self.getIndexIds():
            ratings, indexes["user"], indexes["item"] = self._indexed_ratings(dataset)
        else:
            ratings = validated_ratings(
                dataset, self.getUserCol(), self.getItemCol(), self.getRatingCol()
            )
        initial = self._initial_factors(spark, indexes)
        result = train(spark, ratings, job, initial)
        model = ALSModel._create(
            self.getRank(),
            result.user_factors,
            result.item_factors,
            uid=self.uid,
            summary=result.summary,
            training=self._training_settings(),
            user_index=indexes["user"],
            item_index=indexes["item"],
        )
        model.setBlockSize(self.getBlockSize())
        return self._copyValues(model)
