"""Kimi Delta Attention (Kimi Linear, arXiv:2510.26692), fla layout [B, T, H, D]: the gated
delta rule with a per-key-dim (diagonal) decay,

    S_t = (I - beta_t k_t^T k_t) Diag(exp(g_t)) S_{t-1} + beta_t k_t^T v_t,   o_t = scale q_t S_t

Chunked reference: with u_t = beta_t (v_t - (k_t * exp(g_t)) S_{t-1}) the state is
S_t = Diag(exp(g_t)) S_{t-1} + k_t^T u_t, so inside a chunk (cumulative log decay G, S_0 the
state entering it)  (I + A) U = diag(beta) V - diag(beta) (K * exp(G)) S_0  with
A[t, j] = beta_t sum_d k_td k_jd exp(G_td - G_jd) for j < t: GLA's pairwise-decay scores of K
with itself. Outputs and the outgoing state then follow GLA's chunk form with U as values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._chunked import pad_time, suffix_sum, to_chunks
from .dispatch import check_cp_context, check_mode, resolve_backend
from .gated_delta_rule import delta_chunk_scan, delta_reference
from .gla import _intra_chunk_scores


def kda(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
        cu_seqlens=None, use_qk_l2norm=True, backend="auto", mode="chunk", chunk_size=64,
        A_log=None, dt_bias=None, cp_context=None):
    """q, k, g [B, T, H, K] (g: log decay <= 0), v [B, T, H, V], beta [B, T, H].

    With A_log [H] and dt_bias [H * K], g is the decay's input f instead, and the log decay is
    Kimi Linear's gate -exp(A_log) * softplus(f + dt_bias): fla computes it inside its chunk
    cumsum (use_gate_in_kernel, as fla's KimiDeltaAttention does), where computing it first
    takes several passes over a [tokens, H * K] fp32 tensor each way.

    `cp_context`: fla's context parallelism, as in gated_delta_rule.

    Returns (o [B, T, H, V] in q.dtype, final state [N, H, K, V] or None)."""
    check_mode(mode)
    if q.shape != k.shape or g.shape != q.shape or beta.shape != q.shape[:3]:
        raise ValueError(f"kda expects q, k, g [B, T, H, K], beta [B, T, H]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, g {tuple(g.shape)}, beta "
                         f"{tuple(beta.shape)}")
    gate = _check_gate(g, A_log, dt_bias)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    backend = resolve_backend(backend, q)
    check_cp_context(cp_context, backend, mode, "kda")
    if backend == "fla":
        from fla.ops.kda import chunk_kda, fused_recurrent_kda

        fn = chunk_kda if mode == "chunk" else fused_recurrent_kda
        h0 = None if initial_state is None else initial_state.float()
        gate_args = dict(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias) if gate else {}
        if cp_context is not None:
            gate_args["cp_context"] = cp_context
        o, state = fn(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=h0,
                      output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                      use_qk_l2norm_in_kernel=use_qk_l2norm, **gate_args)
        return o, (state.float() if state is not None and output_final_state else None)

    if gate:
        g = kda_gate(g, A_log, dt_bias)
    return delta_reference(_kda_chunked, q, k, v, g, beta, scale, initial_state,
                           output_final_state, cu_seqlens, use_qk_l2norm, chunk_size)


def _check_gate(g, A_log, dt_bias) -> bool:
    """Whether kda gets the gate's inputs (A_log [H] and dt_bias [H * K], both or neither)."""
    shapes = [None if t is None else tuple(t.shape) for t in (A_log, dt_bias)]
    if shapes == [None, None]:
        return False
    H, K = g.shape[2:]
    if None in shapes or shapes[0] != (H,) or dt_bias.numel() != H * K:
        raise ValueError(f"kda's gate takes A_log [H] and dt_bias [H * K] together; got "
                         f"{shapes[0]} and {shapes[1]} for g {tuple(g.shape)}")
    return True


def kda_gate(f, A_log, dt_bias):
    """Kimi Linear's log decay from its input f [B, T, H, K]: -exp(A_log) * softplus(f +
    dt_bias), in fp32 (fp64 for fp64 inputs)."""
    dtype = torch.promote_types(f.dtype, torch.float32)
    H, K = f.shape[2:]
    return -A_log.to(dtype).exp()[:, None] * F.softplus(f.to(dtype) + dt_bias.to(dtype).view(H, K))


def _kda_chunked(q, k, v, g, beta, h0, *, chunk: int):
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    if T == 0:
        return v.new_zeros(B, 0, H, V), S
    q, k, v, g, beta = pad_time(chunk, q, k, v, g, beta)
    q, k, v, g = (to_chunks(x, chunk) for x in (q, k, v, g))  # [B, H, NC, C, D]
    beta = to_chunks(beta, chunk)  # [B, H, NC, C]

    G = g.cumsum(-2)
    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)
    A = (beta[..., None] * _intra_chunk_scores(k, k, g)).masked_fill(~strict, 0)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, beta[..., None] * k * G.exp()], -1)
    u_base, w = torch.linalg.solve_triangular(eye + A, rhs, upper=False,
                                              unitriangular=True).split([V, K], -1)
    attn = _intra_chunk_scores(q, k, g)  # causal, diagonal included
    q_state = q * G.exp()
    k_state = k * suffix_sum(g, -2).exp()
    chunk_decay = G[..., -1, :, None].exp()  # [B, H, NC, K, 1]

    return delta_chunk_scan(u_base, w, q_state, attn, k_state, chunk_decay, S, T)
