"""Depthwise causal short convolution (+ SiLU) over [b, s, c], our Triton kernels:
ShortConvolution's CUDA path for widths up to 4 (``--la-conv-kernel auto``, the default).

Why a kernel of ours: the layer profiles put most of the gated_deltanet, deltanet and kda layer
overheads in fla's conv, whose kernels run at a third to a half (forward) and a quarter to a
third (backward) of a plain copy's bandwidth on the same tensor (``conv_bench --kernels``, H200
and H100). The forward here is a
tile of shifted multiply-adds. The backward (v4) walks each program's rows once, keeping the
last three x rows and the last three g rows in registers, so every x and dy element is loaded
once and every g computed once. The versions before it (v2, v3) tiled the rows and recomputed
the pre-activation at four shifts per tile: issue-bound, no faster than fla's backward.

Measured (H100, 2026-12-05, 65536 x 1536 bf16, device time): backward 300 us against fla's 613
(2.0 TB/s, a plain copy 3.0), forward 170 against 311; the GDN layer bench 1.35x -> 1.27x,
deltanet 1.45x -> 1.35x, kda 1.29x -> 1.24x.

    y[t, c] = act(bias[c] + sum_j w[c, j] x[t - (W-1) + j, c])        (x before t = 0 is zero)
    g[t]    = dy[t] * act'(pre[t])
    dx[t]   = sum_j w[j] g[t + (W-1) - j],  dw[j] = sum_t g[t] x[t - (W-1) + j],  db = sum_t g[t]

x may be a strided slice of a wider tensor (the fused in-projection's output) as long as its
channels are contiguous; y is contiguous, dx too unless the caller gives the slice of the
in-projection's gradient to write it into (grad_x_into). The weight and bias gradients are summed
over per-program partials in fp32 (deterministic, no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .gated_delta_rule import L2NORM_EPS

# The backward's rows per program are fixed: the partial weight-gradient buffer is sized by them.
_BWD_ROWS = 128
# The backward is written out for width 4 (fla's and the mixers' default), narrower weights
# zero-padded; wider convolutions are refused (fla's kernel takes them).
_BWD_WIDTH = 4
# The backward's channel lanes come in groups of 64 when no L2 norm asks for whole heads.
_BWD_LANES = 64
# A head must fit one backward program (its largest BD), its norm's sums being in registers.
_MAX_L2NORM_HEAD_DIM = 1024
# Triton's CPU interpreter (the CI tests) cannot time configs: one config each there.
_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _configs(params_and_warps):
    configs = [triton.Config(params, num_warps=warps) for params, warps in params_and_warps]
    return configs[:1] if _INTERPRETED else configs


@triton.jit
def _tap(x_base, stride_xt, src, o_d, m_d, T):
    """x[src, o_d] as fp32, zero outside [0, T)."""
    m = ((src >= 0) & (src < T))[:, None] & m_d[None, :]
    return tl.load(x_base + src.to(tl.int64)[:, None] * stride_xt + o_d[None, :], mask=m,
                   other=0.0).to(tl.float32)


@triton.jit
def _pre_activation(x_base, stride_xt, w, b, u, o_d, m_d, T, W: tl.constexpr,
                    HAS_BIAS: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    """bias + sum_j w[:, j] x[u - (W-1) + j] for the rows u, fp32 [BT, BD]."""
    acc = tl.zeros((BT, BD), dtype=tl.float32)
    if HAS_BIAS:
        acc += tl.load(b + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
    for j in tl.static_range(W):
        w_j = tl.load(w + o_d * W + j, mask=m_d, other=0.0).to(tl.float32)
        acc += _tap(x_base, stride_xt, u - (W - 1) + j, o_d, m_d, T) * w_j[None, :]
    return acc


@triton.autotune(
    configs=_configs([({"BT": bt, "BD": bd}, nw)
                      for bt, bd, nw in [(64, 64, 4), (128, 64, 4), (64, 128, 4), (128, 128, 8),
                                         (32, 128, 4), (256, 64, 8)]]),
    key=["D", "W"],
)
@triton.jit
def _fwd_kernel(x, w, b, y, T, D, stride_xb, stride_xt, W: tl.constexpr,
                HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BT: tl.constexpr, BD: tl.constexpr):
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    x_base = x + i_b.to(tl.int64) * stride_xb
    out = _pre_activation(x_base, stride_xt, w, b, o_t, o_d, m_d, T, W, HAS_BIAS, BT, BD)
    if SILU:
        out = out * tl.sigmoid(out)
    p_y = y + (i_b.to(tl.int64) * T + o_t.to(tl.int64))[:, None] * D + o_d[None, :]
    tl.store(p_y, out.to(y.dtype.element_ty), mask=(o_t < T)[:, None] & m_d[None, :])


@triton.autotune(
    # no spills at sm_90 (scripts/probes/compile_sm90.py; BT 128 with 8 warps spilled)
    configs=_configs([({"BT": bt}, nw) for bt, nw in [(32, 4), (16, 4), (32, 8), (64, 8),
                                                      (64, 16)]]),
    key=["D", "W", "HDP"],
)
@triton.jit
def _fwd_l2norm_kernel(x, w, b, y, T, D, HD, eps, stride_xb, stride_xt, W: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SILU: tl.constexpr, HDP: tl.constexpr,
                       BT: tl.constexpr):
    """_fwd_kernel, then each head's HD channels divided by their L2 norm (fla's l2norm:
    u / sqrt(sum u^2 + eps)); a program owns BT rows of one head (HDP: HD rounded up to a
    power of two, the lanes past HD masked)."""
    i_t, i_h, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_j = tl.arange(0, HDP)
    o_d = i_h * HD + o_j
    m_d = o_j < HD
    x_base = x + i_b.to(tl.int64) * stride_xb
    u = _pre_activation(x_base, stride_xt, w, b, o_t, o_d, m_d, T, W, HAS_BIAS, BT, HDP)
    if SILU:
        u = u * tl.sigmoid(u)
    u = tl.where(m_d[None, :], u, 0.0)
    out = u / tl.sqrt(tl.sum(u * u, 1) + eps)[:, None]
    p_y = y + (i_b.to(tl.int64) * T + o_t.to(tl.int64))[:, None] * D + o_d[None, :]
    tl.store(p_y, out.to(y.dtype.element_ty), mask=(o_t < T)[:, None] & m_d[None, :])


@triton.jit
def _row(p, r, stride_t, m_d, T):
    """Row r of the [T, BD] block at p as fp32, zero outside [0, T)."""
    rows = tl.zeros_like(m_d.to(tl.int32)) + r  # r as a block: the interpreter's masks want one
    return tl.load(p + r.to(tl.int64) * stride_t, mask=m_d & (rows >= 0) & (rows < T),
                   other=0.0).to(tl.float32)


def _heads_fit(configs, named_args, **kwargs):
    """The backward's configs whose BD holds a whole group of HDP lanes."""
    hdp = kwargs.get("HDP", named_args.get("HDP"))
    return [c for c in configs if c.kwargs["BD"] >= hdp]


