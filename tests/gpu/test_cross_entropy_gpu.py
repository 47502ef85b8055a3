"""--fused-cross-entropy on CUDA (fla's fused Triton kernel) equals the chunked torch version the
CPU tests prove equal to megatron-core's loss: bf16 logits, loss and logits gradient, with a
vocab that is not a power of two and a non-uniform upstream gradient."""

from __future__ import annotations

import pytest
import torch

from test_fla_parity import rel_err
from linear_moe.layers.cross_entropy import (
    chunked_vocab_parallel_cross_entropy,
    fused_vocab_parallel_cross_entropy,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.mark.parametrize("vocab", [32768, 50000])
def test_fla_fused_cross_entropy_matches_the_chunked_reference(vocab):
    torch.manual_seed(0)
    s, b = 1024, 2
    logits = (3 * torch.randn(s, b, vocab, device="cuda")).to(torch.bfloat16)
    target = torch.randint(0, vocab, (s, b), device="cuda")
    grad_out = torch.rand(s, b, device="cuda")
    results = []
    for fn in (fused_vocab_parallel_cross_entropy, chunked_vocab_parallel_cross_entropy):
        x = logits.clone().requires_grad_()
        loss = fn(x, target)
        loss.backward(grad_out)
        results.append((loss.detach(), x.grad.float()))
    (loss, grad), (ref_loss, ref_grad) = results
    assert loss.dtype == torch.float32 and loss.shape == (s, b)
    assert rel_err(loss, ref_loss) < 1e-5
    assert rel_err(grad, ref_grad) < 1e-2  # both bf16-rounded gradients of the same fp32 math
