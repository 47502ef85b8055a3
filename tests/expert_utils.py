"""GroupedMMExperts' forward over plain weight tensors, without building a Megatron MoE layer
(the CPU and the GPU expert tests share it)."""

from __future__ import annotations

from types import SimpleNamespace

import torch.nn.functional as F


def experts_over(fc1, fc2, **config):
    """A stand-in SequentialMLP with SwiGLU experts fc1[e] [2 ffn, h], fc2[e] [h, ffn], on which
    GroupedMMExperts.forward runs; ``config`` overrides the activation settings."""
    from linear_moe.layers.grouped_experts import GroupedMMExperts

    settings = dict(bias_activation_fusion=False, gated_linear_unit=True, activation_func=F.silu,
                    glu_linear_offset=0.0, activation_func_fp8_input_store=False,
                    moe_act_recompute=False)
    experts = SimpleNamespace(
        num_local_experts=len(fc1), unsupported=None,
        config=SimpleNamespace(**{**settings, **config}),
        local_experts=[SimpleNamespace(linear_fc1=SimpleNamespace(weight=a),
                                       linear_fc2=SimpleNamespace(weight=b))
                       for a, b in zip(fc1, fc2)])
    experts._activation = lambda h, p: GroupedMMExperts._activation(experts, h, p)
    experts._grouped_forward = lambda *a: GroupedMMExperts._grouped_forward(experts, *a)
    experts.forward = lambda *a: GroupedMMExperts.forward(experts, *a)
    return experts
