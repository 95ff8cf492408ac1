"""Params of the SGD estimators, declared like ``pyspark.ml.param.shared``: one mixin per param.

Generic SGD params (``rank``, ``ratingCol``, ``initStd``, ``numBlocks``) first: they have no
default here because each estimator takes its paper's. Then MASCOT's own, with the defaults of
the authors' runs (papers.md, "Implementation spec" A): ``decay`` 0.1, ``storage`` "mascot",
100 user and 100 item groups, ``sampleRatio`` 0.05, ``checkInterval`` 2, ``errorThreshold`` 20,
``firstCheckEpoch`` 5. Spark's own mixins (``HasMaxIter``, ``HasRegParam``, ``HasSeed``,
``HasStepSize``, ``HasValidationIndicatorCol``, ``_ALSModelParams``) are reused as they are.

Values are checked when ``fit`` starts (``spark_gpu_mf.params.validate_params``).
"""

from __future__ import annotations

from pyspark.ml.param import Param, Params, TypeConverters

__all__ = [
    "STORAGES",
    "HasCheckInterval",
    "HasDecay",
    "HasErrorThreshold",
    "HasFirstCheckEpoch",
    "HasInitStd",
    "HasNumBlocks",
    "HasNumItemGroups",
    "HasNumUserGroups",
    "HasRank",
    "HasRatingCol",
    "HasRoundingThreshold",
    "HasSampleRatio",
    "HasStorage",
]

STORAGES = ("fp32", "fp16", "mascot")


class HasRank(Params):
    """Mixin for param rank: number of latent factors (>= 1)."""

    rank: Param[int] = Param(
        Params._dummy(),
        "rank",
        "rank of the factorization (>= 1)",
        typeConverter=TypeConverters.toInt,
    )

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

    def getRatingCol(self) -> str:
        """Gets the value of ratingCol or its default value."""
        return self.getOrDefault(self.ratingCol)


class HasInitStd(Params):
    """Mixin for param initStd: standard deviation of the normal initial factors (> 0)."""

    initStd: Param[float] = Param(
        Params._dummy(),
        "initStd",
        "standard deviation of the N(0, initStd^2) initial factors (> 0)",
        typeConverter=TypeConverters.toFloat,
    )

    def getInitStd(self) -> float:
        """Gets the value of initStd or its default value."""
        return self.getOrDefault(self.initStd)


class HasNumBlocks(Params):
    """Mixin for param numBlocks: DSGD blocks per side (>= 0; 0: one per task slot)."""

    numBlocks: Param[int] = Param(
        Params._dummy(),
        "numBlocks",
        "number of user blocks and of item blocks for stratified SGD (>= 0; 0 means one per "
        "task slot, SparkContext.defaultParallelism): an epoch is numBlocks sub-epochs of "
        "numBlocks parallel tasks. The fit is a function of the seed, the data and numBlocks.",
        typeConverter=TypeConverters.toInt,
    )

    def getNumBlocks(self) -> int:
        """Gets the value of numBlocks or its default value."""
        return self.getOrDefault(self.numBlocks)


