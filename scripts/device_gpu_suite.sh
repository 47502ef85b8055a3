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
# A previous call's cache comes back as <16 MB parts (the limit on files returned from $OUT);
# carry them in as .triton_cache_parts and they are unpacked here.
if compgen -G ".triton_cache_parts/triton_cache.tgz.part-*" > /dev/null; then
    cat .triton_cache_parts/triton_cache.tgz.part-* | tar xzf - -C "$PWD" && echo "triton cache restored: $(du -sh .triton_cache | cut -f1)"
fi
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
if [[ " $STEPS " == *" bench "* ]]; then
    timeout "${BENCH_TIMEOUT:-400}" bash -c "${BENCH_CMD:?set BENCH_CMD}" 2>&1 | tee "$OUT/bench.log" | tail -40
fi
# Bring the cache back at a third of its size: on a hit Triton loads the metadata json and the
# cubin, the IR stages are only for inspection. A group file listing a missing child is a miss,
# so the groups are rewritten to list what is kept.
python3 - "$TRITON_CACHE_DIR" <<'PY'
import json, os, pathlib, sys
DROP = (".llir", ".ptx", ".ttir", ".ttgir", ".source")
for grp in pathlib.Path(sys.argv[1]).glob("*/__grp__*.json"):
    data = json.loads(grp.read_text())
    kept = {name: path for name, path in data.get("child_paths", {}).items()
            if not name.endswith(DROP)}
    grp.write_text(json.dumps({**data, "child_paths": kept}))
for path in pathlib.Path(sys.argv[1]).glob("*/*"):
    if path.suffix in DROP:
        path.unlink()
PY
tar czf - -C "$PWD" .triton_cache 2>/dev/null | split -b 15m - "$OUT/triton_cache.tgz.part-"
ls -la "$OUT"
