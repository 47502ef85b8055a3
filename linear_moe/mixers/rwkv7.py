"""RWKV-7 "Goose" time mixing (Peng et al., 2025, arXiv:2503.14456), as fla's ``RWKV7Attention``:

    S_t = S_{t-1} (diag(w_t) - kk_t^T (a_t * kk_t)) + v_t^T k_t,   o_t = r_t S_t  (paper layout)

with the in-context learning rate a_t = sigmoid(a LoRA), the decay w_t = exp(-e^-0.5 sigmoid(w
LoRA)) per key dim, the removal key kk_t = L2-normalised (k_t * k_k) per head, the replacement
key k_t <- k_t (1 + (a_t - 1) k_a), static token-shift lerps per input (x_r ... x_g), a per-head
GroupNorm, the bonus term (r_t . (k_t * r_k)) v_t and the output gate g = W_up sigmoid(W_down x).

Deviation, on purpose: the value residual ("v_first": every layer after the first lerps its
values towards the first layer's, with a v LoRA) is dropped. It carries a tensor from layer 1 to
every later layer outside the residual stream, which Megatron's TransformerLayer (and pipeline
parallelism) has no slot for; every layer here computes its values like fla's first layer.

Tensor parallelism: the token-shift vectors and the LoRA down projections are replicated (their
outputs feed head-split projections, whose input gradients Megatron all-reduces); r/k/v, the
LoRA up projections, k_k, k_a, r_k and the GroupNorm's affine parameters are split by heads.

Initialisation follows fla / the RWKV-7 reference model where it is per channel (token-shift
lerps, decay and a biases, k_k, k_a, r_k, GroupNorm weight, all depending on the layer's depth);
projections and LoRAs use Megatron's init_method (fla: orthogonal, zero o_proj / LoRA-down).
"""

import math

import torch
import torch.nn.functional as F

from linear_moe import ops
from linear_moe.layers import rwkv
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer

_W_BOUND = -math.exp(-0.5)  # log decay in [-e^-0.5, 0): decay in (0.545, 1]
_SHIFT_POWERS = {"r": 0.2, "w": 0.9, "k": 0.7, "v": 0.7, "a": 0.9, "g": 0.2}


def _low_rank(hidden: int, scale: float, factor: float = 1.0) -> int:
    """fla's LoRA ranks: ~scale * sqrt(hidden), a multiple of 32, at least 32."""
    return max(32, int(round(scale * hidden ** 0.5 * factor / 32) * 32))


