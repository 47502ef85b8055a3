"""megatron-core's own Gated DeltaNet layer (the 'G' of its HybridModel) as a benchmark-only
mixer, ``megatron_gdn``, so that e2e_bench.py can run it side by side with our gated_deltanet
(issue 5, item 3): ``python benchmarks/e2e_bench.py --mixers gated_deltanet megatron_gdn ...``.

megatron-core's HybridModel spec builds that layer from TransformerEngine modules
(TELayerNormColumnParallelLinear, TENorm, TERowParallelLinear). Without TE, this spec uses the
local equivalents and leaves the layer itself unchanged: the TransformerLayer's RMSNorm, one
ColumnParallelLinear for q/k/v/z/beta/alpha, and RMSNorm on the value head dim gated by SiLU(z).
The shapes match ours: heads = --la-num-heads, key dim = hidden * expand_k / heads, value dim =
hidden * expand_v / heads, conv = --la-conv-size.

It is registered only when this module is imported, never in the package: its kernels
(fla's l2norm, causal_conv1d and chunk_gated_delta_rule inside megatron-core) run on CUDA only,
so the CPU suite cannot train it.
"""

from __future__ import annotations

import copy

from linear_moe.registry import get_mixer, register_mixer


from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules  # noqa: E402
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear  # noqa: E402

from linear_moe.layers import RMSNorm  # noqa: E402


@register_mixer(
    "megatron_gdn",
    paper="Gated Delta Networks (arXiv:2412.06464), megatron-core's implementation",
    kernel="megatron.core.ssm.gated_delta_net.GatedDeltaNet (fla chunk_gated_delta_rule)",
    modes=("chunk",),
    # our gated_deltanet's defaults, so that both build the same shapes
    defaults=dict(get_mixer("gated_deltanet").defaults),
)
class MegatronGDN(GatedDeltaNet):
    """megatron-core's layer, built from our la_* fields with local modules."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None,
                 **unused):
        heads = config.la_num_heads
        gdn_config = copy.copy(config)  # megatron's field names for the same shape
        gdn_config.linear_num_key_heads = gdn_config.linear_num_value_heads = heads
        gdn_config.linear_key_head_dim = int(config.hidden_size * config.la_expand_k) // heads
        gdn_config.linear_value_head_dim = int(config.hidden_size * config.la_expand_v) // heads
        gdn_config.linear_conv_kernel_dim = config.la_conv_size
        super().__init__(
            gdn_config,
            GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=RMSNorm,
                                    out_proj=RowParallelLinear),
            layer_number=layer_number,
            pg_collection=pg_collection or ProcessGroupCollection.use_mpu_process_groups())
