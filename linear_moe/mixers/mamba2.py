"""Mamba2 (Dao & Gu, 2024, arXiv:2405.21060), the SSD layer:

    S_t = exp(dt_t A_h) S_{t-1} + B_t^T (dt_t x_t),   y_t = C_t S_t + D_h x_t,
    dt_t = softplus(w_h x + dt_bias_h),  A_h = -exp(A_log_h),

with SiLU short convolutions on x, B and C, then a gated RMSNorm y <- norm(y * silu(z)) and the
output projection. Heads share B and C within --la-ssm-groups groups.

Kernel choice: SSD is scalar-decay linear attention (q = C, k = B, v = dt * x, g = dt * A), so
the CUDA path is fla's chunk_simple_gla. megatron-core 0.19.2's own SSD Triton ops
(megatron/core/ssm/ops) are forward-only (inference), and mamba-ssm / causal-conv1d cannot be
built on the lent GPU. The norm is per head (Mamba2's spans a whole group, which under TP>1
with few groups would cross ranks).
"""

import torch
import torch.nn.functional as F

from linear_moe import ops
from linear_moe.layers import ShortConvolution
from linear_moe.layers.decay_init import init_A_log_, init_dt_bias_
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


@register_mixer(
    "mamba2",
    paper="Transformers are SSMs: Mamba-2 / SSD (arXiv:2405.21060)",
    kernel="fla chunk_simple_gla / fused_recurrent_simple_gla (SSD as scalar-decay GLA)",
    defaults={"la_expand_k": 1.0, "la_expand_v": 2.0, "la_use_short_conv": True,
              "la_gate_fn": "swish"},
)
class Mamba2Mixer(LinearMixer):
    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        groups, state = config.la_ssm_groups, config.la_ssm_state_dim
        if self.num_heads % groups or groups % self.tp_size:
            raise ValueError(f"--la-ssm-groups {groups} must divide --la-num-heads "
                             f"{self.num_heads} and be divisible by TP {self.tp_size}")
        if not config.la_use_short_conv:
            raise ValueError("mamba2 always has its short convolution; drop "
                             "--no-la-use-short-conv")
        self.local_groups, self.state_dim = groups // self.tp_size, state
        h, d_inner = self.hidden_size, self.value_dim
        self.z_proj = self.column(h, d_inner)  # gate
        self.x_proj = self.column(h, d_inner)
        self.B_proj = self.column(h, groups * state)
        self.C_proj = self.column(h, groups * state)
        self.dt_proj = self.column(h, self.num_heads)
        conv = lambda c: ShortConvolution(c, config.la_conv_size, self.tp_rank, self.tp_size,
                                          config.params_dtype)
        self.x_conv, self.B_conv, self.C_conv = conv(d_inner), conv(groups * state), \
            conv(groups * state)
        self.A_log = self.per_head_parameter(init_A_log_)
        self.dt_bias = self.per_head_parameter(init_dt_bias_)
        self.D = self.per_head_parameter(torch.nn.init.ones_)
        self.use_output_gate = False  # the z gate is applied before the norm, below
        self.build_output_norm_and_projection()

    def _seq_conv(self, conv, t):
        return conv(t.transpose(0, 1)).transpose(0, 1)

    def _groups_to_heads(self, t):
        """[s, b, G_local * N] -> [b, s, H_local, N], each head reading its group."""
        t = self.heads(t, self.state_dim)
        return t.repeat_interleave(self.num_local_heads // self.local_groups, dim=2)

    def mix(self, x):
        xs = self.heads(self._seq_conv(self.x_conv, self.x_proj(x)[0]), self.head_v_dim)
        B = self._groups_to_heads(self._seq_conv(self.B_conv, self.B_proj(x)[0]))
        C = self._groups_to_heads(self._seq_conv(self.C_conv, self.C_proj(x)[0]))
        dt = F.softplus(self.per_head(self.dt_proj(x)[0]) + self.dt_bias.float())  # [b, s, H]
        y, _ = ops.ssd(xs, dt, -self.A_log.float().exp(), B, C, self.D,
                       backend=self.config.la_backend, mode=self.config.la_mode,
                       chunk_size=self.config.la_chunk_size)
        z = self.heads(self.z_proj(x)[0], self.head_v_dim)
        y = y * F.silu(z.float()).to(y.dtype)  # gate, then norm (Mamba2's norm_before_gate=False)
        return self.unheads(self.o_norm(y))
