"""Backend / mode selection shared by the ops.

`fla` is only imported by the op wrappers once the fla backend is chosen, so
importing `linear_moe.ops` on a CPU-only machine never touches Triton.
"""

from __future__ import annotations

import torch

BACKENDS = ("auto", "fla", "reference")
MODES = ("chunk", "fused_recurrent")


def resolve_backend(requested: str, tensor: torch.Tensor) -> str:
    """Map a requested backend to the one that runs: "fla" or "reference"."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; valid backends: {', '.join(BACKENDS)}")
    if requested == "auto":
        return "fla" if tensor.is_cuda else "reference"
    if requested == "fla" and not tensor.is_cuda:
        raise ValueError(
            f"backend='fla' needs CUDA tensors but got a tensor on {tensor.device}: "
            "use backend='reference' or move to CUDA"
        )
    return requested


def check_cp_context(cp_context, backend: str, mode: str, op: str) -> None:
    """fla's own context parallelism (a FLACPContext) runs inside its chunk kernels only."""
    if cp_context is not None and (backend != "fla" or mode != "chunk"):
        raise ValueError(f"{op}: cp_context (fla's context parallelism) needs fla's chunk kernels, "
                         f"not backend '{backend}' mode '{mode}'; run CUDA tensors in chunk mode "
                         "or use linear_moe's state passing (--la-cp-kernel ours)")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid modes: {', '.join(MODES)}")
    return mode


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """Reference math runs in fp32, or fp64 when any input is fp64 (gradcheck)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32
