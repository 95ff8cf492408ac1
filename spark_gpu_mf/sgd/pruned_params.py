"""PrunedMF's own params, declared like ``pyspark.ml.param.shared``: one mixin per param.

``pruningRate``, ``pruneStartEpoch``, ``optimizer``, ``truncateFactors`` and ``regrowth`` are
here. The generic SGD params (``rank``, ``ratingCol``, ``initStd``, ``numBlocks``) come from
``sgd/params.py``, shared with MascotMF, and Spark's own mixins (``HasMaxIter``,
``HasRegParam``, ``HasSeed``, ``HasStepSize``, ``_ALSModelParams``) are reused as they are.

Defaults are the DP-MF authors' (their LIBMF fork, papers.md "Implementation spec" B): rank 30,
20 epochs, step 0.1, lambda 0.1, N(0, 0.1) initialization, pruning rate 0.3 from epoch 2.
"""

from __future__ import annotations

from pyspark.ml.param import Param, Params, TypeConverters

from spark_gpu_mf.sgd.pruned_numba import OPTIMIZERS

__all__ = [
    "HasOptimizer",
    "HasPruneStartEpoch",
    "HasPruningRate",
    "HasRegrowth",
    "HasTruncateFactors",
]


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


class HasRegrowth(Params):
    """Mixin for param regrowth: whether pruned entries may grow back above the threshold."""

    regrowth: Param[bool] = Param(
        Params._dummy(),
        "regrowth",
        "keep updating each rating's first insignificant dimension (the one its pruned dot "
        "product stops at), so an entry that fell below the threshold can grow back and the "
        "row's dot products lengthen again (true); false is DP-MF's rule, under which that "
        "entry and every later one of the row are frozen for the rest of the fit",
        typeConverter=TypeConverters.toBoolean,
    )

    def __init__(self) -> None:
        super().__init__()

    def getRegrowth(self) -> bool:
        """Gets the value of regrowth or its default value."""
        return self.getOrDefault(self.regrowth)
