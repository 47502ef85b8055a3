"""megatron.training's initialize runs ``make -C megatron/core/datasets`` to build the C++
dataset helpers, but the megatron-core wheel ships them prebuilt (helpers_cpp*.so) and no
Makefile, so the ``make`` fails and training exits. Use the shipped extension when it imports;
fall back to compiling otherwise (a source checkout)."""

import megatron.core.datasets.utils as dataset_utils

_compile_helpers = dataset_utils.compile_helpers


def compile_helpers():
    try:
        from megatron.core.datasets import helpers_cpp  # noqa: F401
    except ImportError:
        _compile_helpers()


dataset_utils.compile_helpers = compile_helpers
