"""Greedy generation speed: one token per step with the layers' states (incremental decoding,
megatron-core's StaticInferenceContext) against re-running the whole window for each new token,
side by side in one run, per mixer and prompt length; generated tokens/s and the ratio.

    python benchmarks/decode_bench.py --base-model qwen2_moe --model-size A0.3B-2B \
        --pattern LLLN --mixers gla gated_deltanet mamba2 --prompt-lens 512 2048 8192 \
        --new-tokens 64 --out benchmarks/results/decode_h100
    python benchmarks/decode_bench.py --toy     # CPU smoke run

Both paths must produce the same tokens (same_tokens; a near-tie of two logits can flip one in
bf16). Batch 1, as CausalLM.generate.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import add_run_args, device, emit, setup_single_process, write_results  # noqa: E402

VOCAB = 32768


class _Vocabulary:
    """What CausalLM reads of a tokenizer: its size, and an end-of-document id that never
    comes (every run generates all its tokens)."""

    eos_token_id = -1

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size


def _generate_ms(lm, prompt, new_tokens, incremental, warmup, iters):
    """(median ms of one generation, the tokens)."""
    times = []
    for i in range(warmup + iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        tokens = lm.generate(prompt, new_tokens, incremental=incremental)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[len(times) // 2], tokens


def bench(base, size, pattern, mixer, prompt_len, new_tokens, warmup, iters, extra):
    from linear_moe.inference import CausalLM
    from linear_moe.model_provider import build_standalone

    length = prompt_len + new_tokens
    argv = ["--base-model", base, "--model-size", size, "--layer-type-list", pattern,
            "--la-module", mixer, "--tokenizer-type", "NullTokenizer", "--vocab-size",
            str(VOCAB - 1), "--mock-data", "--seq-length", str(length),
            "--max-position-embeddings", str(length), "--micro-batch-size", "1",
            "--train-iters", "1", *extra]
    if torch.cuda.is_available():
        argv.append("--bf16")
    model, _, _ = build_standalone(argv, device=device())
    if torch.cuda.is_available():
        model = model.to(torch.bfloat16)
    lm = CausalLM(model.eval(), _Vocabulary(VOCAB), length, device())
    prompt = torch.randint(0, VOCAB, (prompt_len,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    cached_ms, cached = _generate_ms(lm, prompt, new_tokens, True, warmup, iters)
    rerun_ms, rerun = _generate_ms(lm, prompt, new_tokens, False, warmup, iters)
    common = dict(mixer=mixer, pattern=pattern, T=prompt_len, new_tokens=new_tokens)
    rows = [dict(common, decoding="incremental", ms=cached_ms,
                 tokens_per_s=new_tokens / cached_ms * 1e3, speedup_vs_rerun=rerun_ms / cached_ms,
                 same_tokens=cached == rerun),
            dict(common, decoding="re-run", ms=rerun_ms, tokens_per_s=new_tokens / rerun_ms * 1e3)]
    del model, lm
    return rows


def main(argv=None):
    parser = add_run_args(argparse.ArgumentParser(description=__doc__), tokens=0, warmup=1,
                          iters=3, out_help="write <out>.json and <out>.md")
    parser.add_argument("--base-model", default="qwen2_moe")
    parser.add_argument("--model-size", default="A0.3B-2B")
    parser.add_argument("--pattern", default="LLLN")
    parser.add_argument("--mixers", nargs="+", default=["gla", "gated_deltanet", "mamba2"])
    parser.add_argument("--prompt-lens", nargs="+", type=int, default=[512, 2048, 8192])
    parser.add_argument("--new-tokens", type=int, default=64)
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.toy:
        args.model_size, args.prompt_lens, args.new_tokens = "tiny", [24], 6
        args.mixers, args.warmup, args.iters = ["gla", "mamba2"], 0, 1
    setup_single_process(getattr(args, "fla_autotune_keys", "shape"))
    rows = []
    with torch.no_grad():
        for mixer in args.mixers:
            for prompt_len in args.prompt_lens:
                for row in bench(args.base_model, args.model_size, args.pattern, mixer,
                                 prompt_len, args.new_tokens, args.warmup, args.iters, extra):
                    rows.append(emit(row))
    write_results(rows, args.out, f"greedy decoding, {args.base_model} {args.model_size} "
                  f"'{args.pattern}', batch 1", ["mixer", "pattern", "T", "new_tokens",
                                                  "decoding", "ms", "tokens_per_s",
                                                  "speedup_vs_rerun", "same_tokens"])


if __name__ == "__main__":
    main()
