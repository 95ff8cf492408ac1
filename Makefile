# The two entry points of the README. Both set up .venv first (scripts/setup.sh checks Python
# and Java), so they work on a fresh clone.
.PHONY: demo test setup

demo:
	scripts/setup.sh jobs
	.venv/bin/spark-gpu-mf train

test:
	scripts/setup.sh test,gpu,jobs
	.venv/bin/python -m pytest -q

setup:
	scripts/setup.sh test,gpu,jobs
