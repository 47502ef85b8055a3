"""fla's RWKV-6 / RWKV-7 Triton kernels vs the fp32 reference ops, on one CUDA GPU.

As tests/gpu/test_fla_parity.py: the same bf16 inputs for both (the reference upcasts them),
and every compared tensor (output, final state, grads) must reach a relative L2 error
||fla - ref|| / ||ref|| <= 1e-2. LINEAR_MOE_GPU_RESULTS=path.jsonl appends one row per tensor.

Neither op goes through fla_compat: their backwards never call chunk_o.chunk_bwd_dqkwg, the
kernel behind fla's Hopper guard (#640); tests/test_ops_rwkv.py checks that on fla's sources.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from linear_moe.ops import rwkv6, rwkv7
from test_fla_parity import HEAD_DIMS, REL_TOL, _record, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

B, T, H = 2, 300, 4  # T is not a multiple of fla's 64-chunk
W_BOUND = -math.exp(-0.5)  # RWKV-7's log-decay bound (the mixer passes it as lower_bound)


def _run(fn, inputs, do, dht, with_grads):
    """fn(*leaves) -> (o, ht); returns o, ht and the leaves' grads (None if not with_grads).
    dht None: backpropagate through o only."""
    leaves = [x.detach().clone().requires_grad_(with_grads) for x in inputs]
    o, ht = fn(*leaves)
    if not with_grads:
        return o.detach(), ht.detach(), None
    outputs, grads = [o], [do.to(o.dtype)]
    if dht is not None:
        outputs, grads = [o, ht], [do.to(o.dtype), dht.to(ht.dtype)]
    torch.autograd.backward(outputs, grads)
    return o.detach(), ht.detach(), [x.grad for x in leaves]


def _compare(op, mode, head_dim, names, fn_fla, fn_ref, inputs, with_grads=True,
             state_grad=True):
    torch.manual_seed(1)
    do = torch.randn(*inputs[0].shape[:3], head_dim, device="cuda", dtype=torch.bfloat16)
    dht = torch.randn_like(inputs[-1]) if state_grad else None  # inputs[-1]: h0 [N, H, K, V]
    o, ht, grads = _run(fn_fla, inputs, do, dht, with_grads)
    o_ref, ht_ref, grads_ref = _run(fn_ref, [x.float() for x in inputs], do.float(), dht,
                                    with_grads)
    pairs = [("o", o, o_ref), ("final_state", ht, ht_ref)]
    if with_grads:
        pairs += [(f"d{name}", a, b) for name, a, b in zip(names, grads, grads_ref)]
    errors = {}
    for tensor, a, b in pairs:
        assert a is not None and torch.isfinite(a).all(), f"{tensor}: missing or non-finite"
        errors[tensor] = rel_err(a, b)
        _record(op, mode, head_dim, tensor, errors[tensor])
    bad = {t: e for t, e in errors.items() if e > REL_TOL}
    assert not bad, f"{op}/{mode}/K={head_dim}: rel L2 above {REL_TOL}: {bad} (all: {errors})"


def _rwkv6_inputs(head_dim, batch=B):
    torch.manual_seed(0)
    r, k, v = (torch.randn(batch, T, H, head_dim, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    w = F.logsigmoid(torch.randn(batch, T, H, head_dim, device="cuda")).to(torch.bfloat16)
    u = (0.5 * torch.randn(H, head_dim, device="cuda")).to(torch.bfloat16)
    n = batch if batch > 1 else len(CU_SEQLENS) - 1
    h0 = torch.randn(n, H, head_dim, head_dim, device="cuda")
    return [r, k, v, w, u, h0]


def _rwkv7_inputs(head_dim, batch=B):
    """As the RWKV-7 layer makes them: a = -kk, b = kk * a_gate, w in [W_BOUND, 0)."""
    torch.manual_seed(0)
    r, k, v = (torch.randn(batch, T, H, head_dim, device="cuda") for _ in range(3))
    w = W_BOUND * torch.randn(batch, T, H, head_dim, device="cuda").sigmoid()
    kk = F.normalize(torch.randn(batch, T, H, head_dim, device="cuda"), dim=-1)
    a_gate = torch.randn(batch, T, H, head_dim, device="cuda").sigmoid()
    n = batch if batch > 1 else len(CU_SEQLENS) - 1
    h0 = torch.randn(n, H, head_dim, head_dim, device="cuda")
    bf16 = [x.to(torch.bfloat16) for x in (r, w, k * head_dim ** -0.5, v, -kk, kk * a_gate)]
    return [*bf16, h0]


CU_SEQLENS = [0, 37, 200, 300]


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent"])
def test_rwkv6_fla_matches_reference(mode, head_dim):
    def run(backend):
        return lambda r, k, v, w, u, h0: rwkv6(r, k, v, w, u, initial_state=h0,
                                               output_final_state=True, backend=backend,
                                               mode=mode)

    # fla's fused_recurrent_rwkv6 backward takes no final-state gradient: grads through o only
    _compare("rwkv6", mode, head_dim, ("r", "k", "v", "w", "u", "initial_state"),
             run("fla"), run("reference"), _rwkv6_inputs(head_dim),
             state_grad=(mode == "chunk"))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("lower_bound", [None, W_BOUND], ids=["no_bound", "rwkv7_bound"])
def test_rwkv7_chunk_fla_matches_reference(lower_bound, head_dim):
    # lower_bound (as the mixer passes it) selects fla's 64-chunk tensor-core path; None its
    # default 16-chunk path
    def run(backend):
        return lambda r, w, k, v, a, b, h0: rwkv7(r, w, k, v, a, b, initial_state=h0,
                                                  output_final_state=True,
                                                  lower_bound=lower_bound, backend=backend)

    _compare("rwkv7", "chunk", head_dim, ("r", "w", "k", "v", "a", "b", "initial_state"),
             run("fla"), run("reference"), _rwkv7_inputs(head_dim))


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_rwkv7_fused_recurrent_forward_matches_reference(head_dim):
    # fla's fused_recurrent_rwkv7 is forward-only (its backward raises NotImplementedError)
    def run(backend):
        return lambda r, w, k, v, a, b, h0: rwkv7(r, w, k, v, a, b, initial_state=h0,
                                                  output_final_state=True, backend=backend,
                                                  mode="fused_recurrent")

    _compare("rwkv7", "fused_recurrent", head_dim, (), run("fla"), run("reference"),
             _rwkv7_inputs(head_dim), with_grads=False)


def test_packed_sequences_fla_match_reference():
    cu = torch.tensor(CU_SEQLENS, device="cuda")

    def run6(backend):
        return lambda r, k, v, w, u, h0: rwkv6(r, k, v, w, u, initial_state=h0,
                                               output_final_state=True, cu_seqlens=cu,
                                               backend=backend)

    def run7(backend):
        return lambda r, w, k, v, a, b, h0: rwkv7(r, w, k, v, a, b, initial_state=h0,
                                                  output_final_state=True, cu_seqlens=cu,
                                                  lower_bound=W_BOUND, backend=backend)

    _compare("rwkv6[varlen]", "chunk", 64, ("r", "k", "v", "w", "u", "initial_state"),
             run6("fla"), run6("reference"), _rwkv6_inputs(64, batch=1))
    _compare("rwkv7[varlen]", "chunk", 64, ("r", "w", "k", "v", "a", "b", "initial_state"),
             run7("fla"), run7("reference"), _rwkv7_inputs(64, batch=1))
