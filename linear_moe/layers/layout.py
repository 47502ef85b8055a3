"""Swapping the two leading dims ([s, b, ...] <-> [b, s, ...]) as one copy at memory speed.

The mixers run batch-first while Megatron's activations are [s, b, h]: each layer copies its
input to [b, s, h] and its output back, and backward copies both gradients. torch runs a copy of
a permuted tensor through its generic strided kernel, one 2-byte element at a time for bf16;
those four copies were 1.1 ms/step of the GLA layer bench's 3.0 ms overhead (H200,
2026-12-05). Only the leading dims move and every row of the trailing dims stays contiguous, so
the same copy runs on the rows viewed as 16-byte elements (complex128): 8 bf16 per load.
"""

from __future__ import annotations

import torch

# Widest first; a row whose byte size (or start) does not divide by one tries the next.
_WIDE_DTYPES = (torch.complex128, torch.float64, torch.float32)


def _swap_copy(t: torch.Tensor) -> torch.Tensor:
    """t [a, b, ...] -> a contiguous [b, a, ...] copy."""
    if t.is_contiguous():
        rows = t.reshape(t.shape[0], t.shape[1], -1)  # a view
        row_bytes = rows.shape[-1] * t.element_size()
        for wide in _WIDE_DTYPES:
            size = wide.itemsize
            offset_bytes = t.storage_offset() * t.element_size()  # view(dtype) checks this
            if (size > t.element_size() and row_bytes % size == 0 and offset_bytes % size == 0
                    and t.data_ptr() % size == 0):
                swapped = rows.view(wide).transpose(0, 1).contiguous().view(t.dtype)
                return swapped.view(t.shape[1], t.shape[0], *t.shape[2:])
    return t.transpose(0, 1).contiguous()


class _SwapLeadingDims(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return _swap_copy(x)

    @staticmethod
    def backward(ctx, grad):
        return _swap_copy(grad)


def swap_leading_dims(x: torch.Tensor) -> torch.Tensor:
    """x [a, b, ...] -> contiguous [b, a, ...] (x.transpose(0, 1).contiguous(), and its
    gradient likewise, at memory speed)."""
    if x.shape[0] == 1 or x.shape[1] == 1:  # the transposed view is contiguous: no copy
        return x.transpose(0, 1).contiguous()
    return _SwapLeadingDims.apply(x)
