# Ran in session 30 (its e2e jobs; the rest was cut by the deadline); next: s30_call1.sh.
# Was: item 2's e2e on this tree, then the other mixers' layer rows (s29_layers.txt).
OUT=${OUT:-/tmp/out} NO_CACHE_RETURN=1 DEADLINE=${DEADLINE:-535} JOB_TIMEOUT=240 \
    bash scripts/device_jobs.sh scripts/device_jobs/s29_layers.txt serial
