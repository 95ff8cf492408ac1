"""spark-submit entry point of the train job: `spark-submit jobs/train.py --help`.

The job's logic is spark_gpu_mf.jobs.train, inside the package, so that `spark-gpu-mf train` runs
the same code from any installation (with the project's Spark configs).
"""

from spark_gpu_mf.jobs.train import main

if __name__ == "__main__":
    main()