@triton.autotune(
    configs=_configs([({"BD": bd, "R": r}, nw)
                      for bd, r, nw in [(256, 4, 1), (256, 4, 2), (512, 4, 2), (512, 4, 4),
                                        (1024, 4, 4), (512, 8, 4), (256, 8, 2)]]),
    key=["D", "HDP", "L2NORM"],
    prune_configs_by={"early_config_prune": _heads_fit},
)
@triton.jit
def _bwd_kernel(x, w, b, dy, dx, dw_part, db_part, T, D, HD, eps, NT, stride_xb, stride_xt,
                stride_dyb, stride_dyt, stride_dxb, stride_dxt, HAS_BIAS: tl.constexpr,
                SILU: tl.constexpr, L2NORM: tl.constexpr, HDP: tl.constexpr,
                L: tl.constexpr, BD: tl.constexpr, R: tl.constexpr):
    """Width 4 (narrower weights come zero-padded in front). The program owns dx rows
    [t0, t0 + L) of BD channels and walks rows r = t0 .. t0 + L + 2 one at a time, R rows per
    loop step (their loads issued together), keeping the last three x rows and the last three
    g = dy * act'(pre) rows in registers: each x and dy element is loaded once and each g
    computed once (the tiled version recomputed g at four shifts: issue-bound at ~1/4 of the
    HBM bandwidth). Row r gives g[r] (from x[r-3..r], dy[r]), completes dx[r-3] =
    w3 g[r-3] + w2 g[r-2] + w1 g[r-1] + w0 g[r], and adds g[r] x[r-3+j] to dw[j] for owned r.

    The BD channels are held as BD // HDP groups of HDP lanes, each group's first HD lanes the
    next HD channels: under L2NORM a group is a head (HDP its size rounded up to a power of
    two), whose norm's backward needs sums over it - dy[r] becomes the gradient before the
    norm, rstd (dy - y sum(dy y)) with y = act(pre) rstd recomputed here; else HD = HDP and
    the groups tile the channels contiguously, as one block of BD."""
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NHB: tl.constexpr = BD // HDP
    o_g = i_d * NHB + tl.arange(0, NHB)
    o_j = tl.arange(0, HDP)
    o_d = o_g[:, None] * HD + o_j[None, :]
    m_d = (o_j < HD)[None, :] & (o_d < D)
    t0 = i_t * L
    p_x = x + i_b.to(tl.int64) * stride_xb + o_d
    p_dy = dy + i_b.to(tl.int64) * stride_dyb + o_d
    p_dx = dx + i_b.to(tl.int64) * stride_dxb + o_d
    w0 = tl.load(w + o_d * 4 + 0, mask=m_d, other=0.0).to(tl.float32)
    w1 = tl.load(w + o_d * 4 + 1, mask=m_d, other=0.0).to(tl.float32)
    w2 = tl.load(w + o_d * 4 + 2, mask=m_d, other=0.0).to(tl.float32)
    w3 = tl.load(w + o_d * 4 + 3, mask=m_d, other=0.0).to(tl.float32)
    bias = tl.zeros((NHB, HDP), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(b + o_d, mask=m_d, other=0.0).to(tl.float32)
    xm3 = _row(p_x, t0 - 3, stride_xt, m_d, T)
    xm2 = _row(p_x, t0 - 2, stride_xt, m_d, T)
    xm1 = _row(p_x, t0 - 1, stride_xt, m_d, T)
    gm3 = tl.zeros((NHB, HDP), dtype=tl.float32)
    gm2 = tl.zeros((NHB, HDP), dtype=tl.float32)
    gm1 = tl.zeros((NHB, HDP), dtype=tl.float32)
    dw0 = tl.zeros((NHB, HDP), dtype=tl.float32)
    dw1 = tl.zeros((NHB, HDP), dtype=tl.float32)
    dw2 = tl.zeros((NHB, HDP), dtype=tl.float32)
    dw3 = tl.zeros((NHB, HDP), dtype=tl.float32)
    db = tl.zeros((NHB, HDP), dtype=tl.float32)
    t1 = tl.minimum(t0 + L, T)
    for step in range(0, L + 3, R):
        for i in tl.static_range(R):
            r = t0 + step + i
            x_r = _row(p_x, r, stride_xt, m_d, T)
            g = _row(p_dy, r, stride_dyt, m_d, T)  # zero past T, so g is too
            pre = w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x_r + bias
            if L2NORM:
                u = pre
                if SILU:
                    u = pre * tl.sigmoid(pre)
                u = tl.where(m_d, u, 0.0)
                rstd = 1.0 / tl.sqrt(tl.sum(u * u, 1) + eps)
                y = u * rstd[:, None]
                g = (g - y * tl.sum(g * y, 1)[:, None]) * rstd[:, None]
            if SILU:
                sig = tl.sigmoid(pre)
                g = g * sig * (1 + pre * (1 - sig))
            own = (r < t1).to(tl.float32)  # rows past the block belong to the next program
            g_own = g * own
            dw0 += g_own * xm3
            dw1 += g_own * xm2
            dw2 += g_own * xm1
            dw3 += g_own * x_r
            db += g_own
            grad_x = w3 * gm3 + w2 * gm2 + w1 * gm1 + w0 * g
            rows = tl.zeros_like(o_d) + (r - 3)
            tl.store(p_dx + (r - 3).to(tl.int64) * stride_dxt, grad_x.to(dx.dtype.element_ty),
                     mask=m_d & (rows >= t0) & (rows < t1))
            xm3, xm2, xm1 = xm2, xm1, x_r
            gm3, gm2, gm1 = gm2, gm1, g
    p_dw = dw_part + (i_b * NT + i_t).to(tl.int64) * 4 * D + o_d
    tl.store(p_dw, dw0, mask=m_d)
    tl.store(p_dw + D, dw1, mask=m_d)
    tl.store(p_dw + 2 * D, dw2, mask=m_d)
    tl.store(p_dw + 3 * D, dw3, mask=m_d)
    if HAS_BIAS:
        tl.store(db_part + (i_b * NT + i_t).to(tl.int64) * D + o_d, db, mask=m_d)


def _channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu, grad_x_into, l2norm_head_dim):
        x = _channels_contiguous(x)
        batch, seq, channels = x.shape
        width = weight.shape[-1]
        weight = weight.contiguous()
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        if l2norm_head_dim is None:
            def grid(meta):
                return (triton.cdiv(seq, meta["BT"]), triton.cdiv(channels, meta["BD"]), batch)

            _fwd_kernel[grid](x, weight, bias, y, seq, channels, x.stride(0), x.stride(1),
                              W=width, HAS_BIAS=bias is not None, SILU=silu)
        else:
            def grid(meta):
                return (triton.cdiv(seq, meta["BT"]), channels // l2norm_head_dim, batch)

            _fwd_l2norm_kernel[grid](x, weight, bias, y, seq, channels, l2norm_head_dim,
                                     L2NORM_EPS, x.stride(0), x.stride(1), W=width,
                                     HAS_BIAS=bias is not None, SILU=silu,
                                     HDP=triton.next_power_of_2(l2norm_head_dim))
        ctx.save_for_backward(x, weight, bias)
        ctx.silu, ctx.grad_x_into, ctx.l2norm_head_dim = silu, grad_x_into, l2norm_head_dim
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias = ctx.saved_tensors
        grad_y = _channels_contiguous(grad_y)
        batch, seq, channels = x.shape
        width = weight.shape[-1]
        # zero taps in front: the same conv at width 4, the kernel's
        weight4 = torch.nn.functional.pad(weight, (_BWD_WIDTH - width, 0)).contiguous()
        tiles = triton.cdiv(seq, _BWD_ROWS)
        if ctx.grad_x_into is not None:  # a slice of the fused in-projection's gradient
            grad_x = ctx.grad_x_into()
            if grad_x.shape != x.shape or grad_x.stride(-1) != 1 or grad_x.dtype != x.dtype:
                raise ValueError(f"causal_conv: grad_x_into gave {tuple(grad_x.shape)} "
                                 f"{grad_x.dtype} stride {grad_x.stride()} for x "
                                 f"{tuple(x.shape)} {x.dtype}; it must match x, channels "
                                 "contiguous")
        else:
            grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dw_part = torch.empty(batch * tiles, _BWD_WIDTH, channels, dtype=torch.float32,
                              device=x.device)
        db_part = (torch.empty(batch * tiles, channels, dtype=torch.float32, device=x.device)
                   if bias is not None else None)

        # the kernel's lane groups: a head each under the L2 norm, else 64 channels
        group = ctx.l2norm_head_dim or _BWD_LANES
        lanes = triton.next_power_of_2(group)
        groups = triton.cdiv(channels, group)

        def grid(meta):
            return (tiles, triton.cdiv(groups, meta["BD"] // lanes), batch)

        _bwd_kernel[grid](x, weight4, bias, grad_y, grad_x, dw_part, db_part, seq, channels,
                          group, L2NORM_EPS, tiles, x.stride(0), x.stride(1), grad_y.stride(0),
                          grad_y.stride(1), grad_x.stride(0), grad_x.stride(1),
                          HAS_BIAS=bias is not None, SILU=ctx.silu,
                          L2NORM=ctx.l2norm_head_dim is not None, HDP=lanes, L=_BWD_ROWS)
        grad_w = dw_part.sum(0).t()[:, _BWD_WIDTH - width:].to(weight.dtype)
        grad_b = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return grad_x, grad_w, grad_b, None, None, None


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                activation: str | None = "silu", grad_x_into=None,
                l2norm_head_dim: int | None = None) -> torch.Tensor:
    """x [b, s, c] (channels contiguous), weight [c, W], bias [c] or None -> [b, s, c].

    grad_x_into: called once in backward, returns the tensor x's gradient is written to (x's
    shape and dtype, channels contiguous; e.g. a slice of the fused in-projection's gradient,
    which then needs no concatenation); None: a new tensor.
    l2norm_head_dim: each head of that many channels of the output divided by its L2 norm
    (fla's l2norm, eps 1e-6), in the same kernels: the delta-rule mixers' q / k, which fla's
    op would otherwise normalise in passes of its own (use_qk_l2norm_in_kernel)."""
    if weight.shape[-1] > _BWD_WIDTH:
        raise ValueError(f"causal_conv: width {weight.shape[-1]} > {_BWD_WIDTH} not supported by "
                         "our kernel; use ShortConvolution(kernel='fla') (--la-conv-kernel fla)")
    if activation not in ("silu", None):
        raise ValueError(f"causal_conv: activation '{activation}' not supported; use 'silu' or "
                         "None")
    if l2norm_head_dim is not None and (x.shape[-1] % l2norm_head_dim
                                        or l2norm_head_dim > _MAX_L2NORM_HEAD_DIM):
        raise ValueError(f"causal_conv: l2norm_head_dim {l2norm_head_dim} must divide the "
                         f"{x.shape[-1]} channels and be at most {_MAX_L2NORM_HEAD_DIM}; "
                         "normalise the heads after the conv instead")
    return _CausalConv.apply(x, weight, bias, activation == "silu", grad_x_into, l2norm_head_dim)
