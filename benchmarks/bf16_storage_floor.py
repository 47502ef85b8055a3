"""How much of a GPU op-test error is bf16 storage, on the CPU: the fp32 reference op run with one
intermediate rounded to bf16 (forward value and backward gradient), against the plain fp32
reference on the same bf16-representable inputs and shapes as tests/gpu/test_fla_parity_*.py.

An fla kernel that keeps that intermediate in bf16 cannot do better than this; one far above it
loses precision elsewhere. Used for the two open op-test failures (README, benchmarks/NOTES.md):

- rebased d16, `chunk`: the 136 quadratic features (and their gradients) in bf16, computed from
  fp32 q/k;
- gsa `chunk`: the slot scores passed from the first pass to the second in bf16.

    python benchmarks/bf16_storage_floor.py
"""

from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn.functional as F

from linear_moe.ops import gsa, rebased

B, T, H = 2, 300, 4  # the GPU tests' shapes


class _RoundTrip(torch.autograd.Function):
    """Identity whose forward value and backward gradient are rounded to bf16."""

    @staticmethod
    def forward(ctx, x):
        return x.bfloat16().to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        return g.bfloat16().to(g.dtype)


@contextlib.contextmanager
def _patched(module_name, attr, wrap):
    module = sys.modules[module_name]
    original = getattr(module, attr)
    setattr(module, attr, wrap(original))
    try:
        yield
    finally:
        setattr(module, attr, original)


def _grads(fn, inputs, grad_out):
    leaves = [x.clone().requires_grad_() for x in inputs]
    outs = fn(*leaves)
    torch.autograd.backward(outs, grad_out)
    return [x.grad for x in leaves]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def rebased_floor(d=16, v_dim=64):
    torch.manual_seed(0)
    q, k = (F.layer_norm(torch.randn(B, T, H, d), (d,)) for _ in range(2))
    v = torch.randn(B, T, H, v_dim)
    inputs = [x.bfloat16().double() for x in (q, k, v)]
    do = [torch.randn(B, T, H, v_dim).double()]

    def fn(*x):
        return [rebased(*x, backend="reference")[0]]

    ref = _grads(fn, inputs, do)
    features = lambda phi: lambda x: _RoundTrip.apply(phi(x))  # noqa: E731
    with _patched("linear_moe.ops.based", "quadratic_feature_map", features):
        got = _grads(fn, inputs, do)
    return {n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dv"), got, ref)}


def gsa_floor(head_dim, slots=64):
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, T, H, head_dim).bfloat16().double() for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, slots)).double()
    s = (-torch.expm1(g)).bfloat16().double()
    h0 = [torch.randn(B, H, head_dim, slots).double(), torch.randn(B, H, slots, head_dim).double()]
    grads = [torch.randn(B, T, H, head_dim).double(), torch.randn_like(h0[0]),
             torch.randn_like(h0[1])]

    def fn(q, k, v, s, g, hk0, hv0):
        o, (hk, hv) = gsa(q, k, v, s, g, initial_state=(hk0, hv0), output_final_state=True,
                          backend="reference")
        return [o, hk, hv]

    inputs = [q, k, v, s, g, *h0]
    ref = _grads(fn, inputs, grads)
    scores = lambda gla: lambda p, *a, **kw: gla(_RoundTrip.apply(p), *a, **kw)  # noqa: E731
    with _patched("linear_moe.ops.gsa", "gla", scores):
        got = _grads(fn, inputs, grads)
    return {n: _rel(a, b) for n, a, b in zip(("dq", "dk", "dv", "ds", "dg"), got, ref)}


def main():
    rows = {"rebased chunk d16, bf16 features": rebased_floor()}
    for head_dim in (64, 128):
        rows[f"gsa chunk hd{head_dim}, bf16 slot scores"] = gsa_floor(head_dim)
    for name, errors in rows.items():
        print(f"{name}: " + ", ".join(f"{t} {e:.1e}" for t, e in errors.items()))
    return rows


if __name__ == "__main__":
    main()
