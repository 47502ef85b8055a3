"""Our Triton short-conv kernels (linear_moe.ops.causal_conv, the candidate for ShortConvolution's
CUDA path) equal the module's torch path, forward and every gradient, run on the CPU through
Triton's interpreter: strided (fused in-projection slice) and contiguous inputs, with and
without bias and SiLU, a length and channels that are not multiples of the tiles, and a
width below the backward's 4."""

import pytest

from interpreter_utils import run_in_triton_interpreter

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
    run_in_triton_interpreter(_INTERPRETED)


_INTERPRETED_INTO_BUFFER = r"""
import torch
from linear_moe.mixers.base import _GradientBuffer, _SplitSharingGradient
from linear_moe.ops.causal_conv import causal_conv

# A fused in-projection's output [b, s, 40 + 24 + 8 + 8]: two slices through our conv (their
# gradients written into the shared buffer), one through a plain op, one unused.
torch.manual_seed(0)
widths = [40, 24, 8, 8]
out0 = torch.randn(2, 300, sum(widths))
w1, w2 = torch.randn(40, 4), torch.randn(24, 3)
dys = [torch.randn(2, 300, 40), torch.randn(2, 300, 24), torch.randn(2, 300, 8)]
grads = []
for shared in (True, False):
    out = out0.clone().requires_grad_()
    if shared:
        buffer = _GradientBuffer(out, widths)
        a, b, c, _ = _SplitSharingGradient.apply(out, buffer)
        ya = causal_conv(a, w1, None, "silu", grad_x_into=buffer.writer(0))
        yb = causal_conv(b, w2, None, None, grad_x_into=buffer.writer(1))
    else:
        a, b, c, _ = out.split(widths, -1)
        ya, yb = causal_conv(a, w1, None, "silu"), causal_conv(b, w2, None, None)
    loss = (ya * dys[0]).sum() + (yb * dys[1]).sum() + (c.tanh() * dys[2]).sum()
    loss.backward()
    grads.append(out.grad)
assert grads[0].shape == grads[1].shape and grads[0].is_contiguous()
err = ((grads[0] - grads[1]).abs().max() / grads[1].abs().max()).item()
assert err < 1e-6 and (grads[0][..., -8:] == 0).all(), err
print("ok", err)
"""


def test_conv_writes_its_gradient_into_the_in_projections_in_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED_INTO_BUFFER)


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
