#!/usr/bin/env bash
# Set up .venv with spark_gpu_mf and the given extras (default: jobs), checking the prerequisites.
#
#   scripts/setup.sh              # runtime + jobs (plots)
#   scripts/setup.sh test,gpu,jobs
#
# Prerequisites a user must have: Python >= 3.10 and Java >= 17 (Spark 4 runs on the JVM).
# Re-running is cheap: the install is skipped while pyproject.toml and the extras are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-jobs}"
python="${PYTHON:-python3}"

die() { echo "setup: $*" >&2; exit 1; }

command -v "$python" >/dev/null || die "Python 3.10 or newer is required ('$python' not found; set PYTHON=...)."
"$python" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "Python 3.10 or newer is required (found $("$python" --version 2>&1))."

java_bin="java"
[ -n "${JAVA_HOME:-}" ] && java_bin="$JAVA_HOME/bin/java"
command -v "$java_bin" >/dev/null \
  || die "Java 17 or newer is required by Spark 4, and no 'java' was found on PATH or in JAVA_HOME. Install a JDK/JRE 17+ (e.g. 'apt-get install openjdk-17-jre-headless') and retry."
java_version=$("$java_bin" -version 2>&1 | awk -F'"' '/version/ {print $2; exit}')
java_major=${java_version%%.*}
[ "$java_major" = "1" ] && java_major=$(echo "$java_version" | cut -d. -f2)
[ -n "$java_major" ] && [ "$java_major" -ge 17 ] 2>/dev/null \
  || die "Java 17 or newer is required by Spark 4 (found '$java_version' from $java_bin). Install Java 17+ or point JAVA_HOME at one."

[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=".venv/.installed-$( (cat pyproject.toml; echo "$extras") | sha1sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -e ".[${extras}]"
  rm -f .venv/.installed-*
  touch "$stamp"
fi
# Load the compiled loops an ALS fit calls, compiling into Numba's on-disk cache whatever an
# install or a source change left uncompiled, so that no fit (make demo's first included) does.
.venv/bin/python -c 'from spark_gpu_mf.executor.single_task import compile_kernels; compile_kernels()'
