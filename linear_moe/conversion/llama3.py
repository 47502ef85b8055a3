"""Llama (LlamaForCausalLM: Llama 2 / 3 / 3.x) <-> the llama3 preset."""

from linear_moe.conversion.core import HFFormat, gqa_attention_rules
from linear_moe.conversion.hf_common import (
    decoder_flags,
    decoder_hf_fields,
    refuse_unless,
    rope_flags,
    rope_parameters,
)


def megatron_flags(c) -> dict:
    refuse_unless(c, attention_bias=False, mlp_bias=False)
    return {**decoder_flags(c), **rope_flags(c), "ffn_hidden_size": c.intermediate_size}


def hf_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(**decoder_hf_fields(args), intermediate_size=args.ffn_hidden_size,
                       rope_parameters=rope_parameters(args), attention_bias=False,
                       mlp_bias=False)


FORMAT = HFFormat("LlamaForCausalLM", "llama3", "tiny", megatron_flags, hf_config,
                  lambda m, h, args: gqa_attention_rules(m, h, args, bias=False))