class HasDecay(Params):
    """Mixin for param decay: learning-rate decay of ``stepSize / (1 + decay * epoch^1.5)``."""

    decay: Param[float] = Param(
        Params._dummy(),
        "decay",
        "learning-rate decay (>= 0): epoch e (0-based) uses stepSize / (1 + decay * e^1.5)",
        typeConverter=TypeConverters.toFloat,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(decay=0.1)

    def getDecay(self) -> float:
        """Gets the value of decay or its default value."""
        return self.getOrDefault(self.decay)


class HasStorage(Params):
    """Mixin for param storage: precision the factors are stored in during training."""

    storage: Param[str] = Param(
        Params._dummy(),
        "storage",
        "precision of the factors during training: 'fp32', 'fp16' (MASCOT's m-quantization: "
        "half the memory traffic, arithmetic in float32) or 'mascot' (fp16 plus g-switching: "
        "groups of users/items whose updates FP16 rounding swallows switch to fp32 for good). "
        "Supported values: " + ", ".join(f"'{s}'" for s in STORAGES) + ".",
        typeConverter=TypeConverters.toString,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(storage="mascot")

    def getStorage(self) -> str:
        """Gets the value of storage or its default value."""
        return self.getOrDefault(self.storage)


class HasNumUserGroups(Params):
    """Mixin for param numUserGroups: g-switching groups of users (>= 1)."""

    numUserGroups: Param[int] = Param(
        Params._dummy(),
        "numUserGroups",
        "most groups of users, by rating count, that switch precision together (>= 1)",
        typeConverter=TypeConverters.toInt,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(numUserGroups=100)

    def getNumUserGroups(self) -> int:
        """Gets the value of numUserGroups or its default value."""
        return self.getOrDefault(self.numUserGroups)


class HasNumItemGroups(Params):
    """Mixin for param numItemGroups: g-switching groups of items (>= 1)."""

    numItemGroups: Param[int] = Param(
        Params._dummy(),
        "numItemGroups",
        "most groups of items, by rating count, that switch precision together (>= 1)",
        typeConverter=TypeConverters.toInt,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(numItemGroups=100)

    def getNumItemGroups(self) -> int:
        """Gets the value of numItemGroups or its default value."""
        return self.getOrDefault(self.numItemGroups)


class HasSampleRatio(Params):
    """Mixin for param sampleRatio: share of updates measured in a check epoch, in (0, 1]."""

    sampleRatio: Param[float] = Param(
        Params._dummy(),
        "sampleRatio",
        "fraction of every worker's updates, at the end of a check epoch, whose update vectors "
        "are summed per group to estimate the quantization error, in (0, 1]",
        typeConverter=TypeConverters.toFloat,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(sampleRatio=0.05)

    def getSampleRatio(self) -> float:
        """Gets the value of sampleRatio or its default value."""
        return self.getOrDefault(self.sampleRatio)


class HasCheckInterval(Params):
    """Mixin for param checkInterval: epochs between g-switching checks (>= 1)."""

    checkInterval: Param[int] = Param(
        Params._dummy(),
        "checkInterval",
        "epochs between two g-switching checks (>= 1)",
        typeConverter=TypeConverters.toInt,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(checkInterval=2)

    def getCheckInterval(self) -> int:
        """Gets the value of checkInterval or its default value."""
        return self.getOrDefault(self.checkInterval)


class HasErrorThreshold(Params):
    """Mixin for param errorThreshold: relative error growth that switches a group (> 0)."""

    errorThreshold: Param[float] = Param(
        Params._dummy(),
        "errorThreshold",
        "a FP16 group switches to FP32 when its quantization-error estimate exceeds this "
        "multiple of its first measurement (> 0)",
        typeConverter=TypeConverters.toFloat,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(errorThreshold=20.0)

    def getErrorThreshold(self) -> float:
        """Gets the value of errorThreshold or its default value."""
        return self.getOrDefault(self.errorThreshold)


class HasFirstCheckEpoch(Params):
    """Mixin for param firstCheckEpoch: first 0-based epoch measured by g-switching (>= 0)."""

    firstCheckEpoch: Param[int] = Param(
        Params._dummy(),
        "firstCheckEpoch",
        "first epoch (0-based) whose quantization error is measured; it sets every group's "
        "baseline, so switches happen from the next check on (>= 0)",
        typeConverter=TypeConverters.toInt,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(firstCheckEpoch=5)

    def getFirstCheckEpoch(self) -> int:
        """Gets the value of firstCheckEpoch or its default value."""
        return self.getOrDefault(self.firstCheckEpoch)


class HasRoundingThreshold(Params):
    """Mixin for param roundingThreshold: our rounding switch rule (>= 0; 0 turns it off)."""

    roundingThreshold: Param[float] = Param(
        Params._dummy(),
        "roundingThreshold",
        "a FP16 group also switches to FP32 when float16 rounding changes more than this share "
        "of its sampled updates (sum |store(p + lr g) - (p + lr g)|^2 / sum |lr g|^2 in a check "
        "epoch; about 1 when updates fall below half a float16 step and are lost), besides the "
        "paper's errorThreshold rule (>= 0; 0, the default, leaves the paper's rule alone)",
        typeConverter=TypeConverters.toFloat,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(roundingThreshold=0.0)

    def getRoundingThreshold(self) -> float:
        """Gets the value of roundingThreshold or its default value."""
        return self.getOrDefault(self.roundingThreshold)
