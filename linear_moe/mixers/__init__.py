"""Importing this package registers every built-in mixer (one file per mixer family)."""

from linear_moe.mixers import (  # noqa: F401
    based,
    deltanet,
    gated_deltanet,
    gla,
    gsa,
    hgrn2,
    kda,
    lightning,
    linear_attention,
    mamba2,
    mom,
    rebased,
    retention,
    rwkv6,
    rwkv7,
    simple_gla,
)
from linear_moe.mixers.softmax import SDPACoreAttention  # noqa: F401
