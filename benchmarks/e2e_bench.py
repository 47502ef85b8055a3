"""End-to-end benchmark: the same base model with different layer patterns, side by side in one
run, at equal tokens per step: tokens/s, peak memory and the ratio to the all-softmax model.

    python benchmarks/e2e_bench.py --base-model qwen2_moe --model-size A0.3B-2B \
        --patterns N L LLLN --mixers gla gated_deltanet retention mamba2 \
        --seq-lens 2048 8192 16384 32768 --tokens 16384 --out benchmarks/results/e2e_h100
    python benchmarks/e2e_bench.py --toy     # CPU smoke run

`--mixers gated_deltanet megatron_gdn` adds megatron-core's own GDN layer (benchmarks/native_gdn.py)
as the comparator of issue 5, item 3. Flags after `--` go to every model (e.g. `--
--moe-device-dispatch`); `--cuda-graph` times every row's step captured as one CUDA graph (GPU;
MoE presets need --moe-device-dispatch for it).

Targets on the GPU (issue 5): >= 0.9x the softmax model at 2K, >= 2x at 16K, >= 4x at 32K, peak
memory at 32K <= 0.6x. Times are forward + backward of the language-model loss.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    add_run_args, device, emit, peak_memory_gib, setup_single_process, time_fn, write_results,
)
from flops import training_flops_per_token  # noqa
import native_gdn  # noqa: F401,E402  (registers the megatron_gdn comparator; CUDA only)

VOCAB = 32768
# The measured bf16 dense-matmul ceiling of the lent H100 (issue 5: ~790 TFLOP/s), MFU's denominator
# for issue 5's item 5 (>= 45% for a Llama3-style 1B hybrid at 8K).
MATMUL_CEILING_TFLOPS = 790.0


def bench(base, size, pattern, mixer, seq, batch, warmup, iters, extra, graph=False):
    from linear_moe.model_provider import build_standalone

    argv = ["--base-model", base, "--model-size", size, "--layer-type-list", pattern,
            "--la-module", mixer, "--tokenizer-type", "NullTokenizer", "--vocab-size",
            str(VOCAB - 1), "--mock-data", "--seq-length", str(seq),
            "--max-position-embeddings", str(seq), "--micro-batch-size", str(batch),
            "--train-iters", "1", *extra]
    if torch.cuda.is_available():
        argv.append("--bf16")
    # built directly on the device: no CPU initialisation and copy for every row
    model, config, args = build_standalone(argv, device=device())
    flops_per_token = training_flops_per_token(model, config, seq)
    if torch.cuda.is_available():
        model = model.to(torch.bfloat16)
        torch.cuda.reset_peak_memory_stats()
    tokens = torch.randint(0, VOCAB, (batch, seq), device=device())
    positions = torch.arange(seq, device=device()).expand(batch, seq)

    def step():
        loss = model(tokens, positions, None, labels=tokens).float().mean()
        loss.backward()
        return loss

    if graph and torch.cuda.is_available():
        from linear_moe.cuda_graph import capture_step

        step, _ = capture_step(step, model.parameters())
    ms = time_fn(step, warmup, iters)
    row = {"pattern": pattern, "mixer": mixer if "L" in pattern else "-", "T": seq, "B": batch,
           "ms": ms, "tokens_per_s": batch * seq / ms * 1e3,
           "model_TFLOP_s": flops_per_token * batch * seq / ms / 1e9, "peak_GiB": peak_memory_gib()}
    row["MFU"] = row["model_TFLOP_s"] / MATMUL_CEILING_TFLOPS if torch.cuda.is_available() else None
    del model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="qwen2_moe")
    parser.add_argument("--model-size", default="A0.3B-2B")
    parser.add_argument("--patterns", nargs="+", default=["N", "L", "LLLN"],
                        help="'N' alone is the softmax baseline every row is compared with")
    parser.add_argument("--mixers", nargs="+", default=["gla", "gated_deltanet"])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 8192, 16384, 32768])
    parser.add_argument("--cuda-graph", action="store_true",
                        help="time each step captured as one CUDA graph (GPU only)")
    add_run_args(parser, tokens=16384, warmup=2, iters=5)
    parser.add_argument("extra", nargs="*", help="extra Megatron flags after --")
    args = parser.parse_args(argv)
    if args.toy:
        args.model_size, args.seq_lens, args.tokens = "tiny", [64, 128], 256
        args.warmup, args.iters = 1, 1
    setup_single_process(args.fla_autotune_keys)
    rows = []
    for seq in args.seq_lens:
        batch = max(1, args.tokens // seq)
        baseline = bench(args.base_model, args.model_size, "N", args.mixers[0], seq, batch,
                         args.warmup, args.iters, args.extra, args.cuda_graph)
        rows.append(emit({**baseline, "speedup_vs_N": 1.0,
                          "memory_vs_N": 1.0 if baseline["peak_GiB"] is not None else None}))
        for pattern in (p for p in args.patterns if p != "N"):
            for mixer in args.mixers:
                row = bench(args.base_model, args.model_size, pattern, mixer, seq, batch,
                            args.warmup, args.iters, args.extra, args.cuda_graph)
                row["speedup_vs_N"] = row["tokens_per_s"] / baseline["tokens_per_s"]
                if row["peak_GiB"] is not None:
                    row["memory_vs_N"] = row["peak_GiB"] / baseline["peak_GiB"]
                rows.append(emit(row))
    title = f"End to end: {args.base_model} {args.model_size}, {args.tokens} tokens/step"
    if args.cuda_graph and torch.cuda.is_available():
        title += ", one CUDA graph per step"
    if args.extra:
        title += ", with " + " ".join(args.extra)
    write_results(rows, args.out, title,
                  ["pattern", "mixer", "T", "B", "ms", "tokens_per_s", "model_TFLOP_s", "MFU",
                   "peak_GiB", "speedup_vs_N", "memory_vs_N"])
    return rows


if __name__ == "__main__":
    main()
