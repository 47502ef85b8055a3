"""Per-mixer math: GLA and the gated delta rule, each with a plain-torch
`reference` backend (CPU path and oracle) and an `fla` backend (Triton, CUDA)."""

from .dispatch import resolve_backend
from .gated_delta_rule import gated_delta_rule
from .gla import gla

__all__ = ["gla", "gated_delta_rule", "resolve_backend"]
