"""Multi-scale retention (RetNet, Sun et al., 2023, arXiv:2307.08621).

S_t = gamma_h S_{t-1} + k_t^T v_t, o_t = q_t S_t with a fixed decay per head
gamma_h = 1 - 2^(-5-h) (h over ALL heads, so a TP rank keeps its heads' decays), RoPE on q/k,
per-head RMSNorm and a swish output gate, as fla's ``MultiScaleRetention``.
"""

import torch

from linear_moe import ops
from linear_moe.layers.feature_maps import elementwise_feature_map
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


def retention_log_decays(num_heads: int) -> torch.Tensor:
    return torch.log1p(-(2.0 ** (-5.0 - torch.arange(num_heads, dtype=torch.float64)))).float()


@register_mixer(
    "retention",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_rope_theta", "la_feature_map", "la_num_kv_heads"),
    paper="Retentive Network (arXiv:2307.08621)",
    kernel="fla chunk_simple_gla / fused_recurrent_simple_gla with fixed per-head decay",
    defaults={"la_expand_k": 1.0, "la_expand_v": 2.0, "la_use_short_conv": False},
)
class RetentionMixer(LinearMixer):
    head_sharing = "kv"  # fla's num_kv_heads: k/v heads shared by query heads
    cp_value_arg = 2  # the op's v (context parallelism)

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.build_qkv()
        self.phi = elementwise_feature_map(config.la_feature_map, config.la_module)
        self.build_output()
        # A constant, not a parameter: not trained, not checkpointed.
        self.register_buffer("log_decay", retention_log_decays(self.num_heads)[
            self.local_heads()], persistent=False)

    def mix(self, x):
        q, k, v, gate = self.qkv(x)
        if self.phi is not None:  # fla's feature_map on q/k, before RoPE as fla
            q, k = self.phi(q), self.phi(k)
        fused = self.config.la_backend != "reference"
        q, k = (self.rotate(t, self.config.la_rope_theta, fused) for t in (q, k))
        o, _ = self.recurrent(ops.simple_gla, q, k, v, g_gamma=self.log_decay,
                              backend=self.config.la_backend, mode=self.config.la_mode,
                              chunk_size=self.config.la_chunk_size)
        return self.output(o, x, gate)
