"""Mixture-of-Memories (MoM, Du et al., 2025, arXiv:2502.13685): several independent linear
memories, a router sending each token to its top-k memories, plus a shared memory that sees every
token. Memory m only reads and writes the tokens routed to it (in order), so each memory is the
base recurrence over a sub-sequence; a token's output is the routing-weighted sum of its
memories' outputs (plus the shared memory's), then the usual per-head norm, gate and projection.

    --la-mom-num-memories  M memories (each with its own key/value/decay projections)
    --la-mom-topk          memories per token
    --la-mom-capacity-factor  tokens a memory may take per sequence, as a multiple of its fair
                           share T * k / M (0: unlimited); overflow tokens skip that memory
    --la-mom-shared-memory / --no-la-mom-shared-memory
    --la-mom-aux-loss-coeff  Switch-style load-balancing loss M * sum_m f_m * P_m

Sub-sequences run through the op as packed varlen sequences (cu_seqlens), on both backends; with
packed documents (--reset-attention-mask) each document is a sequence of its own, its capacity
a share of its own length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler

from linear_moe import ops
from linear_moe.layers.decay_init import init_A_log_, init_dt_bias_
from linear_moe.mixers.base import LinearMixer
from linear_moe.registry import register_mixer


class MixtureOfMemories(LinearMixer):
    """Routing, capacity, packing and the load-balancing loss; subclasses define one memory's
    projections (``memory_inputs``) and recurrence (``memory_op``)."""

    cp_value_arg = 2  # the memory op's v (context parallelism)

    strided_input = False  # routing and the memories' projections read x as [b, s, h]

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        if config.la_use_short_conv:
            raise ValueError("MoM mixers have no short convolution here; drop "
                             "--la-use-short-conv")
        self.num_memories = config.la_mom_num_memories
        self.topk = config.la_mom_topk
        if not 1 <= self.topk <= self.num_memories:
            raise ValueError(f"--la-mom-topk {self.topk} must be in 1..--la-mom-num-memories "
                             f"{self.num_memories}")
        self.q_proj = self.column(self.hidden_size, self.key_dim)
        # The router is tiny and replicated over TP (every rank sees the full input).
        self.router = torch.nn.Linear(self.hidden_size, self.num_memories, bias=False,
                                      dtype=config.params_dtype)
        config.init_method(self.router.weight)
        count = self.num_memories + int(config.la_mom_shared_memory)
        self.memories = torch.nn.ModuleList(self.build_memory() for _ in range(count))
        self.build_output()

    def build_memory(self) -> torch.nn.ModuleDict:
        raise NotImplementedError

    def memory_inputs(self, memory, x):
        """-> (k, v, *gates) in [b, s, H, *] for every position."""
        raise NotImplementedError

    def memory_op(self, q, inputs):
        """-> (op, args, kwargs): one memory's recurrence over q and its ``memory_inputs``, the
        op's per-token arguments (q first) in [b, s, H, *]."""
        raise NotImplementedError

    def run_memory(self, q, inputs, cu_seqlens, initial_state=None, output_final_state=False):
        """-> (o, final state [sequences, H, K, V] or None) over the packed sub-sequences."""
        op, args, kwargs = self.memory_op(q, inputs)
        return op(*args, cu_seqlens=cu_seqlens, initial_state=initial_state,
                  output_final_state=output_final_state, **kwargs)

    def _run_memory_masked(self, q, inputs, routed=None):
        """Under context parallelism: the memory over the whole sequence, the tokens not routed
        to it (routed [b, s] False; None for the shared memory, which takes every token) made
        no-ops by zeroing every per-token argument but q (no write, log decay 0, beta 0: the
        state passes them unchanged), so that the sequence's state passing carries it across
        the ranks; o [b, s, H, V]."""
        op, args, kwargs = self.memory_op(q, inputs)
        if routed is not None:
            args = (args[0], *(a * routed.view(*routed.shape, *([1] * (a.dim() - 2))).to(a.dtype)
                               for a in args[1:]))
        return self.recurrent(op, *args, **kwargs)[0]

    @classmethod
    def decode_unsupported(cls, config):
        if config.la_mom_capacity_factor > 0:  # a capacity is a share of the whole sequence
            return ("MoM decodes one token at a time only without a capacity; set "
                    "--la-mom-capacity-factor 0")
        return super().decode_unsupported(config)

    def _run_memory_decoding(self, m, rows, batch, q, inputs, cu):
        """run_memory from / into memory m's state of the batch ``rows`` it reads this call
        (the other rows' states stay); the state is zeros before a memory's first token."""
        states = self._decoding.states
        initial = states[m][rows] if m in states else None
        o, final = self.run_memory(q, inputs, cu, initial, True)
        if m not in states:
            states[m] = final.new_zeros(batch, *final.shape[1:])
        states[m] = states[m].index_copy(0, rows, final.to(states[m].dtype))
        return o

    def _segments(self, b: int, s: int, device):
        """The independent sequences of the flattened [b*s] stream: (segment of each token [N],
        cu_seqlens [n + 1]): the rows, or with packed documents the documents."""
        if self._documents is not None:
            return self._documents.segment_ids, self._documents.cu_seqlens
        cu = torch.arange(0, (b + 1) * s, s, device=device, dtype=torch.int32)
        return torch.arange(b, device=device).repeat_interleave(s), cu

    def _route(self, x, segment, cu):
        """x [b, s, h] -> routing weights [b*s, M] (0 where not routed) and the aux loss."""
        probs = torch.softmax(self.router(x).float(), dim=-1).flatten(0, 1)  # [N, M]
        weights, chosen = probs.topk(self.topk, dim=-1)
        weights = weights / weights.sum(-1, keepdim=True)
        # Each rank combines only its heads' outputs: all-reduce the weights' gradient.
        weights = copy_to_tensor_model_parallel_region(weights, group=self.tp_group)
        routed = torch.zeros_like(probs).scatter(-1, chosen, weights)  # [N, M]
        factor = self.config.la_mom_capacity_factor
        if factor > 0 and self.cp is not None:
            row = torch.tensor(x.shape[1] * self.cp.size, dtype=torch.float64)  # whole row
            routed = routed * (self._cp_queue_positions(routed, x.shape[0])
                               <= self._capacity(row).to(x.device))
        elif factor > 0:
            # per sequence (row or document): a memory takes its first `capacity` tokens there
            capacity = self._capacity((cu[1:] - cu[:-1]).double())
            queued = (routed > 0).long().cumsum(0)  # [N, M]
            before = F.pad(queued, (0, 0, 1, 0))[cu[:-1].long()]  # queued before each sequence
            taken = queued - before[segment]  # position of each token in its memory's queue
            routed = routed * (taken <= capacity[segment, None])
        coeff = self.config.la_mom_aux_loss_coeff
        aux = None
        if coeff > 0 and self.training:
            # Switch's M * sum_m f_m P_m over the whole sequence; under CP each rank adds its
            # tokens' share of P (so the ranks' gradients sum to the sequence's) with the
            # sequence's f
            routed_count, tokens = (routed > 0).float().sum(0), probs.shape[0]
            if self.cp is not None:
                torch.distributed.all_reduce(routed_count, group=self.cp.group)
                tokens *= self.cp.size
            fraction = routed_count / tokens / self.topk
            aux = coeff * self.num_memories * (fraction * probs.sum(0) / tokens).sum()
        return routed, aux

    def _capacity(self, lengths: torch.Tensor) -> torch.Tensor:
        """Tokens a memory may take from sequences of ``lengths`` tokens (fp64)."""
        capacity = self.config.la_mom_capacity_factor * lengths * self.topk / self.num_memories
        return capacity.floor().clamp_min(1)

    def _cp_queue_positions(self, routed, b):
        """Under CP: each token's position in its memory's queue for its row, counting the
        routed tokens of the chunks before its piece on the other ranks; routed [b*2c, M]."""
        M = routed.shape[-1]
        queued = (routed > 0).long().view(2 * b, -1, M).cumsum(1)  # folded: row 2i + piece
        totals = self.cp.gather_chunks(queued[:, -1])  # per global chunk [b, M]
        offset = self.cp.carried_in(totals, torch.zeros_like(totals[0]),
                                    lambda before, total: before + total).flatten(0, 1)
        return (queued + offset[:, None]).view(-1, M)

    def mix(self, x):
        b, s = x.shape[:2]
        q = self.heads(self.q_proj(x)[0], self.head_k_dim)
        segment, cu_segments = self._segments(b, s, x.device)
        routed, aux = self._route(x, segment, cu_segments)
        out = None
        for m, memory in enumerate(self.memories):
            inputs = self.memory_inputs(memory, x)
            weight = routed[:, m] if m < self.num_memories else None  # None: the shared one
            if self.cp is not None:  # every rank runs every memory: the state passing is a
                # collective; the whole sequence, the tokens not routed to it as no-ops
                o = self._run_memory_masked(q, inputs,
                                            None if weight is None else weight.view(b, s) > 0)
                if weight is not None:
                    o = o * weight.view(b, s, 1, 1).to(o.dtype)
                out = o if out is None else out + o
                continue
            if weight is not None:
                selected = weight.nonzero().squeeze(-1)
                if selected.numel() == 0:
                    continue
                # memory m's sub-sequence of each row / document, in order
                lengths = torch.bincount(segment[selected], minlength=len(cu_segments) - 1)
                cu = F.pad(lengths[lengths > 0].cumsum(0), (1, 0)).to(torch.int32)
            else:  # the shared memory: every token, weight 1
                selected = torch.arange(b * s, device=x.device)
                lengths, cu = cu_segments[1:] - cu_segments[:-1], cu_segments
            pick = lambda t: t.reshape(b * s, *t.shape[2:])[selected].unsqueeze(0)
            packed = (pick(q), [pick(t) for t in inputs], cu)
            if self._decoding is None:
                o = self.run_memory(*packed)[0][0]  # [n, H, V]
            else:  # the rows with tokens for this memory, one packed sequence each
                rows = (lengths > 0).nonzero().squeeze(-1)
                o = self._run_memory_decoding(m, rows, b, *packed)[0]
            if weight is not None:
                o = o * weight[selected][:, None, None].to(o.dtype)
            full = o.new_zeros(b * s, *o.shape[1:]).index_add(0, selected, o)
            out = full if out is None else out + full
        out = out.reshape(b, s, *out.shape[-2:])
        if aux is not None:
            out = MoEAuxLossAutoScaler.apply(out, aux)
        return self.output(out, x)


