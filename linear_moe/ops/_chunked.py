"""Helpers shared by the chunked reference ops: varlen splitting, the
[B, T, H, D] <-> [B, H, NC, C, D] chunk layout, and cancellation-free sums of
log decays (every exponent is summed directly from its own terms, never as a
difference of two long cumsums, so it stays accurate in fp32 however strong
the decays before it were)."""

from __future__ import annotations

import math

import torch


def split_varlen(cu_seqlens: torch.Tensor, batch_time: tuple[int, int],
                 initial_state: torch.Tensor | None) -> list[tuple[int, int]]:
    """[start, end) of each packed sequence; checks B == 1, T and the state count."""
    batch, total = batch_time
    if batch != 1:
        raise ValueError(f"cu_seqlens needs batch size 1 (packed sequences), got {batch}")
    bounds = [int(x) for x in cu_seqlens.tolist()]
    if len(bounds) < 2 or bounds[0] != 0 or bounds[-1] != total or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens must rise from 0 to T={total}, got {bounds}")
    if initial_state is not None and initial_state.shape[0] != len(bounds) - 1:
        raise ValueError(f"initial_state holds {initial_state.shape[0]} states for {len(bounds) - 1} sequences")
    return list(zip(bounds[:-1], bounds[1:]))


def over_sequences(run, cu_seqlens, tensors, h0):
    """run(*tensors, h0) -> (o, S) on the batch, or per packed sequence with its own state."""
    if cu_seqlens is None:
        return run(*tensors, h0)
    outs, states = [], []
    for n, (s, e) in enumerate(split_varlen(cu_seqlens, tensors[0].shape[:2], h0)):
        o, state = run(*(x[:, s:e] for x in tensors), None if h0 is None else h0[n:n + 1])
        outs.append(o)
        states.append(state)
    return torch.cat(outs, 1), torch.cat(states, 0)


def to_chunks(x: torch.Tensor, chunk: int) -> torch.Tensor:
    """[B, T, H, *D] (T a multiple of chunk) -> [B, H, NC, C, *D]."""
    B, T, H = x.shape[:3]
    x = x.reshape(B, T // chunk, chunk, H, *x.shape[3:])
    return x.permute(0, 3, 1, 2, *range(4, x.dim()))


def from_chunks(x: torch.Tensor, T: int) -> torch.Tensor:
    """[B, H, NC, C, D] -> [B, T, H, D], dropping the padding past T."""
    B, H, NC, C, D = x.shape
    return x.permute(0, 2, 3, 1, 4).reshape(B, NC * C, H, D)[:, :T]


def pad_time(chunk: int, *xs: torch.Tensor) -> list[torch.Tensor]:
    """Zero-pad dim 1 (time) of [B, T, ...] tensors up to a multiple of chunk."""
    pad = -xs[0].shape[1] % chunk
    if not pad:
        return list(xs)
    return [torch.cat([x, x.new_zeros(x.shape[0], pad, *x.shape[2:])], 1) for x in xs]


def segsum(x: torch.Tensor) -> torch.Tensor:
    """x [..., L, D] -> [..., L, L, D]: out[i, j] = sum_{j < s <= i} x_s for i >= j, -inf for i < j."""
    L = x.shape[-2]
    ones = torch.ones(L, L, dtype=torch.bool, device=x.device)
    terms = x.unsqueeze(-2).expand(*x.shape[:-1], L, x.shape[-1])  # terms[s, j] = x_s
    out = terms.masked_fill(~ones.tril(-1)[:, :, None], 0).cumsum(-3)  # keep s > j, sum s <= i
    return out.masked_fill(~ones.tril()[:, :, None], -math.inf)


def suffix_sum(x: torch.Tensor, dim: int) -> torch.Tensor:
    """out[j] = sum_{s > j} x_s along dim (exclusive reverse cumsum)."""
    shifted = torch.cat([x.narrow(dim, 1, x.shape[dim] - 1), torch.zeros_like(x.narrow(dim, 0, 1))], dim)
    return shifted.flip(dim).cumsum(dim).flip(dim)
