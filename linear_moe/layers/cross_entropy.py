"""The LM loss without megatron-core's fp32 copies of the logits (--fused-cross-entropy).

megatron-core's vocab-parallel cross entropy upcasts the [tokens, vocab/tp] logits to fp32, keeps
the fp32 softmax for backward and builds an fp32 gradient: 2 GiB + 2 GiB at 16k tokens x 32k
vocab beside the 1 GiB of bf16 logits, and ~10 elementwise passes over them. On CUDA
``fused_vocab_parallel_cross_entropy`` runs fla's fused Triton kernel (one pass forward, one
backward, the gradient written over the logits, vocab-parallel through its process group);
elsewhere, and as its reference, the same math in torch over row chunks
(``chunked_vocab_parallel_cross_entropy``).
"""

import torch
from megatron.core.tensor_parallel.utils import VocabUtility
from megatron.core.utils import get_pg_rank, get_pg_size

# One fp32 chunk of this many bytes is the largest temporary of forward and backward.
_CHUNK_BYTES = 256 * 2**20


def default_chunk_rows(vocab_local: int) -> int:
    """Rows per chunk so that one fp32 chunk [rows, vocab_local] is ~256 MiB (at least 1 row)."""
    return max(1, _CHUNK_BYTES // (4 * max(1, vocab_local)))


class _ChunkedVocabParallelCrossEntropy(torch.autograd.Function):

    @staticmethod
    def forward(ctx, logits, target, tp_group, chunk_rows):
        if not logits.is_floating_point():
            raise TypeError(f"logits must be floating point, got {logits.dtype}")
        if target.shape != logits.shape[:-1]:
            raise ValueError(f"target {tuple(target.shape)} does not match "
                             f"logits {tuple(logits.shape)} without the vocab dim")
        # A non-contiguous input (e.g. a transposed [b, s, V] output) is copied once: chunks must
        # be row views, and the copy is the buffer the gradient is written into.
        if not logits.is_contiguous():
            logits = logits.contiguous()
        vocab_local = logits.shape[-1]
        logits_2d = logits.view(-1, vocab_local)
        target_1d = target.reshape(-1).long()  # gather needs int64 indices
        num_rows = logits_2d.shape[0]
        rows = chunk_rows or default_chunk_rows(vocab_local)

        world = get_pg_size(tp_group) if tp_group is not None else 1
        rank = get_pg_rank(tp_group) if tp_group is not None else 0
        distributed = world > 1
        start, end = VocabUtility.vocab_range_from_per_partition_vocab_size(
            vocab_local, rank, world)
        owned = (target_1d >= start) & (target_1d < end)
        local_target = torch.where(owned, target_1d - start, torch.zeros_like(target_1d))

        # The max is exact in any dtype, so it needs no fp32 upcast and no chunking (output [N]).
        row_max = logits_2d.amax(dim=-1).float()
        if distributed:
            torch.distributed.all_reduce(row_max, op=torch.distributed.ReduceOp.MAX,
                                         group=tp_group)

        # stats[0]: sum(exp(x - max)) over this rank's vocab slice; stats[1]: x[target] - max on
        # the rank owning the target, 0 elsewhere. One SUM all-reduce combines both.
        stats = torch.empty(2, num_rows, dtype=torch.float32, device=logits.device)
        for s in range(0, num_rows, rows):
            e = min(s + rows, num_rows)
            # bf16/fp16 - fp32 promotes to fp32: the one fp32 temporary of this chunk.
            shifted = logits_2d[s:e] - row_max[s:e, None]
            stats[0, s:e] = shifted.exp_().sum(dim=-1)
        target_logit = logits_2d.gather(1, local_target[:, None]).squeeze(1).float()
        stats[1] = torch.where(owned, target_logit - row_max, torch.zeros_like(row_max))
        if distributed:
            torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.SUM, group=tp_group)

        # = log(sum exp(x)) - x[target], in megatron's order of operations
        loss = stats[0].log() - stats[1]

        ctx.chunk_rows = rows
        ctx.vocab_start = start
        # Only the logits themselves (no copy), the targets and [2, N] fp32 are kept. The row max
        # and sum of exps rather than their logsumexp: softmax = exp(x - max) / sum is then
        # megatron's expression, exp(x - lse) differs by up to ~|lse| fp32 ulps.
        ctx.save_for_backward(logits, target, torch.stack([row_max, stats[0]]))
        return loss.view(target.shape)

    @staticmethod
    def backward(ctx, grad_output):
        logits, target, (row_max, sum_exp) = ctx.saved_tensors
        vocab_local = logits.shape[-1]
        logits_2d = logits.view(-1, vocab_local)
        target_1d = target.reshape(-1).long() - ctx.vocab_start
        owned = (target_1d >= 0) & (target_1d < vocab_local)
        local_target = torch.where(owned, target_1d, torch.zeros_like(target_1d))
        owned_f = owned.float()
        grad_rows = grad_output.reshape(-1).float()
        num_rows, rows = logits_2d.shape[0], ctx.chunk_rows

        for s in range(0, num_rows, rows):
            e = min(s + rows, num_rows)
            # softmax in fp32, then minus the one-hot of an owned target.
            grad = (logits_2d[s:e] - row_max[s:e, None]).exp_().div_(sum_exp[s:e, None])
            arange = torch.arange(e - s, device=grad.device)
            grad[arange, local_target[s:e]] -= owned_f[s:e]
            grad.mul_(grad_rows[s:e, None])
            # The output layer's matmul backward does not need its output, so the logits' storage
            # becomes the gradient (rounded to the logits dtype), as fla's FusedCrossEntropyLoss.
            logits_2d[s:e].copy_(grad)
        return logits, None, None, None


