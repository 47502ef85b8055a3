"""Gated Delta Rule (Gated DeltaNet, Yang et al. 2024), fla layout [B, T, H, D].

Row-vector convention, state S_t in R^{K x V}, scalar log decay g_t <= 0 and
write strength beta_t in (0, 1) per head:
    S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t
    o_t = scale * q_t S_t

Chunked reference (WY / UT transform). Writing u_t = beta_t (v_t - exp(g_t) k_t S_{t-1})
gives S_t = exp(g_t) S_{t-1} + k_t^T u_t. With S_0 the state entering a chunk,
G the within-chunk inclusive cumsum of g, and D[i, j] = exp(sum_{j < s <= i} g_s) for j <= i:
    (I + A) U = diag(beta) V - diag(beta exp(G)) K S_0,   A = tril_{-1}(diag(beta) K K^T * D)
so U = U~ - W S_0 with U~ = (I + A)^-1 diag(beta) V and W = (I + A)^-1 diag(beta exp(G)) K,
    O     = scale * [(Q * exp(G)) S_0 + (Q K^T * D * causal) U]
    S_out = exp(G_C) S_0 + (K * exp(G_C - G))^T U
Every exponent is the log decay over a span, a sum of g terms <= 0 summed
directly (see _chunked): never positive, so strong decays underflow to their
true value ~0 instead of overflowing, and never lose precision to cancellation.
"""

from __future__ import annotations

import functools

import torch

from ._chunked import from_chunks, over_sequences, pad_time, segsum, suffix_sum, to_chunks
from .dispatch import check_cp_context, check_mode, compute_dtype, resolve_backend
from .fla_compat import install_hopper_guard_shim


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
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
    """Gated delta rule over q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H].

    Returns (o [B, T, H, V] in q.dtype, final state [N, H, K, V] or None), with
    N = B, or the number of sequences when `cu_seqlens` packs them into B = 1.
    `use_qk_l2norm` L2-normalises q and k over K inside the op (fla's
    use_qk_l2norm_in_kernel). The reference backend returns the state in fp32
    (fp64 for fp64 inputs); `mode` only selects the fla kernel. fla's
    fused_recurrent mode has no backward (fla raises NotImplementedError). `cp_context` (fla's
    FLACPContext, chunk kernels only): this rank's part of a sequence split over a context-
    parallel group, fla's kernels passing the states between the ranks.
    """
    check_mode(mode)
    if q.shape != k.shape or v.shape[:3] != q.shape[:3] or g.shape != q.shape[:3] or beta.shape != q.shape[:3]:
        raise ValueError(
            f"gated_delta_rule expects q, k [B, T, H, K], v [B, T, H, V], g, beta [B, T, H]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, g {tuple(g.shape)}, beta {tuple(beta.shape)}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    backend = resolve_backend(backend, q)
    check_cp_context(cp_context, backend, mode, "gated_delta_rule")
    if backend == "fla":
        return _gdn_fla(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
                        use_qk_l2norm, mode, chunk_size, cp_context)

    return delta_reference(_gdn_chunked, q, k, v, g, beta, scale, initial_state,
                           output_final_state, cu_seqlens, use_qk_l2norm, chunk_size)


def delta_reference(chunked, q, k, v, g, beta, scale, initial_state, output_final_state,
                    cu_seqlens, use_qk_l2norm, chunk_size):
    """The reference path shared by the delta-rule ops (scalar or per-key-dim decay g): fp32
    (fp64) math, fla's in-kernel q/k L2 norm, then ``chunked`` per sequence."""
    out_dtype, dtype = q.dtype, compute_dtype(q, k, v, g, beta, initial_state)
    q, k, v, g, beta = (x.to(dtype) for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2norm(q), l2norm(k)
    h0 = None if initial_state is None else initial_state.to(dtype)
    run = functools.partial(chunked, chunk=chunk_size)
    o, state = over_sequences(run, cu_seqlens, (q * scale, k, v, g, beta), h0)
    return o.to(out_dtype), (state if output_final_state else None)


# fla's l2norm epsilon (inside the square root), as the ops' use_qk_l2norm; our short-conv
# kernels that normalise q / k use it too.
L2NORM_EPS = 1e-6


def l2norm(x: torch.Tensor, eps: float = L2NORM_EPS) -> torch.Tensor:
    """x / sqrt(sum(x^2) + eps) over the last dim, the form fla's kernel uses."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def _gdn_chunked(q, k, v, g, beta, h0, *, chunk: int):
    """One batch of equal-length sequences; q already scaled. Returns (o, S)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    if T == 0:
        return v.new_zeros(B, 0, H, V), S
    # zero-padded k, beta and log decay leave the state untouched
    q, k, v, g, beta = pad_time(chunk, q, k, v, g, beta)
    q, k, v = (to_chunks(x, chunk) for x in (q, k, v))  # [B, H, NC, C, D]
    g, beta = (to_chunks(x, chunk) for x in (g, beta))  # [B, H, NC, C]

    G = g.cumsum(-1)  # log decay from the chunk start through row i
    chunk_decay = G[..., -1:, None].exp()  # [B, H, NC, 1, 1]
    decay = segsum(g[..., None]).squeeze(-1).exp()  # D, [B, H, NC, C, C], 0 above the diagonal

    strict = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril(-1)
    A = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay).masked_fill(~strict, 0)
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    rhs = torch.cat([beta[..., None] * v, (beta * G.exp())[..., None] * k], -1)
    u_base, w = torch.linalg.solve_triangular(eye + A, rhs, upper=False, unitriangular=True).split([V, K], -1)

    attn = (q @ k.transpose(-1, -2)) * decay  # causal, diagonal included
    q_state = q * G.exp()[..., None]  # reads the state entering the chunk
    k_state = k * suffix_sum(g, -1).exp()[..., None]  # decays each write to the chunk end

    return delta_chunk_scan(u_base, w, q_state, attn, k_state, chunk_decay, S, T)


def delta_chunk_scan(u_base, w, q_state, attn, k_state, chunk_decay, S, T):
    """The sequential part of a chunked delta rule (also KDA's): per chunk n, the corrected
    values U = U~ - W S, outputs Q_state S + attn U, and the state passed to the next chunk.
    Tensors are [B, H, NC, C, *]; returns (o [B, T, H, V], final S)."""
    outs = []
    for n in range(u_base.shape[2]):  # sequential only in the [K, V] state
        u = u_base[:, :, n] - w[:, :, n] @ S
        outs.append(q_state[:, :, n] @ S + attn[:, :, n] @ u)
        S = chunk_decay[:, :, n] * S + k_state[:, :, n].transpose(-1, -2) @ u
    return from_chunks(torch.stack(outs, 2), T), S


def _gdn_fla(q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens,
             use_qk_l2norm, mode, chunk_size, cp_context=None):
    # Lazy: fla imports Triton.
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

    h0 = None if initial_state is None else initial_state.float()  # fla wants an fp32 state
    kwargs = dict(scale=scale, initial_state=h0, output_final_state=output_final_state,
                  use_qk_l2norm_in_kernel=use_qk_l2norm, cu_seqlens=cu_seqlens)
    if mode == "chunk":
        install_hopper_guard_shim()  # backward goes through chunk_bwd_dqkwg (fla #640)
        o, state = chunk_gated_delta_rule(q, k, v, g, beta, chunk_size=chunk_size,
                                          cp_context=cp_context, **kwargs)
    else:
        o, state = fused_recurrent_gated_delta_rule(q, k, v, g=g, beta=beta, **kwargs)
    return o, (state.float() if state is not None and output_final_state else None)
