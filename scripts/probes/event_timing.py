"""The probes' timer: the median of CUDA-event times around each call of fn.

Not benchmarks/common.time_fn's host clock around a synchronise: the probes time single kernels
or steps of a few ~0.2-1 ms kernels, where the synchronise's tens of microseconds would blur
the few percent between the variants they compare."""

import statistics

import torch


def event_time_ms(fn, warmup: int = 5, iters: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)
