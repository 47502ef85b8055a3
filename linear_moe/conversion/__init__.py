"""HF transformers <-> Megatron checkpoint conversion (toolkits/checkpoint/ runs it).

FORMATS maps a transformers architecture to its converter; each base preset's module holds the
ones it converts to, and core.py the machinery they share.
"""

from linear_moe.conversion import deepseek_v2, llama3, mixtral, qwen2_moe, qwen3

FORMATS = {f.architecture: f for f in (llama3.FORMAT, qwen2_moe.DENSE, qwen2_moe.MOE,
                                       qwen3.DENSE, qwen3.MOE, mixtral.FORMAT,
                                       deepseek_v2.FORMAT)}


def format_for_args(args):
    """The HF architecture a checkpoint's arguments export to."""
    moe = bool(getattr(args, "num_experts", None))
    qk_norm = bool(getattr(args, "qk_layernorm", False))
    for fmt in FORMATS.values():
        if (fmt.base_model, fmt.moe_names is not None, fmt.qk_norm) == (args.base_model, moe,
                                                                        qk_norm):
            return fmt
    kind = ("with experts" if moe else "without experts") + (", q/k norm" if qk_norm else "")
    raise ValueError(f"no HF architecture for --base-model {args.base_model} {kind}; "
                     f"exportable: {', '.join(f'{f.architecture} ({f.base_model})' for f in FORMATS.values())}")
