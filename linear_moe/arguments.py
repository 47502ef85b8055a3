"""Command-line flags of linear_moe (a Megatron ``extra_args_provider``) and their validation.

Validation runs right after Megatron parses its arguments, before any model, data or process
group work, and raises one-line errors that name the fix.
"""

from __future__ import annotations

import argparse

from linear_moe.config import LinearMixerFields, resolve_mixer_defaults
from linear_moe.layers.grouped_experts import EXPERT_IMPLS
from linear_moe.models import PRESETS, get_preset
from linear_moe.models.common import args_to_argv
from linear_moe.registry import LINEAR, expand_layer_pattern, get_mixer

DEFAULT_BASE_MODEL = "qwen2_moe"
DEFAULT_MODEL_SIZE = "tiny"
DEFAULT_LAYER_TYPE_LIST = "LLLN"

_LA_HELP = {
    "la_num_heads": "linear-mixer heads (default: --num-attention-heads)",
    "la_expand_k": "key dim = hidden * expand_k (default: the mixer's)",
    "la_expand_v": "value dim = hidden * expand_v (default: the mixer's)",
    "la_conv_size": "short-convolution kernel size",
    "la_output_norm": "per-head output norm: rmsnorm | identity, groupnorm | identity for "
                      "rwkv6/rwkv7 (default: the mixer's)",
    "la_gate_fn": "output-gate activation: swish | sigmoid | identity (default: the mixer's)",
    "la_rope_theta": "retention: RoPE base applied to q/k",
    "la_feature_map": "linear_attention: feature map on q/k (identity | elu | relu | swish | "
                      "dpfp | hedgehog | t2r; the last two are learnable, one map per head)",
    "la_feature_map_norm": "linear_attention: normalise the output by phi(q) . sum phi(k) "
                           "(for positive feature maps)",
    "la_norm_q": "linear_attention: divide phi(q) by its sum over features",
    "la_norm_k": "linear_attention: divide phi(k) by its sum over features",
    "la_dpfp_nu": "linear_attention: DPFP order nu (key features = 2 * nu * head dim)",
    "la_feature_dim": "based/rebased: q/k dim per head before the polynomial feature map",
    "la_gsa_num_slots": "GSA: memory slots per head",
    "la_gsa_gate_logit_normalizer": "GSA: tau of the slot forget gate sigmoid(.)^(1/tau)",
    "la_token_shift_low_rank_dim": "rwkv6: rank of the data-dependent token-shift LoRA",
    "la_decay_low_rank_dim": "rwkv6/rwkv7: rank of the decay LoRA (default: fla's, 64 for "
                             "rwkv6, ~2.5 sqrt(hidden) for rwkv7)",
    "la_ssm_state_dim": "mamba2: SSM state size N per group",
    "la_ssm_groups": "mamba2: number of B/C groups (must divide heads and be divisible by TP)",
    "la_mom_num_memories": "MoM: number of routed memories",
    "la_mom_topk": "MoM: memories each token is routed to",
    "la_mom_capacity_factor": "MoM: per-memory token capacity as a multiple of T*k/M (0: none)",
    "la_mom_aux_loss_coeff": "MoM: weight of the load-balancing loss",
    "la_gate_low_rank_dim": "GLA: rank of the key-decay projection",
    "la_gate_logit_normalizer": "GLA: divisor of the log-sigmoid decay",
    "la_chunk_size": "chunk length of the reference chunked op",
}


