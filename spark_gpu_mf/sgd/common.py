"""What the two SGD trainers (``mascot_train``, ``pruned_train``) share: the fields of a fit's
job, its result, and the executor-side kernel choice."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union

from pyspark.sql import DataFrame

from spark_gpu_mf.executor.runtime import BackendChoice, executor_backend
from spark_gpu_mf.summary import TrainingSummary

__all__ = ["SGDJob", "SGDResult", "task_uses_gpu"]


@dataclass(frozen=True, kw_only=True)
class SGDJob:
    """Everything an SGD fit needs, resolved from params and confs on the driver.

    ``num_blocks`` 0 leaves the number of DSGD blocks to the trainer (one per task slot, or one
    for a fit in the driver); ``backend`` is ``BackendChoice.for_session``'s, which the tasks
    hand to ``executor_backend`` as ALS's do.
    """

    rank: int
    max_iter: int
    step_size: float
    reg_param: float
    init_std: float
    num_blocks: int
    seed: int
    backend: BackendChoice = field(default_factory=lambda: BackendChoice("numpy"))


@dataclass
class SGDResult:
    """A fit's factor DataFrames (``id``, ``features``) and its summary."""

    user_factors: DataFrame
    item_factors: DataFrame
    summary: TrainingSummary


def task_uses_gpu(choice: Union[BackendChoice, str]) -> bool:
    """Whether this Spark task runs on CuPy (``executor_backend`` chose its GPU); executors only.

    ``choice`` is the driver's ``BackendChoice`` (or a plain backend name, as
    ``executor_backend`` takes). ``"numpy"`` answers without importing the backends, which is
    what every CPU task takes.
    """
    if isinstance(choice, str):
        choice = BackendChoice(choice)
    if choice.requested == "numpy":
        return False
    return executor_backend(choice).__name__.endswith("cupy_backend")
