#!/usr/bin/env bash
# Spark GPU discovery script for spark_gpu_mf (spark.executor.resource.gpu.discoveryScript).
#
# Spark runs it once per executor (and on the driver if spark.driver.resource.gpu.* is set)
# and reads one JSON object from stdout, e.g. {"name": "gpu", "addresses": ["0", "1"]}.
# The addresses are nvidia-smi's device indexes; spark_gpu_mf maps them to CUDA ordinals,
# honouring CUDA_VISIBLE_DEVICES (see spark_gpu_mf.backends.gpu_address_to_ordinal).
# Same output as the example script that ships with Spark (examples/src/main/scripts/).
set -euo pipefail

if ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "getGpusResources.sh: nvidia-smi not found; this node has no NVIDIA driver" >&2
    exit 1
fi

indexes=$(nvidia-smi --query-gpu=index --format=csv,noheader)
addresses=$(printf '%s\n' "$indexes" | sed -e 's/[[:space:]]//g' -e '/^$/d' -e 's/.*/"&"/' | paste -sd, -)
echo "{\"name\": \"gpu\", \"addresses\": [${addresses}]}"
