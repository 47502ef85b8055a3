"""Gated Slot Attention (Zhang et al., 2024, arXiv:2409.07146).

A bounded memory of m slots per head (--la-gsa-num-slots), written under a data-dependent
per-slot forget gate alpha_t = sigmoid(W_f x_t)^(1/tau) (tau = --la-gsa-gate-logit-normalizer):

    K~_t = diag(alpha_t) K~_{t-1} + (1 - alpha_t) k_t^T
    V~_t = diag(alpha_t) V~_{t-1} + (1 - alpha_t) v_t^T
    o_t  = V~_t^T softmax(K~_t q_t)

as fla's ``GatedSlotAttention``: swish on q, k and v (after the optional SiLU short
convolutions), attention scale 1, then swish(o), RMSNorm and the output projection, no output
gate by default. Every parameter is split by heads over TP: q/k/v and the slot gate f (one
row block of m per head) are column-parallel, the norm weight is per value channel.
Deviation, on purpose: the output RMSNorm statistic is per head (fla's spans all heads, which
under TP would be a cross-rank norm); its weight is per channel as fla's. Not exposed: fla's
relu/t2r feature maps and k/v head sharing (num_kv_heads).
"""

import torch
import torch.nn.functional as F

from linear_moe import ops
from linear_moe.layers import init_tp_sharded_
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


@register_mixer(
    "gsa",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    options=("la_gsa_num_slots", "la_gsa_gate_logit_normalizer"),
    paper="Gated Slot Attention for Efficient Linear-Time Sequence Modeling (arXiv:2409.07146)",
    kernel="fla chunk_gsa / fused_recurrent_gsa",
    defaults={"la_expand_k": 1.0, "la_expand_v": 1.0, "la_use_short_conv": False,
              "la_output_norm": "rmsnorm", "la_use_output_gate": False},
)
class GSAMixer(LinearMixer):
    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.num_slots = config.la_gsa_num_slots
        if self.num_slots < 1:
            raise ValueError(f"--la-gsa-num-slots must be >= 1, got {self.num_slots}")
        self.build_qkv()
        # Slot forget gate: m logits per head, so the column split keeps whole heads.
        self.f_proj = self.column(self.hidden_size, self.num_heads * self.num_slots)
        self.build_output()

    def build_output_norm(self, use_norm: bool):
        # o_norm only applies the optional output gate; the norm itself is in mix, because
        # fla's norm weight has one entry per value channel (not one shared by the heads).
        super().build_output_norm(use_norm=False)
        self.norm_weight, self.use_o_norm = None, use_norm
        if use_norm and self.config.la_norm_elementwise_affine:
            self.norm_weight = torch.nn.Parameter(torch.empty(
                self.num_local_heads, self.head_v_dim, dtype=self.config.params_dtype))
            init_tp_sharded_(self.norm_weight, (self.num_heads, self.head_v_dim), 0,
                             torch.nn.init.ones_, self.tp_rank, self.tp_size)

    def cp_recurrent(self, op, args, kwargs):
        """GSA under context parallelism. Both memories decay per slot, K~ on its slot columns
        and V~ on its slot rows, by alpha = exp(g), and neither one's update reads the other
        (the softmax only reads K~ for the output), so a piece's end states are
        (K~_start diag(a), diag(a) V~_start) + its own from zero, with a = exp(sum of the
        piece's g): one op pass from zero states, one all-gather, one pass from the composed
        start states (no probe pass: the transition is read off g)."""
        cp = self.cp
        batch = args[0].shape[0]
        folded, kwargs = cp.fold_op_inputs(args, kwargs)  # q, k, v, s, g: all per token
        _, (hk, hv) = op(*folded, output_final_state=True, **kwargs)  # [2b,H,K,M], [2b,H,M,V]
        decay = folded[4].float().sum(1).exp()  # [2b, H, M]
        K, M, V = hk.shape[-2], hk.shape[-1], hv.shape[-1]
        hk, hv = hk.float(), hv.float()
        chunks = cp.gather_chunks(torch.cat([hk.flatten(-2), hv.flatten(-2), decay], -1))

        def step(start, chunk):
            local_k, local_v, a = chunk.split((K * M, M * V, M), -1)
            return (start[0] * a[..., None, :] + local_k.unflatten(-1, (K, M)),
                    start[1] * a[..., :, None] + local_v.unflatten(-1, (M, V)))

        zero = (torch.zeros_like(hk[:batch]), torch.zeros_like(hv[:batch]))
        initial = tuple(s.flatten(0, 1) for s in cp.carried_in(chunks, zero, step))
        o, _ = op(*folded, initial_state=initial, **kwargs)
        return cp.unfold(o), None

    def mix(self, x):
        q, k, v, f, gate = self.qkv(x, self.f_proj)
        q, k, v = F.silu(q), F.silu(k), F.silu(v)
        f = self.heads(f, self.num_slots).float()
        g = F.logsigmoid(f) / self.config.la_gsa_gate_logit_normalizer  # log alpha_t <= 0
        s = -torch.expm1(g)  # 1 - alpha_t, without cancellation for alpha_t near 1
        o, _ = self.recurrent(ops.gsa, q, k, v, s, g, scale=1.0, backend=self.config.la_backend,
                       mode=self.config.la_mode, chunk_size=self.config.la_chunk_size)
        y = F.silu(o.float())
        if self.use_o_norm:
            y = F.rms_norm(y, (self.head_v_dim,), eps=self.config.layernorm_epsilon)
        if self.norm_weight is not None:
            y = y * self.norm_weight.float()  # [H_local, Dv]: this rank's heads' channels
        return self.output(y.to(o.dtype), x, gate)
