"""The parsed-arguments namespace validate_args sees, without running Megatron's parser: our
flags at their defaults (or from ``argv``) plus the Megatron fields validate_args reads."""

from __future__ import annotations

import argparse

MEGATRON_DEFAULTS = dict(num_layers=4, num_attention_heads=4, tensor_model_parallel_size=1,
                         context_parallel_size=1, expert_model_parallel_size=1, num_experts=8,
                         normalization="RMSNorm", reset_attention_mask=False)


def parsed_args(argv=(), **overrides) -> argparse.Namespace:
    from linear_moe.arguments import add_args

    args = add_args(argparse.ArgumentParser()).parse_args(list(argv))
    for key, value in {**MEGATRON_DEFAULTS, **overrides}.items():
        setattr(args, key, value)
    return args
