"""Short-convolution benchmark: fla's Triton ``causal_conv1d`` against our Triton kernel
(``linear_moe.ops.causal_conv``, ShortConvolution's default on CUDA for widths up to 4, whose
backward walks the rows once with the last rows in registers) and the same depthwise causal conv
+ SiLU written as W shifted multiply-adds and compiled by ``torch.compile`` (Inductor fuses them
into one kernel each way), fwd+bwd, bf16, on the GDN layer bench's channel counts, for a
contiguous input and for the strided slice of a fused in-projection (``LinearMixer.project``).
Measured: compiled 0.84-1.05x fla (H200); ours (backward v4) half fla's device time fwd+bwd
(H100, 2026-12-05, --kernels), so the mixers take it (benchmarks/NOTES.md, eighth session).

The fourth H200 session's GDN layer profile put 4.2 of its 6.2 ms overhead in fla's conv, its
backward at ~1 ms per 200 MB tensor (about 5x the bandwidth bound). This measures the
alternative before anything changes in the model.

    python benchmarks/conv_bench.py --out $OUT/conv        # GPU
    python benchmarks/conv_bench.py --toy                  # CPU: checks the math, no timing claim
    python benchmarks/conv_bench.py --kernels --out $OUT/conv_kernels
        # each conv kernel's device time (profiler) and bandwidth against a plain copy's

The default timing is wall time per synchronised step, which for a ~0.5 ms op includes the
host's launch latency; ``--kernels`` reports device time per kernel instead.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_run_args, device, emit, time_fn, write_results  # noqa: E402


def shifted_conv_silu(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [b, s, c], weight [c, W] -> silu(y), y[t] = sum_j weight[:, j] x[t - (W-1) + j] (the taps
    of ShortConvolution), in fp32, cast back to x's dtype."""
    width, s = weight.shape[-1], x.shape[1]
    xp = F.pad(x.float(), (0, 0, width - 1, 0))  # zeros before the first token
    w = weight.float()
    y = sum(xp[:, j:j + s] * w[:, j] for j in range(width))
    return F.silu(y).to(x.dtype)


def _input(batch, seq, channels, strided, dtype):
    if strided:  # a slice of a wider projection output, as q/k/v of the fused in-GEMM
        return torch.randn(batch, seq, 2 * channels, device=device(), dtype=dtype)[..., :channels]
    return torch.randn(batch, seq, channels, device=device(), dtype=dtype)


def bench(impl, batch, seq, channels, strided, dtype, warmup, iters, width=4):
    """fla = ShortConvolution with fla's kernel; ours = the same module with
    linear_moe.ops.causal_conv (the default); torch_conv1d = its CPU path."""
    from linear_moe.layers import ShortConvolution

    torch.manual_seed(0)  # the same x, weight and dy for every impl
    conv = ShortConvolution(channels, width, 0, 1, dtype, fused=impl in ("fla", "ours"),
                            kernel="ours" if impl == "ours" else "fla").to(device())
    x = _input(batch, seq, channels, strided, dtype).requires_grad_()
    weight = conv.weight
    if impl == "compiled":  # on the CPU eager: the smoke run checks the math, not Inductor
        compiled = (torch.compile(shifted_conv_silu, dynamic=False) if x.is_cuda
                    else shifted_conv_silu)
        fn = lambda: compiled(x, weight.squeeze(1))
    else:
        fn = lambda: conv(x)
    dy = torch.randn(batch, seq, channels, device=device(), dtype=dtype)

    def step():
        fn().backward(dy)

    ms = time_fn(step, warmup, iters)
    x.grad = weight.grad = None
    y = fn()
    y.backward(dy)
    out = {"y": y, "dx": x.grad, "dw": weight.grad}
    return ms, out


