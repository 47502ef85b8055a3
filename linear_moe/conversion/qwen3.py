"""Qwen3 (Qwen3ForCausalLM) <-> the llama3 preset and Qwen3-MoE (Qwen3MoeForCausalLM) <-> the
mixtral preset, both with per-head RMSNorm on q and k (megatron's --qk-layernorm over
kv_channels, HF's q_norm / k_norm over head_dim). Qwen3-MoE has no shared expert; its router is
softmax-then-top-k, renormalised when norm_topk_prob (Megatron's top-k-then-softmax)."""

from linear_moe.conversion.core import HFFormat, MoENames, gqa_attention_rules, same
from linear_moe.conversion.hf_common import (
    decoder_flags,
    decoder_hf_fields,
    moe_layer_flags,
    qwen_moe_layer_freq,
    refuse_router_args,
    refuse_unless,
    rope_flags,
    rope_parameters,
)


def _flags(c) -> dict:
    refuse_unless(c, attention_bias=False, use_sliding_window=False)
    return {**decoder_flags(c), **rope_flags(c), "ffn_hidden_size": c.intermediate_size,
            "qk_layernorm": True}


def moe_flags(c) -> dict:
    return {**_flags(c), "num_experts": c.num_experts, "moe_router_topk": c.num_experts_per_tok,
            "moe_ffn_hidden_size": c.moe_intermediate_size,
            "moe_router_pre_softmax": not c.norm_topk_prob,
            "moe_layer_freq": qwen_moe_layer_freq(c),
            "moe_aux_loss_coeff": c.router_aux_loss_coef}


def attention_rules(m: str, h: str, args):
    return gqa_attention_rules(m, h, args, bias=False) + [
        same(f"{m}.q_layernorm.weight", f"{h}.q_norm.weight"),
        same(f"{m}.k_layernorm.weight", f"{h}.k_norm.weight")]


def dense_hf_config(args):
    from transformers import Qwen3Config

    return Qwen3Config(**decoder_hf_fields(args, qk_norm=True),
                       intermediate_size=args.ffn_hidden_size,
                       rope_parameters=rope_parameters(args), attention_bias=False,
                       use_sliding_window=False)


def moe_hf_config(args):
    from transformers import Qwen3MoeConfig

    refuse_router_args(args, moe_shared_expert_intermediate_size=None,
                       moe_router_topk_scaling_factor=None)
    moe_layers = moe_layer_flags(args)
    fields = decoder_hf_fields(args, qk_norm=True)
    if fields.pop("head_dim") != args.hidden_size // args.num_attention_heads:
        raise ValueError("Qwen3MoeForCausalLM's head dim is hidden / heads; the checkpoint's "
                         "--kv-channels differs")
    return Qwen3MoeConfig(
        **fields, intermediate_size=args.ffn_hidden_size,
        rope_parameters=rope_parameters(args), attention_bias=False, use_sliding_window=False,
        num_experts=args.num_experts, num_experts_per_tok=args.moe_router_topk,
        moe_intermediate_size=args.moe_ffn_hidden_size,
        norm_topk_prob=not args.moe_router_pre_softmax, decoder_sparse_step=1,
        mlp_only_layers=[i for i, moe in enumerate(moe_layers) if not moe],
        router_aux_loss_coef=args.moe_aux_loss_coeff)


DENSE = HFFormat("Qwen3ForCausalLM", "llama3", "tiny", _flags, dense_hf_config, attention_rules,
                 qk_norm=True)
MOE = HFFormat("Qwen3MoeForCausalLM", "mixtral", "tiny", moe_flags, moe_hf_config,
               attention_rules, moe_names=MoENames(), qk_norm=True)
