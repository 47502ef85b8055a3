"""Based (Arora et al., 2024, arXiv:2402.18668): linear attention whose feature map is the
2nd-order Taylor expansion of exp, phi(x) = [1, x, x (x) x / sqrt(2)], on q/k projected to a
small feature dim d (--la-feature-dim, 16), so that
phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(d), with the normaliser
o_t = sum_{s<=t} phi(q_t).phi(k_s) v_s / (sum_{s<=t} phi(q_t).phi(k_s) + eps),
as fla's ``BasedLinearAttention``: no output norm or gate by default (fla has none).
"""

from linear_moe import ops
from linear_moe.mixers.base import LinearMixer
from linear_moe.ops.based import BASED_MODES
from linear_moe.registry import register_mixer


@register_mixer(
    "based",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_feature_dim",),
    paper="Simple linear attention language models balance the recall-throughput tradeoff "
          "(arXiv:2402.18668)",
    kernel="fla parallel_based / fused_chunk_based; chunk: Taylor features through "
           "chunk_simple_gla with zero decay + normaliser",
    modes=BASED_MODES,
    defaults={"la_expand_v": 1.0, "la_use_short_conv": False, "la_output_norm": "identity",
              "la_use_output_gate": False},
)
class BasedMixer(LinearMixer):
    cp_value_arg = 2  # the op's v (context parallelism)
    cp_identity_transition = True  # no decay: the state (and normaliser) only add up
    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        # q/k live in the small space the Taylor map expands, not in hidden * expand_k.
        self.head_k_dim = config.la_feature_dim
        self.key_dim = self.num_heads * self.head_k_dim
        self.build_qkv()
        self.build_output()

    def mix(self, x):
        q, k, v, gate = self.qkv(x)
        o, _ = self.recurrent(ops.based, q, k, v, backend=self.config.la_backend,
                              mode=self.config.la_mode, chunk_size=self.config.la_chunk_size)
        return self.output(o, x, gate)
