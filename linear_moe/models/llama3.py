"""Llama 3: dense SwiGLU, GQA, RoPE theta 5e5, RMSNorm, no biases. Add --num-experts (and
--moe-router-topk) to make its MLPs mixtures of experts."""

from linear_moe.models.common import (
    MODERN_DECODER,
    BasePreset,
    mlp_or_moe_spec,
    softmax_attention_spec,
)

COMMON = {
    **MODERN_DECODER,
    "norm_epsilon": 1e-5,
    "rotary_base": 500000,
    "group_query_attention": True,
}

SIZES = {
    "tiny": dict(num_layers=4, hidden_size=128, num_attention_heads=4, num_query_groups=2,
                 ffn_hidden_size=384),
    "0.3B": dict(num_layers=16, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
                 ffn_hidden_size=3584),
    # Llama-3.2-1B (tied embeddings) and Llama-3-8B.
    "1B": dict(num_layers=16, hidden_size=2048, num_attention_heads=32, num_query_groups=8,
               ffn_hidden_size=8192),
    "8B": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
               ffn_hidden_size=14336, untie_embeddings_and_output_weights=True),
}

PUBLISHED = {"1B": (1_235_814_400, 1_235_814_400, 128_256),
             "8B": (8_030_261_248, 8_030_261_248, 128_256)}

PRESET = BasePreset("llama3", COMMON, SIZES, PUBLISHED,
                    attention_spec=softmax_attention_spec, mlp_spec=mlp_or_moe_spec)
