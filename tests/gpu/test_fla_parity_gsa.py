"""fla's chunk_gsa / fused_recurrent_gsa vs the fp32 reference op, on one CUDA GPU.

As tests/gpu/test_fla_parity.py: the same bf16 inputs for both (the log gate g in fp32, as
the gsa mixer passes it), the reference on them upcast to fp32; the output, both final states
(hk [K, M], hv [M, V]) and every input's grad must reach a relative L2 error <= 1e-2.
LINEAR_MOE_GPU_RESULTS / LINEAR_MOE_GPU_HEAD_DIMS work as there.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from linear_moe.ops import gsa
from test_fla_parity import HEAD_DIMS, REL_TOL, _record, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

B, T, H, M = 2, 300, 4, 64  # T is not a multiple of fla's 64-chunk; M: fla's GSA model default
NAMES = ("q", "k", "v", "s", "g", "hk0", "hv0")


def _inputs(head_dim, batch=B):
    torch.manual_seed(0)
    q, k, v = (torch.randn(batch, T, H, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    g = F.logsigmoid(torch.randn(batch, T, H, M, device="cuda"))  # fp32, as the mixer's
    s = (-torch.expm1(g)).to(torch.bfloat16)  # the layer's 1 - alpha
    n = batch if batch > 1 else 3  # packed: one state per sequence
    hk0 = torch.randn(n, H, head_dim, M, device="cuda")
    hv0 = torch.randn(n, H, M, head_dim, device="cuda")
    return [q, k, v, s, g, hk0, hv0]


def _run(backend, mode, inputs, do, dhk, dhv, cu_seqlens):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, (hk, hv) = gsa(*leaves[:5], initial_state=tuple(leaves[5:]), output_final_state=True,
                      cu_seqlens=cu_seqlens, backend=backend, mode=mode)
    torch.autograd.backward([o, hk, hv], [do.to(o.dtype), dhk, dhv])
    return [o.detach(), hk.detach(), hv.detach()] + [x.grad for x in leaves]


def _compare(mode, head_dim, inputs, cu_seqlens=None, op="gsa", known_over=()):
    """known_over: tensors whose error above the bound is known and documented (then an
    expected failure, with the measured numbers); any other tensor above it fails."""
    torch.manual_seed(1)
    q, hk0 = inputs[0], inputs[5]
    do = torch.randn(*q.shape[:3], head_dim, device="cuda", dtype=torch.bfloat16)
    dhk, dhv = torch.randn_like(hk0), torch.randn_like(inputs[6])
    got = _run("fla", mode, inputs, do, dhk, dhv, cu_seqlens)
    ref = _run("reference", mode, [x.float() for x in inputs], do.float(), dhk, dhv, cu_seqlens)

    errors = {}
    for name, a, b in zip(("o", "hk", "hv") + tuple(f"d{n}" for n in NAMES), got, ref):
        assert a is not None and torch.isfinite(a).all(), f"{name}: missing or non-finite"
        errors[name] = rel_err(a, b)
        _record(op, mode, head_dim, name, errors[name])
    bad = {t: e for t, e in errors.items() if e > REL_TOL}
    unexpected = {t: e for t, e in bad.items() if t not in known_over}
    assert not unexpected, (f"{op}/{mode}/K={head_dim}: rel L2 errors above {REL_TOL}: "
                            f"{unexpected} (all: {errors})")
    if bad:
        pytest.xfail(f"{op}/{mode}/K={head_dim}: known, {bad} (README, gsa row)")


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
def test_gsa_fla_matches_reference(mode, head_dim):
    # fla's chunk_gsa backward loses the gate gradient: dg 1.2e-2 (hd64) / 2.0e-2 (hd128) on the
    # H100 and the H200, every other tensor <= 3.9e-3; bf16 slot scores alone cost 4e-4 on the
    # CPU (benchmarks/bf16_storage_floor.py) and fla's own test allows chunk dg 8e-3 even in fp32.
    _compare(mode, head_dim, _inputs(head_dim), known_over={"dg"} if mode == "chunk" else ())


@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
def test_gsa_fla_packed_sequences_match_reference(mode):
    # B = 1 holding 3 sequences whose lengths are not multiples of 64
    cu_seqlens = torch.tensor([0, 70, 199, T], device="cuda", dtype=torch.long)
    _compare(mode, 64, _inputs(64, batch=1), cu_seqlens, op="gsa_varlen")
