"""Model FLOPs of one training step (forward + backward = 3x forward), Megatron's convention
extended to the linear mixers. Documented in benchmarks/NOTES.md ("FLOP formula").

Per token, forward:
  * every GEMM: 2 x its weight count. Routed experts count top-k / num_experts of theirs (the
    active share); the output layer counts h x V even when tied to the embedding; the embedding
    lookup, norms, convolutions and per-head vectors count nothing.
  * softmax 'N' layer core: causal QK^T and AV over T/2 keys on average:
    2 * (T/2) * H * (d_qk + d_v)   (Megatron's causal count)
  * linear 'L' layer core: the recurrent form's state traffic per head, independent of T:
    read o = q S and write S += k^T v: 2 * 2 * d_k * d_v; the delta rule also reads S k and
    writes the correction: 8 * d_k * d_v; GSA runs two such passes through m slots:
    4 * m * (d_k + d_v). Chunked kernels do more arithmetic than this (the intra-chunk
    C x C block); like Megatron's count for flash attention, the model FLOPs stay the
    algorithm's, so MFU is comparable across kernels.
"""

from __future__ import annotations

import torch

_DELTA_RULE = {"deltanet", "gated_deltanet", "kda", "rwkv7", "mom_gated_deltanet"}


def gemm_weights_per_token(model, config) -> float:
    """Active GEMM weights a token meets (see module docstring)."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    total = 0.0
    for name, module in model.named_modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear, torch.nn.Linear)):
            continue
        weight = getattr(module, "weight", None)
        if weight is None:  # a tied output layer: the embedding's h x V
            n = config.hidden_size * model.vocab_size
        else:
            n = weight.numel()
        if ".experts." in name and config.num_moe_experts:
            n *= config.moe_router_topk / config.num_moe_experts
        total += n
    return total


def linear_core_flops_per_token(config) -> float:
    """Forward FLOPs of one 'L' layer's sequence mixing per token (all heads)."""
    mixer = config.la_module
    heads = config.la_num_heads
    d_k = config.hidden_size * config.la_expand_k / heads
    d_v = config.hidden_size * config.la_expand_v / heads
    if mixer == "mamba2":
        d_k = config.la_ssm_state_dim
    if mixer == "gsa":
        return heads * 4 * config.la_gsa_num_slots * (d_k + d_v)
    per_head = (8 if mixer in _DELTA_RULE else 4) * d_k * d_v
    if mixer.startswith("mom_"):  # each token writes top-k memories (+ the shared one)
        per_head *= config.la_mom_topk + int(config.la_mom_shared_memory)
    return heads * per_head


def softmax_core_flops_per_token(config, seq_len: int) -> float:
    d_qk = config.kv_channels
    d_v = config.kv_channels
    if getattr(config, "multi_latent_attention", False):
        d_qk = config.qk_head_dim + config.qk_pos_emb_head_dim
        d_v = config.v_head_dim
    return 2 * (seq_len / 2) * config.num_attention_heads * (d_qk + d_v)


def training_flops_per_token(model, config, seq_len: int) -> float:
    pattern = config.layer_type_list
    forward = 2 * gemm_weights_per_token(model, config)
    forward += pattern.count("N") * softmax_core_flops_per_token(config, seq_len)
    forward += pattern.count("L") * linear_core_flops_per_token(config)
    return 3 * forward
