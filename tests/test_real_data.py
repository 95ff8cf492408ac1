"""The MovieLens 100K reader of the benchmarks, on a stand-in wheel (no download in tests)."""

import os
import zipfile

import pytest

from spark_gpu_mf.jobs import real_data


def _fake_wheel(cache_dir, lines, header=real_data.ML_100K_HEADER):
    wheel_dir = os.path.join(cache_dir, "wheels")
    os.makedirs(wheel_dir)
    path = os.path.join(wheel_dir, "recbole-1.2.1-py3-none-any.whl")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(real_data.ML_100K_MEMBER, "\n".join([header] + lines) + "\n")
    return path


def test_extracts_u_data_without_the_header(tmp_path, monkeypatch):
    monkeypatch.setattr(real_data, "ML_100K_RATINGS", 3)
    lines = ["196\t242\t3\t881250949", "186\t302\t3\t891717742", "22\t377\t1\t878887116"]
    _fake_wheel(str(tmp_path), lines)
    path = real_data.movielens_100k_path(str(tmp_path))
    with open(path, encoding="utf-8") as f:
        assert f.read().splitlines() == lines
    assert real_data.movielens_100k_path(str(tmp_path)) == path  # cached, not re-extracted


@pytest.mark.parametrize(
    "header, lines",
    [
        ("user_id:token\titem_id:token", ["1\t2\t3\t4"] * 3),
        (real_data.ML_100K_HEADER, ["1\t2\t3\t4"]),
    ],
)
def test_refuses_an_unexpected_file(tmp_path, monkeypatch, header, lines):
    monkeypatch.setattr(real_data, "ML_100K_RATINGS", 3)
    _fake_wheel(str(tmp_path), lines, header=header)
    with pytest.raises(RuntimeError, match="not the expected ML-100K file"):
        real_data.movielens_100k_path(str(tmp_path))
    assert not os.path.exists(os.path.join(str(tmp_path), "ml-100k", "u.data"))
