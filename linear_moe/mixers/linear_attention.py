"""Linear attention (Katharopoulos et al., 2020, arXiv:2006.16236) without normaliser:
S_t = S_{t-1} + phi(k_t)^T v_t, o_t = phi(q_t) S_t, with an elementwise feature map phi
(--la-feature-map) and a per-head RMSNorm on the output, as fla's ``LinearAttention`` with
``do_feature_map_norm=False``."""

import torch

from linear_moe import ops
from linear_moe.layers.feature_maps import feature_map
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


@register_mixer(
    "linear_attention",
    paper="Transformers are RNNs (arXiv:2006.16236)",
    kernel="fla chunk_simple_gla / fused_recurrent_simple_gla with zero decay",
    defaults={"la_expand_k": 1.0, "la_expand_v": 1.0, "la_use_short_conv": False,
              "la_use_output_gate": False},
)
class LinearAttentionMixer(LinearMixer):
    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.phi = feature_map(config.la_feature_map)
        self.build_qkv()
        self.build_output()
        self.register_buffer("no_decay", torch.zeros(self.num_local_heads), persistent=False)

    def mix(self, x):
        q, k, v = self.qkv(x)
        o, _ = ops.simple_gla(self.phi(q), self.phi(k), v, g_gamma=self.no_decay,
                              backend=self.config.la_backend, mode=self.config.la_mode,
                              chunk_size=self.config.la_chunk_size)
        return self.output(o, x)
