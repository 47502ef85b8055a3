"""Core attention for the softmax 'N' layers over torch SDPA.

megatron-core's local spec falls back to an unfused DotProductAttention that materialises the
[b, n, s, s] score matrix when TransformerEngine is absent; SDPA picks flash / memory-efficient
kernels on CUDA and a fused CPU kernel, with the same inputs and outputs.

Context parallelism without TransformerEngine's ring attention: every rank all-gathers the keys
and values (Llama 3's form of CP for attention, Grattafiori et al. 2024, arXiv:2407.21783) and
each of its two pieces of megatron's CP layout attends to the keys up to its own last token,
causally aligned to the bottom right (torch's causal_lower_right).
"""

import contextlib
import math

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule

from linear_moe.layers.documents import Documents


class SDPACoreAttention(MegatronModule):
    """Drop-in for megatron-core's DotProductAttention (same constructor and forward)."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str, attention_dropout: float | None = None,
                 softmax_scale: float | None = None, cp_comm_type: str | None = None,
                 pg_collection=None, k_channels: int | None = None,
                 v_channels: int | None = None):
        super().__init__(config=config)
        self.cp = None
        if config.context_parallel_size > 1:
            from linear_moe.parallel.context_parallel import SequenceChunks

            self.cp = SequenceChunks(pg_collection.cp if pg_collection is not None
                                     else parallel_state.get_context_parallel_group())
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = k_channels or config.kv_channels  # MLA passes its q/k head dim
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1 / math.sqrt(head_dim)

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        """query [sq, b, nq, d], key/value [sk, b, nkv, d] -> [sq, b, nq * d]."""
        documents = None
        if packed_seq_params is not None:
            if packed_seq_params.qkv_format != "sbhd" or self.cp is not None:
                raise NotImplementedError(
                    "SDPA attention takes packed documents as sbhd batches with cu_seqlens_q "
                    "over the flattened rows (--reset-attention-mask), without context "
                    "parallelism; THD needs TransformerEngine attention")
            documents = Documents(packed_seq_params.cu_seqlens_q)
        if attention_bias is not None:
            raise NotImplementedError("attention_bias is not supported by SDPA core attention")
        mask_type = attn_mask_type or self.attn_mask_type
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, n, s, d]
        # A causal layer's dataloader mask is the plain causal mask (--reset-attention-mask is
        # refused in arguments.py), so SDPA's is_causal path replaces it.
        causal = mask_type == AttnMaskType.causal
        mask = None if causal or attention_mask is None else ~attention_mask  # True = keep
        if documents is not None:  # causal within each document (a dense mask: memory s^2)
            if not causal:
                raise NotImplementedError("packed documents need causal attention")
            mask, causal = documents.causal_mask(q.shape[0]), False
        dropout_p = self.dropout_p if self.training else 0.0
        with tensor_parallel.get_cuda_rng_tracker().fork() if dropout_p else contextlib.nullcontext():
            if self.cp is not None:
                if not causal:
                    raise NotImplementedError("context parallelism needs causal attention "
                                              "masks; use --context-parallel-size 1")
                out = self._context_parallel(q, k, v, dropout_p)
            else:
                out = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal,
                    scale=self.softmax_scale, enable_gqa=k.shape[1] != q.shape[1])
        sq, b = query.shape[:2]
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)


    def _context_parallel(self, q, k, v, dropout_p):
        """q, k, v [b, n, s_local, d], this rank's two pieces -> out [b, n, s_local, d]."""
        def whole(t):  # [b, n, s_local, d] -> [b, n, s, d] in sequence order, from every rank
            chunks = self.cp.gather_chunks(self.cp.fold(t.transpose(1, 2)))
            return torch.cat(chunks, 1).transpose(1, 2)

        if k.shape == v.shape:  # one all-gather for both
            keys, values = whole(torch.cat([k, v], -1)).chunk(2, -1)
        else:
            keys, values = whole(k), whole(v)

        def attend(piece, offset):  # piece [b, s_piece, n, d] at global position offset
            end = offset + piece.shape[1]
            mask = causal_lower_right(piece.shape[1], end)
            return F.scaled_dot_product_attention(
                piece.transpose(1, 2), keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                dropout_p=dropout_p, scale=self.softmax_scale,
                enable_gqa=k.shape[1] != q.shape[1]).transpose(1, 2)

        return self.cp.per_piece(q.transpose(1, 2), attend).transpose(1, 2)
