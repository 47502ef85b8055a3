"""Per-mixer math: GLA, scalar-decay GLA, the (gated) delta rule, each with a plain-torch
`reference` backend (CPU path and oracle) and an `fla` backend (Triton, CUDA)."""

from .based import based, rebased
from .delta_rule import delta_rule
from .dispatch import resolve_backend
from .gated_delta_rule import gated_delta_rule
from .gla import gla
from .gsa import gsa
from .kda import kda
from .linear_attn import linear_attn
from .rwkv6 import rwkv6
from .rwkv7 import rwkv7
from .simple_gla import simple_gla, simple_gla_log_decay
from .ssd import ssd

__all__ = ["based", "rebased", "linear_attn", "delta_rule", "gla", "gsa", "gated_delta_rule", "kda", "resolve_backend", "rwkv6", "rwkv7", "simple_gla", "simple_gla_log_decay", "ssd"]
