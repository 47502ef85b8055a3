# Next session's first device call (timeout_s 595): deltanet's layer profile, then the other
# mixers' layer rows (s29_layers.txt; its e2e jobs ran in session 30 and are gone).
OUT=${OUT:-/tmp/out} NO_CACHE_RETURN=1 DEADLINE=${DEADLINE:-535} JOB_TIMEOUT=240 \
    bash scripts/device_jobs.sh scripts/device_jobs/s29_layers.txt serial
