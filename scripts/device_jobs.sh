#!/usr/bin/env bash
# On the lent GPU machine (the workplace's `device` tool): install the carried wheels (.whl),
# run the jobs of a job file and bring back logs, results and fla's Triton cache under $OUT.
#
#   bash scripts/device_jobs.sh scripts/device_jobs/correctness.txt parallel
#   bash scripts/device_jobs.sh scripts/device_jobs/bench.txt serial
#
# Job file: one job per line, "name: command" ('#' starts a comment). A job's command runs in
# the repo root with $OUT, $JOB_OUT (= $OUT/jobs/name, for its result files), a free MASTER_PORT
# and LINEAR_MOE_GPU_RESULTS (the GPU tests append their measured errors there) set.
#   parallel: all jobs at once. For correctness runs, whose first minutes are fla's Triton
#             compile + autotune: single-threaded per process, and the machine has 16 cores.
#             Autotune picks made under contention are not cached for later (timed) runs.
#   serial:   one after another, for timings (nothing else on the GPU).
# JOB_TIMEOUT (s, default 540) bounds each job; a job cut off keeps what its log printed.
# DEADLINE (s after this script starts, default 480) bounds them all: a job gets at most the time
# left before it and is skipped when less than 30 s is left, so the results and the Triton cache
# are packed before the device tool's own limit (600 s a call) kills everything (session 6 lost
# a call's cache and rows that way). Set DEADLINE to the run's timeout_s minus ~100 s.
set -uo pipefail
JOB_FILE=${1:?job file}
MODE=${2:-parallel}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/jobs"
START=$SECONDS
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 PYTHON=python3
# The cache lives in the (git-ignored) repo root, so a warm machine keeps it between calls; a
# fresh one gets it from the <16 MB parts a previous call brought back (carry .triton_cache_parts).
export TRITON_CACHE_DIR=$PWD/.triton_cache
if [[ ! -d $TRITON_CACHE_DIR ]] && compgen -G ".triton_cache_parts/triton_cache.tgz.part-*" >/dev/null; then
    cat .triton_cache_parts/triton_cache.tgz.part-* | tar xzf - -C "$PWD"
fi
mkdir -p "$TRITON_CACHE_DIR"
echo "triton cache at start: $(du -sh "$TRITON_CACHE_DIR" | cut -f1)"
{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    python3 -c "import sys, torch, triton, fla, megatron.core as m; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'fla', fla.__version__, 'megatron-core', m.__version__)"
} | tee "$OUT/versions.txt"

run_job() {  # name command port
    local name=$1 cmd=$2 port=$3 t0=$SECONDS rc left limit
    left=$(( ${DEADLINE:-480} - (SECONDS - START) ))
    if (( left < 30 )); then
        echo "$name skipped: ${left}s left before DEADLINE" | tee -a "$OUT/summary.txt"
        return
    fi
    limit=$(( left < ${JOB_TIMEOUT:-540} ? left : ${JOB_TIMEOUT:-540} ))
    export JOB_OUT=$OUT/jobs/$name MASTER_PORT=$port
    export LINEAR_MOE_GPU_RESULTS=$JOB_OUT/gpu_results.jsonl  # the GPU tests' rows
    mkdir -p "$JOB_OUT"
    timeout "$limit" bash -c "$cmd" > "$JOB_OUT/log.txt" 2>&1 < /dev/null
    rc=$?
    echo "$name rc=$rc $((SECONDS - t0))s" | tee -a "$OUT/summary.txt"
}

port=29600
while IFS= read -r line; do
    line=${line%%#*}
    [[ $line =~ ^[[:space:]]*([A-Za-z0-9_.-]+):[[:space:]]*(.+)$ ]] || continue
    port=$((port + 7))
    if [[ $MODE == parallel ]]; then
        TRITON_CACHE_AUTOTUNING=0 run_job "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" $port &
    else
        TRITON_CACHE_AUTOTUNING=1 run_job "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]}" $port
    fi
done < "$JOB_FILE"
wait
echo "all jobs done after $((SECONDS - START))s"
# One line per failing/passing test and every benchmark row, for the reply's output tail.
grep -hE "^(PASSED|FAILED|ERROR)|^ROW |passed|failed" "$OUT"/jobs/*/log.txt | cut -c1-300 | tail -150
tar czf "$OUT/jobs.tgz" -C "$OUT" jobs summary.txt && rm -rf "$OUT/jobs"

# Bring the cache back at a third of its size: on a hit Triton loads the metadata json and the
# binary, the IR stages are only for inspection. A group file listing a missing child is a
# miss, so the groups are rewritten to list what is kept. Over 75 MB it stays behind (the
# limit on what comes back is 8 files of 16 MB).
python3 - "$TRITON_CACHE_DIR" <<'PY'
import json, pathlib, sys
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
tar czf /tmp/triton_cache.tgz -C "$PWD" .triton_cache
size=$(stat -c %s /tmp/triton_cache.tgz)
echo "triton cache tgz: $((size / 1048576)) MB"
if (( size < 75 * 1048576 )) && [[ -z ${NO_CACHE_RETURN:-} ]]; then  # set: a session's last call
    split -b 15m /tmp/triton_cache.tgz "$OUT/triton_cache.tgz.part-"
fi
ls -la "$OUT"
