"""RWKV-6 "Finch" time mixing (Peng et al., 2024, arXiv:2404.05892), fla layout [B, T, H, D].

Row-vector convention, state S_t in R^{K x V}, per-key-dim log decay w_t <= 0 and a per-head
bonus u [H, K] for the current token:
    o_t = scale * r_t (S_{t-1} + diag(u) k_t^T v_t)
    S_t = diag(exp(w_t)) S_{t-1} + k_t^T v_t
i.e. the output reads the state *before* step t (unlike GLA's o_t = q_t S_t), and the current
token enters only through the bonus. This is fla's convention (fla/ops/rwkv6, naive recurrence):
w is the log decay (fla's layer passes w = -exp(w_raw)), u is [H, K].

Reference: the state recurrence is GLA's, so r_t S_{t-1} is GLA's output at step t - 1 with the
query r_t: run GLA's chunked reference with queries shifted one step earlier, read each output
one step later, and give step 0 the initial state (r_0 S_0). The bonus is a per-token term.
"""

from __future__ import annotations

import functools

import torch

from ._chunked import over_sequences
from .dispatch import check_mode, compute_dtype, resolve_backend
from .gla import _gla_chunked


def rwkv6(
    r: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    w: torch.Tensor,
    u: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RWKV-6 over r, k, w [B, T, H, K] (w: log decay <= 0), v [B, T, H, V], u [H, K].

    Returns (o [B, T, H, V] in r.dtype, final state [N, H, K, V] or None), with N = B, or the
    number of sequences when `cu_seqlens` packs them into B = 1. `scale` defaults to K^-0.5
    (fla's default; fla's RWKV6 layer passes 1.0). The reference returns the state in fp32
    (fp64 for fp64 inputs); `mode` only selects the fla kernel, `chunk_size` only the
    reference's chunk. fla's fused_recurrent backward ignores the final state's gradient
    (FusedRecurrentRWKV6Function takes no dht), so train through `o` only in that mode.
    """
    check_mode(mode)
    if r.shape != k.shape or w.shape != r.shape or v.shape[:3] != r.shape[:3] \
            or u.shape != (r.shape[2], r.shape[3]):
        raise ValueError(
            f"rwkv6 expects r, k, w [B, T, H, K], v [B, T, H, V], u [H, K]; got r "
            f"{tuple(r.shape)}, k {tuple(k.shape)}, w {tuple(w.shape)}, v {tuple(v.shape)}, "
            f"u {tuple(u.shape)}")
    if scale is None:
        scale = r.shape[-1] ** -0.5
    if resolve_backend(backend, r) == "fla":
        return _rwkv6_fla(r, k, v, w, u, scale, initial_state, output_final_state, cu_seqlens,
                          mode)

    out_dtype, dtype = r.dtype, compute_dtype(r, k, v, w, u, initial_state)
    r, k, v, w, u = (x.to(dtype) for x in (r, k, v, w, u))
    r = r * scale
    h0 = None if initial_state is None else initial_state.to(dtype)
    run = functools.partial(_rwkv6_chunked, chunk=chunk_size)
    o, state = over_sequences(run, cu_seqlens, (r, k, v, w), h0)
    o = o + (r * u * k).sum(-1, keepdim=True) * v  # the bonus: r_t diag(u) k_t^T v_t
    return o.to(out_dtype), (state if output_final_state else None)


def _rwkv6_chunked(r, k, v, w, h0, *, chunk: int):
    """One batch of equal-length sequences, r already scaled: (r_t S_{t-1}, final S)."""
    B, T, H, K = r.shape
    S0 = h0 if h0 is not None else r.new_zeros(B, H, K, v.shape[-1])
    if T == 0:
        return v.new_zeros(B, 0, H, v.shape[-1]), S0
    # GLA's output at step t is q_t S_t: with q_t = r_{t+1} it is r_{t+1} S_t, the read of step
    # t + 1. The last shifted query reads past the end and is dropped.
    r_next = torch.cat([r[:, 1:], torch.zeros_like(r[:, :1])], 1)
    o_next, S = _gla_chunked(r_next, k, v, w, S0, chunk=chunk)
    o_first = torch.einsum("bhk,bhkv->bhv", r[:, 0], S0)[:, None]  # r_0 reads the initial state
    return torch.cat([o_first, o_next[:, :-1]], 1), S


def _rwkv6_fla(r, k, v, w, u, scale, initial_state, output_final_state, cu_seqlens, mode):
    # Lazy: fla imports Triton. chunk_rwkv6's backward (fla/ops/rwkv6/chunk.py) uses its own
    # kernels and chunk_gla's, never fla.ops.common.chunk_o.chunk_bwd_dqkwg, so the Hopper
    # guard of fla #640 (see fla_compat) does not apply.
    from fla.ops.rwkv6 import chunk_rwkv6, fused_recurrent_rwkv6

    h0 = None if initial_state is None else initial_state.float()  # fla wants an fp32 state
    fn = chunk_rwkv6 if mode == "chunk" else fused_recurrent_rwkv6
    o, state = fn(r, k, v, w, u, scale=scale, initial_state=h0,
                  output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return o, (state.float() if state is not None and output_final_state else None)
