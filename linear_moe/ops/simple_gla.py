"""Scalar-decay gated linear attention (Simple GLA / RetNet retention / Lightning attention),
fla layout [B, T, H, D].

    S_t = exp(g_t) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t

with one log decay per head and step, either data-dependent (``g`` [B, T, H]) or a constant
per head (``g_gamma`` [H], retention's and lightning attention's fixed decays). It is GLA with
the decay shared by all key dims, so the reference is GLA's chunked reference.
"""

from __future__ import annotations

import torch

from .dispatch import check_mode, resolve_backend
from .fla_compat import install_hopper_guard_shim
from .gla import gla


def simple_gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor | None = None,
    g_gamma: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q, k [B, T, H, K], v [B, T, H, V]; exactly one of g [B, T, H] or g_gamma [H].

    Returns (o [B, T, H, V] in q.dtype, final state [N, H, K, V] or None).
    """
    check_mode(mode)
    if (g is None) == (g_gamma is None):
        raise ValueError("simple_gla needs exactly one of g [B, T, H] or g_gamma [H]")
    B, T, H, K = q.shape
    if g is not None and g.shape != (B, T, H):
        raise ValueError(f"g must be [B, T, H] = {(B, T, H)}, got {tuple(g.shape)}")
    if g_gamma is not None and g_gamma.shape != (H,):
        raise ValueError(f"g_gamma must be [H] = ({H},), got {tuple(g_gamma.shape)}")
    if scale is None:
        scale = K ** -0.5
    if resolve_backend(backend, q) == "fla":
        return _simple_gla_fla(q, k, v, g, g_gamma, scale, initial_state, output_final_state,
                               cu_seqlens, mode)
    gk = simple_gla_log_decay(q, g, g_gamma).expand(B, T, H, K)
    return gla(q, k, v, gk, scale=scale, initial_state=initial_state,
               output_final_state=output_final_state, cu_seqlens=cu_seqlens,
               backend="reference", chunk_size=chunk_size)


def simple_gla_log_decay(q: torch.Tensor, g: torch.Tensor | None = None,
                         g_gamma: torch.Tensor | None = None, **unused) -> torch.Tensor:
    """simple_gla's log decay per token [B, T, H, 1] (g, or the fixed g_gamma over every
    token), as context parallelism's one-pass form reads it."""
    B, T, H = q.shape[:3]
    log_decay = g if g is not None else g_gamma.to(q.device).expand(B, T, H)
    return log_decay.unsqueeze(-1)


def _simple_gla_fla(q, k, v, g, g_gamma, scale, initial_state, output_final_state, cu_seqlens,
                    mode):
    from fla.ops.simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

    h0 = None if initial_state is None else initial_state.float()
    kwargs = dict(g=g, g_gamma=None if g_gamma is None else g_gamma.float(), scale=scale,
                  initial_state=h0, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    if mode == "chunk":
        # A data-dependent g takes fla's gated chunk_bwd_dqkwg (fla #640 guard, fla_compat);
        # g_gamma does not.
        install_hopper_guard_shim()
        o, state = chunk_simple_gla(q, k, v, **kwargs)
    else:
        o, state = fused_recurrent_simple_gla(q, k, v, **kwargs)
    return o, (state.float() if state is not None and output_final_state else None)
