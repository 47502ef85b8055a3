# Session 28's first device call: session 27's queued correctness jobs side by side (GDN hd64
# draws, the fp32 models, deltanet / kda whole-model), then the timed layer rows one by one.
#   bash scripts/device_jobs/s28_call1.sh     (timeout_s 595)
OUT0=${OUT:-/tmp/out}
OUT=$OUT0/tests NO_CACHE_RETURN=1 DEADLINE=270 JOB_TIMEOUT=260 \
    bash scripts/device_jobs.sh scripts/device_jobs/s27_call2.txt parallel
OUT=$OUT0/layers DEADLINE=240 JOB_TIMEOUT=235 \
    bash scripts/device_jobs.sh scripts/device_jobs/s28_layers.txt serial
