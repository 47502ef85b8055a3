"""Building blocks shared by the base presets: the preset type, the softmax-attention spec of
the 'N' layers, and the MLP/MoE spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from megatron.core.models.backends import LocalSpecProvider
from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec_for_backend
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec

from linear_moe.layers import RMSNorm
from linear_moe.mixers.softmax import SDPACoreAttention


@dataclass(frozen=True)
class BasePreset:
    """A base model: Megatron flags common to all sizes, per-size flags, and the specs of the
    parts that are not the linear mixer."""

    name: str
    common_args: dict
    sizes: dict[str, dict]
    attention_spec: Callable = field(default=None)
    mlp_spec: Callable = field(default=None)

    def megatron_args(self, size: str) -> dict:
        if size not in self.sizes:
            raise ValueError(f"unknown --model-size '{size}' for base model '{self.name}'; "
                             f"choose one of {', '.join(self.sizes)}")
        return {**self.common_args, **self.sizes[size]}


def softmax_attention_spec(config) -> ModuleSpec:
    """Megatron's SelfAttention (MHA/GQA, RoPE, optional qkv bias via config.add_qkv_bias) with
    SDPA as the core attention."""
    qk_norm = RMSNorm if config.qk_layernorm else IdentityOp
    return ModuleSpec(
        module=SelfAttention,
        params={"attn_mask_type": AttnMaskType.causal},
        submodules=SelfAttentionSubmodules(
            linear_qkv=ColumnParallelLinear,
            core_attention=SDPACoreAttention,
            linear_proj=RowParallelLinear,
            q_layernorm=qk_norm,
            k_layernorm=qk_norm,
        ),
    )


def mlp_or_moe_spec(config, layer_index: int):
    """megatron-core's MoELayer (router, dispatcher, SequentialMLP experts, shared expert) when
    the config has experts, else its dense MLP."""
    return get_mlp_module_spec_for_backend(
        backend=LocalSpecProvider(), num_experts=config.num_moe_experts, moe_grouped_gemm=False)


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
