"""spark-submit entry point of the evaluate job: `spark-submit jobs/evaluate.py --help`.

The job's logic is spark_gpu_mf.jobs.evaluate, inside the package, so that
`spark-gpu-mf evaluate` runs the same code from any installation (with the project's Spark configs).
"""

from spark_gpu_mf.jobs.evaluate import main

if __name__ == "__main__":
    main()
