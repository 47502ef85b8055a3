"""Mamba2's state-space duality (SSD) scan (Dao & Gu, 2024, arXiv:2405.21060), layout
[B, T, H, D]:

    S_t = exp(dt_t A_h) S_{t-1} + B_t^T (dt_t x_t),    y_t = C_t S_t + D_h x_t

It is scalar-decay linear attention with q = C, k = B, v = dt * x, g = dt * A and scale 1, so
both backends run ``simple_gla`` (megatron-core 0.19.2's SSD Triton ops are forward-only).
"""

from __future__ import annotations

import torch

from .simple_gla import simple_gla


def ssd(x, dt, A, B, C, D=None, *, initial_state=None, output_final_state=False,
        cu_seqlens=None, backend="auto", mode="chunk", chunk_size=64):
    """x [B, T, H, P], dt [B, T, H] (> 0), A [H] (< 0), B, C [B, T, H, N], D [H] (per head),
    [H, P] (per channel, Mamba2's D_has_hdim) or None.

    Returns (y [B, T, H, P] in x.dtype, final state [N_seq, H, N, P] or None)."""
    g = A.float() * dt.float()
    v = (x.float() * dt.float()[..., None]).to(x.dtype)
    y, state = simple_gla(C, B, v, g=g, scale=1.0, initial_state=initial_state,
                          output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                          backend=backend, mode=mode, chunk_size=chunk_size)
    if D is not None:
        D = D.float() if D.dim() == 2 else D.float()[:, None]
        y = y + (D * x.float()).to(y.dtype)
    return y, state
