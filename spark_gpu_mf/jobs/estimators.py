"""The estimators the train job can run, and their params from the command line.

Params come from first-class options for the common ones (``--rank``, ``--max-iter``, ...) and
from a generic, repeatable ``--param name=value`` for everything else. Both are checked against
the chosen estimator's own Params: an unknown name or a value of the wrong type is a one-line
error before any data is read, and value ranges are checked by the estimator's ``fit``, with
Spark's messages.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
from typing import Any

from spark_gpu_mf.jobs.common import JobError

#: --estimator choice -> (class name, modules that may define it, first one wins).
ESTIMATORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "als": ("ALS", ("spark_gpu_mf",)),
    "mascot": ("MascotMF", ("spark_gpu_mf", "spark_gpu_mf.mascot", "spark_gpu_mf.sgd.mascot")),
    "pruned": ("PrunedMF", ("spark_gpu_mf", "spark_gpu_mf.pruned", "spark_gpu_mf.sgd.pruned")),
}

#: First-class options: argparse dest -> the Params they set, as alternatives: the first set
#: the estimator has all of is used (ALS has numUserBlocks/numItemBlocks, the SGD estimators
#: numBlocks).
FIRST_CLASS_PARAMS: dict[str, tuple[tuple[str, ...], ...]] = {
    "rank": (("rank",),),
    "max_iter": (("maxIter",),),
    "reg_param": (("regParam",),),
    "seed": (("seed",),),
    "implicit_prefs": (("implicitPrefs",),),
    "alpha": (("alpha",),),
    "nonnegative": (("nonnegative",),),
    "num_blocks": (("numUserBlocks", "numItemBlocks"), ("numBlocks",)),
    "backend": (("backend",),),
}


def add_estimator_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "estimator",
        "Options left out keep the estimator's defaults (for ALS: Spark's). --param sets any "
        "other param by name; --list-params shows them all for the chosen estimator.",
    )
    group.add_argument(
        "--estimator",
        choices=sorted(ESTIMATORS),
        default="als",
        help="als: alternating least squares, drop-in for Spark's ALS; mascot: SGD with FP16 "
        "parameters and group-wise precision switching (MASCOT); pruned: AdaGrad SGD with "
        "dynamic pruning of insignificant dimensions (DP-MF)",
    )
    group.add_argument("--rank", type=int, metavar="N", help="number of latent factors")
    group.add_argument("--max-iter", type=int, metavar="N", help="iterations (ALS) or epochs (SGD)")
    group.add_argument("--reg-param", type=float, metavar="LAMBDA", help="regularization (lambda)")
    group.add_argument("--seed", type=int, metavar="SEED", help="random seed of the estimator")
    group.add_argument(
        "--implicit-prefs",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="treat ratings as implicit feedback (counts, clicks), as Spark's implicitPrefs",
    )
    group.add_argument(
        "--alpha", type=float, metavar="ALPHA", help="confidence scale of implicit feedback"
    )
    group.add_argument(
        "--nonnegative",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="non-negative factors (ALS)",
    )
    group.add_argument(
        "--num-blocks",
        type=int,
        metavar="N",
        help="ALS: numUserBlocks and numItemBlocks; SGD: numBlocks (blocks per side)",
    )
    group.add_argument(
        "--backend",
        choices=("auto", "cupy", "numpy"),
        help="where executor math runs: auto uses a task's GPU if Spark gave it one",
    )
    group.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any param of the estimator, e.g. --param solver=cholesky --param "
        "cgIterations=5 (repeatable; applied after the options above)",
    )
    group.add_argument(
        "--list-params",
        action="store_true",
        help="print the chosen estimator's params with their defaults and exit",
    )


def estimator_class(name: str) -> type:
    """The class behind ``--estimator name``, or a one-line error if this install lacks it."""
    class_name, modules = ESTIMATORS[name]
    for module_name in modules:
        if importlib.util.find_spec(module_name) is None:
            continue
        # A module that exists but fails to import should say why: let that error through.
        found = getattr(importlib.import_module(module_name), class_name, None)
        if found is not None:
            return found
    import spark_gpu_mf

    raise JobError(
        f"--estimator {name}: spark_gpu_mf.{class_name} is not available in this installation "
        f"(spark_gpu_mf {spark_gpu_mf.__version__}); use --estimator als"
    )


def build_estimator(args: argparse.Namespace, columns: dict[str, str] | None = None):
    """The estimator with every param the arguments set, checked against its Params."""
    cls = estimator_class(args.estimator)
    estimator = cls()
    name = cls.__name__
    for dest, alternatives in FIRST_CLASS_PARAMS.items():
        value = getattr(args, dest, None)
        if value is None:
            continue
        option = "--" + dest.replace("_", "-")
        param_names = next(
            (names for names in alternatives if all(map(estimator.hasParam, names))), None
        )
        if param_names is None:
            raise JobError(
                f"{option} does not apply to --estimator {args.estimator} ({name} has no param "
                + " or ".join("/".join(names) for names in alternatives)
                + ")"
            )
        for param_name in param_names:
            _set(estimator, param_name, value, option)
    for assignment in args.param:
        param_name, raw = parse_assignment(assignment, "--param")
        if not estimator.hasParam(param_name):
            raise JobError(
                f"--param {assignment}: {name} has no param {param_name!r}; its params are: "
                + ", ".join(sorted(p.name for p in estimator.params))
            )
        _set(estimator, param_name, _candidates(raw), f"--param {assignment}")
    for role, column in (columns or {}).items():
        param_name = f"{role}Col"
        if estimator.hasParam(param_name):
            _set(estimator, param_name, column, f"--{role}-col")
    return estimator


def parse_assignment(text: str, option: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise JobError(f"{option} {text!r}: expected NAME=VALUE")
    return name.strip(), value.strip()


def _candidates(raw: str) -> list[Any]:
    """Readings of a command-line value, most specific first (the param's type decides)."""
    readings: list[Any] = []
    lowered = raw.lower()
    if lowered in ("true", "false"):
        readings.append(lowered == "true")
    for kind in (int, float):
        try:
            readings.append(kind(raw))
        except ValueError:
            pass
    if lowered in ("none", "null"):
        readings.append(None)
    readings.append(raw)
    return readings


def _set(estimator, param_name: str, value, option: str) -> None:
    """Set a param through its type converter; with a list, the first reading it accepts."""
    readings = value if isinstance(value, list) else [value]
    param = estimator.getParam(param_name)
    for reading in readings:
        try:
            estimator._set(**{param_name: reading})
            return
        except (TypeError, ValueError):
            continue
    shown = readings[-1]
    raise JobError(f"{option}: invalid value {shown!r} for param {param_name}: {param.doc}")


def describe_params(estimator) -> str:
    """``explainParams()`` of the estimator, one param per line, for ``--list-params``."""
    return f"{type(estimator).__name__} params:\n{estimator.explainParams()}"


def param_values(estimator) -> dict[str, Any]:
    """Every param's value (set or default), for the metrics JSON."""
    return {param.name: value for param, value in estimator.extractParamMap().items()}


def spark_als_like(estimator):
    """pyspark's own ``ALS`` with every param value ``estimator`` shares with it (all of
    Spark's ALS params; ours such as ``solver`` have no counterpart), for a comparison fit."""
    from pyspark.ml.recommendation import ALS as SparkALS

    twin = SparkALS()
    for param, value in estimator.extractParamMap().items():
        if twin.hasParam(param.name):
            twin.set(twin.getParam(param.name), value)
    return twin
