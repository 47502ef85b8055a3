"""The MLP activation shared by the dense MLP and the grouped experts, and a dense MLP that
recomputes it (--mlp-act-recompute).

megatron-core's MLP keeps, per layer, both fc1's output (for the SwiGLU backward) and the
SwiGLU's output (for fc2's weight gradient). The second is recomputable from the first in one
elementwise pass. Without TransformerEngine megatron-core offers that only for MoE experts
("moe_act", which needs TE's grouped GEMM); for a dense layer its choices are to keep it or
to recompute the whole MLP ("mlp", one more fc1 GEMM). ActivationRecomputeMLP drops just the
activation's output after fc2's forward and rebuilds it before fc2's backward, with
megatron-core's own CheckpointWithoutOutput: at 16,384 tokens x FFN 7,168 in bf16 that is
235 MB per layer (2.8 GiB over 12 layers) for one SwiGLU pass per layer.

For a SwiGLU without fc1 bias (the llama / qwen / mixtral presets) the recompute is folded into
the backward instead (_SwiGLULinear, as fla's swiglu_linear): fc2's input gradient is computed
first, then one elementwise pass reads fc1's output and that gradient and writes both the
activation (for fc2's weight gradient) and fc1's output gradient. The separate recompute read
fc1's output twice: at the peer shape it was a 229 us pass per layer beside the 430 us
backward (H100, session 12 profile).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import (
    bias_swiglu_impl, swiglu, weighted_bias_swiglu_impl,
)
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.tensor_parallel.mappings import (
    reduce_from_tensor_model_parallel_region, reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.tensor_parallel.random import CheckpointWithoutOutput
from megatron.core.transformer.mlp import MLP


def _fused_swiglu(config) -> bool:
    return config.bias_activation_fusion and config.gated_linear_unit and (
        config.activation_func is F.silu)


def activation_recompute_unsupported_reason(config) -> str | None:
    """Why mlp_activation cannot stand in for megatron-core's MLP activation (None: it can)."""
    if getattr(config, "use_te_activation_func", False):
        return "TransformerEngine activation modules"
    if getattr(config, "activation_func_clamp_value", None) is not None:
        return "clamped GLU activations"
    if config.bias_activation_fusion and not _fused_swiglu(config):
        return "fused activations other than SwiGLU (drop --bias-activation-fusion)"
    return None


def mlp_activation(config, h, bias=None, probs=None):
    """megatron-core MLP's activation of fc1's output h (+ bias), as its forward computes it,
    scaled per row by the routing probabilities `probs` for MoE experts."""
    if _fused_swiglu(config):
        if probs is not None:
            return weighted_bias_swiglu_impl(h, bias, probs.unsqueeze(-1),
                                             config.activation_func_fp8_input_store)
        return bias_swiglu_impl(h, bias, config.activation_func_fp8_input_store)
    if bias is not None:
        h = h + bias
    if config.gated_linear_unit:
        a, b = torch.chunk(h, 2, dim=-1)
        out = config.activation_func(a) * (b + config.glu_linear_offset)
    else:
        out = config.activation_func(h)
    return out if probs is None else (out * probs.unsqueeze(-1)).to(h.dtype)


def _swiglu_and_grad(h, grad_act):
    """SwiGLU of h = [a, b] and its gradient for grad_act, in one pass: (silu(a) * b,
    [grad_act * b * silu'(a), grad_act * silu(a)]), with megatron-core's swiglu_back formula."""
    a, b = torch.chunk(h, 2, -1)
    sig = torch.sigmoid(a)
    silu = a * sig
    grad_h = torch.cat((grad_act * sig * (1 + a * (1 - sig)) * b, grad_act * silu), -1)
    return silu * b, grad_h


# One fused kernel on CUDA (inductor, as megatron-core's jit_fuser); plain torch on the CPU.
_swiglu_and_grad_cuda = torch.compile(_swiglu_and_grad)


class _SwiGLULinear(torch.autograd.Function):
    """swiglu(h) @ weight.T for this rank's fc2 shard, keeping h (not the activation) for
    backward, where one pass rebuilds the activation and h's gradient (module docstring)."""

    @staticmethod
    def forward(ctx, h, weight):
        ctx.save_for_backward(h, weight)
        if h.is_cuda:  # megatron-core's compiled swiglu: one pass
            act = swiglu(h)
        else:
            a, b = torch.chunk(h, 2, -1)
            act = F.silu(a) * b
        return F.linear(act, weight)

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        grad_act = grad_out @ weight
        fused = _swiglu_and_grad_cuda if h.is_cuda else _swiglu_and_grad
        act, grad_h = fused(h, grad_act)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ act.reshape(
                -1, act.shape[-1])
        return grad_h, grad_weight


class ActivationRecomputeMLP(MLP):
    """megatron-core's MLP whose fc2 input (the activation's output) is freed after fc2's
    forward and recomputed from fc1's output in the backward (see module docstring).
    Parameters, TP/SP communication and checkpoints are MLP's own."""

    def _swiglu_linear_applies(self, fc1_bias) -> bool:
        """_SwiGLULinear stands in for the activation and fc2's plain-torch linear; anything
        else (fc1 bias, other activations, fused or delayed weight gradients, expert comms)
        keeps megatron-core's fc2 and the CheckpointWithoutOutput recompute."""
        config, fc2 = self.config, self.linear_fc2
        return (config.gated_linear_unit and config.activation_func is F.silu
                and config.glu_linear_offset == 0.0 and fc1_bias is None
                and type(fc2) is RowParallelLinear and fc2.input_is_parallel
                and not fc2.explicit_expert_comm and not fc2.gradient_accumulation_fusion
                and getattr(fc2, "gtp_remat_size", 1) == 1
                and not getattr(config, "delay_wgrad_compute", False)
                and config.fp8 is None and not config.cpu_offloading)

    def _swiglu_linear(self, h):
        """What linear_fc2(swiglu(h)) returns (output, bias), through _SwiGLULinear and fc2's
        own reduction over TP (RowParallelLinear.forward)."""
        fc2 = self.linear_fc2
        out = _SwiGLULinear.apply(h, fc2.weight)
        if fc2.sequence_parallel:
            out = reduce_scatter_to_sequence_parallel_region(out, group=fc2.tp_group)
        else:
            out = reduce_from_tensor_model_parallel_region(out, group=fc2.tp_group)
        if fc2.skip_bias_add:
            return out, fc2.bias
        return (out + fc2.bias if fc2.bias is not None else out), None

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        # Nothing to free without a backward; per-token scales are the experts' business.
        if per_token_scale is not None or not torch.is_grad_enabled():
            return super().forward(hidden_states, per_token_scale, **kwargs)
        h, bias = self.linear_fc1(hidden_states)
        if self._swiglu_linear_applies(bias):
            return self._swiglu_linear(h)
        # fp8=None: megatron-core reads "fp8 is not None" as "wrap the recompute in fp8".
        recompute = CheckpointWithoutOutput(fp8=self.config.fp8)
        a = recompute.checkpoint(functools.partial(mlp_activation, self.config), h, bias)
        out, out_bias = self.linear_fc2(a)
        recompute.discard_output_and_register_recompute(out)
        return out, out_bias
