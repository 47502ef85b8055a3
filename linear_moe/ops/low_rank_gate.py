"""GLA's key decay from its low-rank chain's rank-r output z, our Triton kernels: the up
projection, its bias, logsigmoid, the normaliser and the clamp in one pass, on CUDA.

    g = max(logsigmoid(z W^T + b) / normalizer, clamp_min)          z [M, r], W [N, r], g [M, N]

Why a kernel of ours: as a GEMM and then a compiled logsigmoid, the pre-activation [M, N] is
written, read back, kept for backward (M x N x 2 bytes a layer: 128 MiB at the layer bench's
65,536 tokens) and, backward, its gradient written and read three times (the two GEMMs, the
bias's sum): ~0.3 ms of the GLA layer's ~2 ms over its bare op + projections (H100 op diff,
2026-12-06). With r = 16 the GEMMs are memory-bound, so the kernels recompute z W^T from z
(M x r) wherever they need it: forward reads z and writes g; backward reads dg twice (dz, then
dW / db) and writes nothing of size M x N.

    dpre = dg * sigmoid(-pre) / normalizer  (zero where the clamp held)
    dz = dpre W,   dW = dpre^T z,   db = sum_rows dpre
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Triton's CPU interpreter (the CI tests) cannot time configs: one config each there. The
# backward configs are those that ptxas (sm_90, scripts/probes/compile_sm90.py) fits in 255
# registers without spills: dpre, its factor and dg are [BM, BN] fp32 tiles beside tl.dot's.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The weight gradient's row groups: partial sums [groups, N, r] in fp32, summed on the host.
_ROW_GROUPS = 64


def _configs(params_and_warps):
    configs = [triton.Config(params, num_warps=warps) for params, warps in params_and_warps]
    return configs[:1] if _INTERPRETED else configs


def fused_low_rank_log_decay_applies(rank: int) -> bool:
    """tl.dot takes a reduction of at least 16, in powers of two here."""
    return rank >= 16 and rank & (rank - 1) == 0 and rank <= 128


def fused_rank_refusal(rank: int) -> str | None:
    """The one-line error for --la-fused-log-decay asked for with a rank the kernel cannot
    take, or None where it can."""
    if fused_low_rank_log_decay_applies(rank):
        return None
    return (f"--la-fused-log-decay takes --la-gate-low-rank-dim a power of two in [16, 128], "
            f"not {rank}; change the rank or drop --la-fused-log-decay")


@triton.jit
def _pre_activation(z, w, b, o_m, o_n, M, N, R: tl.constexpr, HAS_BIAS: tl.constexpr,
                    IEEE: tl.constexpr):
    """(z W^T + b) for the rows o_m and columns o_n, fp32 [BM, BN]; also z's and W's tiles."""
    o_r = tl.arange(0, R)
    z_t = tl.load(z + o_m.to(tl.int64)[:, None] * R + o_r[None, :], mask=(o_m < M)[:, None],
                  other=0.0)
    w_t = tl.load(w + o_n[:, None] * R + o_r[None, :], mask=(o_n < N)[:, None], other=0.0)
    if IEEE:  # fp32 operands: no tf32 rounding
        pre = tl.dot(z_t, tl.trans(w_t), input_precision="ieee")
    else:
        pre = tl.dot(z_t, tl.trans(w_t))
    if HAS_BIAS:
        pre += tl.load(b + o_n, mask=o_n < N, other=0.0).to(tl.float32)[None, :]
    return pre, z_t, w_t


@triton.jit
def _log_decay_and_grad_factor(pre, inv_norm, clamp_min, CLAMP: tl.constexpr):
    """g and dg/dpre: logsigmoid(pre) / normalizer, clamped; sigmoid(-pre) / normalizer, zero
    where the clamp held (torch's clamp_min passes the gradient at equality)."""
    g = (tl.minimum(pre, 0.0) - tl.log(1.0 + tl.exp(-tl.abs(pre)))) * inv_norm
    factor = tl.sigmoid(-pre) * inv_norm
    if CLAMP:
        factor = tl.where(g >= clamp_min, factor, 0.0)
        g = tl.maximum(g, clamp_min)
    return g, factor


@triton.autotune(
    configs=_configs([({"BM": bm, "BN": bn}, nw)
                      for bm, bn, nw in [(64, 128, 4), (128, 128, 8), (128, 64, 4), (64, 64, 4)]]),
    key=["N", "R"],
)
@triton.jit
def _fwd_kernel(z, w, b, g, M, N, inv_norm, clamp_min, R: tl.constexpr, HAS_BIAS: tl.constexpr,
                CLAMP: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    o_n = tl.program_id(1) * BN + tl.arange(0, BN)
    pre, _, _ = _pre_activation(z, w, b, o_m, o_n, M, N, R, HAS_BIAS, IEEE)
    out, _ = _log_decay_and_grad_factor(pre, inv_norm, clamp_min, CLAMP)
    tl.store(g + o_m.to(tl.int64)[:, None] * N + o_n[None, :], out.to(g.dtype.element_ty),
             mask=(o_m < M)[:, None] & (o_n < N)[None, :])


@triton.jit
def _pre_gradient(z, w, b, dg, o_m, o_n, M, N, inv_norm, clamp_min, R: tl.constexpr,
                  HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr, IEEE: tl.constexpr):
    """dpre [BM, BN] (fp32; zero outside M x N) with z's and W's tiles."""
    pre, z_t, w_t = _pre_activation(z, w, b, o_m, o_n, M, N, R, HAS_BIAS, IEEE)
    _, factor = _log_decay_and_grad_factor(pre, inv_norm, clamp_min, CLAMP)
    m = (o_m < M)[:, None] & (o_n < N)[None, :]
    d = tl.load(dg + o_m.to(tl.int64)[:, None] * N + o_n[None, :], mask=m, other=0.0)
    return d.to(tl.float32) * factor, z_t, w_t


@triton.autotune(
    configs=_configs([({"BM": bm, "BN": bn}, nw)
                      for bm, bn, nw in [(64, 64, 4), (32, 64, 4), (32, 128, 4), (64, 64, 8),
                                         (64, 128, 8)]]),
    key=["N", "R"],
)
@triton.jit
def _bwd_dz_kernel(z, w, b, dg, dz, M, N, inv_norm, clamp_min, R: tl.constexpr,
                   HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr, IEEE: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr):
    """dz for BM rows: dpre W summed over all N columns, BN at a time."""
    o_m = tl.program_id(0) * BM + tl.arange(0, BM)
    acc = tl.zeros((BM, R), dtype=tl.float32)
    for n0 in range(0, N, BN):
        o_n = n0 + tl.arange(0, BN)
        dpre, _, w_t = _pre_gradient(z, w, b, dg, o_m, o_n, M, N, inv_norm, clamp_min, R,
                                     HAS_BIAS, CLAMP, IEEE)
        if IEEE:
            acc += tl.dot(dpre, w_t.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(dpre.to(w_t.dtype), w_t)
    tl.store(dz + o_m.to(tl.int64)[:, None] * R + tl.arange(0, R)[None, :],
             acc.to(dz.dtype.element_ty), mask=(o_m < M)[:, None])


@triton.autotune(
    configs=_configs([({"BM": bm, "BN": bn}, nw)
                      for bm, bn, nw in [(64, 64, 4), (32, 64, 4), (32, 128, 4), (128, 64, 8),
                                         (64, 128, 8)]]),
    key=["N", "R"],
)
@triton.jit
def _bwd_dw_kernel(z, w, b, dg, dw_part, db_part, M, N, inv_norm, clamp_min, R: tl.constexpr,
                   HAS_BIAS: tl.constexpr, CLAMP: tl.constexpr, IEEE: tl.constexpr,
                   GROUPS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr):
    """dW and db for BN columns over the row tiles of one of GROUPS row groups (partials)."""
    o_n = tl.program_id(0) * BN + tl.arange(0, BN)
    group = tl.program_id(1)
    acc_w = tl.zeros((BN, R), dtype=tl.float32)
    acc_b = tl.zeros((BN,), dtype=tl.float32)
    for m0 in range(group * BM, M, GROUPS * BM):
        o_m = m0 + tl.arange(0, BM)
        dpre, z_t, _ = _pre_gradient(z, w, b, dg, o_m, o_n, M, N, inv_norm, clamp_min, R,
                                     HAS_BIAS, CLAMP, IEEE)
        if IEEE:
            acc_w += tl.dot(tl.trans(dpre), z_t.to(tl.float32), input_precision="ieee")
        else:
            acc_w += tl.dot(tl.trans(dpre.to(z_t.dtype)), z_t)
        acc_b += tl.sum(dpre, 0)
    part = group.to(tl.int64) * N
    tl.store(dw_part + (part + o_n)[:, None] * R + tl.arange(0, R)[None, :], acc_w,
             mask=(o_n < N)[:, None])
    if HAS_BIAS:
        tl.store(db_part + part + o_n, acc_b, mask=o_n < N)


class _LowRankLogDecay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, weight, bias, normalizer, clamp_min):
        R = z.shape[-1]
        z2 = z.reshape(-1, R).contiguous()
        M, N = z2.shape[0], weight.shape[0]
        weight = weight.contiguous()
        g = torch.empty(M, N, dtype=z.dtype, device=z.device)
        kernel_args = _kernel_args(normalizer, clamp_min, bias, z.dtype, R)

        def grid(meta):
            return (triton.cdiv(M, meta["BM"]), triton.cdiv(N, meta["BN"]))

        _fwd_kernel[grid](z2, weight, bias, g, M, N, **kernel_args)
        ctx.save_for_backward(z2, weight, bias)
        ctx.lead, ctx.kernel_args = z.shape[:-1], kernel_args
        return g.view(*ctx.lead, N)

    @staticmethod
    def backward(ctx, grad_g):
        z2, weight, bias = ctx.saved_tensors
        (M, R), N = z2.shape, weight.shape[0]
        dg = grad_g.reshape(M, N).contiguous()
        kernel_args = ctx.kernel_args
        dz = torch.empty_like(z2)
        _bwd_dz_kernel[lambda meta: (triton.cdiv(M, meta["BM"]),)](
            z2, weight, bias, dg, dz, M, N, **kernel_args)
        dw_part = torch.empty(_ROW_GROUPS, N, R, dtype=torch.float32, device=z2.device)
        db_part = (torch.empty(_ROW_GROUPS, N, dtype=torch.float32, device=z2.device)
                   if bias is not None else None)
        _bwd_dw_kernel[lambda meta: (triton.cdiv(N, meta["BN"]), _ROW_GROUPS)](
            z2, weight, bias, dg, dw_part, db_part, M, N, GROUPS=_ROW_GROUPS, **kernel_args)
        grad_w = dw_part.sum(0).to(weight.dtype)
        grad_b = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return dz.view(*ctx.lead, R), grad_w, grad_b, None, None


def _kernel_args(normalizer, clamp_min, bias, dtype, rank):
    """The scalars and constexprs the three kernels share, as keywords."""
    return dict(inv_norm=1.0 / normalizer,
                clamp_min=0.0 if clamp_min is None else float(clamp_min),
                R=rank, HAS_BIAS=bias is not None, CLAMP=clamp_min is not None,
                IEEE=dtype == torch.float32)


def low_rank_log_decay(z: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                       normalizer: float, clamp_min: float | None = None) -> torch.Tensor:
    """z [..., r] (the low-rank chain's down projection output), weight [N, r], bias [N] or
    None -> max(logsigmoid(z W^T + b) / normalizer, clamp_min) [..., N] in z's dtype."""
    if not fused_low_rank_log_decay_applies(z.shape[-1]):
        raise ValueError(f"low_rank_log_decay: rank {z.shape[-1]} is not a power of two in "
                         "[16, 128]; use the up projection and logsigmoid instead")
    if weight.shape[-1] != z.shape[-1]:
        raise ValueError(f"low_rank_log_decay: weight {tuple(weight.shape)} does not take rank "
                         f"{z.shape[-1]}")
    return _LowRankLogDecay.apply(z, weight, bias, normalizer, clamp_min)
