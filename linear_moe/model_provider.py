"""The one place that assembles the model: registry mixer + base preset + layer pattern.

Built on megatron-core's GPTModel with one TransformerLayer spec per layer (see
docs/DESIGN.md for why GPTModel rather than HybridModel): an 'L' layer's ``self_attention`` slot
holds the --la-module mixer, an 'N' layer's holds the preset's softmax attention, and the MLP
slot holds the preset's MoE or dense MLP. Pipeline stages build the slice of layers they own.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from megatron.core import parallel_state as mpu
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
    get_transformer_layer_offset,
)
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add

from linear_moe.config import (
    LinearMixerFields, LinearMoEConfig, recomputes_layer_norms, resolve_mixer_defaults,
)
from linear_moe.layers import ResidualRMSNorm, RMSNorm
from linear_moe.layers.norm import (
    AfterMixerResidualRMSNorm, MixerInputResidualRMSNorm, MixerInputRMSNorm,
)
from linear_moe.layers.cross_entropy import fused_vocab_parallel_cross_entropy
from linear_moe.models import get_preset
from linear_moe.ops.fla_autotune import apply_autotune_keys
from linear_moe.registry import LINEAR, get_mixer


class LinearMoEGPTModel(GPTModel):
    """megatron-core's GPTModel; with --fused-cross-entropy its LM loss is fla's fused kernel
    (chunked torch on the CPU), without fp32 copies of the logits (layers/cross_entropy.py).
    Same parameters and checkpoints as GPTModel."""

    def compute_language_model_loss(self, labels, logits):
        if not getattr(self.config, "fused_cross_entropy", False):
            return super().compute_language_model_loss(labels, logits)
        # [b, s] labels against [s, b, V/tp] logits, as megatron's; loss back to [b, s]
        loss = fused_vocab_parallel_cross_entropy(
            logits, labels.transpose(0, 1).contiguous(), self.tp_group)
        return loss.transpose(0, 1).contiguous()


def layer_specs(config, base_model: str) -> list[ModuleSpec]:
    """One TransformerLayer spec per layer of the whole model, following the pattern."""
    preset = get_preset(base_model)
    mixer = get_mixer(config.la_module)
    # megatron-core's layer-norm recompute frees the norm's outputs, which would free the
    # residual that ResidualRMSNorm returns as x itself
    fused_residual = config.fused_residual_rmsnorm and not recomputes_layer_norms(config)
    layer_norm = ResidualRMSNorm if fused_residual else RMSNorm
    # A linear mixer reads its input batch-first; under sequence parallelism it all-gathers
    # the input into a new [s, b, h] tensor first, so there the norm's layout would not reach it.
    mixer_norm = after_mixer_norm = layer_norm
    if not (config.sequence_parallel and config.tensor_model_parallel_size > 1):
        mixer_norm = MixerInputResidualRMSNorm if fused_residual else MixerInputRMSNorm
        # and its output projection's gradient batch-first, from the pre-MLP norm's backward
        # (with the fused residual, where that norm's backward forms the whole gradient)
        after_mixer_norm = AfterMixerResidualRMSNorm if fused_residual else layer_norm
    specs = []
    for index, kind in enumerate(config.layer_type_list):
        if kind == LINEAR:
            token_mixer = ModuleSpec(module=mixer.builder,
                                     params={"attn_mask_type": AttnMaskType.causal})
        else:
            token_mixer = preset.attention_spec(config)
        specs.append(ModuleSpec(module=TransformerLayer, submodules=TransformerLayerSubmodules(
            input_layernorm=mixer_norm if kind == LINEAR else layer_norm,
            self_attention=token_mixer,
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=after_mixer_norm if kind == LINEAR else layer_norm,
            mlp=preset.mlp_spec(config, index),
            mlp_bda=get_bias_dropout_add,
        )))
    return specs


def decoder_block_spec(config, base_model: str, vp_stage=None, pp_rank=None):
    """The layers this pipeline (virtual) stage builds, as megatron-core slices them."""
    specs = layer_specs(config, base_model)
    offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return TransformerBlockSubmodules(layer_specs=specs[offset:offset + count],
                                      layer_norm=RMSNorm)


def build_config(args):
    import megatron_patch  # noqa: F401  (typing.override for megatron.training on 3.11)
    from megatron.training.arguments import core_transformer_config_from_args

    config = core_transformer_config_from_args(args, LinearMoEConfig)
    for field in dataclasses.fields(LinearMixerFields):
        setattr(config, field.name, getattr(args, field.name))
    resolve_mixer_defaults(config)
    # Layers differ ('L' vs 'N'), so dist checkpointing must key them per layer
    # (decoder.layers.<i>.*) instead of stacking them along a layer axis.
    config.hetereogenous_dist_checkpoint = True
    return config


def model_provider(pre_process=True, post_process=True, vp_stage=None, config=None,
                   pg_collection=None):
    """megatron.training's model provider."""
    from megatron.training import get_args

    args = get_args()
    if config is None:
        config = build_config(args)
    apply_autotune_keys(config.la_fla_autotune_keys)  # before any fla kernel's first call
    model = build_model(args, config, pre_process=pre_process, post_process=post_process,
                        pg_collection=pg_collection, vp_stage=vp_stage)
    report_parameter_counts(model, config, vp_stage)
    return model


