"""Building blocks of the RWKV mixers: token shift, the per-head GroupNorm, head-sharded
per-channel parameters and the RWKV initialisations that depend on the layer's depth."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from linear_moe.layers.tp_init import init_tp_sharded_


def token_shift_delta(x: torch.Tensor, previous: torch.Tensor | None = None) -> torch.Tensor:
    """x [b, s, h] -> x_{t-1} - x_t over the sequence, fla's token_shift; x_{-1} is
    ``previous`` [b, 1, h] (the token before x, when decoding) or 0."""
    if previous is None:
        return F.pad(x[:, :-1], (0, 0, 1, 0)) - x
    return torch.cat([previous, x[:, :-1]], 1) - x


def sharded_parameter(full_shape: tuple, init_fn, tp_rank: int, tp_size: int,
                      dtype) -> torch.nn.Parameter:
    """A parameter split over TP along dim 0 (heads, or channels grouped by head)."""
    if full_shape[0] % tp_size:
        raise ValueError(f"dim 0 of {full_shape} is not divisible by TP {tp_size}")
    local = (full_shape[0] // tp_size, *full_shape[1:])
    p = torch.nn.Parameter(torch.empty(local, dtype=dtype))
    return init_tp_sharded_(p, full_shape, 0, init_fn, tp_rank, tp_size)


def replicated_linear(in_features: int, out_features: int, config) -> torch.nn.Linear:
    """A bias-free linear kept whole on every TP rank (the LoRA down projections): small, and
    its output feeds head-split projections, whose input gradients Megatron all-reduces."""
    linear = torch.nn.Linear(in_features, out_features, bias=False, dtype=config.params_dtype)
    config.init_method(linear.weight)
    return linear


def set_sharded_(param: torch.nn.Parameter, full: torch.Tensor, tp_rank: int, tp_size: int):
    """Overwrite an already TP-split parameter (a Megatron linear's bias) with this rank's slice
    of `full` along dim 0."""
    with torch.no_grad():
        param.copy_(full.chunk(tp_size, 0)[tp_rank].to(param.dtype))


class HeadGroupNorm(torch.nn.Module):
    """GroupNorm with one group per head (fla's GroupNorm / nn.GroupNorm(num_heads, value_dim)):
    LayerNorm over each head's channels, then a per-channel weight and bias. A head lives on one
    TP rank, so the statistics are local and the affine parameters are sharded by heads."""

    def __init__(self, num_heads: int, head_dim: int, eps: float, tp_rank: int, tp_size: int,
                 params_dtype, weight_init: float = 1.0, elementwise_affine: bool = True):
        super().__init__()
        self.head_dim, self.eps = head_dim, eps
        channels = (num_heads * head_dim,)
        self.weight = self.bias = None
        if not elementwise_affine:  # nn.GroupNorm(affine=False)
            return
        self.weight = sharded_parameter(channels, lambda t: t.fill_(weight_init), tp_rank,
                                        tp_size, params_dtype)
        self.bias = sharded_parameter(channels, torch.nn.init.zeros_, tp_rank, tp_size,
                                      params_dtype)

    def forward(self, o: torch.Tensor) -> torch.Tensor:
        """o [..., H_local, D] -> same shape, in fp32."""
        y = F.layer_norm(o.float(), (self.head_dim,), eps=self.eps)
        if self.weight is None:
            return y
        return y * self.weight.float().view(-1, self.head_dim) \
            + self.bias.float().view(-1, self.head_dim)


def layer_ratios(layer_number: int | None, num_layers: int) -> tuple[float, float]:
    """RWKV's depth ratios for the 1-based global layer number: (0 at the first layer -> 1 at
    the last, 1 at the first -> ~0 at the last)."""
    index = (layer_number or 1) - 1
    return index / max(num_layers - 1, 1), 1.0 - index / num_layers


def shift_mix_init(hidden: int, power: float) -> torch.Tensor:
    """Token-shift mixing coefficients 1 - (n / hidden) ** power over the channels n: deeper
    layers (smaller power) mix in more of the previous token."""
    return 1.0 - (torch.arange(hidden, dtype=torch.float32) / hidden) ** power


def check_config(config, name: str) -> None:
    """Refuse the generic mixer options an RWKV mixer replaces with its own token mixing."""
    if config.la_use_short_conv:
        raise ValueError(f"{name} mixes tokens with its token shift, not a short convolution; "
                         "drop --la-use-short-conv")
    if not config.la_use_output_gate:
        raise ValueError(f"{name}'s output gate is part of its token mixing; drop "
                         "--no-la-use-output-gate")
    if config.la_output_norm not in ("groupnorm", "identity"):
        raise ValueError(f"{name} normalises each head with a GroupNorm; use --la-output-norm "
                         f"groupnorm (default) or identity, not '{config.la_output_norm}'")
