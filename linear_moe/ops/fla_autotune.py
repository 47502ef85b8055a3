"""Autotune fla's state-passing kernels per sequence length and head count.

fla's chunk kernels that carry the recurrent state across chunks (chunk_fwd_kernel_h,
chunk_bwd_kernel_dh, the delta rule's *_h / *_dhu kernels, ...) run one program per
(sequence, head, state tile) and walk the T/64 chunks in order, so their best tile size depends
on how many sequences and heads there are: few sequences want small tiles (more programs).
Their autotune keys hold only the head dims, and fla caches the winner on disk
(FLA_CACHE_RESULTS, on by default), so a pick made at one shape is reused at every other.

Measured (H100, session 12): the peer's GLA model at T=8192, B=2 ran chunk_bwd_kernel_dh at
276 us a call with a pick made at the layer benchmark's shape (BK=BV=64: 32 programs), against
125 us for fla's own model, whose kernel variant (state_v_first) had been tuned at the peer's 2K
shape (BK=32: 64 programs).

key_state_kernels_on_shape() adds 'T' and 'H' to those kernels' keys, so each (T, H) is tuned
once and cached under its own key. At a fixed number of tokens per step (every benchmark here)
T also fixes the batch. It must run before the kernels' first call in the process: training
(--la-fla-autotune-keys, default shape) and the benchmarks (--fla-autotune-keys) call
apply_autotune_keys() before they build a model, so both models of a comparison, and a training
run, are tuned at the shape they run.
"""

from __future__ import annotations

import importlib
import re
import sys

import torch

# Kernels whose grid is (sequences x heads x state tiles) and whose loop runs over the chunks.
STATE_KERNEL = re.compile(r"(fwd_kernel_h|bwd_kernel_dh|_h_blockdim\d+|_dhu)")
SHAPE_ARGS = ("T", "H")


def _autotuner(obj):
    """The triton Autotuner inside a kernel's decorators (heuristics wrap it), or None."""
    from triton.runtime.autotuner import Autotuner

    for _ in range(4):
        if isinstance(obj, Autotuner):
            return obj
        obj = getattr(obj, "fn", None)
    return None


def key_state_kernels_on_shape() -> list[str]:
    """Adds T and H to the autotune keys of every loaded fla state kernel (fla.ops is imported
    first). Idempotent. Returns 'module.kernel' of each kernel whose key changed."""
    importlib.import_module("fla.ops")
    changed = []
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("fla.ops") or module is None:
            continue
        for name, obj in vars(module).items():
            tuner = _autotuner(obj) if STATE_KERNEL.search(name) else None
            if tuner is None:
                continue
            added = [a for a in SHAPE_ARGS if a in tuner.arg_names and a not in tuner.keys]
            if added:
                tuner.keys.extend(added)
                changed.append(f"{module_name}.{name}")
    return changed


def apply_autotune_keys(mode: str) -> list[str]:
    """mode 'shape': key_state_kernels_on_shape() where fla's kernels run (CUDA); 'fla': fla's
    own keys. Returns what key_state_kernels_on_shape() changed."""
    if mode not in ("shape", "fla"):
        raise ValueError(f"fla autotune keys '{mode}': choose shape or fla")
    if mode == "fla" or not torch.cuda.is_available():
        return []
    return key_state_kernels_on_shape()
