"""Depthwise causal short convolution (+ SiLU) over [b, s, c], our Triton kernels: a candidate
for ShortConvolution's CUDA path (``ShortConvolution(..., kernel="ours")``), measured against
fla's causal_conv1d in ``benchmarks/conv_bench.py`` before the model takes it.

Why a kernel of ours: the fifth H200 session's layer profiles put most of the gated_deltanet,
deltanet and kda layer overheads in fla's conv, whose backward first reruns the forward as a
separate kernel (writing the whole pre-activation to memory) and then reads x, that
pre-activation and dy: ~1.2 GB of traffic per 200 MB tensor, measured at ~1/3 of the HBM
bandwidth. Here the backward recomputes the pre-activation in registers from the 7 x rows a
width-4 tile needs, each loaded once: it reads x and dy once and writes dx, half the traffic
(a first version re-read every tap per shift and was load-bound, no faster than fla's in the
layer). The forward is the same shifted multiply-add as fla's.

Measured (H100, 2026-12-05): 1.13-1.35x fla's conv fwd+bwd alone, but the three convs of the
GDN layer take 3.53 against 3.79 ms/step and the layer ratio moves within run-to-run noise, so
the mixers keep fla's by default. A version with 4 values a thread (~80 registers against this
one's ~250) was slower (0.90-0.95x fla): occupancy is not what limits this backward.

    y[t, c] = act(bias[c] + sum_j w[c, j] x[t - (W-1) + j, c])        (x before t = 0 is zero)
    g[t]    = dy[t] * act'(pre[t])
    dx[t]   = sum_j w[j] g[t + (W-1) - j],  dw[j] = sum_t g[t] x[t - (W-1) + j],  db = sum_t g[t]

x may be a strided slice of a wider tensor (the fused in-projection's output) as long as its
channels are contiguous; y and dx are contiguous. The weight and bias gradients are summed
over per-tile partials in fp32 (deterministic, no atomics).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# The backward's time tile is fixed: the partial weight-gradient buffer is sized by it.
_BWD_BT = 64
# The backward is written out for width 4 (fla's and the mixers' default), narrower weights
# zero-padded; wider convolutions are refused (fla's kernel takes them).
_BWD_WIDTH = 4
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


@triton.jit
def _rows(p, k: tl.constexpr, stride_t, o_t, m_d, T):
    """The tile at p shifted by k rows, as fp32, zero outside [0, T)."""
    r = o_t + k
    return tl.load(p + k * stride_t, mask=((r >= 0) & (r < T))[:, None] & m_d[None, :],
                   other=0.0).to(tl.float32)


@triton.jit
def _grad_pre(p_dy, s: tl.constexpr, stride_dyt, o_t, m_d, T, pre, SILU: tl.constexpr):
    """g at rows o_t + s: dy times the activation's derivative at the pre-activation."""
    g = _rows(p_dy, s, stride_dyt, o_t, m_d, T)
    if SILU:
        sig = tl.sigmoid(pre)
        g = g * sig * (1 + pre * (1 - sig))
    return g