@register_mixer(
    "rwkv7",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_decay_low_rank_dim",),
    paper="RWKV-7 \"Goose\" with Expressive Dynamic State Evolution (arXiv:2503.14456)",
    kernel="fla chunk_rwkv7 (chunk_dplr_delta_rule)",
    # fla 0.6.0's fused_recurrent_rwkv7 (fused_recurrent_dplr_delta_rule) has no backward.
    modes=("chunk",),
    defaults={"la_expand_k": 1.0, "la_expand_v": 1.0, "la_use_short_conv": False,
              "la_output_norm": "groupnorm"},
)
class RWKV7Mixer(LinearMixer):
    strided_input = False  # the token shift and the mixes read x as [b, s, h]
    cp_value_arg = 3  # ops.rwkv7(r, w, k, v, ...): v (context parallelism)
    fla_context_parallel = True

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        rwkv.check_config(config, "rwkv7")
        h, dtype = self.hidden_size, config.params_dtype
        factor = self.head_k_dim / 64  # fla widens the LoRAs for heads over 64
        decay_rank = config.la_decay_low_rank_dim or _low_rank(h, 2.5, factor)
        a_rank, gate_rank = _low_rank(h, 2.5, factor), _low_rank(h, 5.0)
        deep, shallow = rwkv.layer_ratios(self.layer_number, config.num_layers)

        # Static token-shift lerps x + (x_{t-1} - x) * shift_mix[i], replicated.
        self.shift_mix = torch.nn.Parameter(torch.stack(
            [rwkv.shift_mix_init(h, p * shallow) for p in _SHIFT_POWERS.values()]).to(dtype))

        self.r_proj = self.column(h, self.key_dim)
        self.k_proj = self.column(h, self.key_dim)
        self.v_proj = self.column(h, self.value_dim)
        # LoRAs: replicated down projections, head-split up projections.
        self.w_down = rwkv.replicated_linear(h, decay_rank, config)
        self.w_up = self.column(decay_rank, self.key_dim, bias=True)
        self.a_down = rwkv.replicated_linear(h, a_rank, config)
        self.a_up = self.column(a_rank, self.key_dim, bias=True)
        self.g_down = rwkv.replicated_linear(h, gate_rank, config)
        self.g_up = self.column(gate_rank, self.value_dim)

        # Per-channel constants over the key dims (fla: `linear`, `zigzag` within a head).
        n = torch.arange(self.key_dim, dtype=torch.float32)
        linear = n / max(self.key_dim - 1, 1) - 0.5
        half = max(self.head_k_dim - 1, 1) / 2
        zigzag = ((n % self.head_k_dim) - half) / half
        zigzag = zigzag * zigzag.abs()
        decay_speed = -6 + 6 * (linear + 0.5) ** (1 + deep ** 0.3)
        rwkv.set_sharded_(self.w_up.bias, decay_speed + 0.5 + 2.5 * zigzag, self.tp_rank,
                          self.tp_size)
        rwkv.set_sharded_(self.a_up.bias, -0.19 + 0.3 * zigzag + 0.4 * linear, self.tp_rank,
                          self.tp_size)

        def shard(full_shape, init):
            return rwkv.sharded_parameter(full_shape, init, self.tp_rank, self.tp_size, dtype)

        self.k_k = shard((self.key_dim,), lambda t: t.copy_(0.71 - 0.1 * linear))
        self.k_a = shard((self.key_dim,), lambda t: t.fill_(1.02))
        self.r_k = shard((self.num_heads, self.head_k_dim), lambda t: t.fill_(-0.04))

        self.o_norm = None
        if config.la_output_norm == "groupnorm":
            index = (self.layer_number or 1) - 1
            self.o_norm = rwkv.HeadGroupNorm(
                self.num_heads, self.head_v_dim, self.head_k_dim * config.layernorm_epsilon,
                self.tp_rank, self.tp_size, dtype,
                weight_init=((index + 1) / config.num_layers) ** 0.7,
                elementwise_affine=config.la_norm_elementwise_affine)
        self.o_proj = self.row(self.value_dim)

    def mix(self, x):
        delta = self.token_shift_delta(x)  # x [b, s, h]
        xr, xw, xk, xv, xa, xg = (x + delta * m for m in self.shift_mix.unbind(0))
        heads_k = lambda t: self.heads(t, self.head_k_dim)  # noqa: E731

        r = heads_k(self.r_proj(xr)[0])
        w = _W_BOUND * heads_k(self.up(self.w_up, torch.tanh(self.w_down(xw)))).float().sigmoid()
        k = heads_k(self.k_proj(xk)[0])
        v = self.heads(self.v_proj(xv)[0], self.head_v_dim)
        a = heads_k(self.up(self.a_up, self.a_down(xa))).sigmoid()
        g = self.heads(self.g_up(torch.sigmoid(self.g_down(xg)))[0], self.head_v_dim)

        local = lambda p: p.view(self.num_local_heads, self.head_k_dim)  # noqa: E731
        kk = F.normalize(k * local(self.k_k), dim=-1)  # removal key
        k = k.addcmul(k * (a - 1), local(self.k_a))  # replacement key k (1 + (a - 1) k_a)
        o, _ = self.recurrent(ops.rwkv7, r, w, k, v, -kk, kk * a, scale=1.0, lower_bound=_W_BOUND,
                         backend=self.config.la_backend, mode=self.config.la_mode,
                         chunk_size=self.config.la_chunk_size)
        o = self.o_norm(o) if self.o_norm is not None else o.float()
        bonus = (r * k * self.r_k).float().sum(-1, keepdim=True) * v.float()
        return self.unheads(((o + bonus) * g.float()).to(x.dtype))
