"""Qwen2 (Qwen2ForCausalLM) and Qwen2-MoE / Qwen1.5-MoE (Qwen2MoeForCausalLM) <-> the qwen2_moe
preset. HF's MoE router is softmax-then-top-k, renormalised when norm_topk_prob: Megatron's
top-k-then-softmax (--no moe_router_pre_softmax) is the same renormalised distribution."""

from linear_moe.conversion.core import HFFormat, MoENames, gqa_attention_rules
from linear_moe.conversion.hf_common import (
    decoder_flags,
    decoder_hf_fields,
    moe_layer_flags,
    qwen_moe_layer_freq,
    refuse_args_unless,
    refuse_router_args,
    refuse_unless,
    rope_flags,
    rope_parameters,
)


def _flags(c) -> dict:
    refuse_unless(c, use_sliding_window=False)
    return {**decoder_flags(c), **rope_flags(c), "ffn_hidden_size": c.intermediate_size}


def dense_flags(c) -> dict:
    return _flags(c)


def moe_flags(c) -> dict:
    return {**_flags(c), "add_qkv_bias": getattr(c, "qkv_bias", True),
            "num_experts": c.num_experts, "moe_router_topk": c.num_experts_per_tok,
            "moe_ffn_hidden_size": c.moe_intermediate_size,
            "moe_shared_expert_intermediate_size": c.shared_expert_intermediate_size,
            "moe_shared_expert_gate": True, "moe_router_pre_softmax": not c.norm_topk_prob,
            "moe_layer_freq": qwen_moe_layer_freq(c),
            "moe_aux_loss_coeff": c.router_aux_loss_coef,
            "moe_router_load_balancing_type": "aux_loss", "moe_token_dispatcher_type": "alltoall"}


def dense_hf_config(args):
    from transformers import Qwen2Config

    refuse_args_unless(args, add_qkv_bias=True)
    return Qwen2Config(**decoder_hf_fields(args), intermediate_size=args.ffn_hidden_size,
                       rope_parameters=rope_parameters(args), use_sliding_window=False)


def moe_hf_config(args):
    from transformers import Qwen2MoeConfig

    refuse_router_args(args, moe_shared_expert_gate=True, moe_router_topk_scaling_factor=None)
    if not args.moe_shared_expert_intermediate_size:
        raise ValueError("Qwen2MoeForCausalLM has a shared expert; the checkpoint has none")
    moe_layers = moe_layer_flags(args)
    return Qwen2MoeConfig(
        **decoder_hf_fields(args), intermediate_size=args.ffn_hidden_size,
        rope_parameters=rope_parameters(args), use_sliding_window=False,
        qkv_bias=args.add_qkv_bias, num_experts=args.num_experts,
        num_experts_per_tok=args.moe_router_topk, moe_intermediate_size=args.moe_ffn_hidden_size,
        shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        norm_topk_prob=not args.moe_router_pre_softmax, decoder_sparse_step=1,
        mlp_only_layers=[i for i, moe in enumerate(moe_layers) if not moe],
        router_aux_loss_coef=args.moe_aux_loss_coeff)


DENSE = HFFormat("Qwen2ForCausalLM", "qwen2_moe", "0.5B", dense_flags, dense_hf_config,
                 lambda m, h, args: gqa_attention_rules(m, h, args, bias=True))
MOE = HFFormat("Qwen2MoeForCausalLM", "qwen2_moe", "tiny", moe_flags, moe_hf_config,
               lambda m, h, args: gqa_attention_rules(m, h, args, bias=args.add_qkv_bias),
               moe_names=MoENames(shared_expert="shared_expert",
                                  shared_expert_gate="shared_expert_gate.weight"))
