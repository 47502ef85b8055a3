"""HGRN2 (Qin et al., 2024, arXiv:2404.07904): gated linear RNN with state expansion,

    S_t = diag(f_t) S_{t-1} + (1 - f_t)^T i_t,   o_t = swish(q_t) S_t,   log f_t = logsigmoid(W_f x_t)

i.e. GLA with the key tied to the forget gate (k = 1 - f), as fla's ``HGRN2Attention``.
Deviations, on purpose: the cross-layer learnable lower bound of the HGRN2 model (which couples
all layers, awkward under pipeline parallelism) is not used — fla's layer also runs without it;
the output RMSNorm is per head (fla's spans all heads, which under TP would be a cross-rank norm).
"""

import torch.nn.functional as F

from linear_moe import ops
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


@register_mixer(
    "hgrn2",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    paper="HGRN2: Gated Linear RNNs with State Expansion (arXiv:2404.07904)",
    kernel="fla chunk_gla / fused_recurrent_gla (k = 1 - forget gate)",
    defaults={"la_expand_k": 1.0, "la_expand_v": 1.0, "la_use_short_conv": False,
              "la_use_output_gate": False},
)
class HGRN2Mixer(LinearMixer):
    cp_value_arg = 2  # the op's v (context parallelism)
    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        if config.la_use_short_conv:
            raise ValueError("hgrn2 has no short convolution here; drop --la-use-short-conv")
        h = self.hidden_size
        self.q_proj = self.column(h, self.key_dim)
        self.f_proj = self.column(h, self.key_dim)  # forget gate, per key dim
        self.i_proj = self.column(h, self.value_dim)  # input
        self.build_output()

    def mix(self, x):
        gates = (self.g_proj,) if self.use_output_gate else ()
        q, f, i, *gate = self.project_each(x, self.q_proj, self.f_proj, self.i_proj, *gates)
        q = F.silu(self.heads(q, self.head_k_dim))
        g = F.logsigmoid(self.heads(f, self.head_k_dim).float())
        k = (1 - g.exp()).to(q.dtype)
        i = self.heads(i, self.head_v_dim)
        o, _ = self.recurrent(ops.gla, q, k, i, g, backend=self.config.la_backend,
                              mode=self.config.la_mode, chunk_size=self.config.la_chunk_size)
        return self.output(o, x, *gate)
