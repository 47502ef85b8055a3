"""DeepSeek-V2 / V2-Lite (DeepseekV2ForCausalLM) <-> the deepseek_v2 preset (megatron-core's
Multi-Latent Attention). HF applies RoPE to interleaved pairs; Megatron's MLA de-interleaves q
and k alike before its rotate-half RoPE, which leaves every q.k product the same, so the weights
copy unpermuted. HF's group-limited routing ranks groups by their best expert and Megatron's by
the sum of their top-k / groups best: only greedy routing converts."""

from linear_moe.conversion.core import HFFormat, MoENames, Rule, same
from linear_moe.conversion.hf_common import (
    DEFAULT_SEQ_LENGTH,
    decoder_hf_fields,
    moe_layer_flags,
    moe_layer_freq,
    refuse_router_args,
    refuse_unless,
    rotary_base,
)

# HF yarn field -> Megatron flag
_YARN = {"factor": "rotary_scaling_factor", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
         "original_max_position_embeddings": "yarn_original_max_position_embeddings",
         "beta_fast": "yarn_beta_fast", "beta_slow": "yarn_beta_slow"}


def _rope_flags(c) -> dict:
    rope = dict(c.rope_parameters or {})
    flags = {"rotary_base": rotary_base(rope.get("rope_theta", 10000.0))}
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return {**flags, "rope_type": "rope"}
    if kind != "yarn":
        raise ValueError(f"HF rope_type {kind!r} is not supported for DeepSeek-V2 (default and "
                         "yarn are)")
    return {**flags, "rope_type": "yarn",
            **{flag: rope[key] for key, flag in _YARN.items() if rope.get(key) is not None}}


def megatron_flags(c) -> dict:
    refuse_unless(c, hidden_act="silu", attention_bias=False, topk_method="greedy")
    first_dense = c.first_k_dense_replace
    moe_layers = [i >= first_dense for i in range(c.num_hidden_layers)]
    flags = {
        "num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads, "ffn_hidden_size": c.intermediate_size,
        "kv_lora_rank": c.kv_lora_rank, "q_lora_rank": c.q_lora_rank,
        "qk_head_dim": c.qk_nope_head_dim, "qk_pos_emb_head_dim": c.qk_rope_head_dim,
        "v_head_dim": c.v_head_dim, "norm_epsilon": c.rms_norm_eps,
        "untie_embeddings_and_output_weights": not c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "seq_length": min(c.max_position_embeddings, DEFAULT_SEQ_LENGTH),
        "num_experts": c.n_routed_experts, "moe_router_topk": c.num_experts_per_tok,
        "moe_ffn_hidden_size": c.moe_intermediate_size,
        "moe_shared_expert_intermediate_size": (c.n_shared_experts or 0) * c.moe_intermediate_size
        or None,
        "moe_layer_freq": moe_layer_freq(moe_layers),
        "moe_router_topk_scaling_factor": c.routed_scaling_factor,
        "moe_router_pre_softmax": True,
        **_rope_flags(c),
    }
    return flags


def attention_rules(m: str, h: str, args) -> list[Rule]:
    rules = [same(f"{m}.linear_kv_down_proj.weight", f"{h}.kv_a_proj_with_mqa.weight"),
             same(f"{m}.linear_kv_up_proj.layer_norm.weight", f"{h}.kv_a_layernorm.weight"),
             same(f"{m}.linear_kv_up_proj.weight", f"{h}.kv_b_proj.weight"),
             same(f"{m}.linear_proj.weight", f"{h}.o_proj.weight")]
    if args.q_lora_rank is None:
        return rules + [same(f"{m}.linear_q_proj.weight", f"{h}.q_proj.weight")]
    return rules + [same(f"{m}.linear_q_down_proj.weight", f"{h}.q_a_proj.weight"),
                    same(f"{m}.linear_q_up_proj.layer_norm.weight", f"{h}.q_a_layernorm.weight"),
                    same(f"{m}.linear_q_up_proj.weight", f"{h}.q_b_proj.weight")]


def hf_config(args):
    from transformers import DeepseekV2Config

    refuse_router_args(args, moe_router_pre_softmax=True)
    moe_layers = moe_layer_flags(args)
    first_dense = moe_layers.index(True) if any(moe_layers) else len(moe_layers)
    if not all(moe_layers[first_dense:]):
        raise ValueError("DeepseekV2ForCausalLM has experts in every layer after the first k; "
                         "the checkpoint's --moe-layer-freq differs")
    shared = args.moe_shared_expert_intermediate_size or 0
    if shared % args.moe_ffn_hidden_size:
        raise ValueError(f"the shared expert width {shared} is not a multiple of the expert width "
                         f"{args.moe_ffn_hidden_size}, which HF's n_shared_experts needs")
    fields = decoder_hf_fields(args, gqa=False)
    rope = {"rope_type": "default", "rope_theta": float(args.rotary_base)}
    if args.rope_type == "yarn":
        rope = {**rope, "rope_type": "yarn", **{key: getattr(args, flag) for key, flag in
                                                _YARN.items() if getattr(args, flag) is not None}}
    return DeepseekV2Config(
        **fields, num_key_value_heads=args.num_attention_heads,
        intermediate_size=args.ffn_hidden_size, moe_intermediate_size=args.moe_ffn_hidden_size,
        n_routed_experts=args.num_experts, n_shared_experts=shared // args.moe_ffn_hidden_size,
        num_experts_per_tok=args.moe_router_topk, first_k_dense_replace=first_dense,
        routed_scaling_factor=args.moe_router_topk_scaling_factor or 1.0, topk_method="greedy",
        kv_lora_rank=args.kv_lora_rank, q_lora_rank=args.q_lora_rank,
        qk_nope_head_dim=args.qk_head_dim, qk_rope_head_dim=args.qk_pos_emb_head_dim,
        v_head_dim=args.v_head_dim, attention_bias=False, rope_parameters=rope)


FORMAT = HFFormat("DeepseekV2ForCausalLM", "deepseek_v2", "tiny", megatron_flags, hf_config,
                  attention_rules, moe_names=MoENames(shared_expert="shared_experts"))
