"""Our Triton short-conv kernels (linear_moe.ops.causal_conv, the candidate for ShortConvolution's
CUDA path) equal the module's torch path, forward and every gradient, run on the CPU through
Triton's interpreter: strided (fused in-projection slice) and contiguous inputs, with and
without bias and SiLU, a length and channels that are not multiples of the tiles, and a
width below the backward's 4."""

import os
import subprocess
import sys

import pytest

_INTERPRETED = r"""
import itertools
import torch
from linear_moe.layers import ShortConvolution
from linear_moe.ops.causal_conv import causal_conv

worst = 0.0
cases = [(*flags, 4) for flags in itertools.product((False, True), repeat=3)]
cases.append((True, True, True, 3))  # narrower than the kernel's width 4: zero-padded taps
for strided, bias, silu, width in cases:
    torch.manual_seed(0)
    # 3 backward programs of 128 rows (the last one partly past T), channels not a block
    # multiple
    batch, seq, channels = 2, 300, 40
    conv = ShortConvolution(channels, width, 0, 1, torch.float32, bias=bias, fused=False,
                            activation="silu" if silu else None)
    wide = torch.randn(batch, seq, 2 * channels if strided else channels)
    x0 = wide[..., :channels] if strided else wide
    dy = torch.randn(batch, seq, channels)
    results = []
    for ours in (True, False):
        x = x0.detach().requires_grad_()  # a new leaf with x0's strides (clone would pack it)
        assert x.stride() == x0.stride()
        conv.zero_grad()
        y = (causal_conv(x, conv.weight.squeeze(1), conv.bias, conv.activation) if ours
             else conv(x))
        y.backward(dy)
        results.append([y, x.grad, conv.weight.grad] + ([conv.bias.grad] if bias else []))
    for a, b in zip(*results):
        assert a.shape == b.shape, (a.shape, b.shape)
        worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
assert worst < 1e-5, worst
print("ok", worst)
"""


def test_our_conv_kernels_equal_the_torch_path_in_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout[-1000:] + proc.stderr[-3000:]


def test_unknown_kernel_and_activation_are_refused():
    from linear_moe.layers import ShortConvolution

    with pytest.raises(ValueError, match="choose auto, fla or ours"):
        ShortConvolution(8, 4, 0, 1, None, kernel="cuda")
    from linear_moe.ops.causal_conv import causal_conv
    import torch

    with pytest.raises(ValueError, match="use 'silu' or None"):
        causal_conv(torch.zeros(1, 4, 8), torch.zeros(8, 4), activation="gelu")
    with pytest.raises(ValueError, match="widths up to 4.*use kernel 'fla'"):
        ShortConvolution(8, 5, 0, 1, None, kernel="ours")
    with pytest.raises(ValueError, match="use ShortConvolution\\(kernel='fla'\\)"):
        causal_conv(torch.zeros(1, 4, 8), torch.zeros(8, 5))
