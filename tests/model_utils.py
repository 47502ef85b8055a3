"""The tiny hybrid 'LN' model the CPU parity tests build (TP, MoE experts and dispatch, MLP
recompute, fused loss): one config with megatron-core's fusions and dropout off, so each test
states only what it varies."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def tiny_config(**overrides):
    """LinearMoEConfig of a 2-layer 'LN' gla model, hidden 64, fp32 on the CPU; SwiGLU MLP
    unless overridden. The mixer defaults are resolved."""
    from linear_moe.config import LinearMoEConfig, resolve_mixer_defaults

    dtype = overrides.get("params_dtype", torch.float32)
    tp = overrides.get("tensor_model_parallel_size", 1)
    fields = dict(
        num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2,
        ffn_hidden_size=96, kv_channels=16, use_cpu_initialization=True, params_dtype=dtype,
        bf16=dtype == torch.bfloat16, sequence_parallel=tp > 1, normalization="RMSNorm",
        add_bias_linear=False, gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=False, masked_softmax_fusion=False, bias_dropout_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=False, hidden_dropout=0.0,
        attention_dropout=0.0, la_module="gla", layer_type_list="LN", la_num_heads=4,
        fused_residual_rmsnorm=True)  # the CLI's default
    config = LinearMoEConfig(**{**fields, **overrides})
    resolve_mixer_defaults(config)
    return config


def tiny_model(config, base_model: str, vocab: int, seq: int, parallel_output: bool = False):
    """The GPTModel (our subclass) of ``config`` with ``base_model``'s layer specs."""
    from linear_moe.model_provider import LinearMoEGPTModel, decoder_block_spec

    return LinearMoEGPTModel(config, decoder_block_spec(config, base_model), vocab_size=vocab,
                             max_sequence_length=seq, parallel_output=parallel_output,
                             position_embedding_type="rope")
