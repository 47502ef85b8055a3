"""chunked_vocab_parallel_cross_entropy gives megatron-core's vocab_parallel_cross_entropy loss and
gradient (TP=1 and TP=2 on gloo) while saving only the logits, which become the gradient."""

import pytest
import torch

from dist_utils import grad_errors, run_distributed
from linear_moe.layers.cross_entropy import (
    chunked_vocab_parallel_cross_entropy,
    default_chunk_rows,
)

SEQ, BATCH, VOCAB = 7, 3, 50


class _SingleRankGroup:
    """megatron's function needs a group object (None means the global TP group)."""

    def rank(self):
        return 0

    def size(self):
        return 1


@pytest.fixture
def megatron_ce(monkeypatch):
    """megatron's vocab_parallel_cross_entropy in one process without torch.distributed: with
    one rank its all-reduces are identities."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *args, **kwargs: None)

    def run(logits, target):
        return vocab_parallel_cross_entropy(logits, target, tp_group=_SingleRankGroup())

    return run


def _inputs(dtype, seed=0, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    # Spread logits (scale 4) so the softmax is far from uniform.
    logits = (4 * torch.randn(SEQ, BATCH, vocab, generator=g)).to(dtype)
    target = torch.randint(0, vocab, (SEQ, BATCH), generator=g)
    grad_out = torch.rand(SEQ, BATCH, generator=g) + 0.5
    return logits, target, grad_out


def _loss_and_grad(fn, logits, target, grad_out):
    # A fresh leaf each time: megatron overwrites fp32 logits in forward, ours in backward.
    x = logits.clone().requires_grad_()
    loss = fn(x, target)
    loss.backward(grad_out)
    return loss.detach(), x.grad


@pytest.mark.parametrize("chunk_rows", [1, 4, None])
def test_fp32_matches_megatron(megatron_ce, chunk_rows):
    logits, target, grad_out = _inputs(torch.float32)
    ref_loss, ref_grad = _loss_and_grad(megatron_ce, logits, target, grad_out)
    loss, grad = _loss_and_grad(
        lambda x, t: chunked_vocab_parallel_cross_entropy(x, t, chunk_rows=chunk_rows),
        logits, target, grad_out)
    assert loss.dtype == torch.float32 and loss.shape == (SEQ, BATCH)
    assert grad.dtype == torch.float32
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-6)
    # and F.cross_entropy, as an independent reference
    x = logits.clone().requires_grad_()
    torch.nn.functional.cross_entropy(x.view(-1, VOCAB), target.view(-1), reduction="none") \
        .view(SEQ, BATCH).backward(grad_out)
    torch.testing.assert_close(grad, x.grad, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("chunk_rows", [4, None])
def test_half_matches_megatron(megatron_ce, dtype, chunk_rows):
    logits, target, grad_out = _inputs(dtype)
    ref_loss, ref_grad = _loss_and_grad(megatron_ce, logits, target, grad_out)
    loss, grad = _loss_and_grad(
        lambda x, t: chunked_vocab_parallel_cross_entropy(x, t, chunk_rows=chunk_rows),
        logits, target, grad_out)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # Both compute in fp32 from the same half-precision logits.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=0)
    # The same fp32 grad, rounded to the logits dtype (by autograd in megatron, copy_ here): equal
    # on this CPU; one rounding step allowed should exp's vector/tail split differ elsewhere.
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(grad.float(), ref_grad.float(), rtol=ulp, atol=1e-5)


def test_non_contiguous_logits():
    logits, target, grad_out = _inputs(torch.float32)
    ref_loss, ref_grad = _loss_and_grad(chunked_vocab_parallel_cross_entropy,
                                        logits, target, grad_out)
    # The same values as a transposed [b, s, V] buffer.
    base = logits.transpose(0, 1).contiguous().requires_grad_()
    x = base.transpose(0, 1)
    assert not x.is_contiguous()
    loss = chunked_vocab_parallel_cross_entropy(x, target, chunk_rows=5)
    loss.backward(grad_out)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    torch.testing.assert_close(base.grad.transpose(0, 1), ref_grad, rtol=0, atol=0)
    # the caller's buffer is left alone: the copy is what was overwritten
    torch.testing.assert_close(base.detach(), logits.transpose(0, 1), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_saves_only_logits_and_grad_reuses_them(dtype):
    logits, target, grad_out = _inputs(dtype)
    x = logits.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype, t.data_ptr()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = chunked_vocab_parallel_cross_entropy(x, target, chunk_rows=4)
    big = [s for s in saved if s[0] and torch.Size(s[0]).numel() >= SEQ * BATCH * VOCAB]
    assert big == [(tuple(x.shape), dtype, x.data_ptr())], saved
    # besides the logits: the targets and the fp32 row max and sum of exps
    assert sum(torch.Size(s[0]).numel() for s in saved) == x.numel() + 3 * SEQ * BATCH

    (grad,) = torch.autograd.grad(loss, x, grad_out)
    assert grad.data_ptr() == x.data_ptr() and grad.dtype == dtype
    # the logits now hold the gradient
    assert torch.equal(x.detach(), grad)


def test_int32_target():
    logits, target, grad_out = _inputs(torch.float32)
    ref = _loss_and_grad(chunked_vocab_parallel_cross_entropy, logits, target, grad_out)
    out = _loss_and_grad(chunked_vocab_parallel_cross_entropy, logits, target.int(), grad_out)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_second_backward_fails_loudly():
    logits, target, grad_out = _inputs(torch.float32)
    x = logits.clone().requires_grad_()
    loss = chunked_vocab_parallel_cross_entropy(x, target)
    loss.backward(grad_out, retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward(grad_out)


def test_default_chunk_rows():
    assert default_chunk_rows(32768) == 2048  # 2048 x 32768 x 4 B = 256 MiB
    assert default_chunk_rows(2**40) == 1


def _tp_worker(rank, world_size):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    group = torch.distributed.new_group(list(range(world_size)))
    logits, target, grad_out = _inputs(torch.float32, seed=1, vocab=2 * 25)
    # Targets on both ranks' halves.
    assert (target < 25).any() and (target >= 25).any()
    full_loss, full_grad = _loss_and_grad(
        lambda x, t: chunked_vocab_parallel_cross_entropy(x, t, chunk_rows=4),
        logits, target, grad_out)
    local = logits.chunk(world_size, dim=-1)[rank]
    out = {"full": (full_loss, full_grad)}
    out["chunked"] = _loss_and_grad(
        lambda x, t: chunked_vocab_parallel_cross_entropy(x, t, group, chunk_rows=4),
        local, target, grad_out)
    out["megatron"] = _loss_and_grad(
        lambda x, t: vocab_parallel_cross_entropy(x, t, tp_group=group), local, target, grad_out)
    return out


@pytest.mark.slow
def test_chunked_cross_entropy_tp2_matches_tp1():
    results = run_distributed(_tp_worker, 2)
    full_loss, full_grad = results[0]["full"]
    for name in ("chunked", "megatron"):
        for rank_out in results:
            torch.testing.assert_close(rank_out[name][0], full_loss, rtol=1e-6, atol=1e-6)
        grad = torch.cat([rank_out[name][1] for rank_out in results], dim=-1)
        torch.testing.assert_close(grad, full_grad, rtol=1e-6, atol=1e-6)


def _model_loss_worker(rank, world_size):
    """Loss and gradients of a whole model (GPTModel's own loss path, TP=world_size) with
    --fused-cross-entropy against megatron-core's loss."""
    from megatron.core import parallel_state as mpu

    from test_mlp_act_recompute import BATCH, SEQ, VOCAB, _build

    # parallel_output: the loss sees vocab-parallel logits, as in training
    models = [_build(world_size, False, parallel_output=True, fused_cross_entropy=chunked)
              for chunked in (False, True)]
    models[1].load_state_dict(models[0].state_dict())
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    labels = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g)
    weights = torch.rand(BATCH, SEQ, generator=g)  # a non-uniform loss mask
    from linear_moe.layers import cross_entropy

    calls = []
    function = cross_entropy._ChunkedVocabParallelCrossEntropy
    chunked = function.apply
    function.apply = lambda *a: calls.append(1) or chunked(*a)
    losses = []
    try:
        for model in models:
            loss = model(tokens, torch.arange(SEQ).expand(BATCH, SEQ), None, labels=labels)
            assert loss.shape == (BATCH, SEQ)
            (loss * weights).sum().backward()
            losses.append(loss.detach())
    finally:
        function.apply = chunked
    assert len(calls) == 1  # the flagged model's loss, not megatron-core's
    errors = {"loss": (losses[1] - losses[0]).abs().max().item(),
              **grad_errors(models[1], models[0])}
    mpu.destroy_model_parallel()
    return errors


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1", "tp2"])
def test_model_loss_with_fused_cross_entropy_equals_megatrons(tp):
    for errors in run_distributed(_model_loss_worker, tp):
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-5, (worst, errors[worst])