def chunked_vocab_parallel_cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    tp_group: torch.distributed.ProcessGroup | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Cross entropy of vocab-parallel logits; megatron's ``vocab_parallel_cross_entropy`` math
    (no label smoothing) without its fp32 copies of the logits.

    Args:
        logits: [s, b, V/tp] (any leading dims) fp32/bf16/fp16; this rank holds the vocab slice
            ``VocabUtility.vocab_range_from_per_partition_vocab_size(V/tp, rank, tp)``.
        target: [s, b] global vocab ids.
        tp_group: the group the vocab is split over. None (or a group of size 1) means the full
            vocab is here and no collective runs -- unlike megatron's function, which then falls
            back to the global tensor-parallel group.
        chunk_rows: rows (tokens) per chunk; default: one fp32 chunk is ~256 MiB.

    Returns:
        loss [s, b] fp32.

    WARNING: backward OVERWRITES ``logits`` in place with their gradient (in the logits dtype)
    and returns that storage as the gradient, so the caller must not read the logits after
    backward (nor backward twice). Anything else that saved the logits for its backward fails
    loudly through autograd's version counter rather than using the overwritten values.
    A non-contiguous ``logits`` is copied once and that copy is overwritten instead.
    """
    return _ChunkedVocabParallelCrossEntropy.apply(logits, target, tp_group, chunk_rows)


def fused_vocab_parallel_cross_entropy(logits, target, tp_group=None):
    """Loss [s, b] fp32 of vocab-parallel logits [s, b, V/tp] and global targets [s, b], as
    megatron-core's vocab_parallel_cross_entropy; backward overwrites the logits with their
    gradient. fla's fused kernel on CUDA, the chunked torch version elsewhere."""
    if tp_group is not None and get_pg_size(tp_group) == 1:
        tp_group = None
    if not logits.is_cuda:
        return chunked_vocab_parallel_cross_entropy(logits, target, tp_group)
    return fla_vocab_parallel_cross_entropy(logits, target, tp_group)


def fla_vocab_parallel_cross_entropy(logits, target, tp_group=None):
    """fla's fused kernel (Triton: CUDA, or the CPU under TRITON_INTERPRET=1 in tests)."""
    from fla.modules.fused_cross_entropy import cross_entropy_loss

    # fla splits the vocab into equal contiguous slices by rank, as megatron-core's
    # VocabUtility does; no target equals its ignore_index (-100).
    loss, _ = cross_entropy_loss(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                 inplace_backward=True, process_group=tp_group)
    return loss.view(target.shape)
