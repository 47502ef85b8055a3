"""Simple GLA: gated linear attention with one data-dependent decay per head
(S_t = exp(g_t) S_{t-1} + k_t^T v_t, g_t = logsigmoid(w_h x_t) / normalizer), short convs,
per-head RMSNorm and a swish output gate, as fla's ``SimpleGatedLinearAttention``."""

import torch.nn.functional as F

from linear_moe import ops
from linear_moe.layers.feature_maps import elementwise_feature_map
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


@register_mixer(
    "simple_gla",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_gate_logit_normalizer", "la_feature_map", "la_num_kv_heads"),
    paper="Gated Linear Attention (arXiv:2312.06635), scalar per-head gate variant",
    kernel="fla chunk_simple_gla / fused_recurrent_simple_gla",
    defaults={"la_expand_k": 1.0, "la_expand_v": 1.0, "la_use_short_conv": True},
)
class SimpleGLAMixer(LinearMixer):
    head_sharing = "kv"  # fla's num_kv_heads: k/v heads shared by query heads
    cp_value_arg = 2  # the op's v (context parallelism)

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.build_qkv()
        self.phi = elementwise_feature_map(config.la_feature_map, config.la_module)
        self.g_decay_proj = self.column(self.hidden_size, self.num_heads, bias=True)
        self.build_output()

    def mix(self, x):
        q, k, v, g, gate = self.qkv(x, self.g_decay_proj)
        if self.phi is not None:  # fla's feature_map on q/k (--la-feature-map)
            q, k = self.phi(q), self.phi(k)
        g = F.logsigmoid(self.per_head(g))
        g = g / self.config.la_gate_logit_normalizer
        o, _ = self.recurrent(ops.simple_gla, q, k, v, g=g, backend=self.config.la_backend,
                              mode=self.config.la_mode, chunk_size=self.config.la_chunk_size)
        return self.output(o, x, gate)
