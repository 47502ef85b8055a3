"""ReBased (Aksenov et al., 2024, arXiv:2402.10644): Based with a learnable kernel. q and k,
projected to a small feature dim d (--la-feature-dim, 16), are layer-normalised with a learnable
affine (gamma, beta), q' and k', and fed to the quadratic kernel phi(x) = x (x) x with the
normaliser: o_t = sum_{s<=t} a_ts v_s / (sum_{s<=t} a_ts + eps), a_ts = (q'_t . k'_s)^2 / d,
as fla's ``ReBasedLinearAttention`` (use_gamma, use_beta, normalize all on).

gamma and beta are fla's: one [d] pair shared by q, k and all heads. Each TP rank sees only
its heads, so, as GatedRMSNorm's shared weight, they pass through
copy_to_tensor_model_parallel_region, which all-reduces their gradient over TP.
"""

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from linear_moe import ops
from linear_moe.mixers.base import LinearMixer
from linear_moe.ops.based import REBASED_MODES
from linear_moe.registry import register_mixer

_LN_EPS = 1e-5  # fla's layer_norm default


@register_mixer(
    "rebased",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_feature_dim",),
    paper="Linear Transformers with Learnable Kernel Functions are Better In-Context Models "
          "(arXiv:2402.10644)",
    kernel="fla parallel_rebased; chunk: quadratic features through chunk_simple_gla with zero "
           "decay + normaliser",
    modes=REBASED_MODES,
    # parallel by default, as fla's ReBasedLinearAttention: at d = 16 it meets the bf16 bound
    # (fp32 kernel), while chunk's bf16 quadratic features cost dq/dk ~8e-2 (README).
    defaults={"la_mode": "parallel", "la_expand_v": 1.0, "la_use_short_conv": False,
              "la_output_norm": "identity", "la_use_output_gate": False},
)
class ReBasedMixer(LinearMixer):
    cp_value_arg = 2  # the op's v (context parallelism)
    cp_identity_transition = True  # no decay: the state (and normaliser) only add up
    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.head_k_dim = config.la_feature_dim
        self.key_dim = self.num_heads * self.head_k_dim
        self.build_qkv()
        d = self.head_k_dim
        # 1-D, so Megatron's optimizer leaves them out of weight decay like other norm weights.
        self.gamma = torch.nn.Parameter(torch.ones(d, dtype=config.params_dtype))
        self.beta = torch.nn.Parameter(torch.zeros(d, dtype=config.params_dtype))
        self.build_output()

    def kernel_input(self, x, gamma, beta):
        y = F.layer_norm(x.float(), (x.shape[-1],), gamma.float(), beta.float(), _LN_EPS)
        return y.to(x.dtype)

    def mix(self, x):
        q, k, v, gate = self.qkv(x)
        gamma = copy_to_tensor_model_parallel_region(self.gamma, group=self.tp_group)
        beta = copy_to_tensor_model_parallel_region(self.beta, group=self.tp_group)
        q, k = self.kernel_input(q, gamma, beta), self.kernel_input(k, gamma, beta)
        o, _ = self.recurrent(ops.rebased, q, k, v, backend=self.config.la_backend,
                              mode=self.config.la_mode, chunk_size=self.config.la_chunk_size)
        return self.output(o, x, gate)
