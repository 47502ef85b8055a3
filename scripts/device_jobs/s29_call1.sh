# Session 29's first device call (timeout_s 595): the GEMM formulations at retention's / GDN's
# widths, retention rows vs batched, then the other mixers' layer rows.
OUT=${OUT:-/tmp/out} NO_CACHE_RETURN=1 DEADLINE=${DEADLINE:-535} JOB_TIMEOUT=240 \
    bash scripts/device_jobs.sh scripts/device_jobs/s29_layers.txt serial
