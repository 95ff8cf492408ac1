"""``PrunedMF``: SGD matrix factorization with DP-MF's joint-sparsity rearrangement and dynamic
pruning (Wu et al., "Accelerating Matrix Factorization by Dynamic Pruning for Fast
Recommendation", arXiv 2404.04265), producing the same ``ALSModel`` as ``ALS``.
"""

from __future__ import annotations

from typing import Any

from pyspark import keyword_only
from pyspark.errors import IllegalArgumentException
from pyspark.ml import Estimator
from pyspark.ml.param.shared import HasMaxIter, HasRegParam, HasSeed, HasStepSize
from pyspark.ml.recommendation import _ALSModelParams
from pyspark.ml.util import DefaultParamsReadable, DefaultParamsWritable
from pyspark.sql import DataFrame

from spark_gpu_mf.model import COLD_START_STRATEGIES, ALSModel
from spark_gpu_mf.params import BACKENDS, HasBackend, validate_params
from spark_gpu_mf.sgd.params import HasInitStd, HasNumBlocks, HasRank, HasRatingCol
from spark_gpu_mf.sgd.pruned_cuda import MAX_RANK
from spark_gpu_mf.sgd.pruned_numba import OPTIMIZERS
from spark_gpu_mf.sgd.pruned_params import (
    HasOptimizer,
    HasPruneStartEpoch,
    HasPruningRate,
    HasTruncateFactors,
)
from spark_gpu_mf.sgd.pruned_train import PrunedJob, train
from spark_gpu_mf.validation import check_numeric_column, validated_ratings

__all__ = ["PrunedMF"]

PRUNED_PARAM_RULES = {
    "rank": lambda v: v >= 1,
    "maxIter": lambda v: v >= 0,
    "stepSize": lambda v: v > 0,
    "regParam": lambda v: v >= 0,
    "initStd": lambda v: v > 0,
    "optimizer": lambda v: v in OPTIMIZERS,
    "pruningRate": lambda v: 0 <= v < 1,
    "pruneStartEpoch": lambda v: v >= 0,
    "numBlocks": lambda v: v >= 0,
    "coldStartStrategy": lambda v: str(v).lower() in COLD_START_STRATEGIES,
    "blockSize": lambda v: v > 0,
    "backend": lambda v: v in BACKENDS,
}


