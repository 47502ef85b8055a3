# Session 27's first device call: the correctness jobs side by side (the Triton compiles share
# the 16 cores), then the timed layer jobs one after another, each with its own DEADLINE.
#   bash scripts/device_jobs/s27_call1.sh     (timeout_s 580)
OUT0=${OUT:-/tmp/out}
OUT=$OUT0/tests NO_CACHE_RETURN=1 DEADLINE=230 JOB_TIMEOUT=220 \
    bash scripts/device_jobs.sh scripts/device_jobs/s27_next.txt parallel
OUT=$OUT0/layers DEADLINE=270 JOB_TIMEOUT=260 \
    bash scripts/device_jobs.sh scripts/device_jobs/s27_layers.txt serial