def test_fused_cross_entropy_refuses_megatrons_fused_loss():
    from arg_utils import parsed_args
    from linear_moe.arguments import validate_args

    validate_args(parsed_args(["--fused-cross-entropy"]))
    with pytest.raises(ValueError, match="drop --cross-entropy-loss-fusion"):
        validate_args(parsed_args(["--fused-cross-entropy"], cross_entropy_loss_fusion=True))


_INTERPRETED = """
import torch
from linear_moe.layers.cross_entropy import (chunked_vocab_parallel_cross_entropy,
                                             fla_vocab_parallel_cross_entropy)
torch.manual_seed(0)
logits = (3 * torch.randn(8, 2, 1000)).bfloat16()
target = torch.randint(0, 1000, (8, 2))
grad_out = torch.rand(8, 2)
out = []
for fn in (fla_vocab_parallel_cross_entropy, chunked_vocab_parallel_cross_entropy):
    x = logits.clone().requires_grad_()
    loss = fn(x, target)
    loss.backward(grad_out)
    out.append((loss.detach(), x.grad.float()))
(loss, grad), (ref_loss, ref_grad) = out
assert loss.shape == (8, 2) and loss.dtype == torch.float32
assert (loss - ref_loss).abs().max() <= 1e-6 * ref_loss.abs().max(), (loss, ref_loss)
# both are bf16 roundings of the same fp32 gradient: at most one bf16 ulp apart
ulp = ref_grad.abs().clamp_min(1e-30) * 2.0 ** -7
assert ((grad - ref_grad).abs() <= ulp).all(), (grad - ref_grad).abs().max()
print("ok")
"""


def test_fla_fused_kernel_equals_the_chunked_version_in_triton_interpreter():
    """The CUDA path's call into fla's fused kernel (argument order, vocab-slice convention,
    in-place gradient, output shape), run on the CPU through Triton's interpreter."""
    from interpreter_utils import run_in_triton_interpreter

    run_in_triton_interpreter(_INTERPRETED, timeout=300)
