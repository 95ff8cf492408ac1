"""The Examples in the estimators' docstrings run as written (they double as the drop-in proof)."""

from __future__ import annotations

import doctest

import pytest

import spark_gpu_mf.als


@pytest.mark.parametrize("module", [spark_gpu_mf.als], ids=lambda m: m.__name__)
def test_docstring_examples(spark, tmp_path, module):
    from spark_gpu_mf import ALS, ALSModel

    globs = {"spark": spark, "temp_path": str(tmp_path), "ALS": ALS, "ALSModel": ALSModel}
    flags = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    failures, attempted = doctest.testmod(module, globs=globs, optionflags=flags, verbose=False)
    assert attempted > 5
    assert failures == 0


def test_sparks_own_docstring_examples_run_on_our_classes(spark, tmp_path):
    """pyspark's ALS Examples, unchanged, with our classes and default params: Spark's printed
    predictions and recommendations (to the digits it prints) and its save/load round trip."""
    import pyspark.ml.recommendation as spark_recommendation

    from spark_gpu_mf import ALS, ALSModel

    globs = {"spark": spark, "temp_path": str(tmp_path), "ALS": ALS, "ALSModel": ALSModel}
    docstring = spark_recommendation.ALS.__doc__
    test = doctest.DocTestParser().get_doctest(docstring, globs, "pyspark ALS", None, 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test)
    assert runner.tries > 30
    assert runner.failures == 0
