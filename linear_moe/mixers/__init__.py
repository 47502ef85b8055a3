"""Importing this package registers every built-in mixer (one file per mixer family)."""

from linear_moe.mixers import gated_deltanet, gla  # noqa: F401
from linear_moe.mixers.softmax import SDPACoreAttention  # noqa: F401
