# Session 28's second device call (timeout_s 595).
OUT0=${OUT:-/tmp/out}
OUT=$OUT0/tests NO_CACHE_RETURN=1 DEADLINE=240 JOB_TIMEOUT=235 \
    bash scripts/device_jobs.sh scripts/device_jobs/s28_tests.txt parallel
OUT=$OUT0/layers NO_CACHE_RETURN=1 DEADLINE=290 JOB_TIMEOUT=285 \
    bash scripts/device_jobs.sh scripts/device_jobs/s28_layers2.txt serial
