"""Polynomial-kernel linear attention with a normaliser, fla layout [B, T, H, D]:
Based (Arora et al., 2024, arXiv:2402.18668) and ReBased (Aksenov et al., 2024,
arXiv:2402.10644). With s_ij = scale q_i k_j and a causal sum over j <= i,

    based:    o_i = sum_j (1 + s_ij + s_ij^2 / 2) v_j / (sum_j (1 + s_ij + s_ij^2 / 2) + eps)
    rebased:  o_i = sum_j s_ij^2 v_j / (sum_j s_ij^2 + eps)

i.e. linear attention with normaliser on the explicit feature maps
    based:    phi(x) = [1, x, x (x) x / sqrt(2)]   (2nd-order Taylor expansion of exp(x . y))
    rebased:  phi(x) = x (x) x
of x = sqrt(scale) q (or k), since phi(x) . phi(y) is then the kernel above. ReBased's learnable
part (affine-normalised q/k) is the mixer's; the op takes q, k after it.

The reference expands the maps and runs ops.linear_attn (the zero-decay simple_gla reference
plus normaliser). Both maps are kept in their compact form: each off-diagonal product
x_i x_j (i < j) once, times sqrt(2) for its twin x_j x_i, which has the same inner products
with d (d + 1) / 2 instead of d^2 second-order dims (as fla's feature maps).

fla kernels (CUDA): `parallel` = fla's parallel_based / parallel_rebased (quadratic in T, the
kernel computed from q . k, feature dim <= 128); `chunk` = the expanded maps through fla's
chunk_simple_gla (as fla's based/rebased layers' chunk mode); based also has `fused_chunk` =
fla's fused_chunk_based (feature dim <= 16). None of these backward passes goes through the
gated chunk_bwd_dqkwg that fla_compat's Hopper guard covers.
"""

from __future__ import annotations

import math

import torch

from .dispatch import resolve_backend
from .linear_attn import linear_attn

BASED_MODES = ("chunk", "parallel", "fused_chunk")
REBASED_MODES = ("parallel", "chunk")  # the mixer's default first
# Largest feature dim of each fla kernel (their asserts).
_FLA_MAX_DIM = {"parallel": 128, "fused_chunk": 16}


def _pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., d] -> (x_i^2 [..., d], x_i x_j for i < j [..., d (d - 1) / 2])."""
    i, j = torch.triu_indices(x.shape[-1], x.shape[-1], 1, device=x.device)
    return x * x, x[..., i] * x[..., j]


def taylor_feature_map(x: torch.Tensor) -> torch.Tensor:
    """[1, x, x (x) x / sqrt(2)], compact: phi(x) . phi(y) = 1 + x.y + (x.y)^2 / 2.

    (x (x) x / sqrt(2)) . (y (x) y / sqrt(2)) = sum_i x_i^2 y_i^2 / 2 + sum_{i<j} x_i x_j y_i y_j,
    so the squares keep weight 1/sqrt(2) and each pair i < j weight 1.
    """
    squares, cross = _pairs(x)
    return torch.cat([torch.ones_like(x[..., :1]), x, squares / math.sqrt(2), cross], -1)


def quadratic_feature_map(x: torch.Tensor) -> torch.Tensor:
    """x (x) x, compact: phi(x) . phi(y) = (x . y)^2."""
    squares, cross = _pairs(x)
    return torch.cat([squares, cross * math.sqrt(2)], -1)


def _check(name, q, k, v, mode, modes):
    if mode not in modes:
        raise ValueError(f"unknown {name} mode {mode!r}; valid modes: {', '.join(modes)}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{name} expects q, k [B, T, H, d] and v [B, T, H, V]; got q "
                         f"{tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    limit = _FLA_MAX_DIM.get(mode)
    if limit is not None and q.is_cuda and q.shape[-1] > limit:
        raise ValueError(f"fla's {mode} {name} kernel supports feature dims <= {limit}, got "
                         f"{q.shape[-1]}; use mode 'chunk'")


def _expanded(phi, q, k, v, scale, eps, backend, chunk_size, initial_state, output_final_state,
              cu_seqlens):
    """Linear attention with normaliser on phi(sqrt(scale) q), phi(sqrt(scale) k)."""
    r = math.sqrt(scale)
    return linear_attn(phi(q * r), phi(k * r), v, scale=1.0, normalize=True, eps=eps,
                       initial_state=initial_state, output_final_state=output_final_state,
                       cu_seqlens=cu_seqlens, backend=backend, mode="chunk",
                       chunk_size=chunk_size)


def based(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    eps: float = 1e-6,
    initial_state: tuple | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple | None]:
    """q, k [B, T, H, d] (before the Taylor map), v [B, T, H, V] -> (o [B, T, H, V] in
    q.dtype, final state or None): the state is linear_attn's over the Taylor features, so a
    stateful or packed (cu_seqlens) call takes the chunk form whatever the mode.

    scale defaults to d^-1/2 (fla's based layer); eps 1e-6 is fla's parallel kernels' own.
    """
    _check("based", q, k, v, mode, BASED_MODES)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # fla's parallel / fused_chunk kernels take neither states nor packed sequences
    stateful = initial_state is not None or output_final_state or cu_seqlens is not None
    if resolve_backend(backend, q) == "fla" and mode != "chunk" and not stateful:
        from fla.ops.based import fused_chunk_based, parallel_based

        kernel = parallel_based if mode == "parallel" else fused_chunk_based
        return kernel(q, k, v, scale=scale, use_norm=True), None  # eps fixed at 1e-6 by fla
    return _expanded(taylor_feature_map, q, k, v, scale, eps, backend, chunk_size,
                     initial_state, output_final_state, cu_seqlens)


def rebased(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    eps: float = 1e-5,
    initial_state: tuple | None = None,
    output_final_state: bool = False,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    mode: str = "chunk",
    chunk_size: int = 64,
) -> tuple[torch.Tensor, tuple | None]:
    """q, k [B, T, H, d] (normalised, before the quadratic map), v [B, T, H, V] -> (o, final
    state or None), the state as based's (a stateful call takes the chunk form).

    The scale is d^-1/2, as fla's parallel_rebased(use_scale=True); eps 1e-5 is fla's layer's.
    """
    _check("rebased", q, k, v, mode, REBASED_MODES)
    # fla's parallel / fused_chunk kernels take neither states nor packed sequences
    stateful = initial_state is not None or output_final_state or cu_seqlens is not None
    if resolve_backend(backend, q) == "fla" and mode == "parallel" and not stateful:
        from fla.ops.rebased import parallel_rebased

        # In fp32 (fla's kernel does fp32 dots without tf32 then): at ReBased's feature dim 16
        # the bf16 kernel's (q.k)^2 cost dq/dk 2.2e-2, fp32 2.5e-3 (H200, T=300); the op is
        # small next to the layer's projections at d = 16.
        o = parallel_rebased(q.float(), k.float(), v.float(), eps=eps, use_scale=True,
                             use_normalize=True)
        return o.to(q.dtype), None
    # chunk stays in the input dtype: fp32 quadratic features through fla's chunk_simple_gla
    # came out wrong (o 7.8e-2, dq 1.5 on the H200), bf16 ones cost dq/dk ~8e-2 (README).
    return _expanded(quadratic_feature_map, q, k, v, q.shape[-1] ** -0.5, eps, backend,
                     chunk_size, initial_state, output_final_state, cu_seqlens)
