"""Initialisers of Mamba2-style decay parameters, shared by Gated DeltaNet and Mamba2."""

import math

import torch


def init_A_log_(t: torch.Tensor, lo: float = 1.0, hi: float = 16.0) -> None:
    """A ~ U[lo, hi] (default [1, 16]), stored as log A (the decay rate is -exp(A_log))."""
    t.uniform_(lo, hi).log_()


def init_dt_bias_(t: torch.Tensor, dt_min=1e-3, dt_max=0.1, dt_floor=1e-4) -> None:
    """dt ~ log-uniform[dt_min, dt_max]; stores softplus^-1(dt) so softplus(dt_bias) = dt."""
    dt = torch.exp(torch.rand_like(t) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
    dt = dt.clamp(min=dt_floor)
    t.copy_(dt + torch.log(-torch.expm1(-dt)))
