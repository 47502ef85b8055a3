"""Gated Slot Attention (Zhang et al. 2024, arXiv:2409.07146), fla layout [B, T, H, D].

A bounded memory of M slots per head. Each step has a per-slot log forget gate g_t <= 0
([M], alpha_t = exp(g_t)) and a write strength s_t ([M]; the layer uses s_t = 1 - alpha_t):

    K~_t = K~_{t-1} diag(alpha_t) + k_t^T s_t        [K, M]  (pass 1: keys into slots)
    p_t  = softmax(scale * q_t K~_t)                 [M]     (read: attention over slots)
    V~_t = diag(alpha_t) V~_{t-1} + s_t^T v_t        [M, V]  (pass 2: slots into values)
    o_t  = p_t V~_t

i.e. fla's naive_recurrent_gsa with the states (hk, hv) = (K~, V~). Pass 2 is GLA with
query p, key s and key-dim decay g, so it is ops.gla's chunked reference. Pass 1 decays the
state's columns (the slot dim it outputs, not the key dim it contracts), which GLA cannot
express, so it has its own chunked form below, built from the same cancellation-free decay
sums (_chunked): every exponent is a sum of g terms over a span, never positive.
"""

from __future__ import annotations

import functools

import torch

from ._chunked import from_chunks, over_sequences, pad_time, segsum, suffix_sum, to_chunks
from .dispatch import check_mode, compute_dtype, resolve_backend
from .gla import gla

_SUB_CHUNK = 16  # diagonal sub-blocks use a [c, c, M] pairwise decay tensor


