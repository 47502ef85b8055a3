"""swap_leading_dims: the mixers' [s, b, ...] <-> [b, s, ...] copy and its gradient."""

import pytest
import torch

from linear_moe.layers.layout import _swap_copy, swap_leading_dims


@pytest.mark.parametrize("shape,dtype", [
    ((5, 3, 16), torch.bfloat16),      # rows of 32 bytes: complex128 elements
    ((5, 3, 4, 8), torch.float32),     # trailing dims folded into one row
    ((4, 6, 3), torch.bfloat16),       # 6-byte rows: no wider element divides them
    ((7, 5, 2, 4), torch.float16),     # 16-byte rows
    ((1, 4, 8), torch.bfloat16),       # a size-1 dim: the transposed view, no copy
])
def test_swap_matches_transpose_contiguous(shape, dtype):
    x = torch.randn(*shape).to(dtype).requires_grad_()
    y = swap_leading_dims(x)
    assert y.is_contiguous() and y.dtype == dtype
    assert torch.equal(y, x.transpose(0, 1).contiguous())
    grad = torch.randn_like(y)
    y.backward(grad)
    assert torch.equal(x.grad, grad.transpose(0, 1))


def test_swap_copy_of_strided_or_unaligned_tensors():
    strided = torch.randn(6, 5, 16).transpose(0, 1)
    assert torch.equal(_swap_copy(strided), strided.transpose(0, 1).contiguous())
    unaligned = torch.randn(4 * 3 * 8 + 1).to(torch.bfloat16)[1:].view(4, 3, 8)  # 2-byte offset
    assert unaligned.data_ptr() % 4 != 0
    assert torch.equal(_swap_copy(unaligned), unaligned.transpose(0, 1).contiguous())
