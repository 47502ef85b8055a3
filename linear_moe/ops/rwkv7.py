"""RWKV-7 "Goose" time mixing (Peng et al., 2025, arXiv:2503.14456), fla layout [B, T, H, D]:
the generalized delta rule with a diagonal-plus-rank-one (DPLR) transition.

Row-vector convention, state S_t in R^{K x V} (the paper's [V x K] state, transposed), per-key-dim
log decay w_t <= 0 and row vectors a_t, b_t [K]:
    S_t = (diag(exp(w_t)) + b_t^T a_t) S_{t-1} + k_t^T v_t,    o_t = scale * r_t S_t
fla's convention (fla/ops/generalized_delta_rule/dplr, naive recurrence; chunk_rwkv7 passes its
arguments straight to chunk_dplr_delta_rule). The RWKV-7 layer uses a = -kk, b = kk * a_gate
(kk the L2-normalised removal key), i.e. the paper's diag(w) - kk^T (a_gate * kk).

Chunked reference. With the pseudo-values u_t = a_t S_{t-1} the state is a GLA state with two
writes per step, S_t = diag(exp(w_t)) S_{t-1} + k_t^T v_t + b_t^T u_t. Inside a chunk entering
with S_0 (G the inclusive, Gx the exclusive cumsum of w):
    (I - A_ab) U = A_ak V + (a * exp(Gx)) S_0,
    A_xy[t, j] = sum_d x_td y_jd exp(sum_{j < s < t} w_sd) for j < t,
GLA's pairwise-decay scores with the query moved one step earlier (the decay stops before t).
Outputs and the outgoing state then follow GLA's chunk form with the writes (k, v) and (b, U).
Every exponent is a sum of w terms <= 0, summed directly (see _chunked).
"""

from __future__ import annotations

import functools

import torch

from ._chunked import over_sequences, pad_time, suffix_sum, to_chunks
from .dispatch import check_cp_context, check_mode, compute_dtype, resolve_backend
from .gated_delta_rule import delta_chunk_scan
from .gla import _intra_chunk_scores


def rwkv7(
    r: torch.Tensor,
    w: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    *,
    scale: float = 1.0,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    lower_bound: float | None = None,
    backend: str = "auto",
    mode: str = "chunk",
    chunk_size: int = 64,
    cp_context=None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RWKV-7 over r, w, k, a, b [B, T, H, K] (w: log decay <= 0), v [B, T, H, V].

    Returns (o [B, T, H, V] in r.dtype, final state [N, H, K, V] or None). `scale` defaults to
    1.0 as in fla's chunk_rwkv7. `lower_bound` (fla only) promises lower_bound <= w < 0, which
    lets fla's chunk kernel use 64-token chunks and tensor cores (the RWKV-7 layer's w is
    bounded by -exp(-0.5)); `chunk_size` only sets the reference's chunk. fla's fused_recurrent
    mode is forward-only (fused_recurrent_dplr_delta_rule raises in backward). `cp_context`:
    fla's context parallelism, as in gated_delta_rule.
    """
    check_mode(mode)
    if any(x.shape != r.shape for x in (w, k, a, b)) or v.shape[:3] != r.shape[:3]:
        raise ValueError(
            f"rwkv7 expects r, w, k, a, b [B, T, H, K] and v [B, T, H, V]; got r "
            f"{tuple(r.shape)}, w {tuple(w.shape)}, k {tuple(k.shape)}, a {tuple(a.shape)}, "
            f"b {tuple(b.shape)}, v {tuple(v.shape)}")
    backend = resolve_backend(backend, r)
    check_cp_context(cp_context, backend, mode, "rwkv7")
    if backend == "fla":
        return _rwkv7_fla(r, w, k, v, a, b, scale, initial_state, output_final_state,
                          cu_seqlens, lower_bound, mode, cp_context)

    out_dtype, dtype = r.dtype, compute_dtype(r, w, k, v, a, b, initial_state)
    r, w, k, v, a, b = (x.to(dtype) for x in (r, w, k, v, a, b))
    h0 = None if initial_state is None else initial_state.to(dtype)
    run = functools.partial(_rwkv7_chunked, chunk=chunk_size)
    o, state = over_sequences(run, cu_seqlens, (r * scale, w, k, v, a, b), h0)
    return o.to(out_dtype), (state if output_final_state else None)


def _rwkv7_chunked(r, w, k, v, a, b, h0, *, chunk: int):
    """One batch of equal-length sequences; r already scaled. Returns (o, S)."""
    B, T, H, K = r.shape
    V = v.shape[-1]
    S = h0 if h0 is not None else r.new_zeros(B, H, K, V)
    if T == 0:
        return v.new_zeros(B, 0, H, V), S
    # zero-padded k, v, a, b and log decay leave the state untouched
    r, w, k, v, a, b = (to_chunks(x, chunk) for x in pad_time(chunk, r, w, k, v, a, b))

    G = w.cumsum(-2)  # log decay from the chunk start through row t
    Gx = torch.cat([torch.zeros_like(w[..., :1, :]), w[..., :-1, :]], -2).cumsum(-2)  # ... to t-1
    # Scores of a_t against step j < t with the decay stopping before t: the inclusive scores of
    # a_t placed at row t - 1, moved back down one row (row 0 reads only S_0).
    a_next = torch.cat([a[..., 1:, :], torch.zeros_like(a[..., :1, :])], -2)
    down = lambda A: torch.cat([torch.zeros_like(A[..., :1, :]), A[..., :-1, :]], -2)  # noqa: E731
    A_ab = down(_intra_chunk_scores(a_next, b, w))
    A_ak = down(_intra_chunk_scores(a_next, k, w))

    eye = torch.eye(chunk, dtype=r.dtype, device=r.device)
    rhs = torch.cat([A_ak @ v, a * Gx.exp()], -1)
    u_base, W = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False,
                                              unitriangular=True).split([V, K], -1)

    # Two writes per step, stacked as 2C rows for the delta-rule chunk scan (which forms
    # U = u_base - W S): (k, v) with nothing to correct, (b, U) with U = u_base + W S.
    to_end = suffix_sum(w, -2).exp()  # decays each write to the chunk end
    values = torch.cat([v, u_base], -2)
    corrections = torch.cat([torch.zeros_like(W), -W], -2)
    attn = torch.cat([_intra_chunk_scores(r, k, w), _intra_chunk_scores(r, b, w)], -1)
    keys_state = torch.cat([k * to_end, b * to_end], -2)
    chunk_decay = G[..., -1, :, None].exp()  # [B, H, NC, K, 1]
    return delta_chunk_scan(values, corrections, r * G.exp(), attn, keys_state, chunk_decay, S, T)


def _rwkv7_fla(r, w, k, v, a, b, scale, initial_state, output_final_state, cu_seqlens,
               lower_bound, mode, cp_context=None):
    # Lazy: fla imports Triton. chunk_rwkv7 is chunk_dplr_delta_rule, whose backward
    # (fla/ops/generalized_delta_rule/dplr) has its own kernels and never calls
    # fla.ops.common.chunk_o.chunk_bwd_dqkwg: the Hopper guard of fla #640 does not apply.
    from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7

    h0 = None if initial_state is None else initial_state.float()  # fla wants an fp32 state
    kwargs = dict(scale=scale, initial_state=h0, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    if mode == "chunk":
        o, state = chunk_rwkv7(r, w, k, v, a, b, lower_bound=lower_bound, cp_context=cp_context,
                               **kwargs)
    else:
        o, state = fused_recurrent_rwkv7(r, w, k, v, a, b, **kwargs)
    return o, (state.float() if state is not None and output_final_state else None)
