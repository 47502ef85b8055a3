"""Lightning attention (TransNormerLLM, Qin et al., 2023, arXiv:2307.14995; MiniMax-01,
arXiv:2501.08313): linear attention with SiLU feature maps and a fixed per-head decay from
ALiBi-style slopes, weaker in deeper layers:

    S_t = exp(-lambda_h) S_{t-1} + phi(k_t)^T v_t,   o_t = phi(q_t) S_t,
    lambda_h = slope_h * (1 - (l - 1) / (L - 1) + 1e-5),  slope_h = 2^(-8 (h + 1) / H)

for layer l of L (1-based) and head h over ALL heads (a TP rank keeps its heads' slopes); then a
per-head RMSNorm and a sigmoid output gate (MiniMax-01).
"""

import torch
import torch.nn.functional as F

from linear_moe import ops
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


def lightning_log_decays(num_heads: int, layer_number: int, num_layers: int) -> torch.Tensor:
    slopes = 2.0 ** (-8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64) / num_heads)
    depth = 1 - (layer_number - 1) / max(num_layers - 1, 1) + 1e-5
    return (-slopes * depth).float()


@register_mixer(
    "lightning_attention",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    paper="Lightning Attention-2 / TransNormerLLM (arXiv:2307.14995), MiniMax-01 "
          "(arXiv:2501.08313)",
    kernel="fla chunk_simple_gla / fused_recurrent_simple_gla with fixed per-head decay",
    defaults={"la_expand_k": 1.0, "la_expand_v": 1.0, "la_use_short_conv": False,
              "la_gate_fn": "sigmoid"},
)
class LightningAttentionMixer(LinearMixer):
    cp_value_arg = 2  # the op's v (context parallelism)
    def __init__(self, config, layer_number=None, **kwargs):
        super().__init__(config, layer_number=layer_number, **kwargs)
        self.build_qkv()
        self.build_output()
        decays = lightning_log_decays(self.num_heads, layer_number or 1, config.num_layers)
        self.register_buffer("log_decay", decays[self.local_heads()], persistent=False)

    def mix(self, x):
        *qkv, gate = self.qkv(x)
        q, k, v = (F.silu(t) for t in qkv)
        o, _ = self.recurrent(ops.simple_gla, q, k, v, g_gamma=self.log_decay,
                              backend=self.config.la_backend, mode=self.config.la_mode,
                              chunk_size=self.config.la_chunk_size)
        return self.output(o, x, gate)
