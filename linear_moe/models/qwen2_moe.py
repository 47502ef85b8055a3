"""Qwen2 / Qwen2-MoE (Qwen1.5-MoE architecture): RMSNorm, SwiGLU, qkv bias and RoPE (theta 1e6)
on the softmax layers; MoE sizes add routed SwiGLU experts with a gated shared expert,
softmax-then-top-k routing without renormalisation and an auxiliary load-balancing loss."""

from linear_moe.models.common import (
    MODERN_DECODER,
    BasePreset,
    mlp_or_moe_spec,
    softmax_attention_spec,
)

COMMON = {
    **MODERN_DECODER,
    "norm_epsilon": 1e-6,
    "add_qkv_bias": True,
    "rotary_base": 1000000,
}

MOE = {
    "untie_embeddings_and_output_weights": True,
    "moe_router_pre_softmax": True,
    "moe_router_load_balancing_type": "aux_loss",
    "moe_aux_loss_coeff": 0.001,
    "moe_token_dispatcher_type": "alltoall",
    "moe_shared_expert_gate": True,
}

# Shared expert: 4x the routed width in tiny (the ratio of Qwen1.5-MoE-A2.7B); one routed
# width in the named sizes, which keeps them at the active/total their names promise.
SIZES = {
    "tiny": dict(MOE, num_layers=4, hidden_size=128, num_attention_heads=4,
                 ffn_hidden_size=512, num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=128,
                 moe_shared_expert_intermediate_size=256),
    "A0.3B-2B": dict(MOE, num_layers=12, hidden_size=1024, num_attention_heads=8,
                     ffn_hidden_size=3584, num_experts=64, moe_router_topk=8,
                     moe_ffn_hidden_size=896, moe_shared_expert_intermediate_size=896),
    "A1B-7B": dict(MOE, num_layers=16, hidden_size=2048, num_attention_heads=16,
                   ffn_hidden_size=4096, num_experts=64, moe_router_topk=8,
                   moe_ffn_hidden_size=1024, moe_shared_expert_intermediate_size=1024),
    # Qwen2-0.5B: dense, GQA 14/2 heads, tied embeddings.
    "0.5B": dict(num_layers=24, hidden_size=896, num_attention_heads=14,
                 group_query_attention=True, num_query_groups=2, ffn_hidden_size=4864),
}

# (total, active, vocab) of released models these sizes reproduce (HF config + safetensors).
PUBLISHED = {"0.5B": (494_032_768, 494_032_768, 151_936)}

PRESET = BasePreset("qwen2_moe", COMMON, SIZES, PUBLISHED,
                    attention_spec=softmax_attention_spec, mlp_spec=mlp_or_moe_spec)
