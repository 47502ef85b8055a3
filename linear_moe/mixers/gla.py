"""Gated Linear Attention (Yang et al., 2024, arXiv:2312.06635).

S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,  o_t = q_t S_t, with a data-dependent per-key-dim
decay alpha_t = exp(logsigmoid(W_up W_down x_t) / normalizer) from a low-rank projection,
then a per-head RMSNorm and a swish output gate, as in fla's ``GatedLinearAttention``.
"""

import torch
import torch.nn.functional as F

from linear_moe import ops
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


@register_mixer(
    "gla",
    paper="Gated Linear Attention Transformers with Hardware-Efficient Training (arXiv:2312.06635)",
    kernel="fla chunk_gla / fused_recurrent_gla",
    defaults={"la_expand_k": 0.5, "la_expand_v": 1.0, "la_use_short_conv": False,
              "la_output_norm": "rmsnorm"},
)
class GLAMixer(LinearMixer):
    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        h = self.hidden_size
        self.build_qkv()
        # Low-rank key decay: the rank-r down projection is tiny and replicated; the up
        # projection is split by heads like q/k.
        self.gk_down = torch.nn.Linear(h, config.la_gate_low_rank_dim, bias=False,
                                       dtype=config.params_dtype)
        config.init_method(self.gk_down.weight)
        self.gk_up = self.column(config.la_gate_low_rank_dim, self.key_dim, bias=True)
        self.build_output()

    def mix(self, x):
        q, k, v = self.qkv(x)
        gk = self.heads(self.gk_up(self.gk_down(x))[0], self.head_k_dim)
        gk = F.logsigmoid(gk.float()) / self.config.la_gate_logit_normalizer
        o, _ = ops.gla(q, k, v, gk, backend=self.config.la_backend, mode=self.config.la_mode,
                       chunk_size=self.config.la_chunk_size)
        return self.output(o, x)
