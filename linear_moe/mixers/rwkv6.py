"""RWKV-6 "Finch" time mixing (Peng et al., 2024, arXiv:2404.05892), as fla's ``RWKV6Attention``:

    o_t = r_t (S_{t-1} + diag(u) k_t^T v_t),   S_t = diag(exp(w_t)) S_{t-1} + k_t^T v_t,

with w_t = -exp(decay LoRA) per key dim and a per-head bonus u. Every input is a data-dependent
lerp between x_t and x_{t-1} (ddlerp): a shared rank-r LoRA of the static mix x + mu_x dx makes
five mixing vectors, one each for r, w, k, v and the gate g. The output is GroupNorm'd per head
and gated by swish(g).

Tensor parallelism: the mixing LoRA and the decay LoRA's down projection are small and
replicated (their outputs feed head-split projections, whose input gradients Megatron
all-reduces); r/k/v/g and the decay's up projection are split by heads; the bonus and the
GroupNorm's affine parameters are sharded by heads.

Initialisation follows the RWKV-6 reference model where it is per channel (token-shift mixes,
decay speeds, bonus, all depending on the layer's depth); projections and LoRAs use Megatron's
init_method (fla: xavier / zero LoRA-down), the GroupNorm eps is --layernorm-epsilon.
"""

import torch

from linear_moe import ops
from linear_moe.layers import GatedRMSNorm
from linear_moe.layers import rwkv
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer

_MIXES = ("r", "w", "k", "v", "g")  # order of the five data-dependent mixing vectors
_DECAY_LOW_RANK_DIM = 64  # fla's gate_low_rank_dim


@register_mixer(
    "rwkv6",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_token_shift_low_rank_dim", "la_decay_low_rank_dim"),
    paper="Eagle and Finch: RWKV with Matrix-Valued States and Dynamic Recurrence "
          "(arXiv:2404.05892)",
    kernel="fla chunk_rwkv6 / fused_recurrent_rwkv6",
    defaults={"la_expand_k": 0.5, "la_expand_v": 1.0, "la_use_short_conv": False,
              "la_output_norm": "groupnorm", "la_gate_fn": "swish"},
)
class RWKV6Mixer(LinearMixer):
    strided_input = False  # the token shift and the mixes read x as [b, s, h]
    cp_value_arg = 2  # the op's v (context parallelism)

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        rwkv.check_config(config, "rwkv6")
        h, dtype = self.hidden_size, config.params_dtype
        rank = config.la_token_shift_low_rank_dim
        decay_rank = config.la_decay_low_rank_dim or _DECAY_LOW_RANK_DIM
        deep, shallow = rwkv.layer_ratios(self.layer_number, config.num_layers)

        # ddlerp, replicated: mix_x is the static mix fed to the LoRA, mix_bias the static part
        # of each of the five mixes (the reference model's time_maa_*).
        self.mix_x = torch.nn.Parameter(rwkv.shift_mix_init(h, shallow).to(dtype))
        self.mix_bias = torch.nn.Parameter(torch.stack([
            rwkv.shift_mix_init(h, 0.5 * shallow),  # r
            rwkv.shift_mix_init(h, shallow),  # w
            rwkv.shift_mix_init(h, shallow),  # k
            rwkv.shift_mix_init(h, shallow) - 0.3 * deep,  # v
            rwkv.shift_mix_init(h, 0.5 * shallow),  # g
        ]).to(dtype))
        self.mix_down = rwkv.replicated_linear(h, len(_MIXES) * rank, config)
        self.mix_up = torch.nn.Parameter(torch.empty(len(_MIXES), rank, h, dtype=dtype))
        config.init_method(self.mix_up)

        self.r_proj = self.column(h, self.key_dim)
        self.k_proj = self.column(h, self.key_dim)
        self.v_proj = self.column(h, self.value_dim)
        self.g_proj = self.column(h, self.value_dim)
        # Decay LoRA: replicated down, head-split up whose bias holds the per-channel decay
        # speeds, -6 .. -1 from the first to the last channel (log of -log decay).
        self.w_down = rwkv.replicated_linear(h, decay_rank, config)
        self.w_up = self.column(decay_rank, self.key_dim, bias=True)
        n = torch.arange(self.key_dim, dtype=torch.float32) / max(self.key_dim - 1, 1)
        rwkv.set_sharded_(self.w_up.bias, -6 + 5 * n ** (0.7 + 1.3 * deep), self.tp_rank,
                          self.tp_size)
        # Bonus of the current token, per head and key dim.
        zigzag = ((torch.arange(self.key_dim) + 1) % 3 - 1) * 0.1
        bonus = (deep * (1 - n) + zigzag).view(self.num_heads, self.head_k_dim)
        self.bonus = rwkv.sharded_parameter((self.num_heads, self.head_k_dim),
                                            lambda t: t.copy_(bonus), self.tp_rank, self.tp_size,
                                            dtype)

        self.o_norm = None
        if config.la_output_norm == "groupnorm":
            self.o_norm = rwkv.HeadGroupNorm(self.num_heads, self.head_v_dim,
                                             config.layernorm_epsilon, self.tp_rank,
                                             self.tp_size, dtype,
                                             elementwise_affine=config.la_norm_elementwise_affine)
        # the gate alone (no norm): o * gate_fn(g), --la-gate-fn
        self.o_gate = GatedRMSNorm(self.head_v_dim, config.layernorm_epsilon, config.la_gate_fn,
                                   dtype, self.tp_group, use_norm=False)
        self.o_proj = self.row(self.value_dim)

    def mix(self, x):
        delta = self.token_shift_delta(x)  # x [b, s, h]
        lora = torch.tanh(self.mix_down(x + delta * self.mix_x)).unflatten(-1, (len(_MIXES), -1))
        mixes = torch.einsum("bsnr,nrh->bsnh", lora, self.mix_up) + self.mix_bias
        xr, xw, xk, xv, xg = (x + delta * m for m in mixes.unbind(2))

        r = self.heads(self.r_proj(xr)[0], self.head_k_dim)
        k = self.heads(self.k_proj(xk)[0], self.head_k_dim)
        v = self.heads(self.v_proj(xv)[0], self.head_v_dim)
        w = self.heads(self.up(self.w_up, torch.tanh(self.w_down(xw))), self.head_k_dim)
        w = -w.float().exp()  # log decay
        o, _ = self.recurrent(ops.rwkv6, r, k, v, w, self.bonus, scale=1.0,
                              backend=self.config.la_backend, mode=self.config.la_mode,
                              chunk_size=self.config.la_chunk_size)
        o = self.o_norm(o) if self.o_norm is not None else o
        g = self.heads(self.g_proj(xg)[0], self.head_v_dim)
        return self.unheads(self.o_gate(o, g).to(x.dtype))
