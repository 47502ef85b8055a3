"""The norms' CPU-checkable parts: the RMSNorm weight gradient that the CUDA path computes as
a compiled reduction (its forward and input gradient are torch's own fused CUDA kernels, checked
in tests/gpu/test_fused_norms_gpu.py)."""

import pytest
import torch
import torch.nn.functional as F

from linear_moe.layers.norm import _rms_norm_weight_grad


@pytest.mark.parametrize("shape", [(7, 3, 16), (2, 5, 4, 8)])
def test_rms_norm_weight_grad_equals_autograd(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    w = (torch.rand(shape[-1], dtype=torch.float64) + 0.5).requires_grad_()
    dy = torch.randn_like(x)
    F.rms_norm(x, (shape[-1],), w, 1e-6).backward(dy)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # what _fused_rms_norm returns
    got = _rms_norm_weight_grad(dy, x, rstd)
    assert got.dtype == torch.float64 and torch.allclose(got, w.grad, rtol=1e-12, atol=1e-12)
