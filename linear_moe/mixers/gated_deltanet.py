"""Gated DeltaNet (Yang, Kautz & Hatamizadeh, 2024, arXiv:2412.06464).

S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T,  o_t = q_t S_t, with
alpha_t = exp(-exp(A_log) * softplus(a_t + dt_bias)) per head (Mamba2-style decay),
beta_t = sigmoid(b_t) (2 sigmoid(b_t) with --la-allow-neg-eigval), q/k L2-normalised, SiLU
short convolutions on q/k/v, per-head RMSNorm and a swish output gate, as in fla's
``GatedDeltaNet``.
"""

import torch
import torch.nn.functional as F

from linear_moe import ops
from linear_moe.layers.decay_init import init_A_log_, init_dt_bias_
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


def _log_decay(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """The per-head log decay -exp(A_log) * softplus(a + dt_bias), in fp32 (as fla's)."""
    return -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())


# On CUDA one kernel each way (inductor), which keeps only its inputs for backward (a is a slice
# of the in-projection's output, kept anyway): eager keeps softplus's fp32 input and output,
# 2 x tokens x heads x 4 bytes a layer (12 MiB over the peer's 12 layers at 8K, most of its
# memory gap to fla's model; session 16 census), and launches ~6 small kernels each way.
_log_decay_cuda = torch.compile(_log_decay)


@register_mixer(
    "gated_deltanet",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_allow_neg_eigval", "la_num_v_heads", "la_qk_l2norm_in_conv"),
    paper="Gated Delta Networks: Improving Mamba2 with Delta Rule (arXiv:2412.06464)",
    kernel="fla chunk_gated_delta_rule",
    # fla 0.6.0's fused_recurrent_gated_delta_rule has no backward, so it cannot train.
    modes=("chunk",),
    defaults={"la_expand_k": 0.75, "la_expand_v": 1.5, "la_use_short_conv": True,
              "la_output_norm": "rmsnorm"},
)
class GatedDeltaNetMixer(LinearMixer):
    # fla's num_v_heads (GVA): num_heads is then the value-head count (a/b/A_log/dt_bias too).
    head_sharing = "v"
    cp_value_arg = 2  # the op's v (context parallelism)
    fla_context_parallel = True

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        h, nh = self.hidden_size, self.num_heads
        self.build_qkv(qk_l2norm=True)
        self.a_proj = self.column(h, nh)  # decay input, one per head
        self.b_proj = self.column(h, nh)  # beta (write strength), one per head
        self.A_log = self.per_head_parameter(init_A_log_)
        self.dt_bias = self.per_head_parameter(init_dt_bias_)
        self.build_output()

    def mix(self, x):
        q, k, v, a, b, gate = self.qkv(x, self.a_proj, self.b_proj)
        log_decay = _log_decay_cuda if a.is_cuda else _log_decay
        g = log_decay(a, self.A_log, self.dt_bias)
        beta = self.per_head(b).sigmoid()
        if self.config.la_allow_neg_eigval:  # fla's allow_neg_eigval: beta in (0, 2)
            beta = beta * 2.0
        o, _ = self.recurrent(ops.gated_delta_rule, q, k, v, g, beta,
                              use_qk_l2norm=not self.qk_l2norm_in_conv,
                              backend=self.config.la_backend, mode=self.config.la_mode,
                              chunk_size=self.config.la_chunk_size)
        return self.output(o, x, gate)
