"""Gated Linear Attention (Yang et al. 2023), fla layout [B, T, H, D].

Recurrence with state S_t in R^{K x V} and a per-key-dim log decay gk_t <= 0:
    S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t,        o_t = scale * q_t S_t

The reference backend is a chunked form of that recurrence in plain torch.
Every decay it exponentiates is the log decay over a span i >= j, a sum of
gk terms <= 0, summed directly (see _chunked): exponents are never positive,
so strong decays underflow to 0 (their true value) instead of overflowing as
exp(-cumsum) would, and never lose precision to cancellation.
"""

from __future__ import annotations

import functools

import torch

from ._chunked import from_chunks, over_sequences, pad_time, segsum, suffix_sum, to_chunks
from .dispatch import check_mode, compute_dtype, resolve_backend

_SUB_CHUNK = 16  # diagonal sub-blocks use a [c, c, K] pairwise decay tensor


def gla(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    gk: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """GLA over q, k, gk [B, T, H, K] and v [B, T, H, V].

    Returns (o [B, T, H, V] in q.dtype, final state [N, H, K, V] or None), with
    N = B, or the number of sequences when `cu_seqlens` packs them into B = 1.
    The reference backend returns the state in fp32 (fp64 for fp64 inputs);
    `mode` only selects the fla kernel, and `chunk_size` only the reference's
    chunk (fla's chunk_gla fixes its own).
    """
    check_mode(mode)
    if q.shape != k.shape or q.shape != gk.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"gla expects q, k, gk [B, T, H, K] and v [B, T, H, V]; got q {tuple(q.shape)}, "
            f"k {tuple(k.shape)}, gk {tuple(gk.shape)}, v {tuple(v.shape)}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if resolve_backend(backend, q) == "fla":
        return _gla_fla(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens, mode)

    out_dtype, dtype = q.dtype, compute_dtype(q, k, v, gk, initial_state)
    q, k, v, gk = (x.to(dtype) for x in (q, k, v, gk))
    h0 = None if initial_state is None else initial_state.to(dtype)
    run = functools.partial(_gla_chunked, chunk=chunk_size)
    o, state = over_sequences(run, cu_seqlens, (q * scale, k, v, gk), h0)
    return o.to(out_dtype), (state if output_final_state else None)


def _intra_chunk_scores(q: torch.Tensor, k: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Causal scores A[i, j] = sum_d q_id k_jd exp(sum_{j < s <= i} g_sd), per chunk.

    q, k, g: [..., C, K] -> [..., C, C]. The chunk is split into sub-blocks of
    c rows. Inside a sub-block the decays are formed pairwise ([c, c, K]).
    Between blocks J < I they factor through the boundary b just before I:
    decay(j -> i) = decay(b -> i) * decay(j -> b), with
    decay(j -> b) = decay(j -> end of J) * decay(blocks strictly between).
    """
    C, K = q.shape[-2:]
    c = _SUB_CHUNK if C % _SUB_CHUNK == 0 else C
    n = C // c
    qs, ks, gs = (x.unflatten(-2, (n, c)) for x in (q, k, g))  # [..., n, c, K]

    diag = torch.einsum("...ik,...jk,...ijk->...ij", qs, ks, segsum(gs).exp())  # [..., n, c, c]

    q_rel = qs * gs.cumsum(-2).exp()  # decay from b (exclusive) through i
    between = segsum(gs.sum(-2))  # [..., n, n, K]: row I sums blocks J < M <= I ...
    between = torch.cat(  # ... shifted down one row: blocks J < M < I
        [torch.full_like(between[..., :1, :, :], -float("inf")), between[..., :-1, :, :]], -3)
    k_log = between.repeat_interleave(c, dim=-2) + suffix_sum(gs, -2).flatten(-3, -2).unsqueeze(-3)
    off = q_rel @ (k.unsqueeze(-3) * k_log.exp()).transpose(-1, -2)  # [..., n, c, C], 0 for j >= b

    eye_n = torch.eye(n, dtype=q.dtype, device=q.device)
    diag_full = diag.unsqueeze(-2) * eye_n[:, None, :, None]  # [..., n, c, n, c], block-diagonal
    return off.flatten(-3, -2) + diag_full.flatten(-4, -3).flatten(-2, -1)


def _gla_chunked(q, k, v, gk, h0, *, chunk: int):
    """One batch of equal-length sequences; q already scaled. Returns (o, S)."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = h0 if h0 is not None else q.new_zeros(B, H, K, V)
    if T == 0:
        return v.new_zeros(B, 0, H, V), S
    # zero-padded k, v and log decay leave the state untouched
    q, k, v, gk = (to_chunks(x, chunk) for x in pad_time(chunk, q, k, v, gk))

    G = gk.cumsum(-2)  # log decay from the chunk start through row i
    chunk_decay = G[..., -1, :, None].exp()  # [B, H, NC, K, 1]
    q_state = q * G.exp()  # reads the state entering the chunk
    k_state = k * suffix_sum(gk, -2).exp()  # decays each write to the chunk end
    o_intra = _intra_chunk_scores(q, k, gk) @ v

    outs = []
    for n in range(q.shape[2]):  # sequential only in the [K, V] state
        outs.append(o_intra[:, :, n] + q_state[:, :, n] @ S)
        S = chunk_decay[:, :, n] * S + k_state[:, :, n].transpose(-1, -2) @ v[:, :, n]
    return from_chunks(torch.stack(outs, 2), T), S


def _gla_fla(q, k, v, gk, scale, initial_state, output_final_state, cu_seqlens, mode):
    # Lazy: fla imports Triton. chunk_gla's backward is its own (chunk_gla_bwd in
    # fla/ops/gla/chunk.py); it never calls fla.ops.common.chunk_o.chunk_bwd_dqkwg,
    # so the Hopper/Triton guard of fla #640 (see fla_compat) does not apply here.
    from fla.ops.gla import chunk_gla, fused_recurrent_gla

    # The state [V, K]-major inside fla (state_v_first), as fla's GatedLinearAttention layer
    # runs it: the peer's fla model then runs the same kernel variants (and autotune entries)
    # as ours. Our states stay [N, H, K, V] at this boundary.
    h0 = None
    if initial_state is not None:  # fla wants an fp32 state
        h0 = initial_state.float().transpose(-1, -2).contiguous()
    kwargs = dict(scale=scale, initial_state=h0, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens, state_v_first=True)
    if mode == "chunk":
        o, state = chunk_gla(q, k, v, gk, **kwargs)
    else:
        o, state = fused_recurrent_gla(q, k, v, gk=gk, **kwargs)
    if state is None or not output_final_state:
        return o, None
    return o, state.float().transpose(-1, -2)
