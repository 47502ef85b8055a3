"""Rotary position embedding on [b, s, H, D] (half-split layout, as fla's RotaryEmbedding)."""

import functools

import torch


def apply_rotary(x: torch.Tensor, theta: float = 10000.0, fused: bool = False,
                 offset: int = 0) -> torch.Tensor:
    """Rotate the pairs (x_i, x_{i + D/2}) of position t by t * theta^(-2i/D); x [b, s, H, D]
    holds positions offset .. offset + s - 1.

    fused (CUDA): fla's Triton rotary kernel, one read and one write of x each way with fp32
    math inside, with cos/sin in x's dtype as fla's RotaryEmbedding (_FlaRotary). The torch
    path below runs ~10 fp32 elementwise passes each way; with it on q and k the retention
    layer measured 1.4x its bare op + projections (H200, 64K tokens of 2048 channels)."""
    s, d = x.shape[1], x.shape[-1]
    if d % 2:
        raise ValueError(f"rotary embedding needs an even head dim, got {d}")
    if fused and x.is_cuda:
        return _FlaRotary.apply(x, *_cos_sin(s + offset, d, theta, x.device, x.dtype), offset)
    cos, sin = (t[None, offset:, None]
                for t in _cos_sin(s + offset, d, theta, x.device, torch.float32))
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


@functools.lru_cache(maxsize=16)
def _cos_sin(s: int, d: int, theta: float, device: torch.device, dtype: torch.dtype):
    """cos and sin [s, d/2] of the angles t * theta^(-2i/D), once per shape (q and k of every
    layer share them; computed in fp32, then cast)."""
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float32, device=device) / d)
    angles = torch.arange(s, dtype=torch.float32, device=device)[:, None] * inv_freq
    return angles.cos().to(dtype), angles.sin().to(dtype)


class _FlaRotary(torch.autograd.Function):
    """fla's Triton rotary kernel forward and (conjugated) backward, each writing a new tensor.
    fla's own autograd function (fla.modules.rotary.rotary_embedding) zero-fills its output
    first (for the rows left-padded tensor offsets make the kernel skip; an int offset skips
    none) and clones the incoming gradient before rotating it: three passes over q and k per
    step beyond the two rotations (retention's q and k at 64K tokens: 1.46 -> 0.77 ms fwd+bwd,
    bit-equal, H100; scripts/probes/rotary_passes.py)."""

    @staticmethod
    def forward(ctx, x, cos, sin, offset):
        ctx.save_for_backward(cos, sin)
        ctx.offset = offset
        return _rotate_with_fla_kernel(x, cos, sin, offset, conjugate=False)

    @staticmethod
    def backward(ctx, dy):
        cos, sin = ctx.saved_tensors
        return _rotate_with_fla_kernel(dy, cos, sin, ctx.offset, conjugate=True), None, None, None


def _rotate_with_fla_kernel(x, cos, sin, offset: int, conjugate: bool) -> torch.Tensor:
    """x [b, s, H, D] of positions offset.. rotated by fla's kernel (launched as fla's
    rotary_embedding_fwdbwd does, fla 0.6.0) into an uninitialised tensor it writes whole."""
    import triton
    from fla.modules.rotary.ops import rotary_embedding_kernel
    from fla.utils import get_multiprocessor_count

    x = x.contiguous()  # the kernel addresses [b, s, H, D] in memory order
    b, s, h, d = x.shape
    y = torch.empty_like(x)
    sms = get_multiprocessor_count(x.device.index)
    rows = min(128, triton.next_power_of_2(triton.cdiv(s, sms)))
    rotary_embedding_kernel[(triton.cdiv(s, rows), b, h)](
        x=x, cos=cos, sin=sin, y=y, cu_seqlens=None, chunk_indices=None, seq_offsets=offset,
        T=s, B=b, H=h, D=d, R=d // 2, TR=cos.shape[0], BT=rows, BD=triton.next_power_of_2(d),
        IS_SEQLEN_OFFSETS_TENSOR=False, IS_VARLEN=False, INTERLEAVED=False, CONJUGATE=conjugate)
    return y
