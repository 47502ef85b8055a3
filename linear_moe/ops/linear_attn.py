"""Linear attention (Katharopoulos et al., 2020, arXiv:2006.16236) on feature-mapped q/k,
fla layout [B, T, H, D], optionally with the paper's normaliser:

    S_t = S_{t-1} + k_t^T v_t,   z_t = z_{t-1} + k_t,
    o_t = scale q_t S_t                                  (normalize=False)
    o_t = scale q_t S_t / (scale q_t z_t + eps)          (normalize=True)

q and k are already feature maps phi(q), phi(k) (the caller applies them, so the kernel
dims are those of the map's output). The numerator is scalar-decay GLA with zero decay, so it
reuses ops.simple_gla on either backend; the normaliser is a cumulative key sum, computed
here in fp32 on both backends (what fla's chunk_linear_attn(normalize=True) computes, with
eps as a parameter rather than fla's fixed 1e-10, so based/rebased can use their kernels' eps).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .dispatch import compute_dtype, resolve_backend
from .simple_gla import simple_gla


def linear_attn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    normalize: bool = False,
    eps: float = 1e-10,
    initial_state: tuple | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple | None]:
    """q, k [B, T, H, K] (feature-mapped), v [B, T, H, V] -> (o [B, T, H, V] in q.dtype,
    final state or None): the state is (S [N, H, K, V], z [N, H, K], None without the
    normaliser), as initial_state takes it; N = B, or the number of sequences when
    `cu_seqlens` packs them into B = 1 (each then starts from its own state).

    `mode` selects fla's chunk / fused_recurrent kernel for the numerator, `chunk_size` the
    reference's chunk. Normalised attention is meant for positive feature maps: with a map
    that can go negative (identity, swish) q_t z_t can cross zero.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    if q.shape[-1] % 2 and resolve_backend(backend, q) == "fla":
        # fla's chunk_bwd_dv asserts an even K for 16-bit inputs (e.g. Based's 153 Taylor
        # features); a zero feature changes no inner product, so neither o nor the normaliser.
        q, k = F.pad(q, (0, 1)), F.pad(k, (0, 1))
    no_decay = q.new_zeros(q.shape[2], dtype=torch.float32)
    # Zero decay: the numerator takes fla's ungated chunk path (g is None), so fla_compat's
    # Hopper guard (gated chunk_bwd_dqkwg only) never applies here.
    S0, z0 = initial_state if initial_state is not None else (None, None)
    o, S = simple_gla(q, k, v, g_gamma=no_decay, scale=scale, initial_state=S0,
                      output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                      backend=backend, mode=mode, chunk_size=chunk_size)
    if not normalize:
        return o, ((S, None) if output_final_state else None)
    dtype = compute_dtype(q, k, v)
    if cu_seqlens is None:
        z = k.to(dtype).cumsum(1)  # z_t = z_0 + sum_{s <= t} phi(k_s)
        if z0 is not None:
            z = z + z0[:, None].to(dtype)
        last = z[:, -1] if z.shape[1] else (z.new_zeros(z.shape[0], *z.shape[2:])
                                             if z0 is None else z0.to(dtype))
    else:  # each sequence's sum restarts at its start (and from its own z_0): the stream's
        # running sum less the one before the start, in fp64 so that the difference of two
        # long sums keeps fp32's precision (in fp32 it cost 6e-5 of a gradient, CPU test)
        starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
        sequence = torch.repeat_interleave(torch.arange(len(starts), device=k.device),
                                           ends - starts)
        z = k.double().cumsum(1)
        z = (z - F.pad(z, (0, 0, 0, 0, 1, 0))[:, starts[sequence]]).to(dtype)
        if z0 is not None:
            z = z + z0.to(dtype)[sequence][None]
        last = z[0, (ends - 1).clamp_min(0)]
        empty = (ends == starts)[:, None, None]  # an empty sequence ends as it started
        last = torch.where(empty, torch.zeros_like(last) if z0 is None else z0.to(dtype), last)
    denom = (q.to(dtype) * z).sum(-1, keepdim=True) * scale + eps
    return (o.to(dtype) / denom).to(o.dtype), ((S, last) if output_final_state else None)
