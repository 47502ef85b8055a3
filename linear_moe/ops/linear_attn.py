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
    backend: str = "auto",
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple | None]:
    """q, k [B, T, H, K] (feature-mapped), v [B, T, H, V] -> (o [B, T, H, V] in q.dtype,
    final state or None): the state is (S [B, H, K, V], z [B, H, K], None without the
    normaliser), as initial_state takes it.

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
                      output_final_state=output_final_state, backend=backend, mode=mode,
                      chunk_size=chunk_size)
    if not normalize:
        return o, ((S, None) if output_final_state else None)
    dtype = compute_dtype(q, k, v)
    z = k.to(dtype).cumsum(1)  # z_t = z_0 + sum_{s <= t} phi(k_s)
    if z0 is not None:
        z = z + z0[:, None].to(dtype)
    denom = (q.to(dtype) * z).sum(-1, keepdim=True) * scale + eps
    return (o.to(dtype) / denom).to(o.dtype), ((S, z[:, -1]) if output_final_state else None)