def kernel_times(fn, iters: int) -> dict[str, float]:
    """Device microseconds per call of each CUDA kernel fn() launches (profiler, iters calls)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.self_device_time_total / iters for e in prof.key_averages()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.self_device_time_total > 0}


def kernel_rows(batch, seq, channels, strided, dtype, iters, width=4):
    """Per-kernel device time of fla's and our conv fwd+bwd, with the bandwidth each conv kernel
    reaches on its compulsory traffic (forward: read x, write y; backward: read x and dy, write
    dx), beside a plain copy of the same tensor (the bandwidth a kernel can reach here)."""
    from linear_moe.layers import ShortConvolution

    x = _input(batch, seq, channels, strided, dtype).requires_grad_()
    dy = torch.randn(batch, seq, channels, device=device(), dtype=dtype)
    nbytes = x.numel() * x.element_size()
    src = x.detach().contiguous()
    copy_us = sum(kernel_times(lambda: src.clone(), iters).values())
    rows = [{"impl": "copy", "channels": channels, "strided": strided, "kernel": "clone",
             "us": copy_us, "GB_per_s": 2 * nbytes / copy_us / 1e3}]
    for impl in ("fla", "ours"):
        conv = ShortConvolution(channels, width, 0, 1, dtype, kernel=impl).to(device())
        times = kernel_times(lambda: torch.autograd.grad(conv(x), (x, conv.weight), dy), iters)
        for name, us in sorted(times.items(), key=lambda kv: -kv[1]):
            low = name.lower()
            moved = 2 if "fwd" in low else 3 if "bwd" in low else None
            rows.append({"impl": impl, "channels": channels, "strided": strided,
                         "kernel": name[:60], "us": us,
                         "GB_per_s": moved * nbytes / us / 1e3 if moved else None})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, nargs="+", default=[1536, 3072],
                        help="GDN layer bench: q/k 1536, v 3072 (hidden 2048)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--kernels", action="store_true",
                        help="device time and bandwidth per kernel instead (CUDA only)")
    add_run_args(parser, tokens=65536, warmup=3, iters=20, fla_kernels=False)
    args = parser.parse_args(argv)
    if args.kernels:
        if not torch.cuda.is_available():
            raise SystemExit("--kernels profiles CUDA kernels: run it on the GPU")
        batch = max(1, args.tokens // args.seq)
        rows = [emit(r) for c in args.channels for strided in (False, True)
                for r in kernel_rows(batch, args.seq, c, strided, torch.bfloat16, args.iters)]
        write_results(rows, args.out, "Short conv kernels: device time and bandwidth",
                      ["impl", "channels", "strided", "kernel", "us", "GB_per_s"])
        return rows
    if args.toy:
        args.channels, args.seq, args.tokens, args.warmup, args.iters = [8], 16, 32, 1, 1
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    impls = (["fla", "ours", "compiled", "torch_conv1d"] if cuda
             else ["compiled", "torch_conv1d"])
    batch = max(1, args.tokens // args.seq)
    rows = []
    for channels in args.channels:
        for strided in (False, True):
            results = {impl: bench(impl, batch, args.seq, channels, strided, dtype,
                                   args.warmup, args.iters) for impl in impls}
            base_impl = impls[0]
            base_ms, base_out = results[base_impl]
            for impl, (ms, out) in results.items():
                err = max(((out[k].float() - base_out[k].float()).norm()
                           / base_out[k].float().norm().clamp_min(1e-12)).item()
                          for k in out)
                rows.append(emit({"impl": impl, "channels": channels, "strided": strided,
                                  "T": args.seq, "B": batch, "ms": ms,
                                  f"speedup_vs_{base_impl}": base_ms / ms,
                                  f"rel_err_vs_{base_impl}": err}))
    write_results(rows, args.out, "Short conv + SiLU, fwd+bwd: fla causal_conv1d vs compiled "
                  "shifted multiply-adds", ["impl", "channels", "strided", "T", "B", "ms",
                                            f"speedup_vs_{impls[0]}", f"rel_err_vs_{impls[0]}"])
    return rows


if __name__ == "__main__":
    main()
