"""Where a training step's time and memory go: torch.profiler over a few fwd+bwd steps of our model
at the peer shape (issue 5, item 4) or of fla's own model, the top ops by device time grouped
into GEMMs, fla/Triton kernels, attention, communication and the rest, and the peak memory.

    python benchmarks/profile_step.py --model ours --mixer gla --seq 2048 --out $OUT/prof_ours
    python benchmarks/profile_step.py --model fla --mixer gla --seq 2048 --out $OUT/prof_fla
    python benchmarks/profile_step.py --toy     # CPU smoke run

Writes <out>.txt (the profiler's table and the grouped totals) and <out>.json (the groups).

`--saved-tensors` adds a census of what one forward keeps for its backward, by the module that
saved it (layer indices folded into '*'), counted once per storage, parameters left out: the two
models' censuses side by side say where a peak-memory gap comes from.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import NamedTuple

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
    """(model, forward, step): forward returns the LM loss of random tokens, step runs it and its
    backward."""
    tokens = torch.randint(0, shape["vocab"], (batch, seq), device=device())
    if which == "fla":
        if not torch.cuda.is_available():
            raise SystemExit("fla's models are Triton-only: --model fla needs CUDA")
        model = fla_model(mixer, shape).to(device(), torch.bfloat16)

        def forward():
            return model(input_ids=tokens, labels=tokens).loss
    else:
        from linear_moe.model_provider import build_standalone

        model, _, _ = build_standalone(our_argv(mixer, shape, seq, batch, flags),
                                      device=device())
        if torch.cuda.is_available():
            model = model.to(torch.bfloat16)
        positions = torch.arange(seq, device=device()).expand(batch, seq)

        def forward():
            return model(tokens, positions, None, labels=tokens).float().mean()
    return model, forward, lambda: forward().backward()


def saved_tensor_census(model, forward) -> dict:
    """What one forward keeps for backward, by the innermost module running when it was saved
    (layer indices folded into '*', so a row sums over the layers), one count per storage:
    fla's and megatron-core's custom Functions save through the same hooks. Parameters (weights
    kept for the input gradient) are left out: both models hold them anyway. A storage freed
    during the forward (a recompute's discarded output) can be reused by a later tensor, which
    then counts under the first saver: the memory allocated during the forward, reported beside
    it, is the exact total."""
    names = {id(m): re.sub(r"\.\d+(?=\.|$)", ".*", n) or "<model>"
             for n, m in model.named_modules()}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    stack: list[str] = []
    seen: dict[int, tuple[str, int, str]] = {}

    def pack(t):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = (stack[-1] if stack else "<outside modules>", storage.nbytes(),
                         f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}")
        return t

    def enter(module, args):
        stack.append(names.get(id(module), type(module).__name__))

    def leave(module, args, output):  # returns None: a value would replace the module's output
        if stack:
            stack.pop()

    mm = torch.nn.modules.module
    hooks = [mm.register_module_forward_pre_hook(enter), mm.register_module_forward_hook(leave)]
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = forward()
    finally:
        for h in hooks:
            h.remove()
    after = torch.cuda.memory_allocated() if torch.cuda.is_available() else None
    by_module: dict[str, dict] = {}
    for module, nbytes, example in seen.values():
        row = by_module.setdefault(module, {"MiB": 0.0, "tensors": 0, "examples": []})
        row["MiB"] += nbytes / 2**20
        row["tensors"] += 1
        if example not in row["examples"] and len(row["examples"]) < 4:
            row["examples"].append(example)
    loss.backward()  # frees the graph (and checks it was a real forward)
    census = {"saved_MiB": sum(r["MiB"] for r in by_module.values()),
              "by_module": dict(sorted(by_module.items(), key=lambda kv: -kv[1]["MiB"]))}
    if before is not None:
        census["forward_growth_MiB"] = (after - before) / 2**20
    return census


def census_text(census: dict) -> str:
    lines = [f"saved for backward: {census['saved_MiB']:.1f} MiB"
             + (f"; allocated during the forward: {census['forward_growth_MiB']:.1f} MiB"
                if "forward_growth_MiB" in census else "")]
    lines += [f"{row['MiB']:10.1f} MiB {row['tensors']:5d}  {module}  {'; '.join(row['examples'])}"
              for module, row in census["by_module"].items()]
    return "\n".join(lines) + "\n"


def profile(step, warmup: int, iters: int, record_shapes: bool = False):
    from torch.profiler import ProfilerActivity

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available()
                                           else [])
    for _ in range(warmup):
        step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with torch.profiler.profile(activities=activities, record_shapes=record_shapes) as prof:
        for _ in range(iters):
            step()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    return prof


class OpTime(NamedTuple):
    ms: float  # device ms per step (CPU ms on the CPU)
    calls: float  # calls per step


def device_ms_by_op(prof, iters: int) -> dict:
    """{(aten op, its input shapes): OpTime(device ms per step of the kernels it launched
    itself, its calls per step)} (profile(..., record_shapes=True)); on the CPU, its own CPU ms.
    Set two steps' side by side (op_diff) to see which ops one does that the other does not.
    One key can hold different GEMMs of the same shapes (a forward and input gradients): the
    calls say how many."""
    key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    out = {}
    for e in prof.key_averages(group_by_input_shape=True):
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue  # kernels: their time is on the op that launched them
        us = getattr(e, key, 0.0) or 0.0
        if us:
            name = (e.key, str(e.input_shapes))
            ms, calls = out.get(name, (0.0, 0.0))
            out[name] = OpTime(ms + us / 1e3 / iters, calls + e.count / iters)
    return out


def op_diff(a: dict, b: dict, labels=("layer", "bare"), rows: int = 40) -> str:
    """A table of the ops of device_ms_by_op a and b, by how much more a spends on each, with
    each side's calls per step."""
    none = OpTime(0.0, 0.0)
    keys = sorted(set(a) | set(b), key=lambda k: -(a.get(k, none).ms - b.get(k, none).ms))
    total_a, total_b = (sum(t.ms for t in side.values()) for side in (a, b))
    lines = [f"{labels[0]:>9s} {labels[1]:>9s} {'diff':>9s} {'calls':>9s}  ms/step; calls/step "
             f"{labels[0]}/{labels[1]}  op  input shapes",
             f"{total_a:9.3f} {total_b:9.3f} {total_a - total_b:9.3f} {'-':>9s}  total"]
    shown = keys if len(keys) <= rows + 10 else keys[:rows] + keys[-10:]  # and b's extras
    for k in shown:
        x, y = a.get(k, none), b.get(k, none)
        calls = f"{x.calls:g}/{y.calls:g}"
        lines.append(f"{x.ms:9.3f} {y.ms:9.3f} {x.ms - y.ms:9.3f} {calls:>9s}  {k[0]}  "
                     f"{k[1][:160]}")
    return "\n".join(lines) + "\n"


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
    if cuda:  # and by host time: an eager step bound by its launches (2K, session 16) shows here
        table += ("\nBy self CPU time (the host's share; the synchronise at the end holds the "
                  "wait for the device):\n" + events.table(sort_by="self_cpu_time_total",
                                                             row_limit=30,
                                                             max_name_column_width=90))
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
    parser.add_argument("--saved-tensors", action="store_true",
                        help="add the census of tensors one forward saves for backward")
    add_run_args(parser, tokens=16384, warmup=3, iters=3, out_help="write <out>.txt and <out>.json")
    args = parser.parse_args(argv)
    shape = SHAPE
    if args.toy:
        shape, args.seq, args.tokens, args.warmup, args.iters = TOY, 64, 128, 1, 1
    setup_single_process(args.fla_autotune_keys)
    batch = max(1, args.tokens // args.seq)
    model, forward, step = build_step(args.model, args.mixer, shape, args.seq, batch,
                                      args.ours_flags)
    prof = profile(step, args.warmup, args.iters)
    text, groups = summarise(prof, args.iters)
    result = {"environment": environment(), "model": args.model, "mixer": args.mixer,
              "ours_flags": args.ours_flags.strip(), "T": args.seq, "B": batch,
              "peak_GiB": peak_memory_gib(), **groups}
    if args.saved_tensors:
        result["saved_tensors"] = saved_tensor_census(model, forward)
        text += census_text(result["saved_tensors"])
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
