"""The CUDA fast paths of the norms equal their fp32 torch path: GatedRMSNorm through fla's
rms_norm_gated (bf16 in, fp32 inside), GatedRMSNorm without a gate and RMSNorm in the input's
dtype, fwd and bwd."""

from __future__ import annotations

import pytest
import torch

from test_fla_parity import rel_err
from linear_moe.layers import norm as _norm
from linear_moe.layers.norm import GatedRMSNorm, RMSNorm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
REL_TOL = 1e-2


@pytest.fixture(scope="module")
def world_group():
    """A one-rank process group: the shared norm weight's TP all-reduce is then the identity."""
    if not torch.distributed.is_initialized():  # an in-process store: no port to pick
        torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(),
                                             rank=0, world_size=1)
    return torch.distributed.group.WORLD


def _grads(module, inputs, dy):
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    y = module(*leaves)
    y.backward(dy.to(y.dtype))
    return y, [x.grad for x in leaves] + [p.grad for p in module.parameters()]


@pytest.mark.parametrize("gate_fn", ["swish", "sigmoid"])
def test_fused_gated_rmsnorm_matches_fp32_torch(gate_fn, world_group):
    torch.manual_seed(0)
    group = world_group
    o = torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16)
    g = torch.randn_like(o)
    dy = torch.randn_like(o)
    fused = GatedRMSNorm(128, 1e-6, gate_fn, torch.bfloat16, group, fused=True).cuda()
    ref = GatedRMSNorm(128, 1e-6, gate_fn, torch.float32, group, fused=False).cuda()
    with torch.no_grad():
        fused.weight.copy_(torch.rand(128) + 0.5)
        ref.weight.copy_(fused.weight.float())
    y, grads = _grads(fused, [o, g], dy)
    y_ref, grads_ref = _grads(ref, [o.float(), g.float()], dy.float())
    assert y.dtype == torch.bfloat16
    for name, a, b in zip(["y", "do", "dg", "dweight"], [y, *grads], [y_ref, *grads_ref]):
        assert rel_err(a, b) <= REL_TOL, (name, rel_err(a, b))


@pytest.mark.parametrize("affine", [True, False])
def test_gateless_output_norm_in_bf16_matches_fp32_torch(affine, world_group):
    """deltanet's output norm (no gate): torch's rms_norm on the bf16 input."""
    torch.manual_seed(0)
    o = torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(o)
    fused = GatedRMSNorm(128, 1e-6, "swish", torch.bfloat16, world_group, fused=True,
                         elementwise_affine=affine).cuda()
    ref = GatedRMSNorm(128, 1e-6, "swish", torch.float32, world_group, fused=False,
                       elementwise_affine=affine).cuda()
    if affine:
        with torch.no_grad():
            fused.weight.copy_(torch.rand(128) + 0.5)
            ref.weight.copy_(fused.weight.float())
    y, grads = _grads(fused, [o], dy)
    y_ref, grads_ref = _grads(ref, [o.float()], dy.float())
    assert y.dtype == torch.bfloat16
    for name, a, b in zip(["y", "do", "dweight"], [y, *grads], [y_ref, *grads_ref]):
        assert rel_err(a, b) <= REL_TOL, (name, rel_err(a, b))


def test_rmsnorm_in_bf16_matches_fp32():
    from types import SimpleNamespace

    torch.manual_seed(0)
    x = torch.randn(300, 2, 1024, device="cuda", dtype=torch.bfloat16)
    dy = torch.randn_like(x)
    norm = RMSNorm(SimpleNamespace(params_dtype=torch.bfloat16, sequence_parallel=False),
                   1024).cuda()
    ref = RMSNorm(SimpleNamespace(params_dtype=torch.float32, sequence_parallel=False),
                  1024).cuda()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(1024) + 0.5)
        ref.weight.copy_(norm.weight.float())
    y, grads = _grads(norm, [x], dy)
    y_ref, grads_ref = _grads(ref, [x.float()], dy.float())
    for name, a, b in zip(["y", "dx", "dweight"], [y, *grads], [y_ref, *grads_ref]):
        assert rel_err(a, b) <= REL_TOL, (name, rel_err(a, b))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, REL_TOL)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(300, 2, 1024), (2, 300, 4, 128)], ids=["layer", "heads"])
