"""The spark-submit jobs of spark_gpu_mf: ``train``, ``evaluate`` and ``recommend``.

Each job module has ``build_parser()`` (its argparse options, also shown by
``spark-gpu-mf <job> --help``) and ``main(argv=None)``; the module file itself is what
``spark-gpu-mf`` hands to ``spark-submit``, and the repository's ``jobs/*.py`` are thin entry
points that call the same ``main``. The logic lives here, inside the package, so that the
console entry point finds the jobs in any installation without paths into a source tree.
"""

JOB_NAMES = ("train", "evaluate", "recommend")
