"""HF config fields shared by the decoder architectures (Llama, Qwen2, Mixtral, DeepSeek-V2):
the Megatron flags they map to and back, and refusals of what has no counterpart."""

from __future__ import annotations

# Megatron's Llama 3.x RoPE scaling has these constants built in (RotaryEmbedding._apply_scaling).
_MEGATRON_LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}
DEFAULT_SEQ_LENGTH = 4096


def _mismatch(source, expected: dict):
    """The first (name, actual, wanted) where ``source`` differs from ``expected`` (a wanted False
    also accepts None / absent), else None."""
    for name, wanted in expected.items():
        actual = getattr(source, name, None if wanted is False else wanted)
        if actual != wanted and not (wanted is False and not actual):
            return name, actual, wanted
    return None


def refuse_unless(hf_config, **expected) -> None:
    """One-line refusal of a HF config value the conversion has no Megatron counterpart for."""
    if found := _mismatch(hf_config, expected):
        name, actual, wanted = found
        raise ValueError(f"HF config {name}={actual!r} is not supported by the conversion "
                         f"(it needs {wanted!r})")


def refuse_args_unless(args, **expected) -> None:
    """The same for a checkpoint's Megatron arguments on the way to HF."""
    if found := _mismatch(args, expected):
        name, actual, wanted = found
        raise ValueError(f"the checkpoint has {name}={actual!r}; its HF architecture needs "
                         f"{wanted!r}, so it cannot be exported")


def decoder_flags(c) -> dict:
    """Shapes, norm and embeddings of a pre-RMSNorm SwiGLU decoder."""
    refuse_unless(c, hidden_act="silu")
    heads = c.num_attention_heads
    return {
        "num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
        "num_attention_heads": heads, "group_query_attention": True,
        "num_query_groups": getattr(c, "num_key_value_heads", None) or heads,
        "kv_channels": getattr(c, "head_dim", None) or c.hidden_size // heads,
        "norm_epsilon": c.rms_norm_eps,
        "untie_embeddings_and_output_weights": not c.tie_word_embeddings,
        "max_position_embeddings": c.max_position_embeddings,
        "seq_length": min(c.max_position_embeddings, DEFAULT_SEQ_LENGTH),
    }


def rotary_base(theta: float) -> int:
    """Megatron's --rotary-base is an int."""
    if theta != int(theta):
        raise ValueError(f"RoPE theta {theta} is not an integer, which Megatron's --rotary-base "
                         "needs")
    return int(theta)


def rope_flags(c) -> dict:
    """RoPE theta, and Llama 3.x scaling where Megatron's built-in one is the same."""
    rope = dict(getattr(c, "rope_parameters", None) or {})
    refuse_unless(c, partial_rotary_factor=1.0)
    flags = {"rotary_base": rotary_base(rope.get("rope_theta", 10000.0))}
    kind = rope.get("rope_type", "default")
    if kind == "llama3":
        differs = {k: rope.get(k) for k, v in _MEGATRON_LLAMA3_SCALING.items() if rope.get(k) != v}
        if differs:
            raise ValueError(f"llama3 RoPE scaling with {differs}: Megatron's is fixed at "
                             f"{_MEGATRON_LLAMA3_SCALING}")
        flags.update(use_rope_scaling=True, rope_scaling_factor=rope["factor"])
    elif kind != "default":
        raise ValueError(f"HF rope_type {kind!r} is not supported by the conversion (default "
                         "and llama3 are)")
    return flags


def rope_parameters(args) -> dict:
    if getattr(args, "use_rope_scaling", False):
        return {"rope_type": "llama3", "rope_theta": float(args.rotary_base),
                "factor": float(args.rope_scaling_factor), **_MEGATRON_LLAMA3_SCALING}
    return {"rope_type": "default", "rope_theta": float(args.rotary_base)}


def decoder_hf_fields(args, gqa: bool = True, qk_norm: bool = False) -> dict:
    """HF config fields of decoder_flags' inverse (qk_norm: the HF class normalises q and k)."""
    refuse_args_unless(args, swiglu=True, normalization="RMSNorm", add_bias_linear=False,
                       position_embedding_type="rope", rotary_percent=1.0)
    fields = dict(vocab_size=args.padded_vocab_size, hidden_size=args.hidden_size,
                  num_hidden_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                  rms_norm_eps=args.layernorm_epsilon, hidden_act="silu",
                  tie_word_embeddings=not args.untie_embeddings_and_output_weights,
                  max_position_embeddings=args.max_position_embeddings,
                  initializer_range=args.init_method_std)
    if gqa:
        refuse_args_unless(args, qk_layernorm=qk_norm)
        fields.update(head_dim=args.kv_channels, num_key_value_heads=(
            args.num_query_groups if args.group_query_attention else args.num_attention_heads))
    return fields


def moe_layer_freq(moe_layers: list[bool]) -> str:
    """--moe-layer-freq as a 0/1 list (megatron-core evaluates the string)."""
    return "[" + ",".join("1" if m else "0" for m in moe_layers) + "]"


def qwen_moe_layer_freq(c) -> str:
    """--moe-layer-freq of a Qwen MoE config: experts every decoder_sparse_step-th layer,
    except mlp_only_layers."""
    return moe_layer_freq([i not in (c.mlp_only_layers or []) and c.num_experts > 0
                           and (i + 1) % c.decoder_sparse_step == 0
                           for i in range(c.num_hidden_layers)])


def moe_layer_flags(args) -> list[bool]:
    """Which layers of a checkpoint have experts, as megatron-core reads --moe-layer-freq."""
    from linear_moe.models.common import is_moe_layer

    class _View:  # is_moe_layer reads config field names
        num_moe_experts = args.num_experts
        moe_layer_freq = args.moe_layer_freq
        num_layers = args.num_layers
    return [is_moe_layer(_View, i) for i in range(args.num_layers)]


def refuse_router_args(args, **expected) -> None:
    """Routing options HF's plain softmax top-k routers do not have."""
    refuse_args_unless(args, moe_router_score_function="softmax",
                       moe_router_enable_expert_bias=False, moe_router_num_groups=None,
                       moe_router_group_topk=None, moe_latent_size=None, **expected)
