"""``PrunedMF``: SGD matrix factorization with DP-MF's joint-sparsity rearrangement and dynamic
pruning (Wu et al., "Accelerating Matrix Factorization by Dynamic Pruning for Fast
Recommendation", arXiv 2404.04265), producing the same ``ALSModel`` as ``ALS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pyspark import keyword_only
from pyspark.ml.util import DefaultParamsReadable
from pyspark.sql import DataFrame, SparkSession

from spark_gpu_mf.sgd.pruned_cuda import MAX_RANK
from spark_gpu_mf.sgd.pruned_numba import OPTIMIZERS
from spark_gpu_mf.sgd.pruned_params import (
    HasOptimizer,
    HasPruneStartEpoch,
    HasPruningRate,
    HasRegrowth,
    HasTruncateFactors,
)
from spark_gpu_mf.sgd.pruned_train import PrunedJob, train
from spark_gpu_mf.sgd_estimator import SGDEstimator, java_string_hash

if TYPE_CHECKING:
    from spark_gpu_mf.executor.runtime import BackendChoice
    from spark_gpu_mf.sgd.common import SGDResult

__all__ = ["PrunedMF"]

# A fit with the default seed is repeatable from process to process (see java_string_hash).
DEFAULT_SEED = java_string_hash("spark_gpu_mf.pruned.PrunedMF")

PRUNED_PARAM_RULES = {
    "optimizer": lambda v: v in OPTIMIZERS,
    "pruningRate": lambda v: 0 <= v < 1,
    "pruneStartEpoch": lambda v: v >= 0,
}


class PrunedMF(
    SGDEstimator,
    HasOptimizer,
    HasPruningRate,
    HasPruneStartEpoch,
    HasTruncateFactors,
    HasRegrowth,
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

    With ``regrowth`` each rating also updates its first insignificant dimension, so an entry
    that fell below its threshold can grow back (the default, false, is DP-MF's rule: such an
    entry and the rest of its row are frozen). It executes a few more multiply-adds and loses
    less accuracy; docs/pruned.md has the measurements.

    Epochs are distributed as stratified SGD (DSGD): ``numBlocks`` (0: one per task slot) user
    and item blocks, ``numBlocks`` sub-epochs per epoch in which disjoint cells run in parallel.
    The same seed, data and ``numBlocks`` give the same factors. A small fit in local mode
    (``spark.gpumf.sgd.inDriverMaxRatings``, 1M ratings by default) with ``numBlocks`` 0 or 1
    runs as one block in the driver, without a Spark job per sub-epoch. ``backend`` picks the
    Numba (CPU) or the CUDA kernel per task as for ``ALS``; the GPU kernel supports rank <= 256.

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
        regrowth: bool = False,
        numBlocks: int = 0,
        seed: int = DEFAULT_SEED,
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
            regrowth=False,
            numBlocks=0,
            seed=DEFAULT_SEED,
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
        regrowth: bool = False,
        numBlocks: int = 0,
        seed: int = DEFAULT_SEED,
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

    # setters (the shared params' are SGDEstimator's) -------------------------
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

    def setRegrowth(self, value: bool) -> PrunedMF:
        """Sets the value of :py:attr:`regrowth`."""
        return self._set(regrowth=value)

    # fit --------------------------------------------------------------------
    _name = "PrunedMF"
    _param_rules = PRUNED_PARAM_RULES
    _cuda_max_rank = MAX_RANK

    def _job(self, spark: SparkSession, backend: BackendChoice) -> PrunedJob:
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
            regrowth=self.getRegrowth(),
            num_blocks=self.getNumBlocks(),
            seed=self.getSeed(),
            backend=backend,
            in_driver_max_ratings=self._in_driver_max_ratings(spark, backend),
        )

    def _train(self, spark: SparkSession, ratings: DataFrame, backend: BackendChoice) -> SGDResult:
        return train(spark, ratings, self._job(spark, backend))