def gsa(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    s: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: float | None = None,
    initial_state: tuple[torch.Tensor, torch.Tensor] | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """GSA over q, k [B, T, H, K], v [B, T, H, V], slot writes s and log gates g [B, T, H, M].

    Returns (o [B, T, H, V] in q.dtype, final states (hk [N, H, K, M], hv [N, H, M, V]) or
    None), with N = B, or the number of sequences when `cu_seqlens` packs them into B = 1;
    `initial_state` is such a pair. The reference backend returns the states in fp32 (fp64 for
    fp64 inputs); `mode` only selects the fla kernel, and `chunk_size` only the reference's
    chunk (fla's chunk_gsa keeps its default 64).
    """
    check_mode(mode)
    if (q.shape != k.shape or v.shape[:3] != q.shape[:3] or s.shape != g.shape
            or s.shape[:3] != q.shape[:3]):
        raise ValueError(
            f"gsa expects q, k [B, T, H, K], v [B, T, H, V] and s, g [B, T, H, M]; got "
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, s {tuple(s.shape)}, "
            f"g {tuple(g.shape)}"
        )
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if resolve_backend(backend, q) == "fla":
        return _gsa_fla(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens, mode)

    hk0, hv0 = (None, None) if initial_state is None else initial_state
    out_dtype, dtype = q.dtype, compute_dtype(q, k, v, s, g, hk0, hv0)
    q, k, v, s, g = (x.to(dtype) for x in (q, k, v, s, g))
    hk0, hv0 = (None if h is None else h.to(dtype) for h in (hk0, hv0))
    run = functools.partial(_slot_pass_chunked, chunk=chunk_size)
    scores, hk = over_sequences(run, cu_seqlens, (q * scale, k, s, g), hk0)
    o, hv = gla(scores.softmax(-1), s, v, g, scale=1.0, initial_state=hv0,
                output_final_state=True, cu_seqlens=cu_seqlens, backend="reference",
                chunk_size=chunk_size)
    return o.to(out_dtype), ((hk, hv) if output_final_state else None)


def _intra_chunk_slots(A: torch.Tensor, s: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[i, m] = sum_{j <= i} A[i, j] s_jm exp(sum_{j < u <= i} g_um), per chunk.

    A: [..., C, C] causal q.k scores; s, g: [..., C, M] -> [..., C, M]. As ops.gla's
    _intra_chunk_scores, with the decay on the output's slot dim instead of a contracted
    one: pairwise decays inside sub-blocks of c rows; between blocks J < I they factor
    through the boundary b just before I (decay(b -> i) * decay(j -> b)).
    """
    C, M = s.shape[-2:]
    c = _SUB_CHUNK if C % _SUB_CHUNK == 0 else C
    n = C // c
    ss, gs = (x.unflatten(-2, (n, c)) for x in (s, g))  # [..., n, c, M]
    A_rows = A.unflatten(-2, (n, c))  # [..., n, c, C]: block I's rows against every column
    A_diag = A_rows.unflatten(-1, (n, c)).diagonal(dim1=-4, dim2=-2).movedim(-1, -3)

    diag = torch.einsum("...ij,...jm,...ijm->...im", A_diag, ss, segsum(gs).exp())

    between = segsum(gs.sum(-2))  # [..., n, n, M]: row I sums blocks J < B' <= I ...
    between = torch.cat(  # ... shifted down one row: blocks J < B' < I
        [torch.full_like(between[..., :1, :, :], -float("inf")), between[..., :-1, :, :]], -3)
    s_log = between.repeat_interleave(c, dim=-2) + suffix_sum(gs, -2).flatten(-3, -2).unsqueeze(-3)
    off = A_rows @ (s.unsqueeze(-3) * s_log.exp())  # [..., n, c, M], 0 for j >= b
    off = off * gs.cumsum(-2).exp()  # decay from b (exclusive) through i
    return (diag + off).flatten(-3, -2)


def _slot_pass_chunked(q, k, s, g, h0, *, chunk: int):
    """Pass 1 on one batch of equal-length sequences; q already scaled.

    Returns (scores q_t K~_t [B, T, H, M], K~ [B, H, K, M])."""
    B, T, H, K = q.shape
    M = s.shape[-1]
    S = h0 if h0 is not None else q.new_zeros(B, H, K, M)
    if T == 0:
        return s.new_zeros(B, 0, H, M), S
    # zero-padded s and log gate neither write nor decay the state
    q, k, s, g = (to_chunks(x, chunk) for x in pad_time(chunk, q, k, s, g))

    G = g.cumsum(-2)  # log decay from the chunk start through row i, per slot
    read_decay = G.exp()  # decays the entering state's columns up to row i
    chunk_decay = read_decay[..., -1:, :]  # [B, H, NC, 1, M]
    s_state = s * suffix_sum(g, -2).exp()  # decays each write to the chunk end
    scores_intra = _intra_chunk_slots((q @ k.transpose(-1, -2)).tril(), s, g)

    outs = []
    for n in range(q.shape[2]):  # sequential only in the [K, M] state
        outs.append(scores_intra[:, :, n] + (q[:, :, n] @ S) * read_decay[:, :, n])
        S = S * chunk_decay[:, :, n] + k[:, :, n].transpose(-1, -2) @ s_state[:, :, n]
    return from_chunks(torch.stack(outs, 2), T), S


def _gsa_fla(q, k, v, s, g, scale, initial_state, output_final_state, cu_seqlens, mode):
    # Lazy: fla imports Triton. chunk_gsa's backward is chunk_gla_bwd (pass 2) plus its own
    # chunk_gsa_bwd_k (pass 1, fla/ops/gsa/chunk_bwd.py); neither calls
    # fla.ops.common.chunk_o.chunk_bwd_dqkwg, so the Hopper/Triton guard of fla #640 (see
    # fla_compat) does not apply here.
    from fla.ops.gsa import chunk_gsa, fused_recurrent_gsa

    # s is pass 1's value and pass 2's key: the kernels' dots want it in q's dtype; the log
    # gate g may stay fp32 (fla cumsums it in fp32).
    s = s.to(q.dtype)
    h0 = None if initial_state is None else tuple(h.float() for h in initial_state)
    kwargs = dict(scale=scale, initial_state=h0, output_final_state=output_final_state,
                  cu_seqlens=cu_seqlens)
    if mode == "chunk":
        o, state = chunk_gsa(q, k, v, s, g, **kwargs)
    else:
        o, state = fused_recurrent_gsa(q, k, v, s, g, **kwargs)
    if not output_final_state:
        return o, None
    return o, tuple(h.float() for h in state)