@register_mixer(
    "mom_gla",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    cuda_graph=False,  # routing packs tokens by nonzero(): data-dependent shapes, host syncs
    options=("la_gate_low_rank_dim", "la_gate_logit_normalizer", "la_mom_num_memories",
             "la_mom_topk", "la_mom_capacity_factor", "la_mom_shared_memory",
             "la_mom_aux_loss_coeff"),
    paper="MoM: Linear Sequence Modeling with Mixture-of-Memories (arXiv:2502.13685), GLA memories",
    kernel="fla chunk_gla / fused_recurrent_gla over packed sub-sequences",
    defaults={"la_expand_k": 0.5, "la_expand_v": 1.0, "la_use_short_conv": False},
)
class MoMGLAMixer(MixtureOfMemories):
    def build_memory(self):
        rank = self.config.la_gate_low_rank_dim
        down = torch.nn.Linear(self.hidden_size, rank, bias=False,
                               dtype=self.config.params_dtype)
        self.config.init_method(down.weight)
        return torch.nn.ModuleDict({
            "k": self.column(self.hidden_size, self.key_dim),
            "v": self.column(self.hidden_size, self.value_dim),
            "gk_down": down,
            "gk_up": self.column(rank, self.key_dim, bias=True),
        })

    def memory_inputs(self, memory, x):
        k = self.heads(memory["k"](x)[0], self.head_k_dim)
        v = self.heads(memory["v"](x)[0], self.head_v_dim)
        gk = self.heads(self.up(memory["gk_up"], memory["gk_down"](x)), self.head_k_dim)
        return k, v, F.logsigmoid(gk.float()) / self.config.la_gate_logit_normalizer

    def memory_op(self, q, inputs):
        return ops.gla, (q, *inputs), dict(backend=self.config.la_backend,
                                           mode=self.config.la_mode,
                                           chunk_size=self.config.la_chunk_size)


