"""Depthwise causal short convolution over the sequence, channels sharded over TP by heads
(the weight and the optional bias alike).

On CUDA (unless the mixer runs the reference backend) it is a Triton kernel that reads and
writes [b, s, c] and fuses the SiLU: ours (linear_moe.ops.causal_conv) for widths up to 4, else
fla's causal_conv1d (--la-conv-kernel picks one). torch's depthwise conv1d wants [b, c, s], so it
costs two transposes, a slice and an unfused activation per conv (with three of them the GDN
layer measured 1.9x its bare op + projections on the H200)."""

import math

import torch
import torch.nn.functional as F

from linear_moe.layers.tp_init import init_tp_sharded_
from linear_moe.ops.gated_delta_rule import l2norm


class ShortConvolution(torch.nn.Module):
    def __init__(self, channels: int, kernel_size: int, tp_rank: int, tp_size: int,
                 params_dtype, activation: str | None = "silu", bias: bool = False,
                 fused: bool = True, kernel: str = "auto", l2norm_head_dim: int | None = None):
        super().__init__()
        if kernel not in ("auto", "fla", "ours"):
            raise ValueError(f"unknown short-conv kernel '{kernel}'; choose auto, fla or ours")
        if kernel == "auto":  # ours where it applies (widths up to 4), fla's otherwise
            kernel = "ours" if kernel_size <= 4 else "fla"
        if kernel == "ours" and kernel_size > 4:
            raise ValueError(f"short-conv kernel 'ours' takes widths up to 4, not {kernel_size}; "
                             "use kernel 'fla' (--la-conv-kernel fla)")
        self.fused = fused
        # "ours": linear_moe.ops.causal_conv, 2x fla's device time fwd+bwd on the H100
        # (conv_bench --kernels, 2026-12-05); GDN layer bench 1.35x -> 1.27x with it.
        self.kernel = kernel
        if channels % tp_size:
            raise ValueError(f"short-conv channels {channels} not divisible by TP {tp_size}")
        self.kernel_size = kernel_size
        self.activation = activation
        # Each head of the output L2-normalised (the delta-rule mixers' q / k): in our kernel
        # where it runs, else a pass after the conv. Local channels are whole heads under TP.
        self.l2norm_head_dim = l2norm_head_dim
        self.weight = torch.nn.Parameter(
            torch.empty(channels // tp_size, 1, kernel_size, dtype=params_dtype))
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default for a depthwise kernel
        init_tp_sharded_(self.weight, (channels, 1, kernel_size), 0,
                         lambda t: torch.nn.init.uniform_(t, -bound, bound), tp_rank, tp_size)
        self.bias = None
        if bias:  # nn.Conv1d's default init too, sharded by channels like the weight
            self.bias = torch.nn.Parameter(torch.empty(channels // tp_size, dtype=params_dtype))
            init_tp_sharded_(self.bias, (channels,), 0,
                             lambda t: torch.nn.init.uniform_(t, -bound, bound), tp_rank, tp_size)

    def forward(self, x, grad_x_into=None, cache=None, cp=None, documents=None):
        """x: [b, s, c_local] -> [b, s, c_local]; position t sees t-kernel_size+1 .. t.
        grad_x_into: where our kernel's backward writes x's gradient (see causal_conv); the
        other paths return their own, which the caller's split then copies.
        cache: a decoding mixer's DecodeCache: x continues the inputs of the previous call,
        whose last kernel_size - 1 it keeps (zeros before the first).
        cp: the mixer's SequenceChunks under context parallelism: each of x's two pieces
        continues the inputs of the chunk before it, on whichever rank that is.
        documents: the packed stream's Documents (x [1, T, c]): each document's first positions
        read no tokens before it."""
        if documents is not None:
            return self._conv(x, None, documents)
        if cp is not None:
            return cp.with_halo(x, self.kernel_size - 1, lambda x: self._conv(x, None))
        if cache is not None:
            width = self.kernel_size - 1
            past = cache.states.get(self)
            if past is None:
                past = x.new_zeros(x.shape[0], width, x.shape[2])
            x = torch.cat([past, x], 1)
            cache.states[self] = x[:, x.shape[1] - width:]
            return self._conv(x, None)[:, width:]
        return self._conv(x, grad_x_into)

    def _conv(self, x, grad_x_into, documents=None):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # out[t] = sum_j w[j] x[t - (k-1) + j]: the same taps on every path
        weight = self.weight.squeeze(1).to(x.dtype)
        if self.fused and x.is_cuda:
            if self.kernel == "ours" and documents is None:
                from linear_moe.ops.causal_conv import causal_conv

                return causal_conv(x, weight, bias, self.activation, grad_x_into,
                                   l2norm_head_dim=self.l2norm_head_dim)
            from fla.modules.causal_conv1d import causal_conv1d

            return self._l2norm(causal_conv1d(
                x, weight, bias, activation=self.activation, backend="triton",
                cu_seqlens=None if documents is None else documents.cu_seqlens)[0])
        if documents is None:
            s = x.shape[1]
            y = F.conv1d(x.transpose(1, 2), self.weight.to(x.dtype), bias,
                         padding=self.kernel_size - 1, groups=x.shape[-1])[..., :s]
            y = y.transpose(1, 2)
        else:  # tap by tap, each reading nothing before its document's start
            k = self.kernel_size
            y = x * weight[:, k - 1]
            for i in range(k - 1):
                y = y + documents.previous(x, k - 1 - i) * weight[:, i]
            if bias is not None:
                y = y + bias
        return self._l2norm(F.silu(y) if self.activation == "silu" else y)

    def _l2norm(self, y):
        if self.l2norm_head_dim is None:
            return y
        # in fp32, as fla's kernel and ours
        return l2norm(y.unflatten(-1, (-1, self.l2norm_head_dim)).float()).flatten(-2).to(y.dtype)
