"""Real rating data for the benchmarks: MovieLens 100K from the ``recbole==1.2.1`` wheel.

The GroupLens archive is not on a package registry, but RecBole's wheel ships ML-100K as
``recbole/dataset_example/ml-100k/ml-100k.inter``: ``u.data``'s 100,000 lines under a one-line
RecBole header. Benchmarks fetch the wheel with ``pip download`` (no install, no dependencies)
once into a cache directory and read the ratings with :func:`spark_gpu_mf.datasets.read_movielens`.
Nothing here is committed to the repository or needed by the tests.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

RECBOLE_REQUIREMENT = "recbole==1.2.1"
ML_100K_MEMBER = "recbole/dataset_example/ml-100k/ml-100k.inter"
ML_100K_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
ML_100K_RATINGS = 100_000


def default_cache_dir() -> str:
    """``$SPARK_GPU_MF_DATA_DIR``, else ``~/.cache/spark_gpu_mf``."""
    return os.environ.get("SPARK_GPU_MF_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "spark_gpu_mf"
    )


def movielens_100k_path(cache_dir: str | None = None) -> str:
    """Local path of MovieLens 100K as a ``u.data`` file (``user<TAB>item<TAB>rating<TAB>time``).

    Downloads the RecBole wheel on first use (one ``pip download``, ~2 MB), extracts the ratings
    and drops RecBole's header line, so the file reads with ``read_movielens(..., "ml-100k")``.

    Raises
    ------
    RuntimeError
        pip could not fetch the wheel (no package registry reachable), or the wheel does not hold
        the ratings file as expected.
    """
    cache_dir = cache_dir or default_cache_dir()
    target = os.path.join(cache_dir, "ml-100k", "u.data")
    if os.path.isfile(target):
        return target
    wheel = _recbole_wheel(os.path.join(cache_dir, "wheels"))
    with zipfile.ZipFile(wheel) as archive:
        try:
            text = archive.read(ML_100K_MEMBER).decode("utf-8")
        except KeyError:
            raise RuntimeError(f"{wheel} holds no {ML_100K_MEMBER}") from None
    header, _, body = text.partition("\n")
    lines = body.splitlines()
    if header.strip() != ML_100K_HEADER or len(lines) != ML_100K_RATINGS:
        raise RuntimeError(
            f"{ML_100K_MEMBER} in {wheel} is not the expected ML-100K file: header "
            f"{header.strip()!r}, {len(lines)} lines (expected {ML_100K_HEADER!r}, "
            f"{ML_100K_RATINGS})"
        )
    os.makedirs(os.path.dirname(target), exist_ok=True)
    partial = f"{target}.{os.getpid()}.partial"
    with open(partial, "w", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    os.replace(partial, target)  # never a half-written file under the final name
    return target


def _recbole_wheel(wheel_dir: str) -> str:
    pattern = os.path.join(wheel_dir, "recbole-1.2.1-*.whl")
    found = glob.glob(pattern)
    if not found:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += ["--dest", wheel_dir, RECBOLE_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True)
        found = glob.glob(pattern)
        if result.returncode != 0 or not found:
            raise RuntimeError(
                f"could not download {RECBOLE_REQUIREMENT} (for MovieLens 100K) with pip: "
                + (result.stderr.strip().splitlines() or ["no wheel written"])[-1]
            )
    return found[0]
