# The two entry points of the README. Both set up .venv first (scripts/setup.sh checks Python
# and Java), so they work on a fresh clone.
.PHONY: demo test test-native-blas setup

demo:
	scripts/setup.sh jobs
	.venv/bin/spark-gpu-mf train

test:
	scripts/setup.sh test,gpu,jobs
	.venv/bin/python -m pytest -q

# The suite again with Spark on a native BLAS/LAPACK (Debian's OpenBLAS, fetched into .venv, not
# installed), as on a machine with a system BLAS; `make test` uses what this machine has.
test-native-blas:
	scripts/setup.sh test,gpu,jobs
	SPARK_GPU_MF_TEST_BLAS=$$(scripts/native_blas.sh) .venv/bin/python -m pytest -q $(PYTEST_ARGS)

setup:
	scripts/setup.sh test,gpu,jobs
