"""Importing this package registers every built-in mixer (one file per mixer family)."""

from linear_moe.mixers import (  # noqa: F401
    deltanet,
    gated_deltanet,
    gla,
    hgrn2,
    kda,
    lightning,
    linear_attention,
    mamba2,
    mom,
    retention,
    simple_gla,
)
from linear_moe.mixers.softmax import SDPACoreAttention  # noqa: F401
