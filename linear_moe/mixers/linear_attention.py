"""Linear attention (Katharopoulos et al., 2020, arXiv:2006.16236):
S_t = S_{t-1} + phi(k_t)^T v_t, o_t = phi(q_t) S_t, as fla's ``LinearAttention``.

phi is --la-feature-map: elementwise (identity, elu, relu, swish), DPFP, or a learnable map per
head (hedgehog, t2r), separate for q and k (fla's tie_feature_map_qk=False); the maps that
widen the features (hedgehog 2x, dpfp 2 nu x) widen the state's key dim. Optional, as fla:
phi(q) / phi(k) divided by their feature sum (--la-norm-q / --la-norm-k), and the paper's
normaliser o_t / (phi(q_t) . sum_{s<=t} phi(k_s)) (--la-feature-map-norm, fla's
do_feature_map_norm). Then a per-head RMSNorm and the output projection.
"""

from linear_moe import ops
from linear_moe.layers.feature_maps import feature_map
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


@register_mixer(
    "linear_attention",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_feature_map", "la_feature_map_norm", "la_norm_q", "la_norm_k", "la_dpfp_nu",
             "la_num_kv_heads"),
    paper="Transformers are RNNs (arXiv:2006.16236); feature maps: DPFP (arXiv:2102.11174), "
          "Hedgehog (arXiv:2402.04347), T2R (arXiv:2103.13076)",
    kernel="fla chunk_simple_gla / fused_recurrent_simple_gla with zero decay (+ normaliser)",
    defaults={"la_expand_k": 1.0, "la_expand_v": 1.0, "la_use_short_conv": False,
              "la_use_output_gate": False, "la_feature_map": "elu"},
)
class LinearAttentionMixer(LinearMixer):
    cp_value_arg = 2  # the op's v (context parallelism)
    cp_identity_transition = True  # no decay: the state (and normaliser) only add up
    head_sharing = "kv"  # fla's num_kv_heads: k/v heads shared by query heads

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        # Learnable maps are per-head modules sharded like the q/k projections they follow.
        maps = dict(num_heads=self.num_heads, head_dim=self.head_k_dim, tp_rank=self.tp_rank,
                    tp_size=self.tp_size, params_dtype=config.params_dtype, nu=config.la_dpfp_nu)
        self.phi_q = feature_map(config.la_feature_map, **maps)
        self.phi_k = feature_map(config.la_feature_map, **maps)
        self.build_qkv()
        self.build_output()

    @staticmethod
    def _sum_normalise(x):
        return x / (x.sum(-1, keepdim=True) + 1e-4)  # fla's norm_q / norm_k

    def mix(self, x):
        q, k, v, gate = self.qkv(x)
        q, k = self.phi_q(q), self.phi_k(k)
        if self.config.la_norm_q:
            q = self._sum_normalise(q)
        if self.config.la_norm_k:
            k = self._sum_normalise(k)
        o, _ = self.recurrent(ops.linear_attn, q, k, v,
                              normalize=self.config.la_feature_map_norm,
                              backend=self.config.la_backend, mode=self.config.la_mode,
                              chunk_size=self.config.la_chunk_size)
        return self.output(o, x, gate)
