"""Per-mixer math: GLA, scalar-decay GLA, the (gated) delta rule, each with a plain-torch
`reference` backend (CPU path and oracle) and an `fla` backend (Triton, CUDA)."""

from .delta_rule import delta_rule
from .dispatch import resolve_backend
from .gated_delta_rule import gated_delta_rule
from .gla import gla
from .kda import kda
from .simple_gla import simple_gla
from .ssd import ssd

__all__ = ["delta_rule", "gla", "gated_delta_rule", "kda", "resolve_backend", "simple_gla", "ssd"]
