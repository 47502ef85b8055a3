"""Packed documents (varlen): a micro-batch's rows cut into documents that must not see each
other (megatron's --reset-attention-mask).

The mixers run a packed batch as one stream [1, b*s] with fla's ``cu_seqlens`` (the offsets of
the documents in that stream, every row's start included): the recurrences start each document
from a zero state, and the short convolutions and token shifts read nothing before its first
token. The softmax layers take the same offsets as a block-diagonal causal mask.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def document_offsets(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] tokens -> int32 cu_seqlens over the flattened [b*s] stream: a document ends with
    its eod token (the next token starts the next one, as megatron's reset masks cut them), and
    every row starts one."""
    b, s = tokens.shape
    starts = torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 0] = True
    starts[:, 1:] = tokens[:, :-1] == eod
    positions = torch.nonzero(starts.reshape(-1)).squeeze(1)
    end = torch.tensor([b * s], device=tokens.device)
    return torch.cat([positions, end]).to(torch.int32)


def packed_documents(tokens: torch.Tensor, eod: int):
    """megatron-core's PackedSeqParams for a [b, s] batch of eod-separated documents, in the
    form the mixers and SDPA attention take: sbhd (the batch keeps its shape), cu_seqlens over
    the flattened rows, and the row length as max_seqlen (RoPE's table: positions stay those of
    the row, which RoPE's relative form makes equivalent to per-document ones)."""
    from megatron.core.packed_seq_params import PackedSeqParams

    offsets = document_offsets(tokens, eod)
    return PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=offsets, cu_seqlens_kv=offsets,
                           max_seqlen_q=tokens.shape[1], max_seqlen_kv=tokens.shape[1])


@dataclass
class Documents:
    """The documents of a packed stream of ``cu_seqlens[-1]`` tokens."""

    cu_seqlens: torch.Tensor  # int32 [n + 1]

    @property
    def length(self) -> int:
        return int(self.cu_seqlens[-1])

    @functools.cached_property
    def segment_ids(self) -> torch.Tensor:
        """[T] the document of each token of the stream (once per forward: the convs' taps and
        the token shift all read it)."""
        lengths = (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).long()
        return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device),
                                       lengths)

    def previous(self, x: torch.Tensor, lag: int) -> torch.Tensor:
        """x [1, T, ...] shifted by ``lag`` tokens along the stream, zero where that crosses
        the start of a document."""
        shifted = F.pad(x, (0,) * (2 * (x.dim() - 2)) + (lag, 0))[:, :x.shape[1]]
        segments = self.segment_ids
        same = torch.zeros_like(segments, dtype=torch.bool)
        same[lag:] = segments[lag:] == segments[:-lag]
        return shifted * same.view(1, -1, *([1] * (x.dim() - 2))).to(x.dtype)

    def causal_mask(self, batch: int) -> torch.Tensor:
        """[b, 1, s, s] True where a token of a row may attend: itself and the earlier tokens of
        its document (T = b * s)."""
        segments = self.segment_ids.view(batch, 1, -1)
        same = segments[..., :, None] == segments[..., None, :]
        return same & torch.ones_like(same[0, 0]).tril()
