"""HF transformers <-> Megatron checkpoint conversion (toolkits/checkpoint/ runs it).

FORMATS maps a transformers architecture to its converter; each base preset's module holds the
ones it converts to, and core.py the machinery they share.
"""

from linear_moe.conversion import deepseek_v2, llama3, mixtral, qwen2_moe

FORMATS = {f.architecture: f for f in (llama3.FORMAT, qwen2_moe.DENSE, qwen2_moe.MOE,
                                       mixtral.FORMAT, deepseek_v2.FORMAT)}


def format_for_args(args):
    """The HF architecture a checkpoint's arguments export to."""
    moe = bool(getattr(args, "num_experts", None))
    for fmt in FORMATS.values():
        if fmt.base_model == args.base_model and (fmt.moe_names is not None) == moe:
            return fmt
    kind = "with experts" if moe else "without experts"
    raise ValueError(f"no HF architecture for --base-model {args.base_model} {kind}; "
                     f"exportable: {', '.join(f'{f.architecture} ({f.base_model})' for f in FORMATS.values())}")
