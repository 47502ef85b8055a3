"""Mixtral: 8 SwiGLU experts, top-2 routing (top-k then softmax), GQA with 8 KV heads,
RoPE theta 1e6, RMSNorm, no biases, untied embeddings."""

from linear_moe.models.common import (
    MODERN_DECODER,
    BasePreset,
    mlp_or_moe_spec,
    softmax_attention_spec,
)

COMMON = {
    **MODERN_DECODER,
    "norm_epsilon": 1e-5,
    "rotary_base": 1000000,
    "untie_embeddings_and_output_weights": True,
    "group_query_attention": True,
    "num_experts": 8,
    "moe_router_topk": 2,
    "moe_router_load_balancing_type": "aux_loss",
    "moe_aux_loss_coeff": 0.001,
    "moe_token_dispatcher_type": "alltoall",
}

SIZES = {
    "tiny": dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=256),
    "small": dict(num_layers=8, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
                  ffn_hidden_size=3584),
    "8x7B": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                 ffn_hidden_size=14336),
}

# Mixtral-8x7B-v0.1, vocab 32000: total = its released parameter count (46.7B); active
# derived with top-2 of 8 experts per layer ("12.9B").
PUBLISHED = {"8x7B": (46_702_792_704, 12_879_925_248, 32_000)}

PRESET = BasePreset("mixtral", COMMON, SIZES, PUBLISHED,
                    attention_spec=softmax_attention_spec, mlp_spec=mlp_or_moe_spec)
