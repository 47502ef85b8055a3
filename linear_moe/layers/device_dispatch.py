"""MoE token dispatch without host syncs (--moe-device-dispatch, expert parallel size 1).

megatron-core's dispatchers read the expert counts on the host in every MoE layer: the all-gather
one for ``masked_select``'s output size and the expert split sizes, the all-to-all one for its
split sizes. Each read drains the GPU queue, so the host loses its lead over the device once per
layer, and a CUDA graph cannot capture the step at all.

With all experts on this rank every token is routed to exactly top-k of them, so the permuted
rows are a static ``tokens * topk``. This dispatcher is megatron-core's all-gather dispatcher
(the same TP all-gather / reduce-scatter) with the permutation done on the device: the routed
(expert, token) pairs of the expert-major routing map are the first ``tokens * topk`` entries of
a stable sort, the counts stay a device tensor for the grouped-GEMM experts' offsets, and the
combine is an ``index_add``. The row order is megatron-core's (expert-major, tokens in order), so
the experts see what they would see under its dispatchers.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer, get_default_pg_collection
from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher


def device_dispatch_unsupported_reason(config) -> str | None:
    """Why --moe-device-dispatch cannot run with this config (None if it can)."""
    if not config.num_moe_experts:
        return "a model without MoE layers (--num-experts)"
    if config.expert_model_parallel_size > 1:
        return (f"--expert-model-parallel-size {config.expert_model_parallel_size} (experts on "
                "other ranks make the routed row count data-dependent; it needs EP 1)")
    if getattr(config, "moe_expert_impl", "grouped_mm") != "grouped_mm":
        return ("--moe-expert-impl sequential (megatron-core's per-expert loop splits on host "
                "counts; use grouped_mm)")
    if (getattr(config, "moe_expert_capacity_factor", None) is not None
            or getattr(config, "moe_pad_expert_input_to_capacity", False)):
        return "a token-dropping capacity factor (the dropless count is what makes it static)"
    if getattr(config, "moe_shared_expert_overlap", False):
        return "--moe-shared-expert-overlap (it lives in megatron-core's dispatchers)"
    return None


class DeviceTokenDispatcher(MoEAllGatherTokenDispatcher):
    def dispatch_postprocess(self, hidden_states, probs):
        self.hidden_shape_before_permute = hidden_states.shape
        routing_map = self.routing_map  # [tokens, experts], top-k True per row
        tokens = routing_map.shape[0]
        routed = routing_map.t().reshape(-1)  # expert-major, as megatron-core permutes
        # True sorts before False in (not routed); stable keeps the token order per expert.
        order = torch.sort(routed.logical_not().to(torch.uint8), stable=True).indices
        order = order[:tokens * self.router_topk]
        self.token_of_row = order % tokens
        self.routing_map = None
        # (token_combine reads local_probs' dtype for its TP reduce-scatter)
        self.local_probs = probs.t().reshape(-1).index_select(0, order)
        return (hidden_states.index_select(0, self.token_of_row), routing_map.sum(0),
                self.local_probs)

    def combine_preprocess(self, hidden_states):
        out = hidden_states.new_zeros(self.hidden_shape_before_permute)
        return out.index_add(0, self.token_of_row, hidden_states)


class DeviceDispatchMoELayer(MoELayer):
    """megatron-core's MoELayer with DeviceTokenDispatcher in place of the configured one."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 **kwargs):
        reason = device_dispatch_unsupported_reason(config)
        if reason:
            raise ValueError(f"--moe-device-dispatch does not support {reason}; drop the flag")
        pg_collection = pg_collection or get_default_pg_collection()
        super().__init__(config, submodules, layer_number=layer_number,
                         pg_collection=pg_collection, **kwargs)
        self.token_dispatcher = DeviceTokenDispatcher(
            self.num_local_experts, self.local_expert_indices, config=config,
            pg_collection=pg_collection)
