"""Our launch of fla's Triton rotary kernel (linear_moe.layers.rotary._FlaRotary, the CUDA path
of RoPE) equals the torch path forward and backward, run on the CPU through Triton's
interpreter: a length that is not a multiple of the kernel's row block, with and without a
decoding offset. (On the GPU: tests/gpu/test_fused_layers_gpu.py, also bit-equal to fla's own
rotary_embedding.)"""

from interpreter_utils import run_in_triton_interpreter

_INTERPRETED = r"""
import torch
import fla.modules.rotary.ops as fla_rotary
from linear_moe.layers.rotary import _FlaRotary, _cos_sin, apply_rotary

# The interpreter has no device to autotune on: the kernel itself, at its default config.
fla_rotary.rotary_embedding_kernel = fla_rotary.rotary_embedding_kernel.fn

worst = 0.0
for offset in (0, 5):
    torch.manual_seed(0)
    b, s, h, d = 2, 70, 3, 16
    x0, dy = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    results = []
    for ours in (True, False):
        x = x0.clone().requires_grad_()
        if ours:
            y = _FlaRotary.apply(x, *_cos_sin(s + offset, d, 100.0, x.device, x.dtype), offset)
        else:
            y = apply_rotary(x, 100.0, fused=False, offset=offset)
        y.backward(dy)
        results.append((y, x.grad))
    for a, ref in zip(*results):
        worst = max(worst, ((a - ref).abs().max() / ref.abs().max()).item())
assert worst < 1e-5, worst
print("ok", worst)
"""


def test_our_rotary_launch_equals_the_torch_path_in_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED)
