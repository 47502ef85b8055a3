"""Linear-MoE: linear-attention / SSM / linear-RNN sequence mixers with MoE on megatron-core.

Kept import-light (the data tools and launchers use it without loading megatron); modules that
import megatron.training import megatron_patch first.
"""

__version__ = "0.1.0"
