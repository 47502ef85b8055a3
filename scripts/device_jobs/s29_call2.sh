# Session 29's split-K call (timeout_s = DEADLINE + ~60).
OUT=${OUT:-/tmp/out} NO_CACHE_RETURN=1 DEADLINE=${DEADLINE:-270} JOB_TIMEOUT=150 \
    bash scripts/device_jobs.sh scripts/device_jobs/s29_split_k.txt serial
