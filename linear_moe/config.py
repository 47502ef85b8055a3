"""Config fields of the linear mixers, added to Megatron's TransformerConfig.

Each field has a ``--la-*`` flag of the same name (see arguments.py); ``None`` means "the mixer's
own default" (registry MixerEntry.defaults), resolved once in ``resolve_mixer_defaults``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from megatron.core.transformer import MLATransformerConfig, TransformerConfig


@dataclass
class LinearMixerFields:
    la_module: str = "gla"
    # Expanded per-layer pattern: 'L' = linear mixer, 'N' = softmax attention.
    layer_type_list: Optional[str] = None
    # Kernel family mode where fla offers several: "chunk" or "fused_recurrent" (rebased/based
    # also "parallel"). None: the mixer's default (chunk; parallel for rebased, as fla's layer).
    la_mode: Optional[str] = None
    # "auto": fla kernels on CUDA tensors, the fp32 torch reference otherwise.
    la_backend: str = "auto"
    la_num_heads: Optional[int] = None  # defaults to num_attention_heads
    # Head sharing (None: as many as la_num_heads). GQA: k/v heads, dividing la_num_heads
    # (gla, retention, simple_gla, linear_attention; fla's num_kv_heads).
    la_num_kv_heads: Optional[int] = None
    # GVA: value heads, a multiple of la_num_heads (gated_deltanet, kda; fla's num_v_heads).
    la_num_v_heads: Optional[int] = None
    la_expand_k: Optional[float] = None  # key dim = hidden * expand_k
    la_expand_v: Optional[float] = None  # value dim = hidden * expand_v
    la_use_short_conv: Optional[bool] = None
    la_conv_size: int = 4
    la_conv_bias: bool = False  # bias of the short convolutions (fla's conv_bias / use_conv_bias)
    la_conv_kernel: str = "auto"  # CUDA kernel of the short convolutions: auto | fla | ours
    # The delta-rule mixers' q / k L2 norm inside the q / k short convs (our kernel: no passes
    # of its own) instead of the op (fla's use_qk_l2norm_in_kernel: two passes each way).
    # None: wherever the mixer has its short convs; True: required (refused without them);
    # False: in the op.
    la_qk_l2norm_in_conv: Optional[bool] = None
    # GLA's key decay (up projection, bias, logsigmoid) in one kernel of ours on CUDA
    # (linear_moe/ops/low_rank_gate.py). None: wherever the kernel takes the gate's rank
    # (a power of two in [16, 128]); True: required (other ranks refused); False: off.
    la_fused_log_decay: Optional[bool] = None
    # Context parallelism of the delta-rule / DPLR mixers (fla_context_parallel) on fla's chunk
    # kernels: ours = linear_moe's state passing (three op passes), fla = fla's own (one).
    la_cp_kernel: str = "ours"
    # The projection GEMMs on contiguous operands batched over the batch rows ("batched": the
    # tiles cuBLAS picks for it were faster on the H100) or as one 2-D GEMM over all rows
    # ("rows"); linear_moe/layers/layout.py.
    la_gemm_form: str = "batched"
    # fla's state kernels autotuned per (T, heads) ("shape") or on fla's keys ("fla"): see
    # linear_moe/ops/fla_autotune.py. Process-wide, applied when the model is built.
    la_fla_autotune_keys: str = "shape"
    la_output_norm: Optional[str] = None  # rmsnorm | identity (rwkv6/rwkv7: groupnorm | identity)
    la_use_output_gate: Optional[bool] = None  # gate the normed output with a projection
    la_gate_fn: Optional[str] = None  # activation of the output gate (swish|sigmoid|identity)
    la_norm_elementwise_affine: bool = True  # learnable weight (and bias) of the output norm
    la_gate_low_rank_dim: int = 16  # GLA: rank of the key-decay projection
    la_gate_logit_normalizer: float = 16.0  # GLA: divides the log-sigmoid decay
    la_clamp_min: Optional[float] = None  # GLA: lower clamp of the log decay (fla's clamp_min)
    la_allow_neg_eigval: bool = False  # delta rules: beta = 2 sigmoid(.) in (0, 2)
    la_use_beta: bool = True  # deltanet: data-dependent beta (off: beta = 1)
    la_qk_activation: str = "silu"  # deltanet: silu | relu | elu | identity on q/k
    la_qk_norm: str = "l2"  # deltanet: l2 | sum normalisation of q/k
    la_chunk_size: int = 64
    la_rope_theta: float = 10000.0  # retention: RoPE base on q/k
    # phi applied to q and k: linear_attention (default elu); gla/retention/simple_gla (default
    # none, fla's feature_map=None; elementwise maps only)
    la_feature_map: Optional[str] = None
    la_feature_map_norm: bool = False  # linear_attention: o / (phi(q) . sum phi(k)) (fla's do_feature_map_norm)
    la_norm_q: bool = False  # linear_attention: phi(q) / (sum_i phi(q)_i + 1e-4), fla's norm_q
    la_norm_k: bool = False  # linear_attention: the same on phi(k), fla's norm_k
    la_dpfp_nu: int = 4  # linear_attention dpfp: order nu (2 * nu * head_k_dim features)
    la_feature_dim: int = 16  # based/rebased: q/k dim per head before the polynomial map
    la_gsa_num_slots: int = 64  # GSA: memory slots per head (fla's GSA model default)
    la_gsa_gate_logit_normalizer: float = 8.0  # GSA: tau in alpha = sigmoid(.)^(1/tau)
    la_token_shift_low_rank_dim: int = 32  # rwkv6: rank of the data-dependent token-shift LoRA
    la_decay_low_rank_dim: Optional[int] = None  # rwkv6/rwkv7: decay LoRA rank (None: fla's)
    la_ssm_state_dim: int = 64  # mamba2: state size N per group
    la_ssm_groups: int = 1  # mamba2: B/C groups (heads share a group's B and C)
    la_ssm_d_has_hdim: bool = False  # mamba2: skip D per channel (H * P) instead of per head
    la_ssm_norm_before_gate: bool = False  # mamba2: norm(y) * silu(z) instead of norm(y * silu(z))
    la_ssm_dt_min: float = 0.001  # mamba2: dt init ~ log-uniform[dt_min, dt_max]
    la_ssm_dt_max: float = 0.1
    la_ssm_dt_init_floor: float = 1e-4  # mamba2: dt init clamped to >= this
    la_ssm_dt_limit: tuple = (0.0, float("inf"))  # mamba2: clamp of softplus(dt + dt_bias)
    la_ssm_a_init_range: tuple = (1.0, 16.0)  # mamba2: A ~ U[lo, hi] at init
    la_mom_num_memories: int = 4  # MoM: routed memories
    la_mom_topk: int = 2  # MoM: memories per token
    la_mom_capacity_factor: float = 0.0  # MoM: 0 = no capacity limit
    la_mom_shared_memory: bool = True  # MoM: a memory every token writes to
    la_mom_aux_loss_coeff: float = 0.01  # MoM: load-balancing loss weight
    # MoE experts: "grouped_mm" (two torch._grouped_mm over all local experts) or
    # megatron-core's "sequential" per-expert loop; same parameters and checkpoints.
    moe_expert_impl: str = "grouped_mm"
    # grouped_mm experts: recompute the activation in backward instead of keeping its output
    moe_act_recompute: bool = False
    # MoE dispatch on the device, no host sync per layer (layers/device_dispatch.py; EP 1)
    moe_device_dispatch: bool = False
    # dense MLP layers: the same recompute of the activation (layers/mlp.py)
    mlp_act_recompute: bool = False
    # LM loss through fla's fused kernel (chunked torch on the CPU), gradient written over the
    # logits (layers/cross_entropy.py)
    fused_cross_entropy: bool = False


@dataclass
class LinearMoEConfig(TransformerConfig, LinearMixerFields):
    """TransformerConfig + linear-mixer fields (softmax 'N' layers use MHA/GQA)."""


@dataclass
class LinearMoEMLAConfig(MLATransformerConfig, LinearMixerFields):
    """MLATransformerConfig + linear-mixer fields (softmax 'N' layers use MLA)."""


def recomputes_layer_norms(config) -> bool:
    """Whether megatron-core recomputes the layers' norms (selective recompute of 'layernorm'),
    for the parsed args or a TransformerConfig alike."""
    return (getattr(config, "recompute_granularity", None) == "selective"
            and "layernorm" in (getattr(config, "recompute_modules", None) or ()))


def resolve_mixer_defaults(config) -> None:
    """Fill the ``None`` la_* fields from the chosen mixer's registry defaults."""
    from linear_moe.registry import get_mixer

    entry = get_mixer(config.la_module)
    generic = {"la_mode": "chunk", "la_expand_k": 1.0, "la_expand_v": 1.0,
               "la_use_short_conv": False,
               "la_output_norm": "rmsnorm", "la_use_output_gate": True, "la_gate_fn": "swish"}
    for name, value in {**generic, **entry.defaults}.items():
        if getattr(config, name) is None:
            setattr(config, name, value)
    if config.la_num_heads is None:
        config.la_num_heads = config.num_attention_heads
