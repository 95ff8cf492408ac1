#!/usr/bin/env bash
# Fetch Debian's OpenBLAS (and the libgfortran it needs) into .venv/native-blas without
# installing it system-wide, and print that directory. With
#
#   SPARK_GPU_MF_TEST_BLAS=$(scripts/native_blas.sh) .venv/bin/python -m pytest
#
# the test session's Spark loads it as its native BLAS/LAPACK (dev.ludovic.netlib's JNIBLAS and
# JNILAPACK), as on a user's machine with a system BLAS; `make test-native-blas` does this.
# Installing libopenblas0-pthread instead would change every process's libblas.so.3.
set -euo pipefail
cd "$(dirname "$0")/.."
target=".venv/native-blas"
if [ ! -e "$target/libblas.so.3" ]; then
  command -v apt-get >/dev/null || { echo "native_blas: needs apt-get (Debian/Ubuntu)" >&2; exit 1; }
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  (cd "$work" && apt-get download libopenblas0-pthread libgfortran5 >/dev/null 2>&1) \
    || { echo "native_blas: apt-get download libopenblas0-pthread libgfortran5 failed" >&2; exit 1; }
  for deb in "$work"/*.deb; do dpkg-deb -x "$deb" "$work/root"; done
  openblas=$(dirname "$(find "$work/root" -path '*openblas-pthread/libblas.so.3' | head -1)")
  gfortran=$(find "$work/root" -name libgfortran.so.5 | head -1)
  mkdir -p "$target"
  cp -L "$openblas"/{libblas.so.3,liblapack.so.3,libopenblas.so.0} "$gfortran" "$target"/
fi
cd "$target" && pwd