@triton.autotune(
    configs=_configs([({"BD": bd}, nw)
                      for bd, nw in [(32, 4), (16, 2), (32, 2), (64, 4), (64, 8), (128, 8)]]),
    key=["D"],
)
@triton.jit
def _bwd_kernel(x, w, b, dy, dx, dw_part, db_part, T, D, NT, stride_xb, stride_xt,
                stride_dyb, stride_dyt, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
                BT: tl.constexpr, BD: tl.constexpr):
    """Width 4 (narrower weights come zero-padded in front). Every x row the tile needs,
    o_t - 3 .. o_t + 3, is loaded once into registers (X_k below) and reused by the four
    recomputed pre-activations and the weight gradient: 7 x loads and 4 dy loads per tile."""
    i_t, i_d, i_b = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    rows = o_t.to(tl.int64)[:, None]
    p_x = x + i_b.to(tl.int64) * stride_xb + rows * stride_xt + o_d[None, :]
    p_dy = dy + i_b.to(tl.int64) * stride_dyb + rows * stride_dyt + o_d[None, :]
    w0 = tl.load(w + o_d * 4 + 0, mask=m_d, other=0.0).to(tl.float32)[None, :]
    w1 = tl.load(w + o_d * 4 + 1, mask=m_d, other=0.0).to(tl.float32)[None, :]
    w2 = tl.load(w + o_d * 4 + 2, mask=m_d, other=0.0).to(tl.float32)[None, :]
    w3 = tl.load(w + o_d * 4 + 3, mask=m_d, other=0.0).to(tl.float32)[None, :]
    xm3 = _rows(p_x, -3, stride_xt, o_t, m_d, T)
    xm2 = _rows(p_x, -2, stride_xt, o_t, m_d, T)
    xm1 = _rows(p_x, -1, stride_xt, o_t, m_d, T)
    x0 = _rows(p_x, 0, stride_xt, o_t, m_d, T)
    pre0 = w0 * xm3 + w1 * xm2 + w2 * xm1 + w3 * x0  # pre-activation at row t + s: pre<s>
    pre1 = pre0  # placeholders without SILU, where g = dy
    pre2 = pre0
    pre3 = pre0
    if SILU:
        xp1 = _rows(p_x, 1, stride_xt, o_t, m_d, T)
        xp2 = _rows(p_x, 2, stride_xt, o_t, m_d, T)
        xp3 = _rows(p_x, 3, stride_xt, o_t, m_d, T)
        pre1 = w0 * xm2 + w1 * xm1 + w2 * x0 + w3 * xp1
        pre2 = w0 * xm1 + w1 * x0 + w2 * xp1 + w3 * xp2
        pre3 = w0 * x0 + w1 * xp1 + w2 * xp2 + w3 * xp3
        if HAS_BIAS:
            bias = tl.load(b + o_d, mask=m_d, other=0.0).to(tl.float32)[None, :]
            pre0 += bias
            pre1 += bias
            pre2 += bias
            pre3 += bias
    g0 = _grad_pre(p_dy, 0, stride_dyt, o_t, m_d, T, pre0, SILU)
    g1 = _grad_pre(p_dy, 1, stride_dyt, o_t, m_d, T, pre1, SILU)
    g2 = _grad_pre(p_dy, 2, stride_dyt, o_t, m_d, T, pre2, SILU)
    g3 = _grad_pre(p_dy, 3, stride_dyt, o_t, m_d, T, pre3, SILU)
    # dx[t] = sum_s w[3 - s] g[t + s]
    grad_x = w3 * g0 + w2 * g1 + w1 * g2 + w0 * g3
    p_dx = dx + (i_b.to(tl.int64) * T + rows) * D + o_d[None, :]
    tl.store(p_dx, grad_x.to(dx.dtype.element_ty), mask=(o_t < T)[:, None] & m_d[None, :])
    # dw[j] = sum_t g[t] x[t - 3 + j] over this tile's rows (rows past T hold g = 0)
    p_dw = dw_part + ((i_b * NT + i_t).to(tl.int64) * D + o_d) * 4
    tl.store(p_dw + 0, tl.sum(g0 * xm3, 0), mask=m_d)
    tl.store(p_dw + 1, tl.sum(g0 * xm2, 0), mask=m_d)
    tl.store(p_dw + 2, tl.sum(g0 * xm1, 0), mask=m_d)
    tl.store(p_dw + 3, tl.sum(g0 * x0, 0), mask=m_d)
    if HAS_BIAS:
        tl.store(db_part + (i_b * NT + i_t).to(tl.int64) * D + o_d, tl.sum(g0, 0), mask=m_d)


def _channels_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _CausalConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        x = _channels_contiguous(x)
        batch, seq, channels = x.shape
        width = weight.shape[-1]
        weight = weight.contiguous()
        y = torch.empty(x.shape, dtype=x.dtype, device=x.device)

        def grid(meta):
            return (triton.cdiv(seq, meta["BT"]), triton.cdiv(channels, meta["BD"]), batch)

        _fwd_kernel[grid](x, weight, bias, y, seq, channels, x.stride(0), x.stride(1), W=width,
                          HAS_BIAS=bias is not None, SILU=silu)
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, bias = ctx.saved_tensors
        grad_y = _channels_contiguous(grad_y)
        batch, seq, channels = x.shape
        width = weight.shape[-1]
        # zero taps in front: the same conv at width 4, the kernel's
        weight4 = torch.nn.functional.pad(weight, (_BWD_WIDTH - width, 0)).contiguous()
        tiles = triton.cdiv(seq, _BWD_BT)
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        dw_part = torch.empty(batch * tiles, channels, _BWD_WIDTH, dtype=torch.float32,
                              device=x.device)
        db_part = (torch.empty(batch * tiles, channels, dtype=torch.float32, device=x.device)
                   if bias is not None else None)

        def grid(meta):
            return (tiles, triton.cdiv(channels, meta["BD"]), batch)

        _bwd_kernel[grid](x, weight4, bias, grad_y, grad_x, dw_part, db_part, seq, channels,
                          tiles, x.stride(0), x.stride(1), grad_y.stride(0), grad_y.stride(1),
                          HAS_BIAS=bias is not None, SILU=ctx.silu, BT=_BWD_BT)
        grad_w = dw_part.sum(0)[:, _BWD_WIDTH - width:].to(weight.dtype)
        grad_b = db_part.sum(0).to(bias.dtype) if bias is not None else None
        return grad_x, grad_w, grad_b, None


def causal_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                activation: str | None = "silu") -> torch.Tensor:
    """x [b, s, c] (channels contiguous), weight [c, W], bias [c] or None -> [b, s, c]."""
    if weight.shape[-1] > _BWD_WIDTH:
        raise ValueError(f"causal_conv: width {weight.shape[-1]} > {_BWD_WIDTH} not supported by "
                         "our kernel; use ShortConvolution(kernel='fla') (--la-conv-kernel fla)")
    if activation not in ("silu", None):
        raise ValueError(f"causal_conv: activation '{activation}' not supported; use 'silu' or "
                         "None")
    return _CausalConv.apply(x, weight, bias, activation == "silu")
