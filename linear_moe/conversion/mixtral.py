"""Mixtral (MixtralForCausalLM) <-> the mixtral preset. HF's router is softmax-then-top-k,
renormalised: Megatron's top-k-then-softmax is the same distribution."""

from linear_moe.conversion.core import HFFormat, MoENames, gqa_attention_rules
from linear_moe.conversion.hf_common import (
    decoder_flags,
    decoder_hf_fields,
    moe_layer_flags,
    refuse_router_args,
    refuse_unless,
    rope_flags,
    rope_parameters,
)


def megatron_flags(c) -> dict:
    refuse_unless(c, sliding_window=None)
    return {**decoder_flags(c), **rope_flags(c), "ffn_hidden_size": c.intermediate_size,
            "num_experts": c.num_local_experts, "moe_router_topk": c.num_experts_per_tok,
            "moe_ffn_hidden_size": c.intermediate_size, "moe_router_pre_softmax": False,
            "moe_aux_loss_coeff": c.router_aux_loss_coef}


def hf_config(args):
    from transformers import MixtralConfig

    refuse_router_args(args, moe_router_pre_softmax=False, moe_shared_expert_intermediate_size=None,
                       moe_router_topk_scaling_factor=None)
    if not all(moe_layer_flags(args)):
        raise ValueError("MixtralForCausalLM has experts in every layer; the checkpoint's "
                         "--moe-layer-freq leaves some dense")
    return MixtralConfig(**decoder_hf_fields(args), intermediate_size=args.moe_ffn_hidden_size,
                         rope_parameters=rope_parameters(args), sliding_window=None,
                         num_local_experts=args.num_experts,
                         num_experts_per_tok=args.moe_router_topk,
                         router_aux_loss_coef=args.moe_aux_loss_coeff)


FORMAT = HFFormat("MixtralForCausalLM", "mixtral", "tiny", megatron_flags, hf_config,
                  lambda m, h, args: gqa_attention_rules(m, h, args, bias=False),
                  moe_names=MoENames())