@register_mixer(
    "mom_gated_deltanet",
    supports_decode=True,
    supports_cp=True,
    supports_varlen=True,
    cuda_graph=False,  # routing packs tokens by nonzero(): data-dependent shapes, host syncs
    options=("la_mom_num_memories", "la_mom_topk", "la_mom_capacity_factor",
             "la_mom_shared_memory", "la_mom_aux_loss_coeff"),
    paper="MoM: Linear Sequence Modeling with Mixture-of-Memories (arXiv:2502.13685), "
          "Gated DeltaNet memories",
    kernel="fla chunk_gated_delta_rule over packed sub-sequences",
    modes=("chunk",),
    defaults={"la_expand_k": 0.75, "la_expand_v": 1.5, "la_use_short_conv": False},
)
class MoMGatedDeltaNetMixer(MixtureOfMemories):
    fla_context_parallel = True

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.A_log = self.per_head_parameter(init_A_log_)
        self.dt_bias = self.per_head_parameter(init_dt_bias_)

    def build_memory(self):
        return torch.nn.ModuleDict({
            "k": self.column(self.hidden_size, self.key_dim),
            "v": self.column(self.hidden_size, self.value_dim),
            "a": self.column(self.hidden_size, self.num_heads),
            "b": self.column(self.hidden_size, self.num_heads),
        })

    def memory_inputs(self, memory, x):
        k = self.heads(memory["k"](x)[0], self.head_k_dim)
        v = self.heads(memory["v"](x)[0], self.head_v_dim)
        a, b = self.per_head(memory["a"](x)[0]), self.per_head(memory["b"](x)[0])
        return k, v, a, b

    def memory_op(self, q, inputs):
        k, v, a, b = inputs
        g = -self.A_log.float().exp() * F.softplus(a + self.dt_bias.float())
        return ops.gated_delta_rule, (q, k, v, g, b.sigmoid()), dict(
            use_qk_l2norm=True, backend=self.config.la_backend, mode=self.config.la_mode,
            chunk_size=self.config.la_chunk_size)
