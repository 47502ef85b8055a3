"""GLA's key decay in one kernel of ours (linear_moe.ops.low_rank_gate: the low-rank chain's up
projection, its bias, logsigmoid, the normaliser and the clamp) equals the torch path it
replaces on CUDA (F.linear, then the mixer's _log_decay), forward and every gradient, run on
the CPU through Triton's interpreter."""

import pytest

from interpreter_utils import run_in_triton_interpreter

_INTERPRETED = r"""
import torch
import torch.nn.functional as F
from linear_moe.mixers.gla import _log_decay
from linear_moe.ops.low_rank_gate import low_rank_log_decay

worst = 0.0
# rows and columns not multiples of the tiles; rank 16 (GLA's default) and 32; with and without
# bias; no clamp, a clamp that holds for some entries, one that holds for most (normaliser 1)
cases = [((2, 150), 80, 16, True, 16.0, None), ((130,), 200, 32, False, 16.0, -0.05),
         ((3, 40), 96, 16, True, 1.0, -0.5)]
for lead, n, r, bias, normalizer, clamp in cases:
    torch.manual_seed(0)
    z0, w0 = torch.randn(*lead, r), torch.randn(n, r) * 0.5
    b0 = torch.randn(n) if bias else None
    dg = torch.randn(*lead, n)
    results = []
    for ours in (True, False):
        z, w = z0.clone().requires_grad_(), w0.clone().requires_grad_()
        b = b0.clone().requires_grad_() if bias else None
        if ours:
            g = low_rank_log_decay(z, w, b, normalizer, clamp)
        else:
            g = _log_decay(F.linear(z, w, b), normalizer, clamp)
        g.backward(dg)
        results.append([g, z.grad, w.grad] + ([b.grad] if bias else []))
    if clamp is not None:  # the clamp holds somewhere, so its zero gradient is exercised
        held = (results[1][0] == clamp).float().mean().item()
        assert 0.0 < held < 1.0, held
    for a, b in zip(*results):
        assert a.shape == b.shape, (a.shape, b.shape)
        worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
assert worst < 1e-5, worst
print("ok", worst)
"""


def test_low_rank_log_decay_kernels_equal_the_torch_path_in_triton_interpreter():
    run_in_triton_interpreter(_INTERPRETED)


def test_ranks_the_kernel_cannot_take_are_refused():
    import torch

    from linear_moe.ops.low_rank_gate import (
        fused_low_rank_log_decay_applies, low_rank_log_decay,
    )

    assert fused_low_rank_log_decay_applies(16) and fused_low_rank_log_decay_applies(64)
    assert not any(fused_low_rank_log_decay_applies(r) for r in (8, 12, 24, 256))
    with pytest.raises(ValueError, match="use the up projection and logsigmoid instead"):
        low_rank_log_decay(torch.zeros(4, 12), torch.zeros(8, 12), None, 16.0)


def _build_gla_worker(rank, world_size, cases):
    """Per (rank_dim, fused): the GLA mixers' fused_log_decay flags, or the build's refusal."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    from model_utils import tiny_config, tiny_model

    mpu.initialize_model_parallel(tensor_model_parallel_size=1)
    tensor_parallel.model_parallel_cuda_manual_seed(1)
    out = []
    try:
        for rank_dim, fused in cases:
            try:
                model = tiny_model(tiny_config(la_fused_log_decay=fused,
                                               la_gate_low_rank_dim=rank_dim), "llama3", 128, 16)
                out.append([m.fused_log_decay for m in model.modules()
                            if hasattr(m, "fused_log_decay")])
            except ValueError as e:
                out.append(str(e))
    finally:
        mpu.destroy_model_parallel()
    return out


def test_fused_log_decay_refuses_a_rank_the_kernel_cannot_take_at_build():
    """Asked for (True), a rank the kernel cannot take is refused; by default (None) the fused
    kernel is used where the rank fits and not elsewhere; False turns it off."""
    from dist_utils import run_distributed

    cases = [(24, True), (32, True), (32, None), (24, None), (32, False)]
    (out,) = run_distributed(_build_gla_worker, 1, cases)
    message = out[0]
    assert "--la-fused-log-decay takes --la-gate-low-rank-dim a power of two" in message, message
    for (rank_dim, fused), expected, flags in zip(cases[1:], (True, True, False, False), out[1:]):
        assert flags and all(f is expected for f in flags), (rank_dim, fused, flags)
