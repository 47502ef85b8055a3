"""fla's Based / ReBased kernels and normalised linear attention vs the fp32 reference ops, on
one CUDA GPU, as test_fla_parity.py: the same bf16 inputs for both (the reference on them
upcast to fp32), forward and backward, every compared tensor (output, dq, dk, dv) within a
relative L2 error of 1e-2; T = 300 is not a multiple of fla's 64-token chunk.

fla's limits: parallel_based / parallel_rebased take feature dims <= 128, fused_chunk_based
<= 16; the chunk mode runs the expanded feature map (1 + d + d (d + 1) / 2 dims for Based,
d (d + 1) / 2 for ReBased) through chunk_simple_gla. Based/ReBased use d = 16 (fla's layers'
default); the parallel kernels are also run at d = 64.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_moe.ops import based, linear_attn, rebased
from test_fla_parity import B, HEAD_DIMS, REL_TOL, T, H, _record, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

V_DIM = 64  # value head dim of the Based/ReBased cases


def _compare(op, mode, head_dim, fn_fla, fn_ref, inputs):
    """fn(q, k, v) -> o on both backends; asserts o and the grads of q, k, v."""
    torch.manual_seed(1)
    results = []
    for fn, dtype in ((fn_fla, None), (fn_ref, torch.float32)):
        leaves = [(x if dtype is None else x.to(dtype)).detach().clone().requires_grad_()
                  for x in inputs]
        o = fn(*leaves)
        if not results:
            do = torch.randn_like(o)
        o.backward(do.to(o.dtype))
        results.append([o.detach()] + [x.grad for x in leaves])
    errors = {}
    for name, a, b in zip(("o", "dq", "dk", "dv"), *results):
        assert a is not None and torch.isfinite(a).all(), f"{name}: missing or non-finite"
        errors[name] = rel_err(a, b)
        _record(op, mode, head_dim, name, errors[name])
    bad = {t: e for t, e in errors.items() if e > REL_TOL}
    assert not bad, f"{op}/{mode}/d={head_dim}: rel L2 errors above {REL_TOL}: {bad} (all: {errors})"


def _qkv(d, v_dim, layer_norm_qk=False):
    torch.manual_seed(0)
    q, k = (torch.randn(B, T, H, d, device="cuda") for _ in range(2))
    if layer_norm_qk:  # what the ReBased mixer feeds its kernel
        q, k = F.layer_norm(q, (d,)), F.layer_norm(k, (d,))
    v = torch.randn(B, T, H, v_dim, device="cuda")
    return [x.to(torch.bfloat16) for x in (q, k, v)]


BASED_CASES = [("chunk", 16), ("parallel", 16), ("fused_chunk", 16), ("parallel", 64)]
# rebased chunk at d16 (not the default mode): the bf16 quadratic features cost dq/dk ~8e-2 on
# the H100 and H200 (the bf16 rounding alone ~1e-1 on the CPU, benchmarks/bf16_storage_floor.py);
# strict, so a fix shows up as a failure to remove the mark.
REBASED_CASES = [
    pytest.param("chunk", 16, id="chunk-d16", marks=pytest.mark.xfail(
        strict=True, reason="bf16 quadratic features: dq/dk ~8e-2 (README, rebased row)")),
    pytest.param("parallel", 16, id="parallel-d16"),
    pytest.param("parallel", 64, id="parallel-d64"),
]


@pytest.mark.parametrize("mode,d", BASED_CASES, ids=[f"{m}-d{d}" for m, d in BASED_CASES])
def test_based_fla_matches_reference(mode, d):
    run = lambda backend: lambda q, k, v: based(q, k, v, backend=backend, mode=mode)[0]
    _compare("based", mode, d, run("fla"), run("reference"), _qkv(d, V_DIM))


@pytest.mark.parametrize("mode,d", REBASED_CASES)
def test_rebased_fla_matches_reference(mode, d):
    run = lambda backend: lambda q, k, v: rebased(q, k, v, backend=backend, mode=mode)[0]
    _compare("rebased", mode, d, run("fla"), run("reference"), _qkv(d, V_DIM, True))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
def test_normalised_linear_attn_fla_matches_reference(mode, head_dim):
    # elu + 1 features: positive, as the normaliser needs
    run = lambda backend: lambda q, k, v: linear_attn(
        F.elu(q) + 1, F.elu(k) + 1, v, normalize=True, backend=backend, mode=mode)[0]
    _compare("linear_attn[normalised]", mode, head_dim, run("fla"), run("reference"),
             _qkv(head_dim, head_dim))
