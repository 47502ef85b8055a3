"""DeltaNet (Yang et al., 2024, arXiv:2406.06484): the delta rule without decay,
S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, o_t = q_t S_t, with
beta_t = sigmoid(w_h x_t), L2-normalised q/k, SiLU short convolutions and a per-head RMSNorm
(no output gate by default), as fla's ``DeltaNet``.

fla's options: --la-use-beta (off: beta = 1), --la-allow-neg-eigval (beta doubled, in (0, 2)),
--la-qk-activation silu|relu|elu|identity (silu sits in the q/k short convs; the others follow
them, which then have no activation), --la-qk-norm l2|sum, and use_gate = --la-use-output-gate.
Without short convs q/k get SiLU (when --la-qk-activation silu) and v always gets SiLU, as fla.
"""

import torch
import torch.nn.functional as F

from linear_moe import ops
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


QK_ACTIVATIONS = {
    "silu": F.silu,
    "relu": F.relu,
    "elu": lambda x: F.elu(x) + 1,  # fla's elu_p1
    "identity": lambda x: x,
}


def qk_l2norm_in_conv_refusal(qk_norm: str, qk_activation: str) -> str | None:
    """Why q/k's L2 norm cannot run in the convs (it must come right after them: nothing but
    the convs' SiLU or no activation between), as the one-line error for asking; None where
    it can."""
    if qk_norm == "l2" and qk_activation in ("silu", "identity"):
        return None
    return (f"--la-qk-l2norm-in-conv needs deltanet's q/k L2 norm right after the convs, not "
            f"--la-qk-norm {qk_norm} with --la-qk-activation {qk_activation}; drop the flag or "
            "use --la-qk-norm l2 with silu / identity")


@register_mixer(
    "deltanet",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_allow_neg_eigval", "la_use_beta", "la_qk_activation", "la_qk_norm",
             "la_qk_l2norm_in_conv"),
    paper="Parallelizing Linear Transformers with the Delta Rule over Sequence Length "
          "(arXiv:2406.06484)",
    kernel="fla chunk_delta_rule / fused_recurrent_delta_rule",
    defaults={"la_expand_k": 1.0, "la_expand_v": 1.0, "la_use_short_conv": True,
              "la_use_output_gate": False},
)
class DeltaNetMixer(LinearMixer):
    cp_value_arg = 2  # the op's v (context parallelism)
    fla_context_parallel = True

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        if config.la_qk_activation not in QK_ACTIVATIONS:
            raise ValueError(f"unknown --la-qk-activation '{config.la_qk_activation}'; choose "
                             f"one of {', '.join(QK_ACTIVATIONS)}")
        if config.la_qk_norm not in ("l2", "sum"):
            raise ValueError(f"unknown --la-qk-norm '{config.la_qk_norm}'; choose l2 or sum")
        # q/k's L2 norm in their convs where nothing comes between (the activation is the
        # convs' SiLU or none)
        refusal = qk_l2norm_in_conv_refusal(config.la_qk_norm, config.la_qk_activation)
        if getattr(config, "la_qk_l2norm_in_conv", None) is True and refusal:
            raise ValueError(refusal)
        self.build_qkv(qk_l2norm=refusal is None)
        if self.use_short_conv and config.la_qk_activation != "silu":
            for name in ("q_conv", "k_conv"):  # fla: the q/k convs carry only the silu
                conv = getattr(self, name, None)
                if conv is not None:
                    conv.activation = None
        if config.la_use_beta:
            self.b_proj = self.column(self.hidden_size, self.num_heads)  # beta, one per head
        self.build_output()

    def mix(self, x):
        q, k, v, *b, gate = self.qkv(x, *([self.b_proj] if self.config.la_use_beta else []))
        act = self.config.la_qk_activation
        if not self.use_short_conv:  # fla: the convs' SiLU, applied without them
            v = F.silu(v)
            if act == "silu":
                q, k = F.silu(q), F.silu(k)
        if act != "silu":
            q, k = QK_ACTIVATIONS[act](q), QK_ACTIVATIONS[act](k)
        if self.config.la_qk_norm == "sum":  # fla's sum_norm: divide by the L1 norm
            q = F.normalize(q, p=1, dim=-1, eps=1e-6).to(q.dtype)
            k = F.normalize(k, p=1, dim=-1, eps=1e-6).to(k.dtype)
        if self.config.la_use_beta:
            beta = self.per_head(b[0]).sigmoid()
        else:
            beta = q.new_ones(q.shape[:3], dtype=torch.float32)
        if self.config.la_allow_neg_eigval:
            beta = beta * 2.0
        o, _ = self.recurrent(ops.delta_rule, q, k, v, beta,
                              use_qk_l2norm=(self.config.la_qk_norm == "l2"
                                             and not self.qk_l2norm_in_conv),
                              backend=self.config.la_backend, mode=self.config.la_mode,
                              chunk_size=self.config.la_chunk_size)
        return self.output(o, x, gate)
