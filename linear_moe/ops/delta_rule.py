"""DeltaNet's delta rule (Yang et al., 2024, arXiv:2406.06484), fla layout [B, T, H, D]:

    S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t,    o_t = scale * q_t S_t

the gated delta rule with no decay (g = 0), so the reference is that op's chunked reference.
fla's chunk_delta_rule is ungated, so fla's Hopper guard (fla #640) does not apply. It refuses
fp32 inputs (an assert); fp32 takes fla's fused_recurrent_delta_rule, the same recurrence step by
step with its own backward, and says so once.
"""

from __future__ import annotations

import warnings

import torch

from .dispatch import check_cp_context, check_mode, resolve_backend
from .gated_delta_rule import gated_delta_rule


def _warn_fp32_chunk() -> None:
    # once per process under Python's default warning filter (one call site)
    warnings.warn("linear_moe: fla's chunk_delta_rule refuses fp32 inputs; DeltaNet runs fla's "
                  "fused_recurrent_delta_rule instead (same math, sequential over the sequence); "
                  "train in --bf16 for the chunk kernel", stacklevel=3)


def delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    use_qk_l2norm: bool = True,
    backend: str = "auto",
    mode: str = "chunk",
    chunk_size: int = 64,
    cp_context=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k [B, T, H, K], v [B, T, H, V], beta [B, T, H] -> (o, final state or None).

    `cp_context` (fla's context parallelism, as in gated_delta_rule): fla 0.6.0's
    chunk_delta_rule has none, so this runs its chunk_gated_delta_rule with g = 0, the same
    recurrence."""
    check_mode(mode)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    backend = resolve_backend(backend, q)
    check_cp_context(cp_context, backend, mode, "delta_rule")
    if cp_context is not None:
        return gated_delta_rule(q, k, v, torch.zeros_like(beta, dtype=torch.float32), beta,
                                scale=scale, use_qk_l2norm=use_qk_l2norm, backend=backend,
                                chunk_size=chunk_size, cp_context=cp_context)
    if backend == "fla":
        from fla.ops.delta_rule import chunk_delta_rule, fused_recurrent_delta_rule

        fn = chunk_delta_rule if mode == "chunk" else fused_recurrent_delta_rule
        if fn is chunk_delta_rule and q.dtype == torch.float32:
            _warn_fp32_chunk()
            fn = fused_recurrent_delta_rule
        h0 = None if initial_state is None else initial_state.float()
        o, state = fn(q, k, v, beta=beta, scale=scale, initial_state=h0,
                      output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                      use_qk_l2norm_in_kernel=use_qk_l2norm)
        return o, (state.float() if state is not None and output_final_state else None)
    g = torch.zeros_like(beta)
    return gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                            output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                            use_qk_l2norm=use_qk_l2norm, backend="reference",
                            chunk_size=chunk_size)