class PrunedMF(
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
    HasOptimizer,
    HasPruningRate,
    HasPruneStartEpoch,
    HasTruncateFactors,
    HasBackend,
    DefaultParamsWritable,
    DefaultParamsReadable["PrunedMF"],
):
    """
    SGD matrix factorization that skips insignificant latent factors (DP-MF).

    The base trainer is the DP-MF authors': LIBMF's SGD with row-wise AdaGrad on ratings divided
    by their standard deviation, ``N(0, initStd^2)`` initial factors, no biases, an L2 penalty
    ``regParam`` applied at every update. After ``pruneStartEpoch`` epochs, once:

    * a normal distribution is fitted to all entries of the user factors P (and of the item
      factors Q), and the threshold ``t`` is chosen so that the fitted mass in ``[-t, t]`` is
      ``pruningRate``;
    * the latent dimensions of P and Q are permuted together by ascending joint sparsity
      ``sp_j * sq_j`` (``sp_j``: share of column ``j`` of P below its threshold), densest first.

    From then on each rating's dot product and update stop at the first dimension where the
    user's or the item's factor is below its threshold. ``model.summary`` records per epoch the
    wall time, the training RMSE of those (pruned) predictions and the share of multiply-adds
    actually executed (``macFraction``). ``pruningRate=0`` is plain SGD.

    A rating's pruned prediction stops at ``min(f_u, f_i)``, the user's and the item's own first
    insignificant dimensions, and the entries past ``f_u`` are never updated again. With
    ``truncateFactors`` (default) those entries are zeroed at the end, so the model's ordinary dot
    products are exactly the pruned predictions that training fitted; without it the model keeps
    the stale values, as the authors' code predicts by default (see docs/pruned.md for what that
    costs in accuracy).

    Epochs are distributed as stratified SGD (DSGD): ``numBlocks`` (0: one per task slot) user
    and item blocks, ``numBlocks`` sub-epochs per epoch in which disjoint cells run in parallel.
    The same seed, data and ``numBlocks`` give the same factors. ``backend`` picks the Numba
    (CPU) or the CUDA kernel per task as for ``ALS``; the GPU kernel supports rank <= 256.

    Examples
    --------
    >>> df = spark.createDataFrame(
    ...     [(0, 0, 4.0), (0, 1, 2.0), (1, 1, 3.0), (1, 2, 4.0), (2, 1, 1.0), (2, 2, 5.0)],
    ...     ["user", "item", "rating"])
    >>> pruned = PrunedMF(rank=4, maxIter=3, seed=0, numBlocks=2, pruningRate=0.3)
    >>> model = pruned.fit(df)
    >>> model.rank
    4
    >>> len(model.summary.metric("macFraction"))
    3
    >>> model.transform(df).columns
    ['user', 'item', 'rating', 'prediction']
    """

    _input_kwargs: dict[str, Any]

    @keyword_only
    def __init__(
        self,
        *,
        rank: int = 30,
        maxIter: int = 20,
        stepSize: float = 0.1,
        regParam: float = 0.1,
        initStd: float = 0.1,
        optimizer: str = "adagrad",
        pruningRate: float = 0.3,
        pruneStartEpoch: int = 2,
        truncateFactors: bool = True,
        numBlocks: int = 0,
        seed: int | None = None,
        userCol: str = "user",
        itemCol: str = "item",
        ratingCol: str = "rating",
        predictionCol: str = "prediction",
        coldStartStrategy: str = "nan",
        blockSize: int = 4096,
        backend: str = "auto",
    ):
        super().__init__()
        self._setDefault(
            rank=30,
            maxIter=20,
            stepSize=0.1,
            regParam=0.1,
            initStd=0.1,
            optimizer="adagrad",
            pruningRate=0.3,
            pruneStartEpoch=2,
            truncateFactors=True,
            numBlocks=0,
            userCol="user",
            itemCol="item",
            ratingCol="rating",
            coldStartStrategy="nan",
            backend="auto",
        )
        kwargs = self._input_kwargs
        self.setParams(**kwargs)

    @keyword_only
    def setParams(
        self,
        *,
        rank: int = 30,
        maxIter: int = 20,
        stepSize: float = 0.1,
        regParam: float = 0.1,
        initStd: float = 0.1,
        optimizer: str = "adagrad",
        pruningRate: float = 0.3,
        pruneStartEpoch: int = 2,
        truncateFactors: bool = True,
        numBlocks: int = 0,
        seed: int | None = None,
        userCol: str = "user",
        itemCol: str = "item",
        ratingCol: str = "rating",
        predictionCol: str = "prediction",
        coldStartStrategy: str = "nan",
        blockSize: int = 4096,
        backend: str = "auto",
    ) -> PrunedMF:
        """Sets params for PrunedMF; keyword-only, with the same defaults as ``__init__``."""
        kwargs = self._input_kwargs
        return self._set(**kwargs)

    # setters ---------------------------------------------------------------
    def setRank(self, value: int) -> PrunedMF:
        """Sets the value of :py:attr:`rank`."""
        return self._set(rank=value)

    def setMaxIter(self, value: int) -> PrunedMF:
        """Sets the value of :py:attr:`maxIter`."""
        return self._set(maxIter=value)

    def setStepSize(self, value: float) -> PrunedMF:
        """Sets the value of :py:attr:`stepSize`."""
        return self._set(stepSize=value)

    def setRegParam(self, value: float) -> PrunedMF:
        """Sets the value of :py:attr:`regParam`."""
        return self._set(regParam=value)

    def setInitStd(self, value: float) -> PrunedMF:
        """Sets the value of :py:attr:`initStd`."""
        return self._set(initStd=value)

    def setOptimizer(self, value: str) -> PrunedMF:
        """Sets the value of :py:attr:`optimizer`."""
        return self._set(optimizer=value)

    def setPruningRate(self, value: float) -> PrunedMF:
        """Sets the value of :py:attr:`pruningRate`."""
        return self._set(pruningRate=value)

    def setPruneStartEpoch(self, value: int) -> PrunedMF:
        """Sets the value of :py:attr:`pruneStartEpoch`."""
        return self._set(pruneStartEpoch=value)

    def setTruncateFactors(self, value: bool) -> PrunedMF:
        """Sets the value of :py:attr:`truncateFactors`."""
        return self._set(truncateFactors=value)

    def setNumBlocks(self, value: int) -> PrunedMF:
        """Sets the value of :py:attr:`numBlocks`."""
        return self._set(numBlocks=value)

    def setSeed(self, value: int) -> PrunedMF:
        """Sets the value of :py:attr:`seed`."""
        return self._set(seed=value)

    def setUserCol(self, value: str) -> PrunedMF:
        """Sets the value of :py:attr:`userCol`."""
        return self._set(userCol=value)

    def setItemCol(self, value: str) -> PrunedMF:
        """Sets the value of :py:attr:`itemCol`."""
        return self._set(itemCol=value)

    def setRatingCol(self, value: str) -> PrunedMF:
        """Sets the value of :py:attr:`ratingCol`."""
        return self._set(ratingCol=value)

    def setPredictionCol(self, value: str) -> PrunedMF:
        """Sets the value of :py:attr:`predictionCol`."""
        return self._set(predictionCol=value)

    def setColdStartStrategy(self, value: str) -> PrunedMF:
        """Sets the value of :py:attr:`coldStartStrategy`."""
        return self._set(coldStartStrategy=value)

    def setBlockSize(self, value: int) -> PrunedMF:
        """Sets the value of :py:attr:`blockSize`."""
        return self._set(blockSize=value)

    def setBackend(self, value: str) -> PrunedMF:
        """Sets the value of :py:attr:`backend`."""
        return self._set(backend=value)

    # fit --------------------------------------------------------------------
    def transformSchema(self, schema):
        """Numeric user, item and rating columns, as ALS requires."""
        check_numeric_column(schema, self.getUserCol())
        check_numeric_column(schema, self.getItemCol())
        check_numeric_column(schema, self.getRatingCol())
        return schema

    def _job(self, spark) -> PrunedJob:
        from spark_gpu_mf.executor.runtime import BackendChoice
        from spark_gpu_mf.sgd.stratified import default_num_blocks

        choice = BackendChoice.for_session(spark, self.getBackend())
        return PrunedJob(
            rank=self.getRank(),
            max_iter=self.getMaxIter(),
            step_size=self.getStepSize(),
            reg_param=self.getRegParam(),
            init_std=self.getInitStd(),
            optimizer=self.getOptimizer(),
            pruning_rate=self.getPruningRate(),
            prune_start_epoch=self.getPruneStartEpoch(),
            truncate_factors=self.getTruncateFactors(),
            num_blocks=self.getNumBlocks() or default_num_blocks(spark),
            seed=self.getSeed(),
            backend=choice.requested,
            local_mode=choice.local_mode,
            cpu_fallback=choice.cpu_fallback,
        )

    def _fit(self, dataset: DataFrame) -> ALSModel:
        validate_params(self, PRUNED_PARAM_RULES)
        self.transformSchema(dataset.schema)
        spark = dataset.sparkSession
        if self.getBackend() == "cupy":
            from spark_gpu_mf.backends import check_gpu_backend_available

            check_gpu_backend_available(spark)
            if self.getRank() > MAX_RANK:
                raise IllegalArgumentException(
                    desc=f"PrunedMF's CUDA kernel supports rank <= {MAX_RANK}, got rank "
                    f"{self.getRank()}; use backend='auto' or 'numpy' for larger ranks.",
                    stackTrace="",
                )
        ratings = validated_ratings(
            dataset, self.getUserCol(), self.getItemCol(), self.getRatingCol()
        )
        result = train(spark, ratings, self._job(spark))
        model = ALSModel._create(
            self.getRank(),
            result.user_factors,
            result.item_factors,
            uid=self.uid,
            summary=result.summary,
        )
        return self._copyValues(model)
