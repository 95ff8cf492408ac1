"""Exceptions raised by spark_gpu_mf, with Spark's wording where Spark has one."""

from __future__ import annotations


class SingularMatrixError(ArithmeticError):
    """A normal equation is not positive definite (only possible with ``regParam=0``).

    The message is Spark's ``SingularMatrixException`` text for ``LAPACK.dppsv``.
    """

    @classmethod
    def from_leading_minor(cls, order: int) -> "SingularMatrixError":
        return cls(
            f"LAPACK.dppsv returned {order} because A is not positive definite. Is A derived "
            "from a singular matrix (e.g. collinear column values)?"
        )


class InconsistentBlocksError(RuntimeError):
    """The blocks of a half-iteration do not match: the input changed between two reads.

    Spark's message for the same failure (SPARK-28927).
    """

    def __init__(self) -> None:
        super().__init__(
            "A failure detected when matching In/Out blocks of users/items. Because at least one "
            "In/Out block RDD is found to be nondeterministic now, the issue is probably caused by "
            "nondeterministic input data. You can try to checkpoint training data to make it "
            "deterministic. If you do `repartition` + `sample` or `randomSplit`, you can also try "
            "to sort it before `sample` or `randomSplit` to make it deterministic."
        )


class DamagedModelError(ValueError):
    """A saved model directory cannot be loaded; the message names what is missing or wrong."""


class BackendUnavailableError(RuntimeError):
    """``backend="cupy"`` was asked for but no usable GPU or CuPy installation was found."""


def illegal_argument(message: str) -> Exception:
    """``pyspark.errors.IllegalArgumentException`` with Spark's text: what Spark's JVM-side checks
    raise in PySpark, so ``except IllegalArgumentException`` catches ours and Spark's alike."""
    from pyspark.errors import IllegalArgumentException

    return IllegalArgumentException(message=message)
