"""The norms' CPU-checkable parts: the RMSNorm gradient formulas that the CUDA path compiles
(the weight's reduction; x's gradient with the residual branch's added, ResidualRMSNorm) and the
(output, residual) pair megatron-core's layer takes. The CUDA kernels against torch's autograd:
tests/gpu/test_fused_norms_gpu.py."""

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from linear_moe.layers.norm import (
    ResidualRMSNorm,
    _rms_norm_input_grad,
    _rms_norm_weight_grad,
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
    norms = {spec.submodules.input_layernorm for spec in layer_specs(tiny_config(), "llama3")}
    assert norms == {ResidualRMSNorm}
    recomputing = tiny_config(recompute_granularity="selective", recompute_modules=["layernorm"])
    norms = {spec.submodules.input_layernorm for spec in layer_specs(recomputing, "llama3")}
    assert ResidualRMSNorm not in norms


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
