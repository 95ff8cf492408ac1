"""Params spark_gpu_mf adds to Spark's ALS params, declared like ``pyspark.ml.param.shared``.

One mixin per param: the ``Param`` as a class attribute, its default set in ``__init__`` and one
getter. Spark's own ALS params come from ``pyspark.ml.recommendation._ALSParams`` unchanged.

Values are checked when ``fit`` starts (as Spark's JVM validators do), by ``validate_params``.
"""

from __future__ import annotations

from typing import Any, Callable, Dict

from pyspark.ml.param import Param, Params, TypeConverters

from spark_gpu_mf.errors import illegal_argument

__all__ = [
    "HasSolver",
    "HasCgIterations",
    "HasPrecision",
    "HasBackend",
    "HasInitialModel",
    "HasIndexIds",
    "validate_params",
    "spark_invalid_value",
    "SOLVERS",
    "PRECISIONS",
    "BACKENDS",
]

SOLVERS = ("auto", "cholesky", "cg")
PRECISIONS = ("fp32", "fp16")
BACKENDS = ("auto", "cupy", "numpy")


class HasSolver(Params):
    """Mixin for param solver: how each row's normal equations are solved."""

    solver: "Param[str]" = Param(
        Params._dummy(),
        "solver",
        "how each row's normal equations are solved: 'cholesky' (exact, Spark's factors), 'cg' "
        "(conjugate gradient, warm-started from the previous factors) or 'auto' (cholesky up "
        "to rank 12, where it costs about what CG does, with precision 'fp32'; cg otherwise).",
        typeConverter=TypeConverters.toString,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(solver="auto")

    def getSolver(self) -> str:
        """Gets the value of solver or its default value."""
        return self.getOrDefault(self.solver)


class HasCgIterations(Params):
    """Mixin for param cgIterations: conjugate-gradient steps per half-iteration (>= 1)."""

    cgIterations: "Param[int]" = Param(
        Params._dummy(),
        "cgIterations",
        "conjugate-gradient steps per row and half-iteration when solver='cg' (>= 1).",
        typeConverter=TypeConverters.toInt,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(cgIterations=5)

    def getCgIterations(self) -> int:
        """Gets the value of cgIterations or its default value."""
        return self.getOrDefault(self.cgIterations)


class HasPrecision(Params):
    """Mixin for param precision: storage of the matrices the solver reads."""

    precision: "Param[str]" = Param(
        Params._dummy(),
        "precision",
        "storage of the normal-equation matrices the CG solver reads: 'fp32' or 'fp16' "
        "(arithmetic is float32 either way; fp16 halves the memory traffic on GPUs).",
        typeConverter=TypeConverters.toString,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(precision="fp32")

    def getPrecision(self) -> str:
        """Gets the value of precision or its default value."""
        return self.getOrDefault(self.precision)


class HasBackend(Params):
    """Mixin for param backend: where executor math runs."""

    backend: "Param[str]" = Param(
        Params._dummy(),
        "backend",
        "where executor math runs: 'auto' (the task's GPU if it has one, else NumPy), "
        "'cupy' (GPU, fail if none) or 'numpy' (CPU).",
        typeConverter=TypeConverters.toString,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(backend="auto")

    def getBackend(self) -> str:
        """Gets the value of backend or its default value."""
        return self.getOrDefault(self.backend)


def _to_initial_model(value: Any) -> Any:
    """``initialModel`` holds a path (str) or a fitted model (anything with ``rank``,
    ``userFactors`` and ``itemFactors``, e.g. our ``ALSModel`` or pyspark's)."""
    if isinstance(value, str):
        return value
    if all(hasattr(value, name) for name in ("rank", "userFactors", "itemFactors")):
        return value
    raise TypeError(
        f"initialModel must be a path (str) or a fitted ALSModel, got {type(value).__name__}"
    )


class HasInitialModel(Params):
    """Mixin for param initialModel: a fitted model (or its saved path) to warm-start from.

    No default: unset, a fit starts from Spark's random factors.
    """

    initialModel: "Param[Any]" = Param(
        Params._dummy(),
        "initialModel",
        "a fitted ALSModel, or the path of a saved one, whose factors start the fit: known "
        "user and item ids start from its factors, new ids from the usual random ones; its "
        "rank must equal rank. A few iterations then retrain incrementally.",
        typeConverter=_to_initial_model,
    )

    def getInitialModel(self) -> Any:
        """Gets the value of initialModel (raises when it is not set, like pyspark's getters
        of params without a default)."""
        return self.getOrDefault(self.initialModel)


class HasIndexIds(Params):
    """Mixin for param indexIds: whether ALS maps long and string ids to ints itself."""

    indexIds: "Param[bool]" = Param(
        Params._dummy(),
        "indexIds",
        "whether userCol and itemCol may hold ids of any integral or string type, which ALS "
        "indexes itself (the model speaks the original ids). False: Spark's rule, ids must be "
        "numeric values in Integer range.",
        typeConverter=TypeConverters.toBoolean,
    )

    def __init__(self) -> None:
        super().__init__()
        self._setDefault(indexIds=False)

    def getIndexIds(self) -> bool:
        """Gets the value of indexIds or its default value."""
        return self.getOrDefault(self.indexIds)


def spark_invalid_value(instance: Params, name: str, value: Any) -> Exception:
    """Spark's error for a param value its validator rejects."""
    shown = _spark_repr(value)
    return illegal_argument(f"{instance.uid} parameter {name} given invalid value {shown}.")


def _spark_repr(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def validate_params(instance: Params, rules: Dict[str, Callable[[Any], bool]]) -> None:
    """Check every param that has a rule, raising Spark's ``IllegalArgumentException`` text.

    Parameters
    ----------
    instance : Params
    rules : dict
        Param name to a predicate on its value (set or default).
    """
    for name, ok in rules.items():
        param = instance.getParam(name)
        if not instance.isDefined(param):
            continue
        value = instance.getOrDefault(param)
        if not ok(value):
            raise spark_invalid_value(instance, name, value)
