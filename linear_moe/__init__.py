"""Linear-MoE: linear-attention / SSM / linear-RNN sequence mixers with MoE on megatron-core."""

import megatron_patch  # noqa: F401  (must precede any megatron.training import)

__version__ = "0.1.0"
