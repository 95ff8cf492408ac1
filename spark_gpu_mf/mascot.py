"""``MascotMF``: SGD matrix factorization with FP16 parameter storage and group-wise precision
switching (Ko et al., "MASCOT: A Quantization Framework for Efficient Matrix Factorization in
Recommender Systems", ICDM 2021), producing the same ``ALSModel`` as ``ALS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyspark import keyword_only
from pyspark.ml.param.shared import HasValidationIndicatorCol
from pyspark.ml.util import DefaultParamsReadable
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql import types as T

from spark_gpu_mf.errors import illegal_argument
from spark_gpu_mf.sgd.mascot_cuda import MAX_RANK
from spark_gpu_mf.sgd.mascot_train import MascotJob, train
from spark_gpu_mf.sgd.params import (
    STORAGES,
    HasCheckInterval,
    HasDecay,
    HasErrorThreshold,
    HasFirstCheckEpoch,
    HasNumItemGroups,
    HasNumUserGroups,
    HasRoundingThreshold,
    HasSampleRatio,
    HasStorage,
)
from spark_gpu_mf.sgd_estimator import SGDEstimator, java_string_hash
from spark_gpu_mf.validation import checked_id, checked_rating, require_column

if TYPE_CHECKING:
    from spark_gpu_mf.executor.runtime import BackendChoice
    from spark_gpu_mf.sgd.common import SGDResult

__all__ = ["MascotMF"]

# A fit with the default seed is repeatable from process to process (see java_string_hash).
DEFAULT_SEED = java_string_hash("spark_gpu_mf.mascot.MascotMF")

MASCOT_PARAM_RULES = {
    "decay": lambda v: v >= 0,
    "storage": lambda v: v in STORAGES,
    "numUserGroups": lambda v: v >= 1,
    "numItemGroups": lambda v: v >= 1,
    "sampleRatio": lambda v: 0 < v <= 1,
    "checkInterval": lambda v: v >= 1,
    "errorThreshold": lambda v: v > 0,
    "roundingThreshold": lambda v: v >= 0,
    "firstCheckEpoch": lambda v: v >= 0,
}


class MascotMF(
    SGDEstimator,
    HasDecay,
    HasStorage,
    HasNumUserGroups,
    HasNumItemGroups,
    HasSampleRatio,
    HasCheckInterval,
    HasErrorThreshold,
    HasRoundingThreshold,
    HasFirstCheckEpoch,
    HasValidationIndicatorCol,
    DefaultParamsReadable["MascotMF"],
):
    """
    SGD matrix factorization with FP16 factor storage and group-wise precision switching (MASCOT).

    Plain SGD on ``r ~ p_u . q_i`` (no biases): for every rating, ``e = r - p.q``,
    ``p += lr (e q - regParam p)``, ``q += lr (e p - regParam q)`` from the old ``p`` and ``q``,
    with ``lr = stepSize / (1 + decay * epoch^1.5)`` and ``N(0, initStd^2)`` initial factors.
    SGD for matrix factorization is memory-bound, so ``storage`` decides how factors are kept
    during training:

    * ``"fp32"``: float32;
    * ``"fp16"``: float16, arithmetic in float32 (MASCOT's m-quantization, "MASCOT-N1"): half the
      bytes per row, but small updates of rows with many ratings can be rounded away;
    * ``"mascot"`` (default): fp16 plus g-switching. Users (items) are cut by rating count into at
      most ``numUserGroups`` (``numItemGroups``) groups; every ``checkInterval`` epochs from
      epoch ``firstCheckEpoch`` (0-based) the last ``sampleRatio`` of every task's updates
      estimate each FP16 group's quantization error, ``|sum g|^2 / sum |g|^2`` over its update
      vectors ``g`` (summed over all tasks first), and a group whose estimate grows beyond
      ``errorThreshold`` times its first one is widened to float32 for the rest of the fit.
      With ``roundingThreshold`` > 0 (ours, not the paper's) a group also switches when float16
      rounding changes more than that share of its sampled updates: a direct measure that
      keeps fp32 accuracy where the paper's estimate is too noisy (small data, docs/mascot.md).

    The defaults are the MASCOT authors' (rank 128, 50 epochs, decay 0.1, regParam 0.015,
    initStd 0.01, 100 groups, sampleRatio 0.05, checkInterval 2, errorThreshold 20) except
    ``stepSize``: 0.02, not their 0.01, which leaves a 50-epoch fit far from converged on data
    with fewer ratings per row than theirs (measured in docs/mascot.md). Arithmetic is float32
    in all three modes; docs/mascot.md explains why and gives measured times and RMSE.

    Distribution: stratified SGD (DSGD). Users and items are dealt into ``numBlocks`` blocks each
    (0: one per task slot); an epoch is ``numBlocks`` sub-epochs in which ``numBlocks`` tasks
    update cells that share no user and no item. The same seed, data and ``numBlocks`` give the
    same factors. ``backend`` chooses per task between the Numba (CPU) and the CUDA kernel
    (``kernels/sgd_mascot.cu``, rank <= 256) as for ``ALS``.

    With ``validationIndicatorCol`` set, rows where that boolean column is true are held out of
    training and the model's summary has the held-out RMSE after every epoch (as Spark's
    gradient-boosted trees use ``validationIndicatorCol``). ``model.summary`` also records per
    epoch the seconds, the running training RMSE, the learning rate and which groups are FP32.

    Examples
    --------
    >>> df = spark.createDataFrame(
    ...     [(0, 0, 4.0), (0, 1, 2.0), (1, 1, 3.0), (1, 2, 4.0), (2, 1, 1.0), (2, 2, 5.0)],
    ...     ["user", "item", "rating"])
    >>> mascot = MascotMF(rank=8, maxIter=5, stepSize=0.05, initStd=0.1, seed=0, numBlocks=2)
    >>> mascot.getStorage()
    'mascot'
    >>> model = mascot.fit(df)
    >>> model.rank
    8
    >>> len(model.summary.metric("trainRmse"))
    5
    >>> model.transform(df).columns
    ['user', 'item', 'rating', 'prediction']
    """

    _input_kwargs: dict[str, Any]

    @keyword_only
    def __init__(
        self,
        *,
        rank: int = 128,
        maxIter: int = 50,
        stepSize: float = 0.02,
        decay: float = 0.1,
        regParam: float = 0.015,
        initStd: float = 0.01,
        storage: str = "mascot",
        numUserGroups: int = 100,
        numItemGroups: int = 100,
        sampleRatio: float = 0.05,
        checkInterval: int = 2,
        errorThreshold: float = 20.0,
        roundingThreshold: float = 0.0,
        firstCheckEpoch: int = 5,
        numBlocks: int = 0,
        seed: int = DEFAULT_SEED,
        userCol: str = "user",
        itemCol: str = "item",
        ratingCol: str = "rating",
        predictionCol: str = "prediction",
        coldStartStrategy: str = "nan",
        blockSize: int = 4096,
        validationIndicatorCol: str | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        self._setDefault(
            rank=128,
            maxIter=50,
            stepSize=0.02,
            regParam=0.015,
            initStd=0.01,
            numBlocks=0,
            seed=DEFAULT_SEED,
            userCol="user",
            itemCol="item",
            ratingCol="rating",
            predictionCol="prediction",
            coldStartStrategy="nan",
            blockSize=4096,
            backend="auto",
        )
        kwargs = self._input_kwargs
        self.setParams(**kwargs)

    @keyword_only
    def setParams(
        self,
        *,
        rank: int = 128,
        maxIter: int = 50,
        stepSize: float = 0.02,
        decay: float = 0.1,
        regParam: float = 0.015,
        initStd: float = 0.01,
        storage: str = "mascot",
        numUserGroups: int = 100,
        numItemGroups: int = 100,
        sampleRatio: float = 0.05,
        checkInterval: int = 2,
        errorThreshold: float = 20.0,
        roundingThreshold: float = 0.0,
        firstCheckEpoch: int = 5,
        numBlocks: int = 0,
        seed: int = DEFAULT_SEED,
        userCol: str = "user",
        itemCol: str = "item",
        ratingCol: str = "rating",
        predictionCol: str = "prediction",
        coldStartStrategy: str = "nan",
        blockSize: int = 4096,
        validationIndicatorCol: str | None = None,
        backend: str = "auto",
    ) -> MascotMF:
        """Sets params for MascotMF; keyword-only, with the same defaults as ``__init__``."""
        kwargs = self._input_kwargs
        return self._set(**kwargs)

    # setters (the shared params' are SGDEstimator's) --------------------------
    def setDecay(self, value: float) -> MascotMF:
        """Sets the value of :py:attr:`decay`."""
        return self._set(decay=value)

    def setStorage(self, value: str) -> MascotMF:
        """Sets the value of :py:attr:`storage`."""
        return self._set(storage=value)

    def setNumUserGroups(self, value: int) -> MascotMF:
        """Sets the value of :py:attr:`numUserGroups`."""
        return self._set(numUserGroups=value)

    def setNumItemGroups(self, value: int) -> MascotMF:
        """Sets the value of :py:attr:`numItemGroups`."""
        return self._set(numItemGroups=value)

    def setSampleRatio(self, value: float) -> MascotMF:
        """Sets the value of :py:attr:`sampleRatio`."""
        return self._set(sampleRatio=value)

    def setCheckInterval(self, value: int) -> MascotMF:
        """Sets the value of :py:attr:`checkInterval`."""
        return self._set(checkInterval=value)

    def setErrorThreshold(self, value: float) -> MascotMF:
        """Sets the value of :py:attr:`errorThreshold`."""
        return self._set(errorThreshold=value)

    def setRoundingThreshold(self, value: float) -> MascotMF:
        """Sets the value of :py:attr:`roundingThreshold`."""
        return self._set(roundingThreshold=value)

    def setFirstCheckEpoch(self, value: int) -> MascotMF:
        """Sets the value of :py:attr:`firstCheckEpoch`."""
        return self._set(firstCheckEpoch=value)

    def setValidationIndicatorCol(self, value: str) -> MascotMF:
        """Sets the value of :py:attr:`validationIndicatorCol`."""
        return self._set(validationIndicatorCol=value)

    # fit --------------------------------------------------------------------
    def _validation_col(self) -> str | None:
        if not self.isDefined(self.validationIndicatorCol):
            return None
        return self.getValidationIndicatorCol() or None

    def transformSchema(self, schema: T.StructType) -> T.StructType:
        """Numeric user, item and rating columns as ALS requires; a boolean validation column."""
        super().transformSchema(schema)
        name = self._validation_col()
        if name is not None:
            dtype = require_column(schema, name)
            if not isinstance(dtype, T.BooleanType):
                raise illegal_argument(
                    f"requirement failed: Column {name} must be of type boolean but was "
                    f"actually {dtype.simpleString()}."
                )
        return schema

    def _ratings(self, dataset: DataFrame) -> DataFrame:
        """``user, item, rating[, is_validation]`` with Spark ALS's checks on every row."""
        columns = [
            checked_id(dataset, self.getUserCol()).alias("user"),
            checked_id(dataset, self.getItemCol()).alias("item"),
            checked_rating(dataset, self.getRatingCol()).alias("rating"),
        ]
        name = self._validation_col()
        if name is not None:
            column = dataset[name]
            message = F.lit(f"{name} (validationIndicatorCol) MUST NOT be Null")
            columns.append(
                F.when(column.isNull(), F.raise_error(message))
                .otherwise(column)
                .alias("is_validation")
            )
        return dataset.select(*columns)

    _name = "MascotMF"
    _param_rules = MASCOT_PARAM_RULES
    _cuda_max_rank = MAX_RANK

    def _job(self, spark: SparkSession, backend: BackendChoice) -> MascotJob:
        from spark_gpu_mf.sgd.stratified import default_num_blocks

        return MascotJob(
            rank=self.getRank(),
            max_iter=self.getMaxIter(),
            step_size=self.getStepSize(),
            decay=self.getDecay(),
            reg_param=self.getRegParam(),
            init_std=self.getInitStd(),
            storage=self.getStorage(),
            num_user_groups=self.getNumUserGroups(),
            num_item_groups=self.getNumItemGroups(),
            sample_ratio=self.getSampleRatio(),
            check_interval=self.getCheckInterval(),
            error_threshold=self.getErrorThreshold(),
            rounding_threshold=self.getRoundingThreshold(),
            in_driver_max_ratings=self._in_driver_max_ratings(spark, backend),
            first_check_epoch=self.getFirstCheckEpoch(),
            num_blocks=self.getNumBlocks() or default_num_blocks(spark),
            seed=self.getSeed(),
            has_validation=self._validation_col() is not None,
            backend=backend,
        )

    def _train(self, spark: SparkSession, ratings: DataFrame, backend: BackendChoice) -> SGDResult:
        return train(spark, ratings, self._job(spark, backend))
