"""Building blocks shared by the base presets: the preset type, the softmax-attention spec of
the 'N' layers, and the MLP/MoE spec."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.multi_latent_attention import (
    MLASelfAttention,
    MLASelfAttentionSubmodules,
)
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from linear_moe.layers import RMSNorm
from linear_moe.layers.device_dispatch import DeviceDispatchMoELayer
from linear_moe.layers.grouped_experts import GroupedMMExperts
from linear_moe.layers.mlp import ActivationRecomputeMLP, activation_recompute_unsupported_reason
from linear_moe.mixers.softmax import SDPACoreAttention


@dataclass(frozen=True)
class BasePreset:
    """A base model: Megatron flags common to all sizes, per-size flags, and the specs of the
    parts that are not the linear mixer."""

    name: str
    common_args: dict
    sizes: dict[str, dict]
    # Published parameter counts (total, active) of sizes that match a released model, checked by
    # tests/test_presets.py with the all-softmax pattern and the released vocabulary.
    published: dict[str, tuple[float, float, int]] = field(default_factory=dict)
    attention_spec: Callable = field(default=None)
    mlp_spec: Callable = field(default=None)

    def megatron_args(self, size: str) -> dict:
        if size not in self.sizes:
            raise ValueError(f"unknown --model-size '{size}' for base model '{self.name}'; "
                             f"choose one of {', '.join(self.sizes)}")
        return {**self.common_args, **self.sizes[size]}


# Flags every modern decoder preset here shares: pre-RMSNorm, SwiGLU, no linear biases, RoPE,
# no dropout.
MODERN_DECODER = {
    "normalization": "RMSNorm",
    "swiglu": True,
    "disable_bias_linear": True,
    "position_embedding_type": "rope",
    "attention_dropout": 0.0,
    "hidden_dropout": 0.0,
    "init_method_std": 0.02,
}


def _causal_sdpa_attention_spec(module, submodules_cls, **projections) -> ModuleSpec:
    """A causal self-attention spec with SDPA as the core attention and a row-parallel output
    projection; ``projections`` are the module's other submodules (input projections, norms)."""
    return ModuleSpec(
        module=module,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=submodules_cls(core_attention=SDPACoreAttention,
                                  linear_proj=RowParallelLinear, **projections),
    )


def softmax_attention_spec(config) -> ModuleSpec:
    """Megatron's SelfAttention (MHA/GQA, RoPE, optional qkv bias via config.add_qkv_bias) with
    SDPA as the core attention."""
    qk_norm = RMSNorm if config.qk_layernorm else IdentityOp
    return _causal_sdpa_attention_spec(
        SelfAttention, SelfAttentionSubmodules,
        linear_qkv=ColumnParallelLinear,
        q_layernorm=qk_norm,
        k_layernorm=qk_norm,
    )


def is_moe_layer(config, layer_index: int) -> bool:
    """Whether layer ``layer_index`` (0-based) has experts, following --moe-layer-freq as
    megatron-core reads it (an int period, or a 0/1 list such as DeepSeek's first-k-dense)."""
    if not config.num_moe_experts:
        return False
    freq = config.moe_layer_freq
    if isinstance(freq, int):
        return layer_index % freq == 0
    if len(freq) != config.num_layers:
        raise ValueError(f"--moe-layer-freq has {len(freq)} entries for {config.num_layers} "
                         "layers; give one 0/1 per layer")
    return bool(freq[layer_index])


def mlp_or_moe_spec(config, layer_index: int):
    """megatron-core's MoELayer (router, dispatcher, experts, shared expert) on MoE layers, else
    its dense MLP (with --mlp-act-recompute, the subclass that recomputes the activation). The
    experts are megatron-core's SequentialMLP, or by default its grouped subclass
    (linear_moe.layers.grouped_experts) with the same parameters."""
    moe = is_moe_layer(config, layer_index)
    spec = get_mlp_module_spec_for_backend(
        backend=LocalSpecProvider(), num_experts=config.num_moe_experts if moe else None,
        moe_grouped_gemm=False)
    if not moe and getattr(config, "mlp_act_recompute", False):
        reason = activation_recompute_unsupported_reason(config)
        if reason:
            raise ValueError(f"--mlp-act-recompute does not support {reason}; drop the flag")
        return functools.partial(ActivationRecomputeMLP.as_mlp_submodule, **spec.keywords)
    if not moe:
        return spec
    submodules = spec.keywords["submodules"]
    if getattr(config, "moe_expert_impl", "grouped_mm") == "grouped_mm":
        submodules = dataclasses.replace(submodules, experts=functools.partial(
            GroupedMMExperts, *submodules.experts.args, **submodules.experts.keywords))
    # (DeviceDispatchMoELayer refuses the configs it cannot run, the sequential experts too)
    layer = DeviceDispatchMoELayer if getattr(config, "moe_device_dispatch", False) else spec.func
    return functools.partial(layer, *spec.args, **{**spec.keywords, "submodules": submodules})


class RMSNormColumnParallelLinear(ColumnParallelLinear):
    """RMSNorm of the input, then a ColumnParallelLinear: DeepSeek-V2's kv_a_layernorm before
    kv_b_proj. megatron-core 0.19.2 only offers this fused with TransformerEngine (local specs
    with qk_layernorm and no q-LoRA are refused), so MLA specs here keep qk_layernorm off and
    put the norm in the up-projection. The norm weight is replicated over TP; its gradient is
    the same on every rank because the linear all-reduces its input gradient."""

    def __init__(self, input_size, output_size, *, config, **kwargs):
        super().__init__(input_size, output_size, config=config, **kwargs)
        self.layer_norm = RMSNorm(config, input_size, eps=config.layernorm_epsilon)

    def forward(self, x, *args, **kwargs):
        return super().forward(self.layer_norm(x), *args, **kwargs)


def mla_attention_spec(config) -> ModuleSpec:
    """megatron-core's Multi-Latent Attention (DeepSeek-V2) with local linears, RMSNorm on the
    compressed kv (and on the compressed q when there is a q-LoRA), SDPA as the core
    attention."""
    if config.qk_layernorm:
        raise ValueError("MLA here normalises the compressed kv itself; drop --qk-layernorm")
    q_up = RMSNormColumnParallelLinear if config.q_lora_rank is not None else ColumnParallelLinear
    return _causal_sdpa_attention_spec(
        MLASelfAttention, MLASelfAttentionSubmodules,
        linear_q_proj=ColumnParallelLinear,
        linear_q_down_proj=ColumnParallelLinear,
        linear_q_up_proj=q_up,
        linear_kv_down_proj=ColumnParallelLinear,
        linear_kv_up_proj=RMSNormColumnParallelLinear,
        q_layernorm=IdentityOp,
        kv_layernorm=IdentityOp,
    )


def args_to_argv(args: dict) -> list[str]:
    """{"num_layers": 4, "swiglu": True} -> ["--num-layers", "4", "--swiglu"]."""
    argv = []
    for dest, value in args.items():
        flag = "--" + dest.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif value is False or value is None:
            continue
        else:
            argv += [flag, str(value)]
    return argv
