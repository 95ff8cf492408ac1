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