def parameter_counts(model, config) -> tuple[int, int]:
    """(total, active) parameters of the whole model, summed over all ranks.

    Each rank counts its parameters divided by how many ranks hold a copy (data-parallel
    replicas; TP replicas for parameters that are not TP-sharded). Routed-expert parameters
    (not the shared expert) count toward 'active' by top-k / num_experts.
    """
    tp = mpu.get_tensor_model_parallel_world_size()
    dp = mpu.get_data_parallel_world_size(with_context_parallel=True)
    expert_dp = mpu.get_expert_data_parallel_world_size() if config.num_moe_experts else dp
    etp = mpu.get_expert_tensor_parallel_world_size() if config.num_moe_experts else tp
    total = active = 0.0
    for name, p in model.named_parameters():
        expert_parallel = not getattr(p, "allreduce", True)  # reduced over expert-DP only
        sharded = getattr(p, "tensor_model_parallel", False)
        copies = (expert_dp * (1 if sharded else etp)) if expert_parallel else (
            dp * (1 if sharded else tp))
        n = p.numel() / copies
        total += n
        routed = ".mlp.experts." in name
        active += n * (config.moe_router_topk / config.num_moe_experts if routed else 1.0)
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    counts = torch.tensor([total, active], dtype=torch.float64, device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    return round(counts[0].item()), round(counts[1].item())


def report_parameter_counts(model, config, vp_stage=None) -> None:
    total, active = parameter_counts(model, config)
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        where = "" if vp_stage is None else f" (virtual pipeline stage {vp_stage})"
        print(f" > linear_moe model{where}: {total / 1e6:.3f}M parameters in total, "
              f"{active / 1e6:.3f}M active per token; layers '{config.layer_type_list}', "
              f"L = {config.la_module}", flush=True)


def build_model(args, config, pre_process=True, post_process=True, pg_collection=None,
                vp_stage=None) -> LinearMoEGPTModel:
    """The model of megatron-style ``args`` (parsed, or a checkpoint's) with ``config``
    (build_config(args)): what the training loop, the benchmarks and evaluation all build."""
    return LinearMoEGPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, args.base_model, vp_stage=vp_stage),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        parallel_output=True,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        pg_collection=pg_collection,
        vp_stage=vp_stage,
    )


def build_standalone(argv: list[str], device=None):
    """Build the model that ``pretrain_linear_moe.py argv`` would train, outside
    megatron.training's loop (benchmarks, parameter counts). Needs megatron-core's parallel
    state initialised; leaves no global arguments behind. Returns (model, config, args)."""
    from megatron.core.num_microbatches_calculator import destroy_num_microbatches_calculator
    from megatron.training.global_vars import destroy_global_vars

    from linear_moe.pretrain import parse_args

    args = parse_args(argv)
    try:
        config = build_config(args)
        with torch.device(device) if device is not None else contextlib.nullcontext():
            model = build_model(args, config)
    finally:
        destroy_global_vars()
        destroy_num_microbatches_calculator()
    return model, config, args