def add_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Megatron ``extra_args_provider``."""
    g = parser.add_argument_group("linear-moe")
    g.add_argument("--base-model", default=DEFAULT_BASE_MODEL, choices=sorted(PRESETS),
                   help="base-model preset (norms, MLP/MoE, softmax-attention flavour)")
    g.add_argument("--model-size", default=DEFAULT_MODEL_SIZE,
                   help="size preset of the base model (e.g. tiny, A0.3B-2B)")
    g.add_argument("--la-module", default=LinearMixerFields.la_module,
                   help="linear mixer for the 'L' layers (`linear-moe mixers` lists them)")
    g.add_argument("--layer-type-list", default=DEFAULT_LAYER_TYPE_LIST,
                   help="per-layer pattern, L = linear mixer, N = softmax attention; a shorter "
                        "pattern repeats if it divides --num-layers")
    g.add_argument("--la-mode", default=LinearMixerFields.la_mode,
                   help="kernel mode: chunk | fused_recurrent, or parallel | fused_chunk for "
                        "based/rebased (where the mixer has it; `linear-moe mixers` lists them)")
    g.add_argument("--la-backend", default=LinearMixerFields.la_backend,
                   choices=["auto", "reference", "fla"],
                   help="auto = fla kernels on CUDA, fp32 torch reference otherwise")
    g.add_argument("--la-use-short-conv", default=None, action=argparse.BooleanOptionalAction,
                   help="short convolution on q/k/v (default: the mixer's)")
    g.add_argument("--la-mom-shared-memory", default=LinearMixerFields.la_mom_shared_memory,
                   action=argparse.BooleanOptionalAction,
                   help="MoM: a shared memory that every token writes to")
    g.add_argument("--la-use-output-gate", default=None, action=argparse.BooleanOptionalAction,
                   help="gate the normed output with a projection (default: the mixer's)")
    for dest in ("la_feature_map_norm", "la_norm_q", "la_norm_k"):
        g.add_argument("--" + dest.replace("_", "-"), default=getattr(LinearMixerFields, dest),
                       action=argparse.BooleanOptionalAction, help=_LA_HELP[dest])
    g.add_argument("--moe-expert-impl", default=LinearMixerFields.moe_expert_impl,
                   choices=list(EXPERT_IMPLS),
                   help="MoE experts: grouped_mm (one torch._grouped_mm per projection over "
                        "all local experts) or sequential (megatron-core's per-expert loop); "
                        "the same parameters and checkpoints")
    g.add_argument("--sft-data-path", default=None,
                   help="finetune on this jsonl of conversations (prompt/response or messages) "
                        "with the loss on responses only, instead of --data-path")
    g.add_argument("--sft-packing", action="store_true",
                   help="pack several conversations per sample (default: one, padded)")
    types = {"la_num_heads": int, "la_expand_k": float, "la_expand_v": float,
             "la_conv_size": int, "la_output_norm": str, "la_gate_fn": str,
             "la_gate_low_rank_dim": int, "la_gate_logit_normalizer": float,
             "la_chunk_size": int, "la_rope_theta": float, "la_feature_map": str,
             "la_dpfp_nu": int, "la_feature_dim": int,
             "la_gsa_num_slots": int, "la_gsa_gate_logit_normalizer": float,
             "la_token_shift_low_rank_dim": int, "la_decay_low_rank_dim": int,
             "la_ssm_state_dim": int, "la_ssm_groups": int, "la_mom_num_memories": int,
             "la_mom_topk": int, "la_mom_capacity_factor": float,
             "la_mom_aux_loss_coeff": float}
    for dest, typ in types.items():
        g.add_argument("--" + dest.replace("_", "-"), type=typ,
                       default=getattr(LinearMixerFields, dest), help=_LA_HELP[dest])
    return parser


def preset_argv(argv: list[str]) -> list[str]:
    """Megatron flags of the --base-model/--model-size preset, placed before the user's own
    flags so that anything given on the command line wins."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--base-model", default=DEFAULT_BASE_MODEL)
    pre.add_argument("--model-size", default=DEFAULT_MODEL_SIZE)
    known, _ = pre.parse_known_args(argv)
    return args_to_argv(get_preset(known.base_model).megatron_args(known.model_size)) + argv


def _drop_fusions_without_their_kernels(args) -> None:
    """Megatron defaults two fusions on whose kernels come from TransformerEngine (RoPE) and
    apex/TE (fused wgrad accumulation); without them the model build fails deep inside
    TransformerConfig, so turn them off up front and say so."""
    import importlib.util

    dropped = []
    if getattr(args, "apply_rope_fusion", False) and importlib.util.find_spec("transformer_engine") is None:
        args.apply_rope_fusion = False
        dropped.append("--no-rope-fusion (needs TransformerEngine)")
    if (getattr(args, "gradient_accumulation_fusion", False)
            and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None):
        args.gradient_accumulation_fusion = False
        dropped.append("--no-gradient-accumulation-fusion (needs apex/TE's "
                       "fused_weight_gradient_mlp_cuda)")
    if dropped and getattr(args, "rank", 0) == 0:
        print("linear_moe: applied " + "; ".join(dropped), flush=True)


def validate_args(args) -> None:
    """Check linear_moe's flags against Megatron's; fills in the per-layer pattern and the
    mixer defaults. Raises ValueError with the fix."""
    entry = get_mixer(args.la_module)
    _drop_fusions_without_their_kernels(args)
    args.layer_type_list = expand_layer_pattern(args.layer_type_list, args.num_layers)
    resolve_mixer_defaults(args)
    if args.la_mode not in entry.modes:
        raise ValueError(f"mixer '{entry.name}' has no --la-mode '{args.la_mode}'; choose one "
                         f"of {', '.join(entry.modes)}")
    tp = args.tensor_model_parallel_size
    uses_linear = LINEAR in args.layer_type_list
    if uses_linear and args.la_num_heads % tp:
        raise ValueError(f"--la-num-heads {args.la_num_heads} is not divisible by "
                         f"--tensor-model-parallel-size {tp}; pick a TP size dividing it")
    if args.num_attention_heads % tp:
        raise ValueError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                         f"--tensor-model-parallel-size {tp}")
    if uses_linear and args.context_parallel_size > 1 and not entry.supports_cp:
        raise ValueError(f"mixer '{entry.name}' has no context-parallel support; use "
                         "--context-parallel-size 1")
    if args.context_parallel_size > 1:
        raise ValueError("context parallelism is not supported yet (SDPA softmax layers); use "
                         "--context-parallel-size 1")
    if uses_linear and not entry.supports_tp and tp > 1:
        raise ValueError(f"mixer '{entry.name}' has no tensor-parallel support; use "
                         "--tensor-model-parallel-size 1")
    if getattr(args, "reset_attention_mask", False):
        raise ValueError("--reset-attention-mask needs per-document state resets that the "
                         "mixers do not implement yet; drop the flag")
    if args.normalization != "RMSNorm":
        raise ValueError(f"--normalization {args.normalization} is not supported; use RMSNorm")
    num_experts = args.num_experts
    if num_experts and num_experts % args.expert_model_parallel_size:
        raise ValueError(f"--num-experts {num_experts} is not divisible by "
                         f"--expert-model-parallel-size {args.expert_model_parallel_size}")
