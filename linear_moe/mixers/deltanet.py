"""DeltaNet (Yang et al., 2024, arXiv:2406.06484): the delta rule without decay,
S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, o_t = q_t S_t, with
beta_t = sigmoid(w_h x_t), L2-normalised q/k, SiLU short convolutions and a per-head RMSNorm
(no output gate by default), as fla's ``DeltaNet``."""

from linear_moe import ops
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


@register_mixer(
    "deltanet",
    paper="Parallelizing Linear Transformers with the Delta Rule over Sequence Length "
          "(arXiv:2406.06484)",
    kernel="fla chunk_delta_rule / fused_recurrent_delta_rule",
    defaults={"la_expand_k": 1.0, "la_expand_v": 1.0, "la_use_short_conv": True,
              "la_use_output_gate": False},
)
class DeltaNetMixer(LinearMixer):
    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.build_qkv()
        self.b_proj = self.column(self.hidden_size, self.num_heads)  # beta, one per head
        self.build_output()

    def mix(self, x):
        q, k, v = self.qkv(x)
        beta = self.per_head(self.b_proj(x)[0]).sigmoid()
        o, _ = ops.delta_rule(q, k, v, beta, use_qk_l2norm=True, backend=self.config.la_backend,
                              mode=self.config.la_mode, chunk_size=self.config.la_chunk_size)
        return self.output(o, x)
