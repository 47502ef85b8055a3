from linear_moe.layers.norm import GatedRMSNorm, ResidualRMSNorm, RMSNorm
from linear_moe.layers.rotary import apply_rotary
from linear_moe.layers.short_conv import ShortConvolution
from linear_moe.layers.tp_init import init_tp_sharded_

__all__ = ["GatedRMSNorm", "ResidualRMSNorm", "RMSNorm", "apply_rotary", "ShortConvolution",
           "init_tp_sharded_"]
