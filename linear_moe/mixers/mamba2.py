"""Mamba2 (Dao & Gu, 2024, arXiv:2405.21060), the SSD layer:

    S_t = exp(dt_t A_h) S_{t-1} + B_t^T (dt_t x_t),   y_t = C_t S_t + D_h x_t,
    dt_t = softplus(w_h x + dt_bias_h),  A_h = -exp(A_log_h),

with SiLU short convolutions on x, B and C, then a gated RMSNorm y <- norm(y * silu(z)) and the
output projection. Heads share B and C within --la-ssm-groups groups.

fla's Mamba2 options: --la-ssm-d-has-hdim (D per channel), --la-ssm-norm-before-gate
(norm(y) * silu(z)), --la-ssm-dt-min/--la-ssm-dt-max/--la-ssm-dt-init-floor (dt_bias init),
--la-ssm-dt-limit LO HI (clamp of dt), --la-ssm-a-init-range LO HI (A init), use_conv_bias =
--la-conv-bias (off by default here, on in fla), rmsnorm = --la-output-norm rmsnorm|identity.

Kernel choice: SSD is scalar-decay linear attention (q = C, k = B, v = dt * x, g = dt * A), so
the CUDA path is fla's chunk_simple_gla. megatron-core 0.19.2's own SSD Triton ops
(megatron/core/ssm/ops) are forward-only (inference), and mamba-ssm / causal-conv1d cannot be
built on the lent GPU. On Hopper with Triton < 3.7.1 (fla #640) the chunk backward is refused:
the H100 whole-model test measured a dt_bias gradient error of 1.7e-1 through it, against
2.7e-2 for the same model in bf16 through the torch reference (session 3), while plain
simple_gla passed at its bf16 floor. The norm is per head (Mamba2's spans a whole group, which
under TP>1 with few groups would cross ranks).
"""

import torch
import torch.nn.functional as F

from linear_moe import ops
from linear_moe.layers import init_tp_sharded_
from linear_moe.layers.decay_init import init_A_log_, init_dt_bias_
from linear_moe.mixers.base import LinearMixer
from linear_moe.ops import fla_compat
from linear_moe.registry import register_mixer


def refuse_unproven_chunk_backward(config) -> None:
    """Refuse fla's chunk path where its backward is unproven for mamba2 (see the docstring)."""
    if (config.la_backend != "reference" and config.la_mode == "chunk"
            and torch.cuda.is_available() and fla_compat.hopper_guard_active()
            and fla_compat.guard_policy() != "lift_all"):
        raise ValueError(
            "mamba2's fla chunk backward is unproven on Hopper with Triton < 3.7.1 (fla #640; "
            "dt_bias grad error 1.7e-1 vs 2.7e-2 for bf16 itself): use --la-mode "
            "fused_recurrent or --la-backend reference, or Triton >= 3.7.1")


@register_mixer(
    "mamba2",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_ssm_state_dim", "la_ssm_groups", "la_ssm_d_has_hdim",
             "la_ssm_norm_before_gate", "la_ssm_dt_min", "la_ssm_dt_max",
             "la_ssm_dt_init_floor", "la_ssm_dt_limit", "la_ssm_a_init_range"),
    paper="Transformers are SSMs: Mamba-2 / SSD (arXiv:2405.21060)",
    kernel="fla chunk_simple_gla / fused_recurrent_simple_gla (SSD as scalar-decay GLA)",
    defaults={"la_expand_k": 1.0, "la_expand_v": 2.0, "la_use_short_conv": True,
              "la_gate_fn": "swish"},
)
class Mamba2Mixer(LinearMixer):
    cp_value_arg = 0  # ops.ssd(x, ...): x is the value input (context parallelism)
    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        groups, state = config.la_ssm_groups, config.la_ssm_state_dim
        if self.num_heads % groups or groups % self.tp_size:
            raise ValueError(f"--la-ssm-groups {groups} must divide --la-num-heads "
                             f"{self.num_heads} and be divisible by TP {self.tp_size}")
        if not config.la_use_short_conv:
            raise ValueError("mamba2 always has its short convolution; drop "
                             "--no-la-use-short-conv")
        refuse_unproven_chunk_backward(config)
        self.local_groups, self.state_dim = groups // self.tp_size, state
        h, d_inner = self.hidden_size, self.value_dim
        self.z_proj = self.column(h, d_inner)  # gate
        self.x_proj = self.column(h, d_inner)
        self.B_proj = self.column(h, groups * state)
        self.C_proj = self.column(h, groups * state)
        self.dt_proj = self.column(h, self.num_heads)
        self.x_conv, self.B_conv, self.C_conv = (self.short_conv(c) for c in (
            d_inner, groups * state, groups * state))
        lo, hi = config.la_ssm_a_init_range
        self.A_log = self.per_head_parameter(lambda t: init_A_log_(t, lo, hi))
        self.dt_bias = self.per_head_parameter(lambda t: init_dt_bias_(
            t, config.la_ssm_dt_min, config.la_ssm_dt_max, config.la_ssm_dt_init_floor))
        if config.la_ssm_d_has_hdim:  # one skip per channel, 1-D [H_local * P] like fla's
            self.D = torch.nn.Parameter(torch.empty(d_inner // self.tp_size,
                                                    dtype=config.params_dtype))
            init_tp_sharded_(self.D, (d_inner,), 0, torch.nn.init.ones_, self.tp_rank,
                             self.tp_size)
        else:
            self.D = self.per_head_parameter(torch.nn.init.ones_)
        self.dt_limit = tuple(config.la_ssm_dt_limit)
        self.use_output_gate = False  # the z gate is applied before the norm, below
        self.build_output_norm_and_projection()

    def _groups_to_heads(self, t):
        """[b, s, G_local * N] -> [b, s, H_local, N], each head reading its group."""
        t = self.heads(t, self.state_dim)
        return t.repeat_interleave(self.num_local_heads // self.local_groups, dim=2)

    def mix(self, x):
        # z, the output gate, has its own GEMM beside the fused one (project's separate): the
        # norm keeps z for backward, and a kept slice would keep the whole fused output
        xs, B, C, dt, z = self.project(x, self.x_proj, self.B_proj, self.C_proj, self.dt_proj,
                                       separate=(self.z_proj,))
        xs = self.heads(self.convolve(self.x_conv, xs), self.head_v_dim)
        B = self._groups_to_heads(self.convolve(self.B_conv, B))
        C = self._groups_to_heads(self.convolve(self.C_conv, C))
        dt = F.softplus(self.per_head(dt) + self.dt_bias.float())  # [b, s, H]
        if self.dt_limit != (0.0, float("inf")):  # fla's dt_limit
            dt = dt.clamp(*self.dt_limit)
        D = self.D
        if self.config.la_ssm_d_has_hdim:
            D = D.view(self.num_local_heads, self.head_v_dim)
        y, _ = self.recurrent(ops.ssd, xs, dt, -self.A_log.float().exp(), B, C, D,
                       backend=self.config.la_backend, mode=self.config.la_mode,
                       chunk_size=self.config.la_chunk_size)
        z = self.heads(z, self.head_v_dim)
        if self.config.la_ssm_norm_before_gate:  # norm(y) * silu(z)
            return self.unheads(self.o_norm(y, z))
        y = y * self.o_norm.gate_fn(z.float()).to(y.dtype)  # norm(y * silu(z)), Mamba2's default
        return self.unheads(self.o_norm(y))
