"""The norms' CPU-checkable parts: the RMSNorm gradient formulas that the CUDA path compiles
(the weight's reduction; x's gradient with the residual branch's added, ResidualRMSNorm) and the
(output, residual) pair megatron-core's layer takes. The CUDA kernels against torch's autograd:
tests/gpu/test_fused_norms_gpu.py."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from linear_moe.layers.norm import (
    AfterMixerResidualRMSNorm,
    MixerInputResidualRMSNorm,
    MixerInputRMSNorm,
    ResidualRMSNorm,
    RMSNorm,
    _rms_norm_input_grad,
    _rms_norm_weight_grad,
    rms_norm,
    rms_norm_with_residual,
)


@pytest.mark.parametrize("shape", [(7, 3, 16), (2, 5, 4, 8)])
def test_rms_norm_weight_grad_equals_autograd(shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    w = (torch.rand(shape[-1], dtype=torch.float64) + 0.5).requires_grad_()
    dy = torch.randn_like(x)
    F.rms_norm(x, (shape[-1],), w, 1e-6).backward(dy)
    rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)  # what _fused_rms_norm returns
    got = _rms_norm_weight_grad(dy, x, rstd)
    assert got.dtype == torch.float64 and torch.allclose(got, w.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", [(7, 3, 16), (2, 5, 4, 8)])
def test_rms_norm_input_grad_equals_autograd(shape):
    """x's gradient formula of the residual-carrying norm, with and without the residual's."""
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    w = torch.rand(shape[-1], dtype=torch.float64) + 0.5
    dy, dres = torch.randn_like(x), torch.randn_like(x)
    (F.rms_norm(x, (shape[-1],), w, 1e-6) * dy + x * dres).sum().backward()
    rstd = torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + 1e-6)
    got = _rms_norm_input_grad(dy, x.detach(), w, rstd, dres)
    assert torch.allclose(got, x.grad, rtol=1e-12, atol=1e-12)
    alone = _rms_norm_input_grad(dy, x.detach(), w, rstd, None)
    assert torch.allclose(alone, x.grad - dres, rtol=1e-12, atol=1e-12)


def test_norm_with_residual_gradcheck():
    """(y, x) with both outputs used, one used, and in a chain of two (a layer's two norms)."""
    torch.manual_seed(0)
    x = torch.randn(3, 2, 8, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()

    def both(x, w):
        y, r = rms_norm_with_residual(x, w, 1e-6)
        return y * 2 + r.sin()

    def chained(x, w):  # residual + f(norm(x)), normed again: the TransformerLayer's pattern
        y, r = rms_norm_with_residual(x, w, 1e-6)
        h = r + y.tanh()
        y2, r2 = rms_norm_with_residual(h, w, 1e-6)
        return r2 + y2.exp()

    torch.autograd.gradcheck(both, (x, w))
    torch.autograd.gradcheck(chained, (x, w))
    torch.autograd.gradcheck(lambda x, w: rms_norm_with_residual(x, w, 1e-6)[0], (x, w))
    torch.autograd.gradcheck(lambda x, w: rms_norm_with_residual(x, w, 1e-6)[1] * 3, (x, w))


def test_residual_norm_returns_x_itself_and_plain_under_norm_recompute():
    from types import SimpleNamespace

    from model_utils import tiny_config
    from linear_moe.model_provider import layer_specs

    cfg = SimpleNamespace(params_dtype=torch.float32, sequence_parallel=False)
    norm = ResidualRMSNorm(cfg, 8)
    x = torch.randn(4, 2, 8)
    y, residual = norm(x)
    assert residual.data_ptr() == x.data_ptr()
    assert torch.allclose(y, F.rms_norm(x, (8,), norm.weight, 1e-5), atol=1e-6)
    # megatron-core's layer-norm recompute frees the norm's outputs: x must not be one of them
    def norms(config):
        return [(spec.submodules.input_layernorm, spec.submodules.pre_mlp_layernorm)
                for spec in layer_specs(config, "llama3")]

    assert norms(tiny_config()) == [(MixerInputResidualRMSNorm, AfterMixerResidualRMSNorm),
                                    (ResidualRMSNorm, ResidualRMSNorm)]  # pattern "LN"
    recomputing = tiny_config(recompute_granularity="selective", recompute_modules=["layernorm"])
    assert norms(recomputing) == [(MixerInputRMSNorm, RMSNorm), (RMSNorm, RMSNorm)]
    # under sequence parallelism the mixer gathers its input into a new [s, b, h] tensor and
    # its output projection's reduce-scatter gathers its gradient
    assert norms(tiny_config(tensor_model_parallel_size=2)) == [(ResidualRMSNorm,) * 2] * 2


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_batch_first_norm_is_the_norm_stored_batch_first(residual):
    """The linear mixers' input norm: F.rms_norm's values, stored as the transposed view of a
    contiguous [b, s, h] tensor; its gradients (incl. the residual branch's) by gradcheck, and
    x's gradient in x's layout when the output's arrives batch-first, as the mixer gives it."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
    norm = rms_norm_with_residual if residual else rms_norm
    out = norm(x, w, 1e-6, batch_first=True)
    y = out[0] if residual else out
    assert y.shape == x.shape and y.transpose(0, 1).is_contiguous() and not y.is_contiguous()
    assert torch.allclose(y, F.rms_norm(x, (8,), w, 1e-6), rtol=1e-12, atol=1e-12)
    if residual:
        assert out[1].data_ptr() == x.data_ptr()
    torch.autograd.gradcheck(lambda x, w: norm(x, w, 1e-6, batch_first=True), (x, w))
    dy = torch.randn(3, 5, 8, dtype=torch.float64).transpose(0, 1)  # batch-first, as the mixer's
    y.backward(dy)
    expected_x, expected_w = torch.autograd.grad(F.rms_norm(x, (8,), w, 1e-6), (x, w),
                                                 dy.contiguous())
    assert x.grad.is_contiguous()
    assert torch.allclose(x.grad, expected_x, rtol=1e-12, atol=1e-12)
    assert torch.allclose(w.grad, expected_w, rtol=1e-12, atol=1e-12)


def test_after_mixer_norm_stores_its_input_gradient_batch_first():
    """The pre-MLP norm of a linear mixer's layer: the values and gradients of the residual
    norm, x's gradient stored as the transposed view of a contiguous [b, s, h] tensor."""
    torch.manual_seed(0)
    x = torch.randn(5, 3, 8, dtype=torch.float64, requires_grad=True)
    w = (torch.rand(8, dtype=torch.float64) + 0.5).requires_grad_()
    torch.autograd.gradcheck(
        lambda x, w: rms_norm_with_residual(x, w, 1e-6, batch_first_grad=True), (x, w))
    dy, dres = torch.randn_like(x), torch.randn_like(x)
    grads = []
    for batch_first_grad in (True, False):
        y, r = rms_norm_with_residual(x, w, 1e-6, batch_first_grad=batch_first_grad)
        assert y.is_contiguous()
        grads.append(torch.autograd.grad([y, r], [x, w], [dy, dres]))
    (gx, gw), (gx_ref, gw_ref) = grads
    assert gx.transpose(0, 1).is_contiguous() and not gx.is_contiguous()
    assert torch.allclose(gx, gx_ref, rtol=1e-12, atol=1e-12)
    assert torch.allclose(gw, gw_ref, rtol=1e-12, atol=1e-12)


def _batch_first_worker(rank, world_size, mixers):
    """Per mixer: the [b, s] / [s, b] copies of a 2-layer 'LL' model's step with the mixer
    input norm seq-first and batch-first, and the batch-first model's errors against the other."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    from dist_utils import grad_errors
    from linear_moe.layers import layout
    from model_utils import tiny_config, tiny_model

    seq, batch, vocab = 16, 2, 128
    copies = []
    real_swap_copy = layout._swap_copy

    def counted(t):
        copies[-1] += 1
        return real_swap_copy(t)

    layout._swap_copy = counted
    results = {}
    for mixer in mixers:
        runs = []
        for batch_first in (False, True):
            MixerInputResidualRMSNorm.batch_first_out = batch_first
            AfterMixerResidualRMSNorm.batch_first_grad = batch_first
            mpu.destroy_model_parallel()
            mpu.initialize_model_parallel(tensor_model_parallel_size=1)
            tensor_parallel.model_parallel_cuda_manual_seed(123)
            torch.manual_seed(123)
            model = tiny_model(tiny_config(la_module=mixer, layer_type_list="LL"), "llama3",
                               vocab, seq)
            if runs:
                model.load_state_dict(runs[0][0].state_dict())
            g = torch.Generator().manual_seed(7)
            tokens = torch.randint(0, vocab, (batch, seq), generator=g)
            labels = torch.randint(0, vocab, (batch, seq), generator=g)
            copies.append(0)
            logits = model(tokens, torch.arange(seq).expand(batch, seq), None)
            loss = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1))
            loss.backward()
            runs.append((model, loss.item()))
        (seq_first, loss_sf), (batch_first, loss_bf) = runs
        results[mixer] = (copies[-2:], {"loss": abs(loss_sf - loss_bf),
                                        **grad_errors(batch_first, seq_first)})
    mpu.destroy_model_parallel()
    return results


def test_batch_first_mixer_input_norm_removes_the_mixers_copies():
    """A model whose mixer layers' input norm stores its output batch-first equals the same
    model with the seq-first norm (loss and every gradient), and its linear mixers copy x in
    neither order: the seq-first input cost a strided-input mixer (gla, gated_deltanet) x's
    copy into [b, s] order for its weight gradients, and the others (rwkv6, mom_gla) a [b, s, h]
    copy each way; with the pre-MLP norm's input gradient stored batch-first, the output
    projection's weight gradient needs no copy either."""
    from dist_utils import run_distributed

    mixers = ["gla", "gated_deltanet", "rwkv6", "mom_gla"]
    (results,) = run_distributed(_batch_first_worker, 1, mixers)
    for mixer in mixers:
        copies, errors = results[mixer]
        # seq-first: o_proj's weight gradient copies (rows of o and of its output gradient in
        # two orders) and x's (strided mixers: for their weight gradients; the others a copy
        # each way), a layer each. Batch-first: none.
        expected = 2 * (2 if mixer in ("gla", "gated_deltanet") else 3)
        assert copies == [expected, 0], (mixer, copies)
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-6, (mixer, worst, errors[worst])


def _fused_residual_worker(rank, world_size, base_model, recompute_norms=False):
    """The same model with --fused-residual-rmsnorm and without: equal loss and gradients
    (under megatron-core's layer-norm recompute the norms return a plain tensor)."""
    from megatron.core import parallel_state as mpu
    from megatron.core import tensor_parallel

    from dist_utils import grad_errors
    from model_utils import tiny_config, tiny_model

    seq, batch, vocab = 16, 2, 128
    models = []
    for fused in (False, True):
        mpu.destroy_model_parallel()
        mpu.initialize_model_parallel(tensor_model_parallel_size=world_size)
        tensor_parallel.model_parallel_cuda_manual_seed(123)
        torch.manual_seed(123)
        extra = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32,
                     moe_token_dispatcher_type="alltoall") if base_model == "qwen2_moe" else {}
        if recompute_norms:
            extra.update(recompute_granularity="selective", recompute_modules=["layernorm"])
        config = tiny_config(tensor_model_parallel_size=world_size, fused_residual_rmsnorm=fused,
                             **extra)
        models.append(tiny_model(config, base_model, vocab, seq))
    plain, fused = models
    # 2 per layer; none where megatron-core recomputes the norms
    assert sum(isinstance(m, ResidualRMSNorm) for m in fused.modules()) == (
        0 if recompute_norms else 4)
    assert not any(isinstance(m, ResidualRMSNorm) for m in plain.modules())
    fused.load_state_dict(plain.state_dict())
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    losses = []
    for model in (plain, fused):
        logits = model(tokens, torch.arange(seq).expand(batch, seq), None)
        loss = F.cross_entropy(logits.float().reshape(-1, vocab), labels.reshape(-1))
        loss.backward()
        losses.append(loss.item())
    errors = {"loss": abs(losses[0] - losses[1]), **grad_errors(fused, plain)}
    mpu.destroy_model_parallel()
    return errors


@pytest.mark.parametrize("base_model,tp,recompute_norms",
                         [("llama3", 1, False), ("llama3", 2, False), ("qwen2_moe", 2, False),
                          pytest.param("llama3", 1, True, marks=pytest.mark.skipif(
                              importlib.util.find_spec("transformer_engine") is None,
                              reason="megatron-core's layer-norm recompute needs TE"))],
                         ids=["llama3-tp1", "llama3-tp2-sp", "qwen2_moe-tp2-sp",
                              "llama3-tp1-norm-recompute"])
def test_fused_residual_rmsnorm_model_equals_plain(base_model, tp, recompute_norms):
    from dist_utils import run_distributed

    for errors in run_distributed(_fused_residual_worker, tp, base_model, recompute_norms):
        worst = max(errors, key=errors.get)
        assert errors[worst] < 1e-6, (worst, errors[worst])


@pytest.mark.parametrize("extra,expected", [([], True), (["--no-fused-residual-rmsnorm"], False),
                                            (["--fused-residual-rmsnorm"], True)])
def test_fused_residual_rmsnorm_flag(extra, expected, monkeypatch):
    """On by default here (megatron-core's own flag, off there: it needs TransformerEngine)."""
    import megatron_patch  # noqa: F401  (typing.override for megatron.training on 3.11)
    from megatron.training.arguments import parse_args

    from linear_moe.arguments import add_args

    monkeypatch.setattr("sys.argv", ["pretrain"] + extra)
    assert parse_args(extra_args_provider=add_args).fused_residual_rmsnorm is expected


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                    reason="with TE megatron-core's layer-norm recompute runs")
def test_layer_norm_recompute_without_transformer_engine_is_refused():
    from arg_utils import parsed_args
    from linear_moe.arguments import validate_args

    with pytest.raises(ValueError, match="drop layernorm"):
        validate_args(parsed_args(recompute_granularity="selective",
                                  recompute_modules=["layernorm"]))
    validate_args(parsed_args(recompute_granularity="selective", recompute_modules=["mlp"]))
