#!/usr/bin/env bash
# On the lent GPU machine (the workplace's `device` tool): install the carried wheels (.whl),
# run the GPU test suite and the main job, and leave logs + Triton's cache under $OUT.
#   STEPS="tests main" (default) | "tests" | "main"
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export TRITON_CACHE_DIR=$PWD/.triton_cache TRITON_CACHE_AUTOTUNING=1
mkdir -p "$TRITON_CACHE_DIR"
STEPS=${STEPS:-tests main}
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, triton, fla, megatron.core as m; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, 'megatron-core', m.__version__)"
} | tee "$OUT/versions.txt"

if [[ " $STEPS " == *" tests "* ]]; then
    LINEAR_MOE_GPU_RESULTS=$OUT/gpu_results.jsonl timeout "${TEST_TIMEOUT:-540}" python3 -m pytest -q -m gpu \
        "${TEST_SELECT:-tests/gpu}" ${PYTEST_K:+-k "$PYTEST_K"} -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" | tail -40
fi
if [[ " $STEPS " == *" main "* ]]; then
    OUTPUT_BASEPATH=/tmp/lm_out PYTHON=python3 LOG_INTERVAL=10 timeout 400 \
        bash examples/linear_moe_qwen2/run_pretrain_qwen.sh > "$OUT/main_job.log" 2>&1
    echo "main job rc=$?"
    grep -E "linear_moe|iteration +[0-9]+/|saved checkpoint" "$OUT/main_job.log" | cut -c1-230 | tail -25
fi
tar czf "$OUT/triton_cache.tgz" -C "$PWD" .triton_cache 2>/dev/null
ls -la "$OUT"
