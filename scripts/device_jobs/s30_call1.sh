# Next session's first device call (timeout_s 595): deltanet's layer profile, then the other
# mixers' layer rows (s30_layers.txt). The deltanet job compiles cold without a cache part for it.
OUT=${OUT:-/tmp/out} NO_CACHE_RETURN=1 DEADLINE=${DEADLINE:-535} JOB_TIMEOUT=${JOB_TIMEOUT:-240} \
    bash scripts/device_jobs.sh scripts/device_jobs/s30_layers.txt serial
