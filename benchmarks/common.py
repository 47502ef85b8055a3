"""Shared pieces of the benchmarks: process set-up, timing, result files.

Numbers only count from the GPU; on the CPU the scripts run at toy sizes so CI proves they work.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time

import torch


_AUTOTUNE_KEYS = {"mode": "fla"}  # what environment() reports


def setup_single_process(autotune_keys: str = "shape"):
    """Megatron's model-parallel state for one process (CPU: gloo + cpu_support).

    autotune_keys "shape" (on the GPU): fla's state-passing kernels are autotuned per sequence
    length and head count (linear_moe.ops.fla_autotune), so every model in a comparison runs
    picks made at the measured shape; "fla" keeps fla's keys (rows before session 12)."""
    from linear_moe.inference import init_single_process

    init_single_process()
    from linear_moe.ops.fla_autotune import apply_autotune_keys

    apply_autotune_keys(autotune_keys)
    _AUTOTUNE_KEYS["mode"] = autotune_keys


def add_run_args(parser, *, tokens: int, warmup: int, iters: int, out_help: str | None = None,
                 fla_kernels: bool = True):
    """The arguments every benchmark takes: tokens per step, timing, the toy switch, output,
    and (where fla's kernels run) how they are autotuned."""
    parser.add_argument("--tokens", type=int, default=tokens, help="tokens per step (B = tokens/T)")
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--iters", type=int, default=iters)
    parser.add_argument("--toy", action="store_true", help="tiny CPU-sized smoke run")
    parser.add_argument("--out", default=None, help=out_help or "write <out>.json and <out>.md")
    if fla_kernels:
        parser.add_argument("--fla-autotune-keys", choices=["shape", "fla"], default="shape",
                            help="shape: fla's state kernels autotuned per (T, heads) "
                                 "(default); fla: fla's own keys, one pick for every shape")
    return parser


def add_layer_args(parser, seq_lens: list[int], seq_help: str | None = None):
    """The arguments of the one-layer benchmarks (layer_bench, cp_bench): the layer's size, the
    sequence lengths and add_run_args' (65,536 tokens a step)."""
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=seq_lens, help=seq_help)
    return add_run_args(parser, tokens=65536, warmup=3, iters=10)


def parse_layer_args(parser, argv) -> tuple[argparse.Namespace, torch.dtype]:
    """Parsed add_layer_args (shrunk to CPU size under --toy), the process set up, and the
    dtype the layers run in (bf16 on the GPU)."""
    args = parser.parse_args(argv)
    if args.toy:
        args.hidden, args.heads, args.seq_lens, args.tokens = 64, 2, [64], 128
        args.warmup, args.iters = 1, 2
    setup_single_process(args.fla_autotune_keys)
    return args, torch.bfloat16 if torch.cuda.is_available() else torch.float32


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def time_fn(fn, warmup: int, iters: int, host_ms: list | None = None) -> float:
    """Median milliseconds of fn() (synchronised on CUDA). host_ms, when given, receives each
    timed call's host time (until fn returns, before the synchronise): a step whose host time
    is close to its total is bound by the host's kernel launches, not by the GPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if host_ms is not None:
            host_ms.append((time.perf_counter() - start) * 1e3)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


_ALLOCATOR_EVENTS = ("num_device_alloc", "num_device_free", "num_alloc_retries")


def allocator_events() -> dict:
    """The caching allocator's counters of cudaMalloc / cudaFree calls and of retries (a
    retry frees every cached block and synchronises): growing during timed steps means the
    allocator thrashes, which costs host time the graphed step does not pay."""
    if not torch.cuda.is_available():
        return {}
    stats = torch.cuda.memory_stats()
    return {key: stats.get(key, 0) for key in _ALLOCATOR_EVENTS}


def peak_memory_gib(since_gib: float = 0.0) -> float | None:
    """Peak allocated GiB since the last reset, less `since_gib` (what was allocated before the
    measured thing was built: a row's own memory, free of earlier rows' leftovers)."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.max_memory_allocated() / 2**30 - since_gib


def allocated_gib() -> float:
    return torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0


def environment() -> dict:
    import fla
    import megatron.core

    info = {
        "date": datetime.date.today().isoformat(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "fla": getattr(fla, "__version__", "?"),
        "fla_autotune_keys": _AUTOTUNE_KEYS["mode"],
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def emit(row: dict) -> dict:
    """Print one finished row at once (a run cut off by a time limit keeps what it measured)."""
    print("ROW " + json.dumps(row), flush=True)
    return row


def write_results(rows: list[dict], out: str | None, title: str, columns: list[str]) -> None:
    """Print a markdown table; with ``out`` also write <out>.json and <out>.md."""
    env = environment()
    header = f"## {title}\n\n{json.dumps(env)}\n\n| " + " | ".join(columns) + " |\n|" + \
        "---|" * len(columns) + "\n"
    body = "".join("| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |\n" for r in rows)
    print(header + body)
    if out:
        os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
        with open(out + ".json", "w") as f:
            json.dump({"environment": env, "rows": rows}, f, indent=1)
        with open(out + ".md", "w") as f:
            f.write(header + body)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return "" if value is None else str(value)
