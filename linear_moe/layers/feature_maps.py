"""Feature maps phi(.) for linear attention (--la-feature-map), as fla/modules/feature_map.py:

- elementwise: identity, elu (elu + 1, Katharopoulos et al., 2020), relu, swish;
- dpfp (Schlag et al., 2021, arXiv:2102.11174): parameter-free, order nu,
  phi(x)_{i + 2d (j - 1)} = r(x)_i r(x)_{i - j mod 2d} with r(x) = [relu(x), relu(-x)],
  j = 1..nu: 2 nu d features;
- learnable, one map per head: hedgehog (Zhang et al., 2024, arXiv:2402.04347),
  softmax([2 y, -2 y]) of y = W_h x + b_h (2d features; fla's temperature 2), W_h = I at init;
  t2r (Kasai et al., 2021, arXiv:2103.13076), relu(W_h x + b_h) (d features).

Learnable maps hold [num_heads, ...] parameters sharded over TP by heads (init_tp_sharded_),
so a rank keeps its heads' maps and TP=n equals TP=1. Each head learns its own map (fla's
LinearAttention shares one across heads).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from linear_moe.layers.tp_init import init_tp_sharded_

FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu": lambda x: F.elu(x) + 1,  # "elu+1", the original linear-transformer map
    "relu": F.relu,
    "swish": F.silu,
}
LEARNABLE_FEATURE_MAPS = ("hedgehog", "t2r")
FEATURE_MAP_NAMES = (*FEATURE_MAPS, "dpfp", *LEARNABLE_FEATURE_MAPS)


def dpfp(x: torch.Tensor, nu: int) -> torch.Tensor:
    """[..., d] -> [..., 2 nu d]: r(x) times r(x) rolled by j, for j = 1..nu."""
    r = torch.cat([F.relu(x), F.relu(-x)], -1)
    return torch.cat([r * r.roll(j, -1) for j in range(1, nu + 1)], -1)


def feature_dim(name: str, head_dim: int, nu: int = 4) -> int:
    """Output dim of the map on a [..., head_dim] input (the kernel's key dim)."""
    return {"hedgehog": 2 * head_dim, "dpfp": 2 * nu * head_dim}.get(name, head_dim)


class PerHeadFeatureMap(torch.nn.Module):
    """hedgehog / t2r: y = W_h x + b_h per head h, then the map's nonlinearity.

    weight [H_local, d, d] (out, in, as nn.Linear) and bias [H_local, d] are this rank's heads.
    """

    def __init__(self, kind: str, num_heads: int, head_dim: int, tp_rank: int, tp_size: int,
                 params_dtype=torch.float32):
        super().__init__()
        if kind not in LEARNABLE_FEATURE_MAPS:
            raise ValueError(f"unknown learnable feature map '{kind}'")
        self.kind = kind
        local = num_heads // tp_size
        d = head_dim
        self.weight = torch.nn.Parameter(torch.empty(local, d, d, dtype=params_dtype))
        self.bias = torch.nn.Parameter(torch.empty(local, d, dtype=params_dtype))
        if kind == "hedgehog":
            # Identity at init (fla's init_weights_): the map starts as softmax([2x, -2x]).
            init_w = lambda t: t.copy_(torch.eye(d).expand_as(t))
        else:
            # nn.Linear's default (kaiming-uniform, a = sqrt(5)) for a d -> d map.
            bound = 1.0 / math.sqrt(d)
            init_w = lambda t: torch.nn.init.uniform_(t, -bound, bound)
        init_tp_sharded_(self.weight, (num_heads, d, d), 0, init_w, tp_rank, tp_size)
        init_tp_sharded_(self.bias, (num_heads, d), 0, torch.nn.init.zeros_, tp_rank, tp_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [b, s, H_local, d] -> [b, s, H_local, feature_dim]."""
        y = torch.einsum("bshi,hoi->bsho", x, self.weight.to(x.dtype)) + self.bias.to(x.dtype)
        if self.kind == "hedgehog":
            y = 2 * y
            return torch.cat([y, -y], -1).softmax(-1)
        return F.relu(y)


def feature_map(name: str, *, num_heads: int | None = None, head_dim: int | None = None,
                tp_rank: int = 0, tp_size: int = 1, params_dtype=torch.float32, nu: int = 4):
    """phi for --la-feature-map: a function, or a PerHeadFeatureMap module for learnable maps
    (which need num_heads / head_dim and this rank's TP coordinates)."""
    if name in FEATURE_MAPS:
        return FEATURE_MAPS[name]
    if name == "dpfp":
        if nu < 1:
            raise ValueError(f"--la-dpfp-nu must be >= 1, got {nu}")
        return lambda x: dpfp(x, nu)
    if name in LEARNABLE_FEATURE_MAPS:
        if num_heads is None or head_dim is None:
            raise ValueError(f"feature map '{name}' is learnable: pass num_heads and head_dim")
        return PerHeadFeatureMap(name, num_heads, head_dim, tp_rank, tp_size, params_dtype)
    raise ValueError(f"unknown --la-feature-map '{name}'; choose one of "
                     f"{', '.join(FEATURE_MAP_NAMES)}")


def elementwise_feature_map(name: str | None, mixer: str):
    """phi for --la-feature-map on the mixers whose state key dim is fixed (gla, retention,
    simple_gla; fla's ``feature_map`` on q and k): None when unset, else an elementwise map."""
    if name is None:
        return None
    if name not in FEATURE_MAPS:
        raise ValueError(f"mixer '{mixer}' takes only an elementwise --la-feature-map "
                         f"({', '.join(FEATURE_MAPS)}), got '{name}'; pick one or drop the flag")
    return FEATURE_MAPS[name]
