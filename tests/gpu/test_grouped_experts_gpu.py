"""The grouped_mm experts on CUDA in bf16 equal the per-expert loop in fp32 (fwd and bwd), with an
empty expert and a row count that needs padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expert_utils import experts_over
from test_fla_parity import rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


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
    experts = experts_over(leaves[1:1 + n], leaves[1 + n:], bias_activation_fusion=fused_swiglu,
                           moe_act_recompute=recompute)
    out, _ = experts.forward(leaves[0], torch.tensor(sizes), probs.bfloat16())
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
