"""Initialise a tensor-parallel shard so that TP=n weights are slices of the TP=1 weights."""

from typing import Callable

import torch
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes


def init_tp_sharded_(param: torch.nn.Parameter, full_shape: tuple, partition_dim: int,
                     init_fn: Callable[[torch.Tensor], None], tp_rank: int, tp_size: int):
    """Build the full tensor with the (TP-replicated) default generator, keep this rank's slice.

    Every TP rank draws the same full tensor, so the model is identical for any TP size, which is
    what the TP-parity tests rely on; marks ``param`` as TP-sharded for optimizers and dist
    checkpointing.
    """
    full = torch.empty(full_shape, dtype=torch.float32)
    init_fn(full)
    shard = full.chunk(tp_size, dim=partition_dim)[tp_rank]
    with torch.no_grad():
        param.data.copy_(shard.to(dtype=param.dtype, device=param.device))
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=partition_dim, stride=1)
    return param
