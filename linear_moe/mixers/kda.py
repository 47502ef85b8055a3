"""Kimi Delta Attention (Kimi Linear, arXiv:2510.26692): the gated delta rule with a per-channel
decay, g_t = -exp(A_log_h) * softplus(W_up W_down x_t + dt_bias) per key dim (low-rank decay
projection), beta_t = sigmoid(w_h x_t) (x2 with --la-allow-neg-eigval), L2-normalised q/k,
SiLU short convolutions, per-head RMSNorm and a sigmoid output gate. (fla's layer uses a
low-rank output gate; here it is the full-rank gate projection of every mixer.)"""

import torch

from linear_moe import ops
from linear_moe.layers import init_tp_sharded_
from linear_moe.layers.decay_init import init_A_log_, init_dt_bias_
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


@register_mixer(
    "kda",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_allow_neg_eigval", "la_num_v_heads", "la_qk_l2norm_in_conv"),
    paper="Kimi Linear: Kimi Delta Attention (arXiv:2510.26692)",
    kernel="fla chunk_kda / fused_recurrent_kda",
    defaults={"la_expand_k": 1.0, "la_expand_v": 1.0, "la_use_short_conv": True,
              "la_gate_fn": "sigmoid"},
)
class KDAMixer(LinearMixer):
    # fla's num_v_heads (GVA): num_heads is then the value-head count; the per-key-dim decay
    # is per value head (fla's gate_dim = num_v_heads * head_k_dim).
    head_sharing = "v"
    cp_value_arg = 2  # the op's v (context parallelism)
    fla_context_parallel = True

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.build_qkv(qk_l2norm=True)
        # Low-rank decay projection (rank = head dim): replicated down, head-split up.
        self.f_down = torch.nn.Linear(self.hidden_size, self.head_k_dim, bias=False,
                                      dtype=config.params_dtype)
        config.init_method(self.f_down.weight)
        gate_dim = self.num_heads * self.head_k_dim
        self.f_up = self.column(self.head_k_dim, gate_dim)
        self.b_proj = self.column(self.hidden_size, self.num_heads)
        self.A_log = self.per_head_parameter(init_A_log_)
        self.dt_bias = torch.nn.Parameter(
            torch.empty(gate_dim // self.tp_size, dtype=config.params_dtype))
        init_tp_sharded_(self.dt_bias, (gate_dim,), 0, init_dt_bias_, self.tp_rank,
                         self.tp_size)
        self.build_output()

    def mix(self, x):
        q, k, v, b, f_low, gate = self.qkv(x, self.b_proj, self.f_down)
        # The decay's input; the op forms the log decay -exp(A_log) softplus(f + dt_bias)
        # (inside fla's chunk kernel, as fla's KimiDeltaAttention).
        f = self.heads(self.f_up(f_low)[0], self.head_k_dim)
        beta = self.per_head(b).sigmoid()
        if self.config.la_allow_neg_eigval:  # fla's allow_neg_eigval: beta in (0, 2)
            beta = beta * 2.0
        o, _ = self.recurrent(ops.kda, q, k, v, f, beta, A_log=self.A_log.float(),
                       dt_bias=self.dt_bias.float(), use_qk_l2norm=not self.qk_l2norm_in_conv,
                       backend=self.config.la_backend, mode=self.config.la_mode,
                       chunk_size=self.config.la_chunk_size)
        return self.output(o, x, gate)
