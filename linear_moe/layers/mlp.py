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
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl, weighted_bias_swiglu_impl
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


class ActivationRecomputeMLP(MLP):
    """megatron-core's MLP whose fc2 input (the activation's output) is freed after fc2's
    forward and recomputed from fc1's output before fc2's backward (see module docstring).
    Parameters, TP/SP communication and checkpoints are MLP's own."""

    def forward(self, hidden_states, per_token_scale=None, **kwargs):
        # Nothing to free without a backward; per-token scales are the experts' business.
        if per_token_scale is not None or not torch.is_grad_enabled():
            return super().forward(hidden_states, per_token_scale, **kwargs)
        h, bias = self.linear_fc1(hidden_states)
        # fp8=None: megatron-core reads "fp8 is not None" as "wrap the recompute in fp8".
        recompute = CheckpointWithoutOutput(fp8=self.config.fp8)
        a = recompute.checkpoint(functools.partial(mlp_activation, self.config), h, bias)
        out, out_bias = self.linear_fc2(a)
        recompute.discard_output_and_register_recompute(out)
        return out, out_bias
