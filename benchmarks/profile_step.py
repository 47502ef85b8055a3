"""Where a training step's time and memory go: torch.profiler over a few fwd+bwd steps of our model
at the peer shape (issue 5, item 4) or of fla's own model, the top ops by device time grouped
into GEMMs, fla/Triton kernels, attention, communication and the rest, and the peak memory.

    python benchmarks/profile_step.py --model ours --mixer gla --seq 2048 --out $OUT/prof_ours
    python benchmarks/profile_step.py --model fla --mixer gla --seq 2048 --out $OUT/prof_fla
    python benchmarks/profile_step.py --toy     # CPU smoke run

Writes <out>.txt (the profiler's table and the grouped totals) and <out>.json (the groups).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_run_args, device, environment, peak_memory_gib, setup_single_process,
)
from peer_bench import SHAPE, TOY, fla_model, our_argv  # noqa: E402

# Kernel-name fragments -> group (first match wins; names are lower-cased).
GROUPS = (
    ("gemm", ("gemm", "matmul", "cutlass", "sm90_xmma", "nvjet", "addmm", "aten::mm", "aten::bmm",
              "grouped_mm")),
    ("attention", ("flash", "attention", "fmha", "sdpa")),
    ("fla/triton", ("chunk", "fused_recurrent", "triton", "rms_norm", "layer_norm_fwd",
                    "layer_norm_bwd", "causal_conv")),
    ("communication", ("nccl", "all_reduce", "allreduce", "all_gather", "reduce_scatter")),
    # dtype casts run as copy kernels (bfloat16_copy_kernel_cuda, direct_copy_kernel_cuda); not
    # "cast", which matched every elementwise kernel through gpu_kernel_impl_nocast.
    ("copy/cast", ("copy", "contiguous", "transpose")),
    ("elementwise", ("elementwise_kernel", "reduce_kernel")),
)


def group_of(name: str) -> str:
    low = name.lower()
    for group, fragments in GROUPS:
        if any(f in low for f in fragments):
            return group
    return "other"


def build_step(which: str, mixer: str, shape: dict, seq: int, batch: int, flags: str = ""):
    """A fwd+bwd step of the chosen model on random tokens."""
    tokens = torch.randint(0, shape["vocab"], (batch, seq), device=device())
    if which == "fla":
        if not torch.cuda.is_available():
            raise SystemExit("fla's models are Triton-only: --model fla needs CUDA")
        model = fla_model(mixer, shape).to(device(), torch.bfloat16)
        return lambda: model(input_ids=tokens, labels=tokens).loss.backward()
    from linear_moe.model_provider import build_standalone

    model, _, _ = build_standalone(our_argv(mixer, shape, seq, batch, flags),
                                  device=device())
    if torch.cuda.is_available():
        model = model.to(torch.bfloat16)
    positions = torch.arange(seq, device=device()).expand(batch, seq)
    return lambda: model(tokens, positions, None, labels=tokens).float().mean().backward()


def profile(step, warmup: int, iters: int):
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                           else [])
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(iters):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return prof


def summarise(prof, iters: int) -> tuple[str, dict]:
    cuda = torch.cuda.is_available()
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    groups: dict[str, float] = {}
    for e in events:
        us = getattr(e, key, 0.0) or 0.0
        if cuda and e.device_type != torch.autograd.DeviceType.CUDA:
            continue  # device time lives on the kernels; CPU-side ops would count it twice
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + us / 1e3 / iters
    table = events.table(sort_by=key, row_limit=40, max_name_column_width=90)
    total = sum(groups.values())
    lines = [f"{g:14s} {ms:9.2f} ms/step  {100 * ms / max(total, 1e-9):5.1f}%"
             for g, ms in sorted(groups.items(), key=lambda kv: -kv[1])]
    return table + "\n" + "\n".join(lines) + "\n", {"ms_per_step_by_group": groups,
                                                      "total_ms_per_step": total}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["ours", "fla"], default="ours")
    parser.add_argument("--mixer", default="gla")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--ours-flags", default="",
                        help="extra flags for our model, e.g. ' --fused-cross-entropy' (a leading "
                             "space keeps argparse from reading it as an option)")
    add_run_args(parser, tokens=16384, warmup=3, iters=3, out_help="write <out>.txt and <out>.json")
    args = parser.parse_args(argv)
    shape = SHAPE
    if args.toy:
        shape, args.seq, args.tokens, args.warmup, args.iters = TOY, 64, 128, 1, 1
    setup_single_process()
    batch = max(1, args.tokens // args.seq)
    step = build_step(args.model, args.mixer, shape, args.seq, batch, args.ours_flags)
    prof = profile(step, args.warmup, args.iters)
    text, groups = summarise(prof, args.iters)
    result = {"environment": environment(), "model": args.model, "mixer": args.mixer,
              "ours_flags": args.ours_flags.strip(), "T": args.seq, "B": batch,
              "peak_GiB": peak_memory_gib(), **groups}
    text += json.dumps(result) + "\n"
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".txt", "w") as f:
            f.write(text)
        with open(args.out + ".json", "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
