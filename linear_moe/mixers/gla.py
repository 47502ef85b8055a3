"""Gated Linear Attention (Yang et al., 2024, arXiv:2312.06635).

S_t = diag(alpha_t) S_{t-1} + k_t^T v_t,  o_t = q_t S_t, with a data-dependent per-key-dim
decay alpha_t = exp(logsigmoid(W_up W_down x_t) / normalizer) from a low-rank projection,
then a per-head RMSNorm and a swish output gate, as in fla's ``GatedLinearAttention``.
Options as fla's: --la-clamp-min clamps the log decay from below; --la-feature-map (default
none) applies an elementwise map to q and k.
"""

import torch
import torch.nn.functional as F

from linear_moe import ops
from linear_moe.layers.feature_maps import elementwise_feature_map
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


def _log_decay(z: torch.Tensor, normalizer: float, clamp_min: float | None) -> torch.Tensor:
    """fla's GLA log decay: logsigmoid(z) / normalizer, clamped from below where set."""
    g = F.logsigmoid(z) / normalizer
    return g if clamp_min is None else g.clamp_min(clamp_min)


# One pass forward and one backward on CUDA (inductor), where eager runs two each way over
# [tokens, key dim] (logsigmoid, the division): ~0.13 ms of the GLA layer bench's step (H200).
_log_decay_cuda = torch.compile(_log_decay)


@register_mixer(
    "gla",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_gate_low_rank_dim", "la_gate_logit_normalizer", "la_clamp_min",
             "la_feature_map", "la_num_kv_heads", "la_fused_log_decay"),
    paper="Gated Linear Attention Transformers with Hardware-Efficient Training (arXiv:2312.06635)",
    kernel="fla chunk_gla / fused_recurrent_gla",
    defaults={"la_expand_k": 0.5, "la_expand_v": 1.0, "la_use_short_conv": False,
              "la_output_norm": "rmsnorm"},
)
class GLAMixer(LinearMixer):
    head_sharing = "kv"  # fla's num_kv_heads: k, v and the key decay have --la-num-kv-heads
    cp_value_arg = 2  # the op's v (context parallelism)

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        h = self.hidden_size
        self.build_qkv()
        self.phi = elementwise_feature_map(config.la_feature_map, config.la_module)
        # Low-rank key decay: the rank-r down projection is tiny and replicated; the up
        # projection is split by heads like q/k.
        self.gk_down = torch.nn.Linear(h, config.la_gate_low_rank_dim, bias=False,
                                       dtype=config.params_dtype)
        config.init_method(self.gk_down.weight)
        self.gk_up = self.column(config.la_gate_low_rank_dim,
                                 self.num_k_heads * self.head_k_dim, bias=True)
        from linear_moe.ops.low_rank_gate import fused_rank_refusal

        fused = getattr(config, "la_fused_log_decay", None)
        refusal = fused_rank_refusal(config.la_gate_low_rank_dim)
        if fused is True and refusal:
            raise ValueError(refusal)
        # on CUDA (key_log_decay); elsewhere the same math in torch
        self.fused_log_decay = refusal is None and fused is not False
        self.build_output()

    def key_log_decay(self, gk_low):
        """The per-key-dim log decay [b, s, N_local] from the down projection's output. In the
        activation dtype, as fla's GatedLinearAttention: chunk_gla then keeps this bf16 gate
        for its backward and recomputes the fp32 cumsum. An fp32 gate made it keep the fp32
        cumsum and logsigmoid its fp32 input: 0.4 GiB more at the peer shape."""
        normalizer, clamp_min = self.config.la_gate_logit_normalizer, self.config.la_clamp_min
        if gk_low.is_cuda and self.config.la_backend != "reference" and self.fused_log_decay:
            from linear_moe.ops.low_rank_gate import low_rank_log_decay

            # the up projection, its bias and the logsigmoid in one kernel of ours
            return low_rank_log_decay(self._column_input(gk_low), self.gk_up.weight,
                                      self.gk_up.bias, normalizer, clamp_min)
        gk = self.up(self.gk_up, gk_low)
        return (_log_decay_cuda if gk.is_cuda else _log_decay)(gk, normalizer, clamp_min)

    def mix(self, x):
        q, k, v, gk_low, gate = self.qkv(x, self.gk_down)
        gk = self.expand_heads(self.heads(self.key_log_decay(gk_low), self.head_k_dim))
        if self.phi is not None:  # fla's feature_map on q/k
            q, k = self.phi(q), self.phi(k)
        o, _ = self.recurrent(ops.gla, q, k, v, gk, backend=self.config.la_backend,
                              mode=self.config.la_mode, chunk_size=self.config.la_chunk_size)
        return self.output(o, x, gate)