def test_cuda_rms_norm_matches_torch_autograd(shape, dtype, tol):
    """norm.rms_norm on CUDA (torch's fused forward and input gradient, the weight gradient as
    a compiled reduction) against F.rms_norm under torch's autograd in fp32."""
    import torch.nn.functional as F

    from linear_moe.layers.norm import rms_norm

    torch.manual_seed(0)
    d = shape[-1]
    x = torch.randn(*shape, device="cuda")
    w = torch.rand(d, device="cuda") + 0.5
    dy = torch.randn_like(x)
    runs = []
    for fn, run_dtype in ((rms_norm, dtype),
                          (lambda a, b, eps: F.rms_norm(a, (d,), b, eps), torch.float32)):
        xi, wi = (t.to(run_dtype).requires_grad_() for t in (x, w))
        y = fn(xi, wi, 1e-6)
        y.backward(dy.to(run_dtype))
        runs.append((y, xi.grad, wi.grad))
    for name, a, b in zip(["y", "dx", "dweight"], *runs):
        assert a.dtype == dtype and rel_err(a.float(), b) <= tol, (name, rel_err(a.float(), b))


# The layer norms' CUDA paths: (norm(x, w, eps) -> y or (y, residual), whether the residual
# branch is used, the output's and x's gradients stored batch-first).
_LAYER_NORMS = {
    # x's gradient and the residual branch's in one compiled pass; the residual is x itself
    "residual": (lambda x, w, eps: _norm.rms_norm_with_residual(x, w, eps), True, False, False),
    # a linear mixer's input norm: the output stored batch-first (one compiled kernel), its
    # gradient arriving batch-first, x's gradient in x's layout
    "mixer_input": (lambda x, w, eps: _norm.rms_norm(x, w, eps, batch_first=True),
                    False, True, False),
    "mixer_input_residual": (
        lambda x, w, eps: _norm.rms_norm_with_residual(x, w, eps, batch_first=True),
        True, True, False),
    # the pre-MLP norm after a linear mixer: x's gradient stored batch-first
    "after_mixer": (
        lambda x, w, eps: _norm.rms_norm_with_residual(x, w, eps, batch_first_grad=True),
        True, False, True),
}


@pytest.mark.parametrize("kind", sorted(_LAYER_NORMS))
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, REL_TOL)],
                         ids=["fp32", "bf16"])
def test_cuda_layer_norms_match_torch_autograd(kind, dtype, tol):
    """The layer norms on CUDA in a layer's pattern (y and, where returned, the residual both
    used), their outputs and gradients in the layouts they promise, against F.rms_norm (+ x)
    under autograd in fp32."""
    import torch.nn.functional as F

    norm, residual, batch_first_out, batch_first_grad = _LAYER_NORMS[kind]
    torch.manual_seed(0)
    x = torch.randn(300, 4, 1024, device="cuda")
    w = torch.rand(1024, device="cuda") + 0.5
    dy, dres = torch.randn_like(x), torch.randn_like(x)
    if batch_first_out:  # as the mixer's arrives
        dy = dy.transpose(0, 1).contiguous().transpose(0, 1)
    runs = []
    for ours, run_dtype in ((True, dtype), (False, torch.float32)):
        xi, wi = (t.to(run_dtype).requires_grad_() for t in (x, w))
        if ours:
            out = norm(xi, wi, 1e-6)
            y, r = out if residual else (out, None)
            assert y.transpose(0, 1).is_contiguous() if batch_first_out else y.is_contiguous()
            assert r is None or r.data_ptr() == xi.data_ptr()
        else:
            y, r = F.rms_norm(xi, (1024,), wi, 1e-6), (xi if residual else None)
        outs, grads = [y], [dy.to(run_dtype)]
        if residual:
            outs.append(r)
            grads.append(dres.to(run_dtype))
        gx, gw = torch.autograd.grad(outs, [xi, wi], grads)
        if ours:
            assert gx.transpose(0, 1).is_contiguous() if batch_first_grad else gx.is_contiguous()
        runs.append((y, gx, gw))
    for name, a, b in zip(["y", "dx", "dweight"], *runs):
        assert a.dtype == dtype and rel_err(a.float(), b) <= tol, (name, rel_err(a.float(), b))
