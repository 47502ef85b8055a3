"""Per-mixer math: GLA, scalar-decay GLA, the (gated) delta rule, each with a plain-torch
`reference` backend (CPU path and oracle) and an `fla` backend (Triton, CUDA)."""

from .based import based, rebased
from .delta_rule import delta_rule
from .dispatch import resolve_backend
from .gated_delta_rule import gated_delta_rule
from .gla import gla
from .gsa import gsa
from .kda import kda
from .linear_attn import linear_attn
from .rwkv6 import rwkv6
from .rwkv7 import rwkv7
from .simple_gla import simple_gla, simple_gla_log_decay
from .ssd import ssd

# The diagonal-decay ops (o_t = scale q_t S_t + state-free terms, S_t = diag(exp g_t) S_{t-1}
# + k_t^T v_t): their (log decay [B, T, H, K | 1], query, scale or None for K^-1/2, whether o_t
# reads S_{t-1}) from their arguments, for context parallelism's one-pass form
# (linear_moe.parallel.context_parallel.SequenceChunks.diagonal_state_passing).
DIAGONAL_DECAY = {
    gla: lambda args, kw: (args[3], args[0], kw.get("scale"), False),
    simple_gla: lambda args, kw: (simple_gla_log_decay(args[0], *args[3:], **kw), args[0],
                                  kw.get("scale"), False),
    rwkv6: lambda args, kw: (args[3], args[0], kw.get("scale"), True),  # o_t = r_t S_{t-1} + ..
    # SSD is simple_gla with q = C, g = dt * A, scale 1 (the D skip is state-free)
    ssd: lambda args, kw: ((args[2].float() * args[1].float()).unsqueeze(-1), args[4], 1.0,
                           False),
}

# The ops whose fla chunk kernel runs context parallelism itself (fla.ops.cp: each rank's
# chunk-state transition and local state from one pass, all-gathered and merged inside the
# kernels, on fla's zigzag layout - megatron's), given a cp_context: one op pass where the
# state passing of SequenceChunks takes three for these delta-rule / DPLR recurrences
# (delta_rule through fla's gated kernel with g = 0: chunk_delta_rule has no CP).
NATIVE_CONTEXT_PARALLEL = frozenset({delta_rule, gated_delta_rule, kda, rwkv7})

# The ops the generic state passing runs once at V + K value width, the transition probe in
# the extra columns (SequenceChunks.state_passing_widened): one state S [.., K, V] whose columns
# evolve independently, an output linear in it, and the key input right before the value.
# Not linear_attn / based / rebased: their normaliser divides by a state read. A set, as
# DIAGONAL_DECAY a dict: benchmarks/cp_bench.py empties both for its three-pass baseline.
WIDENED_PROBE = {delta_rule, gated_delta_rule, kda, rwkv7}

__all__ = ["DIAGONAL_DECAY", "NATIVE_CONTEXT_PARALLEL", "WIDENED_PROBE", "based", "rebased",
           "linear_attn", "delta_rule", "gla", "gsa", "gated_delta_rule", "kda", "resolve_backend",
           "rwkv6", "rwkv7", "simple_gla", "simple_gla_log_decay", "ssd"]
