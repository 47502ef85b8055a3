"""Command-line flags of linear_moe (a Megatron ``extra_args_provider``) and their validation.

Validation runs right after Megatron parses its arguments, before any model, data or process
group work, and raises one-line errors that name the fix.
"""

from __future__ import annotations

import argparse
import importlib.util
from types import SimpleNamespace

import torch

from linear_moe.config import LinearMixerFields, recomputes_layer_norms, resolve_mixer_defaults
from linear_moe.layers.device_dispatch import device_dispatch_unsupported_reason
from linear_moe.layers.grouped_experts import EXPERT_IMPLS
from linear_moe.mixers.base import check_head_sharing, qk_l2norm_in_conv_needs_conv
from linear_moe.models import PRESETS, get_preset
from linear_moe.models.common import args_to_argv, is_moe_layer
from linear_moe.registry import (
    LINEAR,
    expand_layer_pattern,
    get_mixer,
    mixer_specific_options,
    unused_option_error,
)

DEFAULT_BASE_MODEL = "qwen2_moe"
DEFAULT_MODEL_SIZE = "tiny"
DEFAULT_LAYER_TYPE_LIST = "LLLN"

_LA_HELP = {
    "la_num_heads": "linear-mixer heads (default: --num-attention-heads)",
    "la_num_kv_heads": "GQA: k/v heads, each shared by --la-num-heads / this consecutive query "
                       "heads; must divide --la-num-heads and be divisible by TP (gla, "
                       "retention, simple_gla, linear_attention; default: --la-num-heads)",
    "la_num_v_heads": "GVA: value heads, each group of this / --la-num-heads reading one q/k "
                      "head; a multiple of --la-num-heads (which TP must divide); head dims "
                      "stay, so the value width grows (gated_deltanet, kda; default: "
                      "--la-num-heads)",
    "la_expand_k": "key dim = hidden * expand_k (default: the mixer's)",
    "la_expand_v": "value dim = hidden * expand_v (default: the mixer's)",
    "la_conv_size": "short-convolution kernel size",
    "la_conv_bias": "bias on the short convolutions (needs a short convolution; fla's "
                    "conv_bias, mamba2's use_conv_bias)",
    "la_norm_elementwise_affine": "learnable weight (groupnorm: and bias) of the per-head output "
                                  "norm; off: a plain norm without parameters (needs "
                                  "--la-output-norm other than identity)",
    "la_clamp_min": "GLA: clamp the log decay logsigmoid(.)/normalizer from below at this "
                    "value (fla's clamp_min; default: no clamp)",
    "la_allow_neg_eigval": "deltanet/gated_deltanet/kda: beta = 2 sigmoid(.) in (0, 2), so "
                           "I - beta k k^T can have negative eigenvalues",
    "la_use_beta": "deltanet: data-dependent write strength beta = sigmoid(w x); off: beta = 1",
    "la_qk_activation": "deltanet: activation of q/k: silu (in the short conv) | relu | elu "
                        "(elu + 1) | identity",
    "la_qk_norm": "deltanet: normalisation of q/k: l2 | sum (divide by the L1 norm)",
    "la_ssm_d_has_hdim": "mamba2: skip parameter D per channel (heads * head dim) instead of "
                         "per head",
    "la_ssm_norm_before_gate": "mamba2: norm(y) * silu(z) instead of norm(y * silu(z))",
    "la_ssm_dt_min": "mamba2: dt init is log-uniform in [dt_min, dt_max]",
    "la_ssm_dt_max": "mamba2: dt init is log-uniform in [dt_min, dt_max]",
    "la_ssm_dt_init_floor": "mamba2: lower clamp of the initial dt",
    "la_ssm_dt_limit": "mamba2: LO HI clamp of dt = softplus(. + dt_bias) in the forward",
    "la_ssm_a_init_range": "mamba2: LO HI, A ~ U[LO, HI] at init (decay rate -A)",
    "la_output_norm": "per-head output norm: rmsnorm | identity, groupnorm | identity for "
                      "rwkv6/rwkv7 (default: the mixer's)",
    "la_gate_fn": "output-gate activation: swish | sigmoid | identity (default: the mixer's)",
    "la_rope_theta": "retention: RoPE base applied to q/k",
    "la_feature_map": "feature map on q/k; linear_attention (default elu): identity | elu | "
                      "relu | swish | dpfp | hedgehog | t2r (the last two learnable, one map per "
                      "head); gla/retention/simple_gla (default none): identity | elu | relu | "
                      "swish",
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


# Off-by-default switches of this package: (flag, help).
_SWITCHES = (
    ("--moe-act-recompute",
     "grouped_mm experts: fc2 recomputes the expert activation in backward instead of keeping "
     "its output (one [routed tokens, ffn] tensor less per MoE layer); megatron-core's 'moe_act' "
     "recompute needs TransformerEngine"),
    ("--moe-device-dispatch",
     "MoE token permutation on the device, without megatron-core's host read of the expert "
     "counts in every MoE layer (needs EP 1 and the grouped_mm experts; lets --cuda-graph-impl "
     "capture MoE layers)"),
    ("--mlp-act-recompute",
     "dense MLP layers: fc2 recomputes the activation in backward instead of keeping its output "
     "(one [tokens, ffn] tensor less per dense layer, for one elementwise pass); megatron-core's "
     "'mlp' recompute redoes fc1 too"),
    ("--fused-cross-entropy",
     "LM loss through fla's fused cross-entropy kernel (row-chunked torch on the CPU), the "
     "gradient written over the logits: no fp32 copy of the [tokens, vocab] logits "
     "(megatron-core's keeps two); the same math"),
)


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
                        "based/rebased (where the mixer has it; `linear-moe mixers` lists them, "
                        "the default first: chunk, for rebased parallel)")
    g.add_argument("--la-backend", default=LinearMixerFields.la_backend,
                   choices=["auto", "reference", "fla"],
                   help="auto = fla kernels on CUDA, fp32 torch reference otherwise")
    g.add_argument("--la-use-short-conv", default=None, action=argparse.BooleanOptionalAction,
                   help="short convolution on q/k/v (default: the mixer's)")
    g.add_argument("--la-conv-kernel", default=LinearMixerFields.la_conv_kernel,
                   choices=["auto", "fla", "ours"],
                   help="CUDA kernel of the short convolutions: ours (linear_moe/ops/"
                        "causal_conv.py, ~2x fla's on the H100, widths up to 4) or fla's "
                        "causal_conv1d; the same math. auto = ours for widths up to 4, else fla's")
    g.add_argument("--la-qk-l2norm-in-conv", default=LinearMixerFields.la_qk_l2norm_in_conv,
                   action=argparse.BooleanOptionalAction,
                   help="gated_deltanet / deltanet / kda: L2-normalise q and k per head inside "
                        "their short convs (on CUDA in our conv kernel, no passes of its own) "
                        "instead of in the op (fla's use_qk_l2norm_in_kernel); the same math. "
                        "Default: wherever the mixer has its short convs; the flag requires it, "
                        "--no-la-qk-l2norm-in-conv keeps the norm in the op")
    g.add_argument("--la-fused-log-decay", default=LinearMixerFields.la_fused_log_decay,
                   action=argparse.BooleanOptionalAction,
                   help="gla: the key decay (low-rank up projection, bias, logsigmoid, "
                        "normaliser, clamp) in one Triton kernel of ours on CUDA (linear_moe/ops/"
                        "low_rank_gate.py) instead of a GEMM and a compiled logsigmoid; the same "
                        "math. Default: wherever the kernel takes --la-gate-low-rank-dim (a power "
                        "of two in [16, 128]); the flag requires it, --no-la-fused-log-decay "
                        "turns it off")
    g.add_argument("--la-cp-kernel", default=LinearMixerFields.la_cp_kernel,
                   choices=["ours", "fla"],
                   help="context parallelism of the delta-rule / DPLR mixers (deltanet, "
                        "gated_deltanet, kda, rwkv7, mom_gated_deltanet): ours = linear_moe's "
                        "state passing (three op passes; every mixer), fla = fla's own inside its "
                        "chunk kernels (one op pass; CUDA; not yet proven on a GPU here)")
    g.add_argument("--la-gemm-form", default=LinearMixerFields.la_gemm_form,
                   choices=["batched", "rows"],
                   help="the mixers' projection GEMMs on contiguous operands batched over the "
                        "batch rows (cuBLAS picked faster tiles for it on the H100: -0.1 to "
                        "-0.6 ms a GLA / GDN layer step) or as one 2-D GEMM over all rows; the "
                        "same products. Sequences under 256 tokens take the 2-D GEMM either way")
    g.add_argument("--la-fla-autotune-keys", default=LinearMixerFields.la_fla_autotune_keys,
                   choices=["shape", "fla"],
                   help="shape: fla's state-passing kernels are autotuned per sequence length "
                        "and head count (fla keys them on the head dims only and reuses one "
                        "cached pick at every shape); fla: fla's own keys")
    g.add_argument("--la-mom-shared-memory", default=LinearMixerFields.la_mom_shared_memory,
                   action=argparse.BooleanOptionalAction,
                   help="MoM: a shared memory that every token writes to")
    g.add_argument("--la-use-output-gate", default=None, action=argparse.BooleanOptionalAction,
                   help="gate the normed output with a projection (default: the mixer's)")
    for dest in ("la_feature_map_norm", "la_norm_q", "la_norm_k", "la_conv_bias",
                 "la_norm_elementwise_affine", "la_allow_neg_eigval", "la_use_beta",
                 "la_ssm_d_has_hdim", "la_ssm_norm_before_gate"):
        g.add_argument("--" + dest.replace("_", "-"), default=getattr(LinearMixerFields, dest),
                       action=argparse.BooleanOptionalAction, help=_LA_HELP[dest])
    g.add_argument("--moe-expert-impl", default=LinearMixerFields.moe_expert_impl,
                   choices=list(EXPERT_IMPLS),
                   help="MoE experts: grouped_mm (one torch._grouped_mm per projection over "
                        "all local experts) or sequential (megatron-core's per-expert loop); "
                        "the same parameters and checkpoints")
    for flag, text in _SWITCHES:
        g.add_argument(flag, action="store_true", help=text)
    # megatron-core's --fused-residual-rmsnorm (off there: its norm is TransformerEngine's) is on
    # here, where our RMSNorm does it (layers/norm.py, ResidualRMSNorm); this turns it off.
    parser.set_defaults(fused_residual_rmsnorm=True)
    g.add_argument("--no-fused-residual-rmsnorm", dest="fused_residual_rmsnorm",
                   action="store_false",
                   help="the layers' RMSNorms return a tensor, not megatron-core's (output, "
                        "residual) pair with the residual branch's gradient summed inside the "
                        "norm's backward (that is the default, left off where "
                        "--recompute-modules has layernorm: its checkpoint frees the outputs)")
    g.add_argument("--sft-data-path", default=None,
                   help="finetune on this jsonl of conversations (prompt/response or messages) "
                        "with the loss on responses only, instead of --data-path")
    g.add_argument("--sft-packing", action="store_true",
                   help="pack several conversations per sample (default: one, padded)")
    types = {"la_num_heads": int, "la_num_kv_heads": int, "la_num_v_heads": int,
             "la_expand_k": float, "la_expand_v": float,
             "la_conv_size": int, "la_output_norm": str, "la_gate_fn": str,
             "la_gate_low_rank_dim": int, "la_gate_logit_normalizer": float,
             "la_chunk_size": int, "la_rope_theta": float, "la_feature_map": str,
             "la_dpfp_nu": int, "la_feature_dim": int,
             "la_gsa_num_slots": int, "la_gsa_gate_logit_normalizer": float,
             "la_token_shift_low_rank_dim": int, "la_decay_low_rank_dim": int,
             "la_ssm_state_dim": int, "la_ssm_groups": int, "la_mom_num_memories": int,
             "la_mom_topk": int, "la_mom_capacity_factor": float,
             "la_mom_aux_loss_coeff": float}
    types.update(la_clamp_min=float, la_ssm_dt_min=float, la_ssm_dt_max=float,
                 la_ssm_dt_init_floor=float)
    for dest, typ in types.items():
        g.add_argument("--" + dest.replace("_", "-"), type=typ,
                       default=getattr(LinearMixerFields, dest), help=_LA_HELP[dest])
    for dest, choices in (("la_qk_activation", ["silu", "relu", "elu", "identity"]),
                          ("la_qk_norm", ["l2", "sum"])):
        g.add_argument("--" + dest.replace("_", "-"), choices=choices,
                       default=getattr(LinearMixerFields, dest), help=_LA_HELP[dest])
    for dest in ("la_ssm_dt_limit", "la_ssm_a_init_range"):
        g.add_argument("--" + dest.replace("_", "-"), type=float, nargs=2, metavar=("LO", "HI"),
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
    TransformerConfig, so turn them off up front and say so. Likewise the bias-dropout-add
    fusion where it has nothing to fuse."""
    dropped = []
    if getattr(args, "apply_rope_fusion", False) and importlib.util.find_spec("transformer_engine") is None:
        args.apply_rope_fusion = False
        dropped.append("--no-rope-fusion (needs TransformerEngine)")
    if (getattr(args, "gradient_accumulation_fusion", False)
            and importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None):
        args.gradient_accumulation_fusion = False
        dropped.append("--no-gradient-accumulation-fusion (needs apex/TE's "
                       "fused_weight_gradient_mlp_cuda)")
    # With neither dropout nor a bias, the "fused" bias-dropout-add is a torch.compile'd call
    # around the one residual add that the unfused path launches too: same kernel, same result,
    # ~90 us more host time per call forward + backward (CPU measurement, session 16), two
    # calls a layer, where an eager step at 2K is bound by its host (session 16, H100).
    if (getattr(args, "bias_dropout_fusion", False) and getattr(args, "hidden_dropout", 1) == 0
            and not getattr(args, "add_bias_linear", True)):
        args.bias_dropout_fusion = False
        dropped.append("--no-bias-dropout-fusion (no dropout and no bias: the residual add is "
                       "one kernel either way, the fused one costs host time)")
    if dropped and getattr(args, "rank", 0) == 0:
        print("linear_moe: applied " + "; ".join(dropped), flush=True)


def check_mixer_options(entry, args) -> None:
    """Refuse a non-default value of a mixer-specific option (one that some mixer lists in its
    registry ``options``) for a mixer that does not read it. Runs before the mixer defaults
    are filled in, so a default is LinearMixerFields' value."""
    for name in sorted(mixer_specific_options()):
        value = getattr(args, name, None)
        if isinstance(value, list):  # nargs=2 flags
            value = tuple(value)
            setattr(args, name, value)
        if name not in entry.options and value != getattr(LinearMixerFields, name):
            raise ValueError(unused_option_error(entry, name))


def check_option_dependencies(entry, args) -> None:
    """Options of shared building blocks that only mean something when the block is there."""
    if args.la_conv_bias and not args.la_use_short_conv:
        raise ValueError(f"--la-conv-bias needs a short convolution, which mixer "
                         f"'{entry.name}' has off; add --la-use-short-conv or drop --la-conv-bias")
    if args.la_conv_kernel != "auto" and not args.la_use_short_conv:
        raise ValueError(f"--la-conv-kernel {args.la_conv_kernel} needs a short convolution, "
                         f"which mixer '{entry.name}' has off; add --la-use-short-conv or drop "
                         "--la-conv-kernel")
    if args.la_qk_l2norm_in_conv is True and not args.la_use_short_conv:
        raise ValueError(qk_l2norm_in_conv_needs_conv(entry.name))
    if args.la_qk_l2norm_in_conv is True and entry.name == "deltanet":
        from linear_moe.mixers.deltanet import qk_l2norm_in_conv_refusal

        if refusal := qk_l2norm_in_conv_refusal(args.la_qk_norm, args.la_qk_activation):
            raise ValueError(refusal)
    if args.la_fused_log_decay is True:
        from linear_moe.ops.low_rank_gate import fused_rank_refusal

        if refusal := fused_rank_refusal(args.la_gate_low_rank_dim):
            raise ValueError(refusal)
    if not args.la_norm_elementwise_affine and args.la_output_norm == "identity":
        raise ValueError(f"--no-la-norm-elementwise-affine needs an output norm, and mixer "
                         f"'{entry.name}' has --la-output-norm identity; drop the flag or set "
                         "--la-output-norm")


def check_cuda_graphs(entry, args, uses_linear: bool) -> None:
    """--cuda-graph-impl: megatron-core's full_iteration (one graph for the whole forward and
    backward) is the capture this package supports and tests (tests/gpu/test_cuda_graph_gpu.py)."""
    impl = getattr(args, "cuda_graph_impl", "none")
    if impl == "none":
        return
    if impl != "full_iteration":
        raise ValueError(f"--cuda-graph-impl {impl} is not supported here (per-layer capture; "
                         "'transformer_engine' needs TransformerEngine); use --cuda-graph-impl "
                         "full_iteration")
    if not torch.cuda.is_available():
        raise ValueError("--cuda-graph-impl full_iteration needs a GPU; drop it on the CPU")
    if uses_linear and not entry.cuda_graph:
        raise ValueError(f"mixer '{entry.name}' syncs with the host in its forward (data-"
                         "dependent shapes) and cannot be captured; drop --cuda-graph-impl")
    if args.num_experts and not getattr(args, "moe_device_dispatch", False):
        raise ValueError("--cuda-graph-impl full_iteration cannot capture megatron-core's MoE "
                         "dispatchers (they read the expert counts on the host); add "
                         "--moe-device-dispatch (EP 1) or drop --cuda-graph-impl")
    if getattr(args, "check_for_nan_in_loss_and_grad", False):
        raise ValueError("--cuda-graph-impl full_iteration needs "
                         "--no-check-for-nan-in-loss-and-grad (the check reads the loss on the "
                         "host inside the captured step)")


def _check_packed_documents(entry, args, uses_linear: bool) -> None:
    """--reset-attention-mask: documents packed into a sample do not see each other (the
    mixers restart their state at each eod, SDPA masks across them)."""
    if uses_linear and not entry.supports_varlen:
        raise ValueError(f"mixer '{entry.name}' has no packed-document (varlen) support; drop "
                         "--reset-attention-mask or use a mixer with varlen=yes "
                         "(`linear-moe mixers`)")
    if args.context_parallel_size > 1:
        raise ValueError("--reset-attention-mask with --context-parallel-size > 1 is not "
                         "supported; use one of them")
    if getattr(args, "multi_latent_attention", False):
        raise ValueError("--reset-attention-mask is not supported with MLA attention (the "
                         "deepseek_v2 preset); drop it")
    if getattr(args, "cuda_graph_impl", "none") != "none":
        raise ValueError("--reset-attention-mask finds the documents on the host each step, "
                         "which a CUDA graph cannot capture; drop --cuda-graph-impl")


def _check_context_parallel(entry, args, uses_linear: bool) -> None:
    cp = args.context_parallel_size
    if getattr(args, "la_cp_kernel", "ours") == "fla":
        if cp == 1:
            raise ValueError("--la-cp-kernel fla needs context parallelism; add "
                             "--context-parallel-size > 1 or drop --la-cp-kernel")
        if not uses_linear or not getattr(entry.builder, "fla_context_parallel", False):
            raise ValueError(f"--la-cp-kernel fla applies to the mixers whose op fla runs under "
                             f"CP (deltanet, gated_deltanet, kda, rwkv7, mom_gated_deltanet), not "
                             f"'{entry.name}'; drop --la-cp-kernel")
        if args.la_backend == "reference":
            raise ValueError("--la-cp-kernel fla runs fla's kernels; drop --la-backend reference "
                             "or --la-cp-kernel fla")
    if cp == 1:
        return
    if uses_linear and not entry.supports_cp:
        raise ValueError(f"mixer '{entry.name}' has no context-parallel support; use "
                         "--context-parallel-size 1")
    if getattr(args, "multi_latent_attention", False):
        raise ValueError("MLA attention (the deepseek_v2 preset) has no context-parallel support "
                         "here; use --context-parallel-size 1")
    if args.seq_length % (2 * cp):  # megatron's CP layout: 2 * cp chunks of the sequence
        raise ValueError(f"--seq-length {args.seq_length} is not divisible by 2 x "
                         f"--context-parallel-size {cp}; pick a multiple of {2 * cp}")
    chunk = args.seq_length // (2 * cp)
    if uses_linear and chunk < args.la_conv_size:
        raise ValueError(f"--seq-length {args.seq_length} over 2 x --context-parallel-size {cp} "
                         f"gives chunks of {chunk} tokens, shorter than a short convolution's "
                         f"{args.la_conv_size}; use a longer --seq-length or a smaller "
                         "--context-parallel-size")


def validate_args(args) -> None:
    """Check linear_moe's flags against Megatron's; fills in the per-layer pattern and the
    mixer defaults. Raises ValueError with the fix."""
    entry = get_mixer(args.la_module)
    _drop_fusions_without_their_kernels(args)
    args.layer_type_list = expand_layer_pattern(args.layer_type_list, args.num_layers)
    check_mixer_options(entry, args)
    resolve_mixer_defaults(args)
    check_option_dependencies(entry, args)
    if args.la_mode not in entry.modes:
        raise ValueError(f"mixer '{entry.name}' has no --la-mode '{args.la_mode}'; choose one "
                         f"of {', '.join(entry.modes)}")
    tp = args.tensor_model_parallel_size
    uses_linear = LINEAR in args.layer_type_list
    check_head_sharing(entry.name, getattr(entry.builder, "head_sharing", None),
                       args.la_num_heads, getattr(args, "la_num_kv_heads", None),
                       getattr(args, "la_num_v_heads", None),
                       tp if uses_linear else 1)
    if uses_linear and args.la_num_heads % tp:
        raise ValueError(f"--la-num-heads {args.la_num_heads} is not divisible by "
                         f"--tensor-model-parallel-size {tp}; pick a TP size dividing it")
    if args.num_attention_heads % tp:
        raise ValueError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                         f"--tensor-model-parallel-size {tp}")
    _check_context_parallel(entry, args, uses_linear)
    if uses_linear and not entry.supports_tp and tp > 1:
        raise ValueError(f"mixer '{entry.name}' has no tensor-parallel support; use "
                         "--tensor-model-parallel-size 1")
    if getattr(args, "reset_attention_mask", False):
        _check_packed_documents(entry, args, uses_linear)
    if args.normalization != "RMSNorm":
        raise ValueError(f"--normalization {args.normalization} is not supported; use RMSNorm")
    if recomputes_layer_norms(args) and importlib.util.find_spec("transformer_engine") is None:
        # megatron-core 0.19's TransformerLayer builds CheckpointWithoutOutput() for it, whose
        # fp8=False default still takes the fp8 path ('fp8 is not None') into TE's globals
        raise ValueError("--recompute-modules layernorm needs TransformerEngine in megatron-core "
                         "0.19 (its norm checkpoint calls into TE); drop layernorm")
    num_experts = args.num_experts
    if getattr(args, "moe_act_recompute", False) and (
            not num_experts or args.moe_expert_impl != "grouped_mm"):
        raise ValueError("--moe-act-recompute applies to the grouped_mm MoE experts only: it "
                         "needs --num-experts and --moe-expert-impl grouped_mm")
    if getattr(args, "fused_cross_entropy", False) and getattr(
            args, "cross_entropy_loss_fusion", False):
        raise ValueError("--fused-cross-entropy replaces megatron-core's loss; drop "
                         "--cross-entropy-loss-fusion")
    layers = SimpleNamespace(num_moe_experts=num_experts, num_layers=args.num_layers,
                             moe_layer_freq=getattr(args, "moe_layer_freq", 1))
    if getattr(args, "mlp_act_recompute", False) and all(
            is_moe_layer(layers, i) for i in range(args.num_layers)):
        raise ValueError("--mlp-act-recompute applies to dense MLP layers and every layer here "
                         "is MoE; use --moe-act-recompute for the experts")
    if getattr(args, "moe_device_dispatch", False):
        # the config field names are Megatron's argument names, except the expert count
        reason = device_dispatch_unsupported_reason(
            SimpleNamespace(**{**vars(args), "num_moe_experts": num_experts}))
        if reason:
            raise ValueError(f"--moe-device-dispatch does not support {reason}; drop the flag")
    check_cuda_graphs(entry, args, uses_linear)
    if num_experts and num_experts % args.expert_model_parallel_size:
        raise ValueError(f"--num-experts {num_experts} is not divisible by "
                         f"--expert-model-parallel-size {args.expert_model_parallel_size}")
