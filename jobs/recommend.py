"""spark-submit entry point of the recommend job: `spark-submit jobs/recommend.py --help`.

The job's logic is spark_gpu_mf.jobs.recommend, inside the package, so that
`spark-gpu-mf recommend` runs the same code from any installation (with the project's Spark
configs).
"""

from spark_gpu_mf.jobs.recommend import main

if __name__ == "__main__":
    main()
