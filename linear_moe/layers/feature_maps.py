"""Elementwise feature maps phi(.) for linear attention (Katharopoulos et al., 2020, and the
variants fla ships). Learnable maps (hedgehog, t2r, dpfp) are not implemented yet."""

import torch.nn.functional as F

FEATURE_MAPS = {
    "identity": lambda x: x,
    "elu": lambda x: F.elu(x) + 1,  # "elu+1", the original linear-transformer map
    "relu": F.relu,
    "swish": F.silu,
}


def feature_map(name: str):
    if name not in FEATURE_MAPS:
        raise ValueError(f"unknown --la-feature-map '{name}'; choose one of "
                         f"{', '.join(FEATURE_MAPS)}")
    return FEATURE_MAPS[name]
