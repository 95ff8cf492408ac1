"""Params of ``PrunedMF``, declared like ``pyspark.ml.param.shared``: one mixin per param.

The pruning params (``pruningRate``, ``pruneStartEpoch``, ``optimizer``, ``truncateFactors``) are
PrunedMF's own.
``rank``, ``ratingCol``, ``initStd`` and ``numBlocks`` are generic SGD params that
``spark_gpu_mf/sgd/params.py`` (shared with MascotMF) did not provide when PrunedMF was written;
they belong there once it does. Spark's own mixins (``HasMaxIter``, ``HasRegParam``, ``HasSeed``,
``HasStepSize``, ``_ALSModelParams``) are reused as they are.

Defaults are the DP-MF authors' (their LIBMF fork, papers.md "Implementation spec" B): rank 30,
20 epochs, step 0.1, lambda 0.1, N(0, 0.1) initialization, pruning rate 0.3 from epoch 2.
"""

from __future__ import annotations

from pyspark.ml.param import Param, Params, TypeConverters

from spark_gpu_mf.sgd.pruned_numba import OPTIMIZERS

__all__ = [
    "HasInitStd",
    "HasNumBlocks",
    "HasOptimizer",
    "HasPruneStartEpoch",
    "HasPruningRate",
    "HasRank",
    "HasRatingCol",
    "HasTruncateFactors",
]


class HasRank(Params):
    """Mixin for param rank: number of latent factors (>= 1)."""

    rank: Param[int] = Param(
        Params._dummy(),
        "rank",
        "rank of the factorization (>= 1)",
        typeConverter=TypeConverters.toInt,
    )

    def __init__(self) -> None:
        super().__init__()

    def getRank(self) -> int:
        """Gets the value of rank or its default value."""
        return self.getOrDefault(self.rank)


class HasRatingCol(Params):
    """Mixin for param ratingCol: column name for ratings."""

    ratingCol: Param[str] = Param(
        Params._dummy(),
        "ratingCol",
        "column name for ratings",
        typeConverter=TypeConverters.toString,
    )

    def __init__(self) -> None:
        super().__init__()

    def getRatingCol(self) -> str:
        """Gets the value of ratingCol or its default value."""
        return self.getOrDefault(self.ratingCol)


class HasInitStd(Params):
    """Mixin for param initStd: standard deviation of the normal initial factors (> 0)."""

    initStd: Param[float] = Param(
        Params._dummy(),
        "initStd",
        "standard deviation of the N(0, initStd^2) initial factors, in the scale of ratings "
        "divided by their standard deviation (> 0)",
        typeConverter=TypeConverters.toFloat,
    )

    def __init__(self) -> None:
        super().__init__()

    def getInitStd(self) -> float:
        """Gets the value of initStd or its default value."""
        return self.getOrDefault(self.initStd)


class HasNumBlocks(Params):
    """Mixin for param numBlocks: DSGD blocks per side (>= 1)."""

    numBlocks: Param[int] = Param(
        Params._dummy(),
        "numBlocks",
        "number of user blocks and of item blocks for stratified SGD (>= 1): an epoch is "
        "numBlocks sub-epochs of numBlocks parallel tasks. The fit is a function of the seed, "
        "the data and numBlocks.",
        typeConverter=TypeConverters.toInt,
    )

    def __init__(self) -> None:
        super().__init__()

    def getNumBlocks(self) -> int:
        """Gets the value of numBlocks or its default value."""
        return self.getOrDefault(self.numBlocks)


class HasOptimizer(Params):
    """Mixin for param optimizer: the per-row step size rule."""

    optimizer: Param[str] = Param(
        Params._dummy(),
        "optimizer",
        "step size rule: 'adagrad' (LIBMF's row-wise AdaGrad: stepSize / sqrt(G) with one "
        "accumulator G per user and per item) or 'sgd' (constant stepSize). Supported values: "
        + ", ".join(f"'{name}'" for name in OPTIMIZERS)
        + ".",
        typeConverter=TypeConverters.toString,
    )

    def __init__(self) -> None:
        super().__init__()

    def getOptimizer(self) -> str:
        """Gets the value of optimizer or its default value."""
        return self.getOrDefault(self.optimizer)


class HasPruningRate(Params):
    """Mixin for param pruningRate: fitted-normal mass treated as insignificant, in [0, 1)."""

    pruningRate: Param[float] = Param(
        Params._dummy(),
        "pruningRate",
        "share of a normal fitted to each factor matrix that lies in the insignificant band "
        "[-t, t], in [0, 1); 0 prunes nothing",
        typeConverter=TypeConverters.toFloat,
    )

    def __init__(self) -> None:
        super().__init__()

    def getPruningRate(self) -> float:
        """Gets the value of pruningRate or its default value."""
        return self.getOrDefault(self.pruningRate)


class HasPruneStartEpoch(Params):
    """Mixin for param pruneStartEpoch: unpruned epochs before the thresholds are fixed."""

    pruneStartEpoch: Param[int] = Param(
        Params._dummy(),
        "pruneStartEpoch",
        "number of unpruned epochs; after them the thresholds and the column order are fixed "
        "and every later epoch is pruned (>= 0; >= maxIter never prunes)",
        typeConverter=TypeConverters.toInt,
    )

    def __init__(self) -> None:
        super().__init__()

    def getPruneStartEpoch(self) -> int:
        """Gets the value of pruneStartEpoch or its default value."""
        return self.getOrDefault(self.pruneStartEpoch)


class HasTruncateFactors(Params):
    """Mixin for param truncateFactors: whether the model predicts what pruned training fitted."""

    truncateFactors: Param[bool] = Param(
        Params._dummy(),
        "truncateFactors",
        "after training with pruning, zero each user's and item's factors from its first "
        "insignificant dimension on, so that the model's dot products equal the pruned "
        "predictions training fitted (true); false keeps the values there, which no rating has "
        "updated since the row's first insignificant entry appeared (the DP-MF authors' default "
        "prediction)",
        typeConverter=TypeConverters.toBoolean,
    )

    def __init__(self) -> None:
        super().__init__()

    def getTruncateFactors(self) -> bool:
        """Gets the value of truncateFactors or its default value."""
        return self.getOrDefault(self.truncateFactors)
