"""DeepSeek-V2: Multi-Latent Attention on the softmax layers (megatron-core's MLA), fine-grained
routed experts + shared experts, the first k layers dense, softmax-then-top-k routing with a
routed scaling factor, sequence-level auxiliary loss, RMSNorm, untied embeddings."""

from linear_moe.models.common import (
    MODERN_DECODER,
    BasePreset,
    mla_attention_spec,
    mlp_or_moe_spec,
)

COMMON = {
    **MODERN_DECODER,
    "norm_epsilon": 1e-6,
    "rotary_base": 10000,
    "untie_embeddings_and_output_weights": True,
    "multi_latent_attention": True,
    "qk_head_dim": 128,
    "qk_pos_emb_head_dim": 64,
    "v_head_dim": 128,
    "moe_router_pre_softmax": True,
    "moe_router_load_balancing_type": "seq_aux_loss",
    "moe_aux_loss_coeff": 0.001,
    "moe_token_dispatcher_type": "alltoall",
}

SIZES = {
    "tiny": dict(num_layers=4, hidden_size=128, num_attention_heads=4, kv_lora_rank=32,
                 qk_head_dim=32, qk_pos_emb_head_dim=16, v_head_dim=32, ffn_hidden_size=384,
                 num_experts=8, moe_router_topk=2, moe_ffn_hidden_size=64,
                 moe_shared_expert_intermediate_size=128, moe_layer_freq="([0]*1+[1]*3)",
                 moe_router_topk_scaling_factor=1.0),
    # DeepSeek-V2-Lite shape: 64 routed + 2 shared experts of 1408, top-6, first layer dense.
    "A2.4B-16B": dict(num_layers=27, hidden_size=2048, num_attention_heads=16, kv_lora_rank=512,
                      ffn_hidden_size=10944, num_experts=64, moe_router_topk=6,
                      moe_ffn_hidden_size=1408, moe_shared_expert_intermediate_size=2816,
                      moe_layer_freq="([0]*1+[1]*26)", moe_router_topk_scaling_factor=1.0),
}

# DeepSeek-V2-Lite, vocab 102400: total = its released parameter count; active derived from
# its config with both embedding matrices counted (the paper's "2.4B activated" rounds it
# without the input embedding).
PUBLISHED = {"A2.4B-16B": (15_706_484_224, 2_661_150_208, 102_400)}

PRESET = BasePreset("deepseek_v2", COMMON, SIZES, PUBLISHED,
                    attention_spec=mla_attention_spec, mlp_spec=mlp_or_moe_spec)
