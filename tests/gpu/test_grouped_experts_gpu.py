"""The grouped_mm experts on CUDA in bf16 equal the per-expert loop in fp32 (fwd and bwd), with an
empty expert and a row count that needs padding."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from linear_moe.layers.grouped_experts import GroupedMMExperts
from test_fla_parity import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _experts(fc1, fc2, fused, recompute):
    experts = SimpleNamespace(
        num_local_experts=len(fc1), unsupported=None,
        config=SimpleNamespace(bias_activation_fusion=fused, gated_linear_unit=True,
                               activation_func=F.silu, glu_linear_offset=0.0,
                               activation_func_fp8_input_store=False,
                               moe_act_recompute=recompute),
        local_experts=[SimpleNamespace(linear_fc1=SimpleNamespace(weight=a),
                                       linear_fc2=SimpleNamespace(weight=b))
                       for a, b in zip(fc1, fc2)])
    experts._activation = lambda h, p: GroupedMMExperts._activation(experts, h, p)
    experts._grouped_forward = lambda *a: GroupedMMExperts._grouped_forward(experts, *a)
    return experts


@pytest.mark.parametrize("recompute", [False, True], ids=["keep_act", "moe_act_recompute"])
@pytest.mark.parametrize("fused_swiglu", [False, True])
def test_grouped_experts_bf16_match_fp32_loop(fused_swiglu, recompute):
    torch.manual_seed(0)
    sizes = [1000, 0, 517, 2900, 3]  # 4420 rows: padded to a multiple of 8
    hidden, ffn = 1024, 896
    fc1 = [torch.randn(2 * ffn, hidden, device="cuda") * hidden ** -0.5 for _ in sizes]
    fc2 = [torch.randn(hidden, ffn, device="cuda") * ffn ** -0.5 for _ in sizes]
    x = torch.randn(sum(sizes), hidden, device="cuda")
    probs = torch.rand(sum(sizes), device="cuda")
    dy = torch.randn(sum(sizes), hidden, device="cuda")

    leaves = [t.bfloat16().requires_grad_() for t in (x, *fc1, *fc2)]
    n = len(sizes)
    experts = _experts(leaves[1:1 + n], leaves[1 + n:], fused_swiglu, recompute)
    out, _ = GroupedMMExperts.forward(experts, leaves[0], torch.tensor(sizes), probs.bfloat16())
    assert experts.unsupported is None  # the grouped path ran, not the fallback
    out.backward(dy.bfloat16())

    ref_leaves = [t.clone().requires_grad_() for t in (x, *fc1, *fc2)]
    ref = []
    for xs, ps, a, b in zip(ref_leaves[0].split(sizes), probs.split(sizes), ref_leaves[1:1 + n],
                            ref_leaves[1 + n:]):
        g, u = (xs @ a.T).chunk(2, -1)
        ref.append((F.silu(g) * u * ps[:, None]) @ b.T)
    ref = torch.cat(ref)
    ref.backward(dy)
    assert rel_err(out, ref) <= 1e-2
    for i, (a, b) in enumerate(zip(leaves, ref_leaves)):
        if b.grad.abs().max() == 0:  # the empty expert
            assert a.grad is None or a.grad.abs().max() == 0
            continue
        assert rel_err(a.grad, b.grad) <= 1e-2, i
